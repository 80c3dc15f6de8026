#!/usr/bin/env python
"""The CamVid study (docs/results.md), arm by arm: train, evaluate, record, commit.

    PYTHONPATH=src python scripts/camvid_study.py                 # every arm, in order
    PYTHONPATH=src python scripts/camvid_study.py --only host_s0,hmsa
    PYTHONPATH=src python scripts/camvid_study.py --list          # arms and whether their results exist
    PYTHONPATH=src python scripts/camvid_study.py --tables        # only rewrite the tables in docs/results.md

Each arm trains into ``<runs>/<arm>`` (default ``runs/study``, gitignored) with ``nice -n 10`` and
``OMP_WAIT_POLICY=PASSIVE`` (busy-waiting OpenMP threads are many times slower on a shared CPU);
an interrupted arm continues with ``--resume auto``. After training, the arm's evaluations run
(validation split at the label resolution; the train split evaluated the same way, for the val/train
gap: 101 evenly spaced train images, as many as val holds; method-specific inference variants), and ``docs/results/camvid/<arm>.json`` is written with
the scores, parameters, GFLOPs, seconds per epoch with the load average, wall time, the exact
commands and the commit. An arm whose JSON exists is skipped. With ``--commit`` each result (and
the regenerated tables) is committed as soon as the arm finishes, so nothing is lost.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs/results/camvid"
DOC = REPO / "docs/results.md"
THIN = ("pole", "signsymbol", "pedestrian", "bicyclist")
TRAIN_SUBSET = 101  # train images scored for the val/train gap (evenly spaced, as many as val has)

STRONG = "configs/camvid/deeplabv3plus_r18_strong_cpu.yaml"
STRONG_HR = "configs/camvid/deeplabv3plus_r18_strong_cpu_hr.yaml"
STRONG_FR = "configs/camvid/deeplabv3plus_r18_strong_cpu_fr.yaml"
HOUR = "configs/camvid/deeplabv3plus_r18_os32_weighted_cpu.yaml"
HOUR_HR = "configs/camvid/deeplabv3plus_r18_os32_weighted_cpu_hr.yaml"
HOST = "configs/camvid/deeplabv3plus_r18_study_host.yaml"
ESP = "configs/camvid/espnetv2_city_finetune.yaml"
ESP_DSRL = "configs/camvid/espnetv2_city_dsrl.yaml"
ALL = "configs/camvid/deeplabv3plus_r18_all_cpu.yaml"
STAGED = "configs/camvid/mobilenetv2_deeplabv3plus_hmsa_staged_cpu.yaml"

# The host sees 176×240 crops of images ×0.4–0.75 and is scored on the image ×0.5 with its logits
# bilinearly upsampled to 360×480: exactly the DSRL baseline. DSRL takes 352×480 high-resolution crops
# of images ×0.8–1.5 (labels at that size), the network sees them ×0.5 (the host's input) and outputs
# 352×480; at evaluation it sees the image ×0.5 and outputs 360×480.
DSRL = ["model.dsrl.enabled=true", "model.dsrl.lr_scale=0.5", "data.crop_size=[352,480]",
        "data.scale_range=[0.8,1.5]", "eval.infer_scale=null"]
HIER = ["--scales", "0.5,1.0,2.0"]
# HMSA trained on (0.5, 1.0); "val" of its arm is single-scale (eval.scales=[1.0]), the variants chain
# or pool (0.5, 1, 2)
HMSA = ["model.hmsa.mode=hierarchical", "model.hmsa.train_scales=[0.5,1.0]", "model.hmsa.attn_channels=64"]


@dataclass
class Arm:
    name: str
    table: str
    label: str
    config: str
    overrides: list[str] = field(default_factory=list)
    # extra evaluations on val: label → (overrides, CLI flags)
    variants: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)
    needs: str | None = None  # a file that must exist (e.g. a config another branch adds)


ARMS: list[Arm] = [
    Arm("strong", "strong", "phase 1: 80 epochs at ×0.5, bf16", STRONG),
    Arm("strong_hr", "strong", "phase 2: + 8 epochs at ×0.75, bf16", STRONG_HR,
        ["train.init_weights={runs}/strong/model.safetensors"],
        variants={"flip": ([], ["--flip"]), "x1.0": (["eval.infer_scale=1.0"], [])}, needs="{runs}/strong/model.safetensors"),
    Arm("strong_fr", "strong", "phase 3: + 14 epochs at ×1.0, bf16", STRONG_FR,
        ["train.init_weights={runs}/strong_hr/model.safetensors"],
        variants={"flip": ([], ["--flip"])}, needs="{runs}/strong_hr/model.safetensors"),
    # ---- the hour recipe for a CPU without AMX: OS32 + ENet class weights, the same two phases
    Arm("hour", "strong", "OS32 + ENet weights, phase 1: 80 epochs at ×0.5, bf16", HOUR),
    Arm("hour_hr", "strong", "OS32 + ENet weights, phase 2: + 8 epochs at ×0.75, bf16", HOUR_HR,
        ["train.init_weights={runs}/hour/model.safetensors"],
        variants={"flip": ([], ["--flip"]), "x1.0": (["eval.infer_scale=1.0"], [])}, needs="{runs}/hour/model.safetensors"),
    # the same without the class weights: what OS32 alone costs, what the weights add. In float32:
    # they were run on an AVX2 CPU (no native bf16), where oneDNN's emulated bf16 step takes 17 s
    # against 1.65 s in float32; bf16 and float32 scored alike where both were run (38.8 vs 39.4 at
    # epoch 20 of phase 1).
    Arm("hour_nw", "strong", "OS32, no class weights, phase 1: 80 epochs at ×0.5, fp32", HOUR,
        ["loss.class_weights=null", "train.precision=32"]),
    Arm("hour_nw_hr", "strong", "OS32, no class weights, phase 2: + 8 epochs at ×0.75, fp32", HOUR_HR,
        ["loss.class_weights=null", "train.precision=32", "train.init_weights={runs}/hour_nw/model.safetensors"],
        variants={"flip": ([], ["--flip"])}, needs="{runs}/hour_nw/model.safetensors"),
    # ---- methods against their host, DeepLabV3+ R-18 from scratch, one common schedule
    Arm("host_s0", "methods", "host, seed 0 (= 180×240 input, logits ×2 bilinear)", HOST,
        variants={"avg_0.5_1_2": ([], HIER)}),
    Arm("host_s1", "methods", "host, seed 1", HOST, ["seed=1"]),
    Arm("hmsa", "methods", "HMSA trained on (0.5, 1.0)", HOST, [*HMSA, "eval.scales=[1.0]"],
        variants={"avg_0.5_1_2": (["eval.scale_mode=avg"], HIER), "hier_0.5_1_2": ([], HIER)}),
    Arm("mcibi", "methods", "MCIBI (memory 128-d)", HOST, ["model.mcibi.enabled=true", "model.mcibi.channels=128"]),
    Arm("wide", "methods", "host widened to MCIBI's params/FLOPs", HOST, ["model.head_channels=176"]),
    Arm("dsrl", "methods", "DSRL (SSSR+SISR+FA) 180×240 → 360×480", HOST, DSRL),
    Arm("all", "methods", "HMSA ∘ DSRL ∘ MCIBI composed", HOST,
        [*HMSA, "eval.scales=[1.0]", "model.mcibi.enabled=true", "model.mcibi.channels=128", *DSRL],
        variants={"hier_0.5_1_2": ([], HIER)}, needs=ALL),  # ALL appears on main with the composition contract
    # ---- ESPNetv2 from the official Cityscapes checkpoint
    Arm("esp_full", "espnetv2", "ESPNetv2 fine-tuned, 360×480 input", ESP),
    Arm("esp_bilinear", "espnetv2", "180×240 → 360×480, bilinear", ESP_DSRL,
        ["model.dsrl.upsample=bilinear", "model.dsrl.sisr=false"]),
    Arm("esp_sssr", "espnetv2", "180×240 → 360×480, SSSR", ESP_DSRL, ["model.dsrl.sisr=false"]),
    Arm("esp_dsrl", "espnetv2", "180×240 → 360×480, SSSR+SISR+FA", ESP_DSRL),
    # ---- staged HMSA training (single-GPU recipe) against end-to-end at the same 12 epochs
    # "val" is the recipe's own evaluation: hierarchical over (0.5, 1.0), the pair it trains on
    Arm("staged", "staged", "MobileNetV2 HMSA, 3 stages (trunk 6, attention 3, finetune 3)", STAGED,
        variants={"single": (["eval.scales=[1.0]"], []), "hier_0.5_1_2": ([], HIER)}),
    Arm("staged_e2e", "staged", "MobileNetV2 HMSA, end-to-end 12 epochs", STAGED, ["stages=[]", "train.epochs=12"],
        variants={"single": (["eval.scales=[1.0]"], []), "hier_0.5_1_2": ([], HIER)}),
]


def run(cmd: list[str], log: Path | None = None, nice: bool = True) -> None:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1")
    full = (["nice", "-n", "10"] if nice else []) + cmd
    print("+", " ".join(cmd), flush=True)
    if log is None:
        subprocess.run(full, check=True, env=env, cwd=REPO)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        subprocess.run(full, check=True, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)


def commit_id() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "src", "configs"],
                           capture_output=True, text=True, cwd=REPO).stdout.strip()
    return head + ("+dirty" if dirty else "")


def epoch_times(run_dir: Path) -> tuple[list[float], list[float], list[float]]:
    """(train s/epoch, val s, load1) over every logged epoch of the run (all resumed versions)."""
    train, val, load = [], [], []
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(path) as fh:
            for row in csv.DictReader(fh):
                if row.get("time/train_epoch_s"):
                    train.append(float(row["time/train_epoch_s"]))
                if row.get("time/load1"):
                    load.append(float(row["time/load1"]))
                if row.get("time/val_s"):
                    val.append(float(row["time/val_s"]))
    return train, val, load


def stage_seconds(run_dir: Path) -> dict[str, float] | None:
    """Training seconds per stage of a staged run (from the epochs' ``time/train_epoch_s``)."""
    from scaleseg.config import load_config
    from scaleseg.engine.stages import stage_at_epoch

    config = run_dir / "config.yaml"
    stages = load_config(config).stages if config.exists() else None
    if not stages:
        return None
    seconds = {st.name: 0.0 for st in stages}
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(path) as fh:
            for row in csv.DictReader(fh):
                if row.get("time/train_epoch_s"):
                    seconds[stages[stage_at_epoch(stages, int(row["epoch"]))].name] += float(row["time/train_epoch_s"])
    return seconds


def evaluate(arm: Arm, run_dir: Path, label: str, overrides: list[str], flags: list[str]) -> dict:
    out = run_dir / f"eval_{label}"
    if not (out / "metrics.json").exists():
        cmd = [sys.executable, "-m", "scaleseg.cli", "eval", arm.config, *arm.overrides, f"output_dir={run_dir}",
               *overrides, "--checkpoint", str(run_dir / "model.safetensors"), "--out", str(out), "--quiet", *flags]
        run(cmd, run_dir / "eval.log")
    result = json.loads((out / "metrics.json").read_text())
    cmd_text = " ".join(["scaleseg eval", arm.config, *arm.overrides, *overrides,
                         f"--checkpoint {run_dir}/model.safetensors", *flags])
    return {"mIoU": result["mIoU"], "per_class": result["per_class"], "gflops": result.get("gflops"),
            "params_m": result.get("params_m"), "input_size": result.get("input_size"), "command": cmd_text,
            # K×K pixel counts (rows = label, columns = prediction): what a class loses, and to which
            "confusion_matrix": result.get("confusion_matrix")}


def run_arm(arm: Arm, runs: Path, commit: bool) -> None:
    target = RESULTS / f"{arm.name}.json"
    if target.exists():
        print(f"[{arm.name}] done ({target}), skipped")
        return
    arm.overrides = [o.replace("{runs}", str(runs)) for o in arm.overrides]
    if arm.needs:
        arm.needs = arm.needs.replace("{runs}", str(runs))
    if arm.needs and not (REPO / arm.needs).exists():
        print(f"[{arm.name}] needs {arm.needs}, which does not exist yet; skipped")
        return
    run_dir = runs / arm.name
    train_cmd = [sys.executable, "-m", "scaleseg.cli", "train", arm.config, *arm.overrides, f"output_dir={run_dir}", "--quiet"]
    wall_file = run_dir / "wall_times.jsonl"
    if not (run_dir / "model.safetensors").exists():
        resume = ["--resume", "auto"] if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").glob("last*.ckpt")) else []
        start, load0, code = time.time(), os.getloadavg()[0], commit_id()  # the commit whose code trains
        run(train_cmd + resume, run_dir / "train.log")
        wall_file.parent.mkdir(parents=True, exist_ok=True)
        with open(wall_file, "a") as fh:
            fh.write(json.dumps({"start": start, "seconds": time.time() - start, "resumed": bool(resume),
                                 "load_start": load0, "load_end": os.getloadavg()[0], "commit": code}) + "\n")
    segments = [json.loads(line) for line in wall_file.read_text().splitlines()] if wall_file.exists() else []
    evals = {"val": evaluate(arm, run_dir, "val", [], [])}
    evals["train"] = evaluate(arm, run_dir, "train", ["data.val_split=train", f"eval.num_images={TRAIN_SUBSET}"], [])
    for label, (overrides, flags) in arm.variants.items():
        evals[label] = evaluate(arm, run_dir, label, overrides, flags)
    train_s, val_s, load = epoch_times(run_dir)
    result = {
        "arm": arm.name, "table": arm.table, "label": arm.label,
        "train_command": " ".join(["scaleseg train", arm.config, *arm.overrides, f"output_dir={run_dir}"]) + "  (--resume auto if interrupted)",
        "commit": segments[0]["commit"] if segments else commit_id(),
        "wall_s": sum(s["seconds"] for s in segments), "resumed": any(s["resumed"] for s in segments),
        "s_per_epoch_median": statistics.median(train_s) if train_s else None,
        "s_per_epoch_min": min(train_s) if train_s else None, "epochs": len(train_s),
        "train_s_total": sum(train_s), "val_s_total": sum(val_s),
        "load1_mean": statistics.mean(load) if load else None,
        "load1_median": statistics.median(load) if load else None,
        "stage_seconds": stage_seconds(run_dir),
        "evals": evals,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(target)
    print(f"[{arm.name}] val mIoU {evals['val']['mIoU']:.2f}, train mIoU {evals['train']['mIoU']:.2f}")
    write_tables()
    if commit:
        subprocess.run(["git", "add", str(target), str(DOC)], check=True, cwd=REPO)
        subprocess.run(["git", "commit", "-q", "-m", f"Study result: {arm.name} ({arm.label}), val mIoU {evals['val']['mIoU']:.2f}"],
                       check=False, cwd=REPO)


# ------------------------------------------------------------------------------------------ tables
def _f(v: float | None, nd: int = 1) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def table(name: str) -> str:
    rows = []
    head = ("| arm | eval | val mIoU | " + " | ".join(THIN) + " | train mIoU | gap | params (M) | GFLOPs | s/epoch (load) | commit |")
    rows.append(head)
    rows.append("|" + "---|" * (head.count("|") - 1))
    for arm in ARMS:
        if arm.table != name:
            continue
        path = RESULTS / f"{arm.name}.json"
        if not path.exists():
            rows.append(f"| {arm.label} | not run yet |" + " |" * (head.count("|") - 3))
            continue
        r = json.loads(path.read_text())
        train = r["evals"]["train"]["mIoU"]
        for label, ev in r["evals"].items():
            if label == "train":
                continue
            gap = train - ev["mIoU"] if label == "val" else None
            thin = " | ".join(_f(ev["per_class"].get(c)) for c in THIN)
            rows.append(
                f"| {arm.label if label == 'val' else ''} | {label} | **{_f(ev['mIoU'])}** | {thin} | "
                f"{_f(train) if label == 'val' else ''} | {_f(gap)} | {_f(ev['params_m'], 2)} | {_f(ev['gflops'], 1)} | "
                f"{_f(r['s_per_epoch_median'], 0)} ({_f(r['load1_median'], 1)}) | {r['commit']} |"
            )
    return "\n".join(rows)


def per_class_table(arm_name: str) -> str:
    path = RESULTS / f"{arm_name}.json"
    if not path.exists():
        return "(not run yet)"
    r = json.loads(path.read_text())
    evals = {k: v for k, v in r["evals"].items()}
    classes = list(evals["val"]["per_class"])
    lines = ["| class | " + " | ".join(evals) + " |", "|---|" + "---|" * len(evals)]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(_f(e["per_class"][c]) for e in evals.values()) + " |")
    lines.append("| **mIoU** | " + " | ".join(f"**{_f(e['mIoU'])}**" for e in evals.values()) + " |")
    return "\n".join(lines)


def stage_time_table() -> str:
    """Training minutes per stage of the staged arms (and the end-to-end control's total)."""
    lines = ["| arm | " + " | ".join(["stage 1", "stage 2", "stage 3", "total train min", "wall min"]) + " |",
             "|---|---|---|---|---|---|"]
    for arm in ARMS:
        path = RESULTS / f"{arm.name}.json"
        if arm.table != "staged" or not path.exists():
            continue
        r = json.loads(path.read_text())
        stages = r.get("stage_seconds") or {}
        cells = [f"{name}: {sec / 60:.1f}" for name, sec in stages.items()] or ["–"] * 3
        cells += ["–"] * (3 - len(cells))
        lines.append(f"| {arm.label} | " + " | ".join(cells) + f" | {r['train_s_total'] / 60:.1f} | {r['wall_s'] / 60:.1f} |")
    return "\n".join(lines)


def write_tables() -> None:
    """Replace the text between ``<!-- table:NAME -->`` and ``<!-- /table -->`` markers in docs/results.md."""
    if not DOC.exists():
        return
    text = DOC.read_text()
    out, pos = [], 0
    while True:
        start = text.find("<!-- table:", pos)
        if start < 0:
            out.append(text[pos:])
            break
        end_tag = text.index("-->", start) + 3
        name = text[start + len("<!-- table:"): end_tag - 3].strip()
        stop = text.index("<!-- /table -->", end_tag)
        if name.startswith("perclass:"):
            body = per_class_table(name[len("perclass:"):])
        elif name == "stagetimes":
            body = stage_time_table()
        else:
            body = table(name)
        out.append(text[pos:end_tag] + "\n" + body + "\n")
        pos = stop
    DOC.write_text("".join(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated arm names")
    parser.add_argument("--runs", default=str(REPO / "runs/study"), help="folder for the arms' run folders")
    parser.add_argument("--commit", action="store_true", help="git-commit each arm's result as it finishes")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--tables", action="store_true", help="only rewrite the tables of docs/results.md")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for every arm's training and evaluation (smoke tests)")
    parser.add_argument("--results", help="folder for the result JSONs (default docs/results/camvid)")
    args = parser.parse_args()
    global RESULTS
    if args.results:
        RESULTS = Path(args.results).resolve()
    for arm in ARMS:
        arm.overrides = [*arm.overrides, *args.set]
    arms = ARMS
    if args.only:
        names = args.only.split(",")
        unknown = [n for n in names if n not in {a.name for a in ARMS}]
        if unknown:
            parser.error(f"unknown arm(s) {', '.join(unknown)}; arms: {', '.join(a.name for a in ARMS)}")
        by_name = {a.name: a for a in ARMS}
        arms = [by_name[n] for n in names]  # in the order given
    if args.list:
        for a in arms:
            print(f"{a.name:14s} {'done' if (RESULTS / f'{a.name}.json').exists() else '-':5s} {a.label}")
        return
    if args.tables:
        write_tables()
        return
    for arm in arms:
        run_arm(arm, Path(args.runs), args.commit)


if __name__ == "__main__":
    main()
