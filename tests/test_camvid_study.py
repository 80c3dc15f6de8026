"""scripts/camvid_study.py end to end on a tiny arm: train → evaluations → result JSON → table.

The arm is the study's own ``Arm`` and ``run_arm`` with a tiny ScaleScenes config, so what the study
records (the per-class IoU, the confusion matrix it is computed from, the commands, the epoch
times) is pinned, and an arm whose JSON exists is skipped without training again.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.backbone=test_resnet", "model.head_channels=8", "data.dataset=scalescenes", "data.num_images=6",
    "data.image_size=[32,64]", "data.crop_size=[32,64]", "data.scale_range=[1.0,1.0]", "data.color_jitter=0",
    "train.batch_size=3", "train.num_workers=0", "train.accelerator=cpu", "train.progress=false",
    "train.epochs=2", "eval.num_workers=0", "eval.batch_size=3", "optim.lr=0.05",
]


@pytest.fixture
def study(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("camvid_study", REPO / "scripts/camvid_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["camvid_study"] = module
    spec.loader.exec_module(module)
    doc = tmp_path / "results.md"
    doc.write_text("# study\n\n<!-- table:tiny -->\nold\n<!-- /table -->\n\ntext kept\n")
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "DOC", doc)
    config = tmp_path / "tiny.yaml"
    config.write_text("name: tiny\nseed: 0\n")
    arm = module.Arm("tiny_arm", "tiny", "tiny host", str(config), list(TINY),
                     variants={"flip": ([], ["--flip"])})
    monkeypatch.setattr(module, "ARMS", [arm])
    yield module, arm, tmp_path
    sys.modules.pop("camvid_study", None)


def test_an_arm_is_trained_scored_recorded_and_then_skipped(study):
    module, arm, tmp = study
    module.run_arm(arm, tmp / "runs", commit=False)

    result = json.loads((tmp / "results/tiny_arm.json").read_text())
    assert set(result["evals"]) == {"val", "train", "flip"}
    assert result["epochs"] == 2 and len(module.epoch_times(tmp / "runs/tiny_arm")[0]) == 2
    assert result["wall_s"] > 0 and result["resumed"] is False
    assert "--flip" in result["evals"]["flip"]["command"]
    assert "data.val_split=train" in result["evals"]["train"]["command"]

    for name, ev in result["evals"].items():
        metrics = json.loads((tmp / f"runs/tiny_arm/eval_{name}/metrics.json").read_text())
        assert ev["mIoU"] == pytest.approx(metrics["mIoU"])
        # the recorded confusion matrix is the one the IoU came from: IoU_k = C_kk / (row_k + col_k − C_kk)
        mat = np.asarray(ev["confusion_matrix"], dtype=np.float64)
        assert mat.shape == (len(ev["per_class"]),) * 2 and mat.sum() > 0 and (mat == np.round(mat)).all()
        union = mat.sum(0) + mat.sum(1) - np.diag(mat)
        for k, (cls, recorded) in enumerate(ev["per_class"].items()):
            if union[k] == 0:
                assert recorded is None, cls
            else:
                assert recorded == pytest.approx(100 * mat[k, k] / union[k]), cls
        assert ev["mIoU"] == pytest.approx(np.mean([100 * mat[k, k] / union[k] for k in np.flatnonzero(union)]))

    text = (tmp / "results.md").read_text()
    val = result["evals"]["val"]
    assert f"| tiny host | val | **{val['mIoU']:.1f}** |" in text
    assert "old" not in text and text.endswith("text kept\n")

    stamp = (tmp / "results/tiny_arm.json").stat().st_mtime_ns
    module.run_arm(arm, tmp / "runs", commit=False)  # a finished arm is skipped
    assert (tmp / "results/tiny_arm.json").stat().st_mtime_ns == stamp
