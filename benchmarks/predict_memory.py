"""Peak RSS of ``scaleseg predict`` on a 4000×3000 image, whole-image vs tiled (``eval.max_pixels``).

Run with no arguments: ``python benchmarks/predict_memory.py``. The network is the CamVid CPU
recipe's DeepLabV3+ R-18 (``configs/camvid/deeplabv3plus_r18_cpu.yaml``, random init, saved as a
safetensors checkpoint); the image is a synthetic 4000×3000 RGB PNG (smooth noise). Both runs go
through the CLI in a fresh process each; their peak RSS comes from ``wait4`` (``ru_maxrss``):

* ``whole``: ``eval.max_pixels=null`` (the behaviour before the pixel budget);
* ``tiled``: the default budget (2 Mpx per window; the CLI says that it tiles; labels are taken
  window by window, so no image-sized logits are held).

The label PNGs of both are compared (identical up to ties of the top two logits), and on a 2000×1500 crop the tiled logits must equal the
whole-image logits (``max_abs_diff``, computed in this process with a budget of 1 Mpx). Results:
``benchmarks/results/predict_memory.json`` with ``rss_ratio`` = whole ÷ tiled.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "camvid" / "deeplabv3plus_r18_cpu.yaml"
SIZE = (3000, 4000)  # H, W
RESULTS = Path(__file__).resolve().parent / "results" / "predict_memory.json"


def _image(path: Path) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, SIZE[0] // 50, SIZE[1] // 50, generator=g)
    smooth = F.interpolate(coarse, size=SIZE, mode="bicubic", align_corners=False)[0]
    noise = 0.05 * torch.randn(3, *SIZE, generator=g)
    rgb = ((smooth + noise).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(rgb)).save(path)


def _predict_rss(work: Path, name: str, overrides: list[str]) -> dict:
    """Run predict in a child and read its peak RSS from wait4 (``ru_maxrss``, KiB on Linux)."""
    out = work / name
    cmd = [sys.executable, "-m", "scaleseg.cli", "predict", str(RECIPE), str(work / "image.png"),
           "--checkpoint", str(work / "model.safetensors"), "--out", str(out), "--quiet", *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    with open(work / f"{name}.err", "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    text = (work / f"{name}.err").read_text()
    if status != 0:
        sys.exit(f"predict ({name}) failed:\n{text[-2000:]}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - start,
            "cpu_s": usage.ru_utime + usage.ru_stime, "notes": [l for l in text.splitlines() if "tiled inference" in l]}


def _model():  # noqa: ANN202
    """The recipe's network, random weights with BN statistics spread so its logits are O(1): an
    untrained network's near-zero logits would make the label comparison a comparison of ties."""
    import torch
    from torch import nn

    from scaleseg import create_model, load_config

    torch.manual_seed(0)
    model = create_model(load_config(RECIPE), 11).eval()
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.02 + 0.05 * torch.rand(m.running_var.shape, generator=g))
    return model


def _logits_check() -> tuple[float, float]:
    """max |tiled − whole| of the logits on a 2000×1500 crop of the same kind of image."""
    import torch

    from scaleseg.tiling import TiledInference

    model = _model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 1500, 2000, generator=g)
    with torch.inference_mode():
        whole = model(x)
        tiled = TiledInference(model, max_pixels=2**20).logits(model, x)
    return float((tiled - whole).abs().max()), float(whole.abs().max())


def main() -> None:
    import numpy as np
    from PIL import Image

    from scaleseg.engine.checkpoint import save_weights

    start, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="scaleseg_predict_memory_") as tmp:
        work = Path(tmp)
        _image(work / "image.png")
        save_weights(_model(), work / "model.safetensors")
        runs = {"whole": _predict_rss(work, "whole", ["eval.max_pixels=null"]),
                "tiled": _predict_rss(work, "tiled", [])}
        labels = {k: np.asarray(Image.open(next((work / k).rglob("*label*.png")))) for k in runs}
        same = bool((labels["whole"] == labels["tiled"]).all())
        mismatch = float((labels["whole"] != labels["tiled"]).mean())
    diff, scale = _logits_check()
    result = {"setup": {"image": list(SIZE), "recipe": str(RECIPE.relative_to(ROOT)), "load_before": load_before},
              "whole": runs["whole"], "tiled": runs["tiled"], "labels_identical": same, "label_mismatch_fraction": mismatch,
              "rss_ratio": runs["whole"]["peak_rss_mib"] / runs["tiled"]["peak_rss_mib"],
              "max_abs_diff": diff, "logit_scale": scale}
    result["setup"].update(load_after=os.getloadavg(), seconds=time.perf_counter() - start)
    for k, r in runs.items():
        print(f"{k:>6}: peak RSS {r['peak_rss_mib']:7.0f} MiB, {r['cpu_s']:6.1f} CPU s, {r['seconds']:6.1f} s wall")
    print(f"  {runs['tiled']['notes'][0] if runs['tiled']['notes'] else 'no tiling note!'}")
    print(f"peak RSS whole ÷ tiled = {result['rss_ratio']:.2f}; label maps identical: {same} ({100 * mismatch:.4f} % of pixels differ); "
          f"logits on a 2000×1500 crop: max |tiled − whole| = {diff:.1e} (logits up to {scale:.1f})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS} ({result['setup']['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
