"""Each method trains end to end through the Lightning task on a tiny ScaleScenes budget."""
from __future__ import annotations

import json

import pytest
import torch

from scaleseg.config import load_config
from scaleseg.engine.train import train

TINY = ["model.backbone=test_resnet", "model.head_channels=16", "data.dataset=scalescenes",
        "data.num_images=8", "data.image_size=[64,128]", "data.crop_size=[64,128]", "data.scale_range=[1.0,1.0]",
        "train.epochs=1", "train.batch_size=4", "train.num_workers=0", "train.accelerator=cpu",
        "train.progress=false", "eval.num_workers=0", "eval.batch_size=4"]


def run(tmp_path, *extra: str) -> dict:
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path / 'run'}", *extra])
    train(cfg)
    return json.loads((tmp_path / "run" / "metrics.json").read_text())


def test_dsrl_logs_sisr_psnr_ssim_and_scores_at_label_resolution(tmp_path):
    metrics = run(tmp_path, "model.dsrl.enabled=true", "model.dsrl.fa_subsample=4")
    assert {"sisr_psnr", "sisr_ssim", "psnr_upsampled_input"} <= set(metrics)
    assert 0 < metrics["sisr_psnr"] < 100 and -1 <= metrics["sisr_ssim"] <= 1
    # every validation pixel of the 64×128 labels is scored (the input was 32×64)
    total = sum(map(sum, metrics["confusion_matrix"]))
    assert total == 8 * 64 * 128 - _ignored(8)


def _ignored(n: int) -> int:
    from scaleseg.data.scalescenes import ScaleScenes

    data = ScaleScenes("val", num_images=n, size=(64, 128))
    return sum(int((data.load_raw(i)[1] == 255).sum()) for i in range(n))


@pytest.mark.parametrize("extra", [
    ["model.hmsa.mode=hierarchical", "eval.scales=[0.5,1.0]"],
    ["model.hmsa.mode=explicit", "model.hmsa.explicit_scales=[0.5,1.0]"],
    ["model.mcibi.enabled=true", "model.mcibi.channels=16", "model.mcibi.consistency_start_epoch=0"],
    ["loss.name=rmi", "model.aux_head=true"],
])
def test_methods_train_and_validate(tmp_path, extra):
    metrics = run(tmp_path, *extra)
    assert metrics["mIoU"] is not None and 0 <= metrics["mIoU"] <= 100


def test_mcibi_memory_is_trained_and_saved(tmp_path):
    run(tmp_path, "model.mcibi.enabled=true", "model.mcibi.channels=16")
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "run" / "model.safetensors"))
    memory = [k for k in state if k.endswith("memory")]
    assert memory, "the memory buffer is part of the saved weights"
    assert state[memory[0]].abs().sum() > 0
    flags = [k for k in state if k.endswith("initialized")]
    assert flags and bool(state[flags[0]].any())
    assert torch.isfinite(state[memory[0]]).all()
