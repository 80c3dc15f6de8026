"""Cost and memory of multi-scale hierarchical inference, dense, tiled and sparse, in one run.

Run with no arguments: ``python benchmarks/multiscale_infer.py``.

**Dense and tiled** (DeepLabV3+ R-50 at OS8 + HMSA, random init, 19 classes, 1 × 512×1024, the
HMSA paper's ablation trunk), each as a ratio to single-scale inference of the same model:

* ``dense_ratio``: time of hierarchical inference over (0.5, 1, 2) (``model(x)``'s chain; NVIDIA's
  code takes 6.4×, the pixel floor is 0.25 + 1 + 4 = 5.25×) as ``scaleseg eval`` runs it, i.e. with
  ``eval.reuse_memory`` as its default says (on: glibc serves large tensors from the heap, no page
  faults on re-allocation), with ``dense_flops_ratio``; ``dense_reuse_ratio`` and
  ``dense_glibc_ratio`` with reuse on and off for both, ``reuse_memory_speedup_dense`` its gain on dense;
* ``dense_mem_ratio``: its peak memory;
* ``tiled_mem_ratio``: peak memory of the same chain with a pixel budget of 2^20 px per window
  (``eval.max_pixels``; the 2.0 scale's 2 Mpx run in windows with the network's receptive field as
  margin), whose logits equal the dense ones (``tiled_max_abs_diff``); ``window_mem_ratio`` is one
  budget-sized window run alone: the tiled peak is bounded by the budget, not by the largest scale.

**Sparse** (``eval.sparse``, ``scaleseg/sparse.py``) on trained models, when they exist: the demo
model on ScaleScenes val (``runs/demo``, made by ``scaleseg demo``) and a CamVid HMSA model: the first of
``runs/camvid_hmsa_r18_cpu`` (``scaleseg train configs/camvid/deeplabv3plus_r18_hmsa_cpu.yaml``),
``runs/study/hmsa`` and ``runs/study/staged_e2e`` (``scripts/camvid_study.py`` arms) that exists, run at its
``eval.infer_scale`` and scored at the label size, as ``scaleseg eval`` does:
``sparse_ratio`` (cost ÷ single scale), ``sparse_miou_drop`` (mIoU of dense 3-scale − sparse) and
``sparse_pixel_fraction`` (2.0-scale pixels computed ÷ the 2.0 image), per dataset and as the
worst over the datasets (top-level keys).

Time is the median process CPU time (see ``vs_smp.py``), interleaved round-robin; memory is the
peak RSS above the resting state (``_measure.py``). Results: ``benchmarks/results/multiscale_infer.json``.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE, NUM_CLASSES, SCALES = (512, 1024), 19, (0.5, 1.0, 2.0)
BUDGET = 2**20
ROUNDS = 2
THREADS = 2
RESULTS = Path(__file__).resolve().parent / "results" / "multiscale_infer.json"
# per dataset: the trained HMSA runs to use, first found wins (each trained on a (0.5, 1.0) pair), and
# how to make the first
SPARSE_RUNS = {
    "scalescenes": ([ROOT / "runs" / "demo"], "scaleseg demo"),
    "camvid": ([ROOT / "runs" / "camvid_hmsa_r18_cpu", ROOT / "runs" / "study" / "hmsa",
                ROOT / "runs" / "study" / "staged_e2e"],
               "scaleseg train configs/camvid/deeplabv3plus_r18_hmsa_cpu.yaml"),
}


def _timed(fn) -> dict:  # noqa: ANN001
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def _reusing(fn):  # noqa: ANN001, ANN202
    """``fn`` under ``eval.reuse_memory`` (glibc keeps freed blocks for reuse), then this benchmark's
    allocator settings again."""
    from scaleseg.engine.speed import reuse_freed_memory

    def run():  # noqa: ANN202
        reuse_freed_memory(True)
        try:
            return fn()
        finally:
            reuse_freed_memory(False)
            _measure.keep_freed_memory()
    return run


def dense_and_tiled() -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from scaleseg.models.hmsa import HierarchicalAttention, deeplabv3plus_os8
    from scaleseg.tiling import TiledInference, hierarchical_logits, hmsa_unit

    torch.manual_seed(0)
    base = deeplabv3plus_os8(NUM_CLASSES, "resnet50")
    model = HierarchicalAttention(base, base.head.feat_channels).eval()
    x = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    tiling = TiledInference(model, max_pixels=BUDGET)
    runs = {
        "single": lambda: model.forward_features(x, scales=[1.0])["logits"],
        "dense": lambda: model.forward_features(x, scales=SCALES)["logits"],
    }
    timed = runs | {"single_reuse": _reusing(runs["single"]), "dense_reuse": _reusing(runs["dense"])}
    out: dict = {}
    with torch.inference_mode():
        # FLOPs from shapes alone: the same counts on the meta device, without a minute of compute
        meta, meta_x = copy.deepcopy(model).to("meta"), x.to("meta")
        for name, scales in (("single", [1.0]), ("dense", SCALES)):
            with FlopCounterMode(display=False) as counter:
                meta.forward_features(meta_x, scales=scales)
            out[f"{name}_flops"] = counter.get_total_flops()
        del meta
        samples: dict[str, list[dict]] = {name: [] for name in timed}
        for r in range(ROUNDS):
            for name in (list(timed) if r % 2 == 0 else list(timed)[::-1]):
                samples[name].append(_timed(timed[name]))
        kept: dict = {}  # the dense logits of the memory run serve as the reference (no extra 3-scale run)
        mems = {"single": _measure.peak_memory_mib(runs["single"]),
                "dense": _measure.peak_memory_mib(lambda: kept.update(d=runs["dense"]()))}
        dense = kept.pop("d")
        tiling.margin_for(hmsa_unit(model, with_attn=True), x.device)  # measured outside the memory figure
        mems["tiled"] = _measure.peak_memory_mib(lambda: kept.update(t=hierarchical_logits(model, x, SCALES, tiling)))
        out["tiled_max_abs_diff"] = float((kept["t"] - dense).abs().max())
        out["logit_scale"] = float(dense.abs().max())
        out["margin"] = tiling.margin
        kept.clear()
        del dense
        window = torch.randn(1, 3, 1024, 1024)
        unit = hmsa_unit(model, with_attn=True)
        mems["window"] = _measure.peak_memory_mib(lambda: unit(window))
    for name in timed:
        out[f"{name}_cpu_s"] = statistics.median(s["cpu_s"] for s in samples[name])
        out[f"{name}_wall_s"] = statistics.median(s["wall_s"] for s in samples[name])
    for name, mib in mems.items():
        out[f"{name}_peak_mib"] = mib
    return out


CALIBRATION_IMAGES, RECALL = 16, 0.98


def _reuse_default() -> bool:
    from scaleseg.config import EvalConfig

    return EvalConfig().reuse_memory


REUSE_DEFAULT = _reuse_default()


def benchmark_sparse(run: Path, name: str) -> dict:
    """Single, dense 3-scale and sparse inference of a trained run on its val split, image by
    image, interleaved: mIoU, CPU time and the top-scale pixels computed. The sparse threshold is
    calibrated on training images (eval transform), never on val."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from scaleseg import load_config
    from scaleseg.config import EvalConfig
    from scaleseg.engine.checkpoint import load_model_weights
    from scaleseg.engine.datamodule import SegDataModule, build_dataset
    from scaleseg.inference import resize_image
    from scaleseg.metrics import ConfusionMatrix, scores
    from scaleseg.models.factory import create_model
    from scaleseg.sparse import calibrate_threshold, config_kwargs, sparse_hierarchical

    cfg = load_config(run / "config.yaml")
    dm = SegDataModule(cfg)
    model = create_model(cfg, dm.spec.num_classes)
    load_model_weights(model, run / "model.safetensors")
    model.eval()
    dm.set_normalization(model.mean, model.std)
    dm.setup("validate")
    train = build_dataset(cfg.data, cfg.data.train_split, dm.make_eval_transform(), cfg.seed)
    picks = np.linspace(0, len(train) - 1, CALIBRATION_IMAGES).astype(int)
    e = cfg.eval

    def network_input(image: torch.Tensor) -> torch.Tensor:  # as `scaleseg eval`: resized by eval.infer_scale
        return image if e.infer_scale is None else resize_image(image, e.infer_scale)

    threshold = calibrate_threshold(model, (network_input(train[int(i)]["image"][None]) for i in picks), SCALES,
                                    recall=RECALL)
    # today's eval.sparse_* defaults, not those a run's resolved config froze when it was trained
    sparse_kwargs = config_kwargs(EvalConfig()) | {"threshold": threshold}
    kinds = ("single", "dense", "sparse")
    mats = {k: ConfusionMatrix(dm.spec.num_classes) for k in kinds}
    cpu = {k: 0.0 for k in kinds}
    computed = top = core = 0
    best: tuple[float, int] | None = None
    with torch.inference_mode():
        for i in range(len(dm.val_set)):
            sample = dm.val_set[i]
            x, mask = network_input(sample["image"][None]), sample["mask"][None]
            order = kinds if i % 2 == 0 else kinds[::-1]
            for k in order:
                start = time.process_time()
                if k == "single":
                    logits = model.forward_features(x, scales=[1.0])["logits"]
                elif k == "dense":
                    logits = model.forward_features(x, scales=SCALES)["logits"]
                else:
                    res = sparse_hierarchical(model, x, SCALES, **sparse_kwargs)
                    logits = res.logits
                cpu[k] += time.process_time() - start
                if logits.shape[-2:] != mask.shape[-2:]:  # infer_scale: scored at the label size
                    logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
                mats[k].update(logits.argmax(1), mask)
                if k == "sparse":
                    computed, top, core = computed + res.computed_px, top + res.top_px, core + res.core_px
                    thin = float(np.isin(mask.numpy(), [c for c, n in enumerate(dm.spec.classes)
                                                        if n in ("pole", "wire", "signsymbol")]).mean())
                    if best is None or thin > best[0]:
                        best = (thin, i, res)  # type: ignore[assignment]
    miou = {k: scores(mats[k].compute(), list(dm.spec.classes))["mIoU"] for k in kinds}
    if best is not None:  # the picture of the chosen tiles on the image with the most thin structures
        _, i, res = best  # type: ignore[misc]
        image, label = dm.val_set.load_raw(i)
        size = tuple(network_input(dm.val_set[i]["image"][None]).shape[-2:])
        if image.shape[:2] != size:  # the eval transform resized it (CamVid: long edge 240)
            from PIL import Image

            image = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
            label = np.asarray(Image.fromarray(label).resize(size[::-1], Image.NEAREST))
        _save_tiles_picture(image, label, res, dm.spec.palette_array(), sparse_kwargs["tile"],
                            RESULTS.parent / f"sparse_tiles_{name}.png")
    return {"images": len(dm.val_set), "threshold": threshold, "recall_target": RECALL,
            "sparse": {k: v for k, v in sparse_kwargs.items() if k != "threshold"},
            "miou_single": miou["single"], "miou_dense": miou["dense"], "miou_sparse": miou["sparse"],
            "sparse_miou_drop": miou["dense"] - miou["sparse"], "sparse_ratio": cpu["sparse"] / cpu["single"],
            "dense_ratio": cpu["dense"] / cpu["single"], "sparse_pixel_fraction": computed / top,
            "core_fraction": core / top, "cpu_s": cpu}


def _save_tiles_picture(image, label, res, palette, tile: int, path: Path) -> None:  # noqa: ANN001
    """Input | ground truth with the selected tiles outlined (white) at 2× size."""
    import numpy as np
    from PIL import Image

    from scaleseg.visualize import colorize, overlay, save_png

    h, w = image.shape[:2]
    gt = overlay(image, colorize(label, palette), 0.6)
    panel = gt.copy()
    sel = res.tiles[0].cpu().numpy()
    for ty, tx in zip(*np.nonzero(sel)):
        y0, x0 = ty * tile, tx * tile
        y1, x1 = min(y0 + tile, h) - 1, min(x0 + tile, w) - 1
        panel[y0, x0:x1 + 1] = panel[y1, x0:x1 + 1] = 255
        panel[y0:y1 + 1, x0] = panel[y0:y1 + 1, x1] = 255
    both = np.concatenate([image, np.full((h, 4, 3), 255, np.uint8), panel], axis=1)
    big = Image.fromarray(both).resize((both.shape[1] * 2, both.shape[0] * 2), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(path, np.asarray(big))


def sparse_results() -> dict:
    found = {}
    for name, (candidates, how) in SPARSE_RUNS.items():
        run = next((r for r in candidates if (r / "model.safetensors").exists()), None)
        if run is None:
            print(f"  sparse on {name}: no trained model in {candidates[0]} (make it with: {how}); skipped")
            continue
        found[name] = benchmark_sparse(run, name) | {"run": str(run.relative_to(ROOT))}
    return found


def main() -> None:
    import torch

    torch.set_num_threads(THREADS)
    _measure.keep_freed_memory()
    start, load_before = time.perf_counter(), os.getloadavg()
    d = dense_and_tiled()
    result: dict = {
        "setup": {"trunk": "DeepLabV3+ resnet50 OS8 + HMSA", "size": list(SIZE), "scales": list(SCALES),
                  "budget_px": BUDGET, "rounds": ROUNDS, "threads": THREADS},
        # as `scaleseg eval` runs it: with eval.reuse_memory as its default says (on)
        "dense_ratio": (d["dense_reuse_cpu_s"] / d["single_reuse_cpu_s"] if REUSE_DEFAULT
                        else d["dense_cpu_s"] / d["single_cpu_s"]),
        "dense_glibc_ratio": d["dense_cpu_s"] / d["single_cpu_s"],
        "dense_wall_ratio": d["dense_wall_s"] / d["single_wall_s"],
        "dense_flops_ratio": d["dense_flops"] / d["single_flops"],
        "dense_reuse_ratio": d["dense_reuse_cpu_s"] / d["single_reuse_cpu_s"],
        "reuse_memory_speedup_dense": d["dense_cpu_s"] / d["dense_reuse_cpu_s"],
        "dense_mem_ratio": d["dense_peak_mib"] / d["single_peak_mib"],
        "tiled_mem_ratio": d["tiled_peak_mib"] / d["single_peak_mib"],
        "window_mem_ratio": d["window_peak_mib"] / d["single_peak_mib"],
        "tiled_max_abs_diff": d["tiled_max_abs_diff"],
        "raw_dense": d,
    }
    print(f"HMSA {SCALES} at {SIZE[0]}×{SIZE[1]}, DeepLabV3+ R-50 OS8 (÷ single scale, {d['single_cpu_s']:.2f} CPU s, "
          f"{d['single_peak_mib']:.0f} MiB):")
    print(f"  dense: time ×{result['dense_ratio']:.2f} with eval.reuse_memory={str(REUSE_DEFAULT).lower()} (its default), "
          f"FLOPs ×{result['dense_flops_ratio']:.2f}, peak memory ×{result['dense_mem_ratio']:.2f}")
    print(f"  with glibc's allocator defaults: dense time ×{result['dense_glibc_ratio']:.2f} (wall ×{result['dense_wall_ratio']:.2f}); "
          f"with eval.reuse_memory: ×{result['dense_reuse_ratio']:.2f} of single scale with it "
          f"({d['single_reuse_cpu_s']:.2f} CPU s), dense {result['reuse_memory_speedup_dense']:.2f}× faster")
    print(f"  tiled (≤ {BUDGET} px per window, margin {d['margin']} px): peak memory ×{result['tiled_mem_ratio']:.2f} "
          f"(one window ×{result['window_mem_ratio']:.2f}); max |tiled − dense| = {d['tiled_max_abs_diff']:.1e} "
          f"(logits up to {d['logit_scale']:.1f})", flush=True)
    sparse = sparse_results()
    for name, s in sparse.items():
        result[f"sparse_{name}"] = s
        print(f"  sparse on {name} val ({s['images']} images): cost ×{s['sparse_ratio']:.2f} of single scale "
              f"(dense 3-scale ×{s['dense_ratio']:.2f}); mIoU single {s['miou_single']:.2f}, dense {s['miou_dense']:.2f}, "
              f"sparse {s['miou_sparse']:.2f} (drop {s['sparse_miou_drop']:.2f}); 2.0-scale pixels computed "
              f"{100 * s['sparse_pixel_fraction']:.1f} % (cores {100 * s['core_fraction']:.1f} %)", flush=True)
    if sparse:
        for key in ("sparse_ratio", "sparse_miou_drop", "sparse_pixel_fraction"):
            result[key] = max(s[key] for s in sparse.values())
    result["setup"].update(load_before=load_before, load_after=os.getloadavg(), seconds=time.perf_counter() - start)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS} ({result['setup']['seconds']:.0f} s, load {load_before[0]:.1f} → "
          f"{result['setup']['load_after'][0]:.1f})")


if __name__ == "__main__":
    main()
