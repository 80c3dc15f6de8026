"""Confusion-matrix metrics: mIoU, aAcc, mAcc, mDice, fwIoU and a per-class table.

``ConfusionMatrix`` is a torchmetrics ``Metric`` whose K×K state is summed across ranks (gloo on CPU,
NCCL on GPU), so distributed evaluation gives the same numbers as one process. ``scores`` turns the
matrix into JSON-serialisable percentages. For predictions restricted to the train classes the class
mIoU equals the official Cityscapes evaluator's (tests/test_cityscapes_official.py checks it).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from scaleseg.errors import ConfigError, DataError

__all__ = ["ConfusionMatrix", "scores", "format_table"]


class ConfusionMatrix(Metric):
    """Accumulates a ``K×K`` int64 confusion matrix (rows = ground truth, columns = prediction).

    ``update(preds, target)`` takes ``preds`` as integer labels of the same shape as ``target``
    (e.g. ``B×H×W``) or as ``B×K×H×W`` logits (arg-maxed over dim 1). Pixels whose target equals
    ``ignore_index`` are skipped; any other value outside ``[0, K)`` in the target, or any prediction
    outside ``[0, K)``, raises ``DataError`` naming the value.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    mat: Tensor

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes={num_classes!r}: expected a positive int")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state(
            "mat", default=torch.zeros(num_classes, num_classes, dtype=torch.int64), dist_reduce_fx="sum"
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch: ``preds`` ``B×H×W`` int labels or ``B×K×H×W`` logits; ``target`` ``B×H×W``."""
        k = self.num_classes
        if preds.is_floating_point():
            if preds.dim() != target.dim() + 1 or preds.shape[1] != k:
                raise DataError(
                    f"logits of shape {tuple(preds.shape)}: expected B×{k}×H×W for a target of shape "
                    f"{tuple(target.shape)}"
                )
            preds = preds.argmax(dim=1)
        if preds.shape != target.shape:
            raise DataError(
                f"prediction shape {tuple(preds.shape)} != target shape {tuple(target.shape)}"
            )
        if target.is_floating_point():
            raise DataError(f"target dtype {target.dtype}: expected integer labels")
        preds = preds.to(device=self.mat.device, dtype=torch.int64).reshape(-1)
        target = target.to(device=self.mat.device, dtype=torch.int64).reshape(-1)
        valid = target != self.ignore_index
        _check_range(target[valid], k, "target", f" (ignore_index={self.ignore_index})")
        _check_range(preds, k, "prediction", "")
        index = target[valid] * k + preds[valid]
        self.mat += torch.bincount(index, minlength=k * k).reshape(k, k)

    def compute(self) -> Tensor:
        """The accumulated ``K×K`` int64 matrix (rows = ground truth, columns = prediction)."""
        return self.mat


def _check_range(values: Tensor, k: int, what: str, note: str) -> None:
    """Raise DataError naming the first value outside ``[0, k)`` (one device sync)."""
    bad = (values < 0) | (values >= k)
    if bool(bad.any()):
        value = int(values[bad][0])
        raise DataError(f"{what} value {value} outside [0, {k}){note}")


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _nanmean(values: Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else float("nan")


def scores(mat: Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Scores in percent from a ``K×K`` confusion matrix (rows = ground truth, columns = prediction).

    - ``mIoU``: mean over classes of ``diag / (rowsum + colsum − diag)``; classes absent from both
      ground truth and predictions (zero denominator) are NaN and left out of the mean;
    - ``mAcc``: mean class recall ``diag / rowsum`` over classes present in the ground truth;
    - ``mDice``: mean ``2·diag / (rowsum + colsum)`` over the same classes as mIoU;
    - ``aAcc``: ``trace / total``; ``fwIoU``: IoU weighted by ground-truth class frequency;
    - ``per_class`` / ``per_class_acc``: ``{name: IoU% / recall% or None}``.

    Every value is a float or ``None`` (for NaN), so the dict is JSON-serialisable.
    """
    if mat.dim() != 2 or mat.shape[0] != mat.shape[1]:
        raise DataError(f"confusion matrix of shape {tuple(mat.shape)}: expected K×K")
    if len(class_names) != mat.shape[0]:
        raise ConfigError(f"{len(class_names)} class names for a {mat.shape[0]}-class confusion matrix")
    m = mat.detach().to("cpu", torch.float64)
    diag = m.diagonal()
    gt, pred = m.sum(1), m.sum(0)
    total = m.sum()
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    union = gt + pred - diag
    iou = torch.where(union > 0, diag / union.clamp(min=1), nan)
    acc = torch.where(gt > 0, diag / gt.clamp(min=1), nan)
    dice = torch.where(gt + pred > 0, 2 * diag / (gt + pred).clamp(min=1), nan)
    if total > 0:
        a_acc = float(diag.sum() / total)
        fw_iou = float((gt / total * torch.nan_to_num(iou)).sum())
    else:
        a_acc = fw_iou = float("nan")
    return {
        "mIoU": _nan_to_none(100 * _nanmean(iou)),
        "mAcc": _nan_to_none(100 * _nanmean(acc)),
        "mDice": _nan_to_none(100 * _nanmean(dice)),
        "aAcc": _nan_to_none(100 * a_acc),
        "fwIoU": _nan_to_none(100 * fw_iou),
        "per_class": {n: _nan_to_none(100 * float(v)) for n, v in zip(class_names, iou)},
        "per_class_acc": {n: _nan_to_none(100 * float(v)) for n, v in zip(class_names, acc)},
    }


def _fmt(value: float | None) -> str:
    return "  nan" if value is None else f"{value:6.2f}"


def format_table(result: dict[str, Any]) -> str:
    """A plain-text per-class table (class, IoU, Acc) followed by the summary lines of ``scores``."""
    names = list(result["per_class"])
    width = max([len("class"), *(len(n) for n in names)])
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}", "-" * (width + 16)]
    accs = result.get("per_class_acc", {})
    for name in names:
        lines.append(f"{name:<{width}}  {_fmt(result['per_class'][name]):>6}  {_fmt(accs.get(name)):>6}")
    lines.append("-" * (width + 16))
    for key in ("mIoU", "mAcc", "mDice", "aAcc", "fwIoU"):
        if key in result:
            lines.append(f"{key:<{width}}  {_fmt(result[key]):>6}")
    return "\n".join(lines)
