"""ConfusionMatrix and scores against plain-loop float64 references and hand-computed values."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scaleseg.errors import ConfigError, DataError
from scaleseg.metrics import ConfusionMatrix, format_table, scores


def loop_confusion(preds: np.ndarray, target: np.ndarray, k: int, ignore: int = 255) -> np.ndarray:
    """Plain per-pixel reference."""
    mat = np.zeros((k, k), np.int64)
    for p, t in zip(preds.reshape(-1), target.reshape(-1)):
        if t != ignore:
            mat[t, p] += 1
    return mat


def random_batch(gen: torch.Generator, k: int, shape=(2, 9, 11)) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.randint(0, k, shape, generator=gen)
    target[torch.rand(shape, generator=gen) < 0.2] = 255
    preds = torch.randint(0, k, shape, generator=gen)
    return preds, target


def test_confusion_matches_plain_loop_over_several_updates():
    gen = torch.Generator().manual_seed(0)
    k = 5
    metric = ConfusionMatrix(k)
    ref = np.zeros((k, k), np.int64)
    for _ in range(3):
        preds, target = random_batch(gen, k)
        metric.update(preds, target)
        ref += loop_confusion(preds.numpy(), target.numpy(), k)
    mat = metric.compute()
    assert mat.dtype == torch.int64 and mat.shape == (k, k)
    np.testing.assert_array_equal(mat.numpy(), ref)
    metric.reset()
    assert int(metric.mat.sum()) == 0


def test_confusion_accepts_logits_and_uint8_targets():
    gen = torch.Generator().manual_seed(1)
    k = 4
    logits = torch.randn(2, k, 6, 7, generator=gen)
    target = torch.randint(0, k, (2, 6, 7), generator=gen).to(torch.uint8)
    target[0, 0, :3] = 255
    metric = ConfusionMatrix(k)
    metric.update(logits, target)
    ref = loop_confusion(logits.argmax(1).numpy(), target.numpy().astype(np.int64), k)
    np.testing.assert_array_equal(metric.compute().numpy(), ref)


def test_custom_ignore_index():
    metric = ConfusionMatrix(3, ignore_index=-1)
    metric.update(torch.tensor([[0, 1, 2, 2]]), torch.tensor([[0, -1, 2, 1]]))
    np.testing.assert_array_equal(metric.compute().numpy(), [[1, 0, 0], [0, 0, 1], [0, 0, 1]])


@pytest.mark.parametrize(
    "preds, target, message",
    [
        ([[0, 1]], [[0, 7]], "target value 7"),
        ([[0, 1]], [[-3, 1]], "target value -3"),
        ([[0, 9]], [[0, 1]], "prediction value 9"),
        ([[0, 255]], [[0, 255]], "prediction value 255"),
    ],
)
def test_out_of_range_values_raise_naming_the_value(preds, target, message):
    metric = ConfusionMatrix(3)
    with pytest.raises(DataError, match=message):
        metric.update(torch.tensor(preds), torch.tensor(target))


def test_shape_mismatch_raises():
    metric = ConfusionMatrix(3)
    with pytest.raises(DataError, match="shape"):
        metric.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(DataError, match="logits"):
        metric.update(torch.zeros(1, 5, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))


def test_scores_hand_example():
    # rows = GT, cols = prediction; class 3 absent from GT and predictions -> NaN/None.
    mat = torch.tensor([[3, 1, 0, 0], [2, 4, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    res = scores(mat, ["a", "b", "c", "d"])
    iou = [3 / (4 + 5 - 3), 4 / (6 + 6 - 4), 1 / (2 + 1 - 1)]  # 0.5, 0.5, 0.5
    acc = [3 / 4, 4 / 6, 1 / 2]
    dice = [2 * 3 / 9, 2 * 4 / 12, 2 * 1 / 3]
    total = 12
    assert res["mIoU"] == pytest.approx(100 * sum(iou) / 3)
    assert res["mAcc"] == pytest.approx(100 * sum(acc) / 3)
    assert res["mDice"] == pytest.approx(100 * sum(dice) / 3)
    assert res["aAcc"] == pytest.approx(100 * 8 / total)
    assert res["fwIoU"] == pytest.approx(100 * (4 * iou[0] + 6 * iou[1] + 2 * iou[2]) / total)
    assert res["per_class"] == pytest.approx({"a": 50.0, "b": 50.0, "c": 50.0, "d": None})
    assert res["per_class"]["d"] is None and res["per_class_acc"]["d"] is None
    assert res["per_class_acc"]["b"] == pytest.approx(100 * 4 / 6)
    json.dumps(res, allow_nan=False)  # no NaN leaks into the result


def test_class_only_predicted_counts_with_zero_iou():
    # class 1 never in GT but predicted: IoU 0 (included in mIoU), recall NaN (excluded from mAcc).
    mat = torch.tensor([[2, 2], [0, 0]])
    res = scores(mat, ["x", "y"])
    assert res["per_class"] == {"x": 50.0, "y": 0.0}
    assert res["mIoU"] == pytest.approx(25.0)
    assert res["mAcc"] == pytest.approx(50.0)
    assert res["per_class_acc"]["y"] is None


def test_scores_match_float64_loop_reference():
    gen = np.random.default_rng(3)
    k = 6
    mat = gen.integers(0, 50, (k, k))
    mat[4, :] = 0  # class 4 absent from GT but predicted
    mat[5, :] = 0
    mat[:, 5] = 0  # class 5 absent everywhere
    res = scores(torch.from_numpy(mat), [f"c{i}" for i in range(k)])
    ious, accs, weighted = [], [], 0.0
    total = mat.sum()
    for c in range(k):
        tp, gt, pr = mat[c, c], mat[c, :].sum(), mat[:, c].sum()
        if gt + pr - tp > 0:
            ious.append(tp / (gt + pr - tp))
            weighted += gt / total * tp / (gt + pr - tp)
        if gt > 0:
            accs.append(tp / gt)
    assert len(ious) == 5 and len(accs) == 4
    assert res["mIoU"] == pytest.approx(100 * float(np.mean(ious)), rel=1e-12)
    assert res["mAcc"] == pytest.approx(100 * float(np.mean(accs)), rel=1e-12)
    assert res["aAcc"] == pytest.approx(100 * np.trace(mat) / total, rel=1e-12)
    assert res["fwIoU"] == pytest.approx(100 * weighted, rel=1e-12)
    assert res["per_class"]["c5"] is None and res["per_class"]["c4"] == 0.0


def test_empty_matrix_gives_none():
    res = scores(torch.zeros(3, 3, dtype=torch.long), ["a", "b", "c"])
    assert res["mIoU"] is None and res["aAcc"] is None and res["fwIoU"] is None
    assert json.loads(json.dumps(res))["mIoU"] is None


def test_scores_rejects_wrong_class_names():
    with pytest.raises(ConfigError, match="2 class names"):
        scores(torch.zeros(3, 3, dtype=torch.long), ["a", "b"])


def test_format_table_lists_classes_and_summary():
    mat = torch.tensor([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
    res = scores(mat, ["road", "sidewalk", "sky"])
    table = format_table(res)
    lines = table.splitlines()
    assert lines[0].split() == ["class", "IoU", "Acc"]
    road = next(line for line in lines if line.startswith("road"))
    assert road.split() == ["road", f"{res['per_class']['road']:.2f}", f"{res['per_class_acc']['road']:.2f}"]
    sky = next(line for line in lines if line.startswith("sky"))
    assert sky.split() == ["sky", "nan", "nan"]
    miou = next(line for line in lines if line.startswith("mIoU"))
    assert miou.split() == ["mIoU", f"{res['mIoU']:.2f}"]
    assert any(line.startswith("fwIoU") for line in lines) and any(line.startswith("aAcc") for line in lines)


def _sync_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # forked child: stay off the parent's OpenMP pool (as DataLoader workers do)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        gen = torch.Generator().manual_seed(100 + rank)
        metric = ConfusionMatrix(4)
        preds, target = random_batch(gen, 4, (1, 5, 6))
        metric.update(preds, target)
        torch.save(metric.compute(), os.path.join(out_dir, f"mat{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")
def test_matrix_is_summed_across_ranks_with_gloo(tmp_path):
    """Two real gloo processes: every rank's compute() returns the sum of both local matrices."""
    # fork: the children reuse the imported modules (spawn would re-import torch and torchmetrics).
    mp.start_processes(
        _sync_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    local = []
    for rank in range(2):
        preds, target = random_batch(torch.Generator().manual_seed(100 + rank), 4, (1, 5, 6))
        local.append(loop_confusion(preds.numpy(), target.numpy(), 4))
    for rank in range(2):
        mat = torch.load(tmp_path / f"mat{rank}.pt", weights_only=True)
        np.testing.assert_array_equal(mat.numpy(), local[0] + local[1])
    assert local[0].sum() > 0 and local[1].sum() > 0
