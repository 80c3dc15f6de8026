"""Our trainId mIoU equals cityscapesScripts' official pixel-level evaluator on labelId PNGs.

The LUT is written here from the labels table (docs: datasets-and-ecosystem.md §3) so this test does
not depend on scaleseg.data.cityscapes.
"""
from __future__ import annotations

import copy
import importlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from scaleseg.metrics import ConfusionMatrix, scores

pytest.importorskip("cityscapesscripts", reason="needs cityscapesscripts (pip install scaleseg[test])")
pytest.importorskip("pyquaternion", reason="the official evaluator imports pyquaternion")

TRAIN_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
TRAIN_NAMES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
]  # fmt: skip
LABEL_TO_TRAIN = np.full(256, 255, np.uint8)
LABEL_TO_TRAIN[TRAIN_LABEL_IDS] = np.arange(19)
TRAIN_TO_LABEL = np.zeros(256, np.uint8)
TRAIN_TO_LABEL[:19] = TRAIN_LABEL_IDS


def make_pair(rng: np.random.Generator, shape=(64, 128), agree: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """GT labelIds 0..33 and a trainId prediction agreeing with the GT trainId on ~``agree`` of pixels."""
    gt = rng.integers(0, 34, shape).astype(np.uint8)
    gt_train = LABEL_TO_TRAIN[gt]
    pred = rng.integers(0, 19, shape).astype(np.uint8)
    keep = (rng.random(shape) < agree) & (gt_train != 255)
    pred[keep] = gt_train[keep]
    return gt, pred


@pytest.mark.parametrize("inst_level", [False, True])
def test_miou_equals_official_evaluator(tmp_path, monkeypatch, inst_level):
    rng = np.random.default_rng(0)
    gt_dir, pred_dir = tmp_path / "gtFine" / "val" / "frankfurt", tmp_path / "results"
    gt_dir.mkdir(parents=True)
    pred_dir.mkdir()
    metric = ConfusionMatrix(19)
    gts, preds = [], []
    seen_ids: set[int] = set()
    for i in range(4):
        gt, pred = make_pair(rng)
        seen_ids |= set(np.unique(gt).tolist())
        stem = f"frankfurt_000000_{i:06d}"
        gts.append(str(gt_dir / f"{stem}_gtFine_labelIds.png"))
        preds.append(str(pred_dir / f"{stem}_pred.png"))
        Image.fromarray(gt).save(gts[-1])
        Image.fromarray(gt).save(gts[-1].replace("labelIds", "instanceIds"))  # no instances (ids < 1000)
        Image.fromarray(TRAIN_TO_LABEL[pred]).save(preds[-1])  # official format: labelIds
        target = LABEL_TO_TRAIN[gt].astype(np.int64)
        metric.update(torch.from_numpy(pred.astype(np.int64))[None], torch.from_numpy(target)[None])
    assert seen_ids == set(range(34))

    # The evaluator resolves paths from the environment at import time and NumPy >= 2.4 lacks in1d.
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path))
    if not hasattr(np, "in1d"):
        monkeypatch.setattr(np, "in1d", np.isin, raising=False)
    ev = importlib.import_module("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    args = copy.copy(ev.args)
    args.quiet, args.JSONOutput, args.evalInstLevelScore = True, False, inst_level
    result = ev.evaluateImgLists(preds, gts, args)

    ours = scores(metric.compute(), TRAIN_NAMES)
    official = result["averageScoreClasses"] * 100
    assert 30 < ours["mIoU"] < 70  # a non-trivial agreement level, not a degenerate case
    assert ours["mIoU"] == pytest.approx(official, abs=1e-6)
    for name in TRAIN_NAMES:
        assert ours["per_class"][name] == pytest.approx(result["classScores"][name] * 100, abs=1e-6)
