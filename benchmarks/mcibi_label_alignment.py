"""MCIBI memory update at feature resolution vs the reference's full-resolution update.

Run ``python benchmarks/mcibi_label_alignment.py`` (no arguments; well under a minute on 2 CPU cores).
Prints the figures and writes ``benchmarks/results/mcibi_label_alignment.json``.

The reference (sssegmentation) updates the memory from features bilinearly upsampled to the label
size (``FeatureMemory(full_resolution=True)``). The fast path keeps the features at stride 8 and
brings the labels to the feature grid. This script measures how far each way of doing that ends from
the full-resolution memory after three EMA updates:

* ``corner``: nearest downsampling (``F.interpolate(mode="nearest")``, pixel ``8i`` of each cell):
  scaleseg's earlier default, 3.5 px off the cell centre that bilinear upsampling assumes;
* ``center``, ``majority``, ``soft``: ``FeatureMemory(label_downsample=...)`` (``soft`` is the default).

Setting: real label maps — the first 12 CamVid val annotations (360×480, void → ignore) when
``../shared/data/camvid`` exists, else 12 ScaleScenes scenes (embedded, 256×512, printed as the
source) — in 4 steps of 3 images. Features imitate a trained stride-8 representation: each class
has a random non-negative C = 64 embedding; the stride-8 feature of a cell is the average embedding
of its label pixels (ignore pixels contribute nothing) plus 0.3 × smooth noise (random at stride 16,
bilinearly upsampled), then ReLU + 0.05. Step 1 initialises the memory (first sighting = class mean;
both paths get identical memories if they see the same class means, so step 1 already differs a
little), steps 2–4 are EMA steps with ``m = momentum_at(step, 100)`` ≈ 0.9.

Figures per variant, over classes present in the memory: relative L2 ``‖M − M_full‖ / ‖M_full‖``
(max and median over classes), max absolute difference and the mean time of one update (the
variants take turns, so load from other processes affects them alike). ``ratio_corner_to_soft`` =
max relative L2 of corner ÷ soft.
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from scaleseg.models.mcibi import FeatureMemory
from scaleseg.types import StepInfo

STRIDE, CHANNELS, IMAGES, BATCH = 8, 64, 12, 3
IGNORE = 255
RESULTS = Path(__file__).resolve().parent / "results" / "mcibi_label_alignment.json"
CAMVID = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "camvid"


def label_maps() -> tuple[str, int, list[torch.Tensor]]:
    """(source, number of classes, H×W int64 label maps padded with ignore to a multiple of 8)."""
    maps: list[np.ndarray] = []
    if (CAMVID / "val.txt").is_file():
        source, num_classes = "camvid val", 11
        for line in (CAMVID / "val.txt").read_text().split("\n")[:IMAGES]:
            label = np.array(Image.open(CAMVID / "valannot" / Path(line.split()[1]).name))
            maps.append(np.where(label >= num_classes, IGNORE, label))
    else:
        from scaleseg.data.scalescenes import generate

        source, num_classes = "scalescenes val", 8
        maps = [generate(0, "val", i)[1] for i in range(IMAGES)]
    out = []
    for m in maps:
        t = torch.from_numpy(m.astype(np.int64))
        pad_h, pad_w = -t.shape[0] % STRIDE, -t.shape[1] % STRIDE
        out.append(F.pad(t, (0, pad_w, 0, pad_h), value=IGNORE))
    return source, num_classes, out


def features(labels: torch.Tensor, embed: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``B×H×W`` labels → ``B×C×(H/8)×(W/8)`` stride-8 features (see the module docstring)."""
    b, h, w = labels.shape
    valid = labels != IGNORE
    onehot = F.one_hot(torch.where(valid, labels, 0), embed.shape[0]).float() * valid[..., None]
    pixel = (onehot @ embed).permute(0, 3, 1, 2)  # B×C×H×W, zero on ignore
    cells = F.avg_pool2d(pixel, STRIDE)
    noise = torch.randn(b, embed.shape[1], h // 16 + 1, w // 16 + 1, generator=g)
    noise = F.interpolate(noise, size=cells.shape[-2:], mode="bilinear", align_corners=False)
    return (cells + 0.3 * noise).relu() + 0.05


def run() -> dict:
    torch.manual_seed(0)
    source, k, maps = label_maps()
    g = torch.Generator().manual_seed(0)
    embed = torch.rand(k, CHANNELS, generator=g) * 2.0
    batches = []
    for start in range(0, IMAGES, BATCH):
        labels = torch.stack(maps[start : start + BATCH])
        batches.append((features(labels, embed, g), labels))
    variants = {
        "full": FeatureMemory(k, CHANNELS, full_resolution=True),
        "corner": FeatureMemory(k, CHANNELS),  # fed nearest-downsampled labels below
        "center": FeatureMemory(k, CHANNELS, label_downsample="center"),
        "majority": FeatureMemory(k, CHANNELS, label_downsample="majority"),
        "soft": FeatureMemory(k, CHANNELS, label_downsample="soft"),
    }
    seconds = {name: 0.0 for name in variants}
    for step, (feats, labels) in enumerate(batches):
        info = StepInfo(step=step, max_steps=100)
        for name, mem in variants.items():  # the variants take turns, so machine load hits them alike
            start = time.perf_counter()
            lab = labels
            if name == "corner":
                lab = F.interpolate(labels[:, None].float(), size=feats.shape[-2:], mode="nearest")[:, 0].long()
            mem.update(feats, lab, info)
            seconds[name] += time.perf_counter() - start
    full = variants["full"]
    present = full.initialized.nonzero().squeeze(1).tolist()
    result: dict = {"source": source, "num_classes": k, "images": IMAGES, "steps": len(batches),
                    "stride": STRIDE, "channels": CHANNELS, "classes_compared": len(present)}
    for name, mem in variants.items():
        if name == "full":
            continue
        both = [c for c in present if bool(mem.initialized[c])]
        rel = [float((mem.memory[c] - full.memory[c]).norm() / full.memory[c].norm()) for c in both]
        result[name] = {
            "max_rel_l2": max(rel),
            "median_rel_l2": statistics.median(rel),
            "max_abs": float((mem.memory[both] - full.memory[both]).abs().max()),
            "classes_missing": len(present) - len(both),
            "update_s": seconds[name] / len(batches),
        }
    result["full_update_s"] = seconds["full"] / len(batches)
    result["ratio_corner_to_soft"] = result["corner"]["max_rel_l2"] / max(result["soft"]["max_rel_l2"], 1e-12)
    result["platform"] = {"python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine()}
    return result


def main() -> None:
    result = run()
    print(f"labels: {result['source']} ({result['images']} images, {result['steps']} updates, stride {STRIDE})")
    print(f"{'variant':>9}  {'max rel L2':>10}  {'median rel L2':>13}  {'max |dM|':>8}  missing  s/update")
    for name in ("corner", "center", "majority", "soft"):
        r = result[name]
        print(f"{name:>9}  {r['max_rel_l2']:10.4f}  {r['median_rel_l2']:13.4f}  {r['max_abs']:8.4f}  "
              f"{r['classes_missing']:7d}  {r['update_s']:.3f}")
    print(f"{'full':>9}  (reference path){'':>35}{result['full_update_s']:.3f}")
    print(f"corner / soft (max rel L2): {result['ratio_corner_to_soft']:.1f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
