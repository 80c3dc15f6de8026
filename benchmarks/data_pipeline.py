"""Data pipeline throughput vs training throughput on CamVid at 360×480, in one run.

Measures (images/s): the training pipeline (read PNG, random scale 0.5–2.0, crop 360×480, flip,
colour jitter, normalise) through a DataLoader with 0 and with 2 workers, and DeepLabV3+ ResNet-18
training steps (forward + backward + SGD) at batch 4. Writes benchmarks/results/data_pipeline.json.
Falls back to ScaleScenes rendered at 360×480 when ../shared/data/camvid is absent.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from scaleseg.config import load_config  # noqa: E402
from scaleseg.data.sampler import EpochSampler  # noqa: E402
from scaleseg.engine.datamodule import build_dataset  # noqa: E402
from scaleseg.data.transforms import train_transform  # noqa: E402
from scaleseg.models.factory import create_model  # noqa: E402
from scaleseg.types import StepInfo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "data" / "camvid"
CROP = (360, 480)
PIPELINE_IMAGES = 96
TRAIN_BATCH, TRAIN_STEPS, WARMUP_STEPS = 4, 6, 2


def make_config():
    if CAMVID.is_dir():
        data = ["data.dataset=camvid", f"data.root={CAMVID}"]
    else:
        print("../shared/data/camvid not found: using ScaleScenes at 360×480 instead")
        data = ["data.dataset=scalescenes", "data.image_size=[360,480]", "data.num_images=120"]
    return load_config(None, data + ["model.arch=deeplabv3plus", "model.backbone=resnet18", "model.output_stride=16",
                                     f"data.crop_size=[{CROP[0]},{CROP[1]}]", "data.scale_range=[0.5,2.0]"])


def pipeline_rate(dataset, workers: int) -> float:
    """Images/s through a DataLoader (batch 4), after the first batch (worker start-up) is served."""
    sampler = EpochSampler(len(dataset), shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=workers)
    it = iter(loader)
    next(it)
    seen, start = 0, time.perf_counter()
    for batch in it:
        seen += batch["image"].shape[0]
        if seen >= PIPELINE_IMAGES:
            break
    return seen / (time.perf_counter() - start)


def train_rate(cfg, num_classes: int) -> float:
    torch.manual_seed(0)
    model = create_model(cfg, num_classes).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = {"image": torch.randn(TRAIN_BATCH, 3, *CROP), "mask": torch.randint(0, num_classes, (TRAIN_BATCH, *CROP))}
    elapsed = 0.0
    for step in range(WARMUP_STEPS + TRAIN_STEPS):
        start = time.perf_counter()
        loss = sum(model.training_losses(batch, StepInfo(step, 100, 0)).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= WARMUP_STEPS:
            elapsed += time.perf_counter() - start
    return TRAIN_BATCH * TRAIN_STEPS / elapsed


def main() -> dict:
    cfg = make_config()
    dataset = build_dataset(cfg.data, "train", None, seed=0)
    dataset.transform = train_transform(CROP, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                                        scale_range=(0.5, 2.0), color_jitter=0.25)
    result = {
        "dataset": cfg.data.dataset,
        "crop": list(CROP),
        "torch_threads": torch.get_num_threads(),
        "pipeline_img_s_w0": pipeline_rate(dataset, 0),
        "pipeline_img_s_w2": pipeline_rate(dataset, 2),
        "train_step_img_s": train_rate(cfg, dataset.spec.num_classes),
    }
    result["w2_over_w0"] = result["pipeline_img_s_w2"] / result["pipeline_img_s_w0"]
    result["pipeline_w2_over_train"] = result["pipeline_img_s_w2"] / result["train_step_img_s"]
    for key, value in result.items():
        print(f"{key:>24}: {value:.3f}" if isinstance(value, float) else f"{key:>24}: {value}")
    out = ROOT / "benchmarks" / "results" / "data_pipeline.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
