"""``scaleseg demo``: train a hierarchical multi-scale attention model on ScaleScenes (embedded,
no downloads) on the CPU, then compare single-scale, average-pooling and hierarchical inference."""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..config import load_config, parse_override
from ..metrics import ConfusionMatrix, scores
from ..models.hmsa import HierarchicalAttention, hierarchical_fusion, scale_key
from .checkpoint import load_model_weights
from .datamodule import SegDataModule, eval_loader
from .evaluate import ready_for_inference
from .report import dump_scale_maps
from .speed import cpu_has_native_bf16, runs_on_cpu, use_channels_last
from .train import train, write_text_atomic
from ..models.factory import create_model

SCALE_SETS: tuple[tuple[float, ...], ...] = ((0.5, 1.0, 2.0), (0.25, 0.5, 1.0, 2.0))
WATCH = ("pole", "wire", "road", "sidewalk")  # thin classes and the layout-ambiguous pair
COMPOSED = "HMSA + MCIBI hierarchical {0.5, 1, 2}"
# the composed run: the demo's network with MCIBI's memory context in the DeepLabV3+ host, same budget
COMPOSED_OVERRIDES = ("model.mcibi.enabled=true", "model.mcibi.channels=64", "model.mcibi.consistency_start_epoch=1")


NATIVE_BF16_SPEED = {"train.precision": "bf16-mixed", "train.channels_last": "true"}


def native_speed_overrides(overrides: Sequence[str]) -> list[str]:
    """``overrides`` plus bf16-mixed precision and channels-last training when the demo trains on a
    CPU with native bf16 (AVX512-BF16 or AMX), where they make its trainings about twice as fast
    (README). A key the user gives wins, key by key; a GPU run and a CPU without native bf16 (where
    oneDNN emulates bf16, many times slower) get nothing added."""
    cfg = load_config(demo_config_path(), list(overrides))
    if not (runs_on_cpu(cfg.train.accelerator) and cpu_has_native_bf16()):
        return list(overrides)
    given = {".".join(parse_override(o)[0]) for o in overrides}
    return [*overrides, *(f"{k}={v}" for k, v in NATIVE_BF16_SPEED.items() if k not in given)]


def demo_config_path() -> Path:
    return Path(str(resources.files("scaleseg") / "resources" / "demo.yaml"))


def variant_names() -> list[str]:
    names = ["single scale 1.0"]
    for scales in SCALE_SETS:
        text = "{" + ", ".join(f"{s:g}" for s in scales) + "}"
        names += [f"avg pooling {text}", f"hierarchical {text}"]
    return names


def variant_logits(model: HierarchicalAttention, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits of every inference variant for ``x`` from **one** hierarchical run over the union of
    the scale sets (each scale's base run once): each set's hierarchical fusion comes from that run's
    per-scale logits and attention (:func:`hierarchical_fusion`, equal to running the set alone), and
    its average-pooling baseline is the mean of the same per-scale logits (in the given scale order,
    as ``inference.scale_pooling`` sums them). Scaled sizes follow the hierarchical chain (floor);
    pooling alone would round (equal for the demo's even image sizes)."""
    union = sorted({s for scales in SCALE_SETS for s in scales})
    res = model.forward_features(x, scales=union, return_scales=True)
    out: dict[str, torch.Tensor] = {"single scale 1.0": res[scale_key("pred", 1.0)]}
    names = iter(variant_names()[1:])
    for scales in SCALE_SETS:
        preds = [_resize_to(res[scale_key("pred", s)], x.shape[-2:]) for s in scales]
        pooled = preds[0]
        for p in preds[1:]:
            pooled = pooled + p
        out[next(names)] = pooled / len(scales)
        out[next(names)] = hierarchical_fusion(res, scales)
    return out


def _resize_to(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return torch.nn.functional.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def compare(model: HierarchicalAttention, loader: Any, class_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """mIoU and per-class IoU of every variant over the loader's images."""
    mats = {name: ConfusionMatrix(len(class_names)) for name in variant_names()}
    model.eval()
    with torch.inference_mode():
        for batch in tqdm(loader, desc=f"evaluating {len(mats)} inference variants", unit="batch", leave=False):
            for name, logits in variant_logits(model, batch["image"]).items():
                mats[name].update(logits.argmax(1), batch["mask"])
    return {name: scores(mats[name].compute(), class_names) for name in variant_names()}


def compare_one(model: HierarchicalAttention, loader: Any, class_names: Sequence[str],
                scales: Sequence[float]) -> dict[str, Any]:
    """mIoU and per-class IoU of the hierarchical fusion of ``model`` over ``scales``."""
    mat = ConfusionMatrix(len(class_names))
    model.eval()
    with torch.inference_mode():
        for batch in loader:
            mat.update(model.forward_features(batch["image"], scales=scales)["logits"].argmax(1), batch["mask"])
    return scores(mat.compute(), class_names)


def format_comparison(results: dict[str, dict[str, Any]]) -> str:
    head = f"{'inference':<32} {'mIoU':>6} " + " ".join(f"{c:>8}" for c in WATCH)
    lines = [head, "-" * len(head)]
    for name, s in results.items():
        cells = " ".join(f"{(s['per_class'].get(c) or 0.0):8.2f}" for c in WATCH)
        lines.append(f"{name:<32} {s['mIoU']:6.2f} {cells}")
    return "\n".join(lines)


def comparison_html(results: dict[str, dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{name}</td><td>{s['mIoU']:.2f}</td>" + "".join(f"<td>{(s['per_class'].get(c) or 0):.2f}</td>" for c in WATCH) + "</tr>"
        for name, s in results.items()
    )
    head = "<tr><th>inference</th><th>mIoU</th>" + "".join(f"<th>{c} IoU</th>" for c in WATCH) + "</tr>"
    return f"<table border='1' cellpadding='4'>{head}{rows}</table>"


def train_run(cfg: Any) -> Any:
    """Train (or continue, or skip if finished) the run in ``cfg.output_dir``; → the trained model."""
    out = Path(cfg.output_dir)
    if not (out / "model.safetensors").exists():
        resume = "auto" if any((out / "checkpoints").glob("last*.ckpt")) else None
        train(cfg, resume=resume)
    dm = SegDataModule(cfg)
    model = create_model(cfg, dm.spec.num_classes)
    load_model_weights(model, out / "model.safetensors")
    return ready_for_inference(model, cfg)


def composed_config_args(out: Path, overrides: Sequence[str]) -> list[str]:
    """Config arguments of the demo's composed HMSA + MCIBI run (in ``out/hmsa_mcibi``)."""
    return [f"output_dir={out / 'hmsa_mcibi'}", *overrides, *COMPOSED_OVERRIDES]


def demo(out: str | Path = "runs/demo", overrides: Sequence[str] = (), quiet: bool = False) -> dict[str, Any]:
    """Train (or continue) the demo runs in ``out`` — HMSA, and HMSA + MCIBI on the same budget —
    evaluate the variants, write table, JSON and HTML."""
    out = Path(out)
    overrides = native_speed_overrides(overrides)
    cfg = load_config(demo_config_path(), [f"output_dir={out}", *overrides])
    composed_cfg = load_config(demo_config_path(), composed_config_args(out, overrides))
    if not quiet:
        from ..config import to_yaml

        print("# resolved config\n" + to_yaml(cfg))
    channels_last = use_channels_last(cfg.train.channels_last, cfg.train.accelerator)
    print(f"training in precision {cfg.train.precision}, channels_last={channels_last}"
          + (" (this CPU has native bf16)" if cfg.train.precision == "bf16-mixed" and runs_on_cpu(cfg.train.accelerator) else ""))
    start = time.perf_counter()
    model = train_run(cfg)
    composed = train_run(composed_cfg)
    train_seconds = time.perf_counter() - start

    dm = SegDataModule(cfg)
    dm.set_normalization(model.mean, model.std)
    dm.setup("validate")
    loader = eval_loader(dm.val_set, cfg)
    results = compare(model, loader, list(dm.spec.classes))
    results[COMPOSED] = compare_one(composed, loader, list(dm.spec.classes), SCALE_SETS[0])
    table = format_comparison(results)
    print(f"\nScaleScenes val ({len(dm.val_set)} images), networks trained on scales "
          f"{cfg.model.hmsa.train_scales} (the last row: the same network with MCIBI, same budget):\n{table}")
    page = dump_scale_maps(model, dm.val_set, SCALE_SETS[-1], out / "pictures", limit=8,
                           title="scaleseg demo: hierarchical multi-scale attention on ScaleScenes",
                           table_html=comparison_html(results))
    total_seconds = time.perf_counter() - start
    summary = {"train_seconds": train_seconds, "eval_seconds": total_seconds - train_seconds,
               "total_seconds": total_seconds, "precision": cfg.train.precision,
               "channels_last": channels_last, "results": results}
    write_text_atomic(out / "demo_results.json", json.dumps(summary, indent=2))
    print(f"\nwrote {out / 'demo_results.json'} and {page}")
    return summary
