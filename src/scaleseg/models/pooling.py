"""Adaptive average pooling as two small matrix products, valid for every input size when exported.

``torch.nn.functional.adaptive_avg_pool2d`` is decomposed by torch.export / the ONNX exporter into
index arithmetic whose form depends on whether the input size is a multiple of the output size; the
exported graph is then only correct for sizes in the example input's class (onnxruntime fails with
an out-of-bounds Gather on the others). Written by hand for that reason: the same windows as PyTorch
(bin ``i`` of ``n`` inputs into ``b`` bins averages ``[floor(i·n/b), ceil((i+1)·n/b))``) as a
``b×n`` averaging matrix per axis, so the traced graph has no size-dependent branch.

Eager code keeps torch's kernel (faster, and FLOP counters do not see pooling as matmuls); the matrix
form is used while tracing (``torch.compiler.is_compiling()``: torch.export, ONNX, torch.compile). The
two agree to float rounding (≤ 3e-7 on unit-variance inputs, tested).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AdaptiveAvgPool2d", "adaptive_avg_pool2d", "matrix_adaptive_avg_pool2d", "pooling_matrix"]


def pooling_matrix(size: int, bins: int, *, device: torch.device | None = None,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """``bins×size`` matrix whose row ``i`` averages inputs ``floor(i·size/bins) … ceil((i+1)·size/bins) − 1``."""
    i = torch.arange(bins, device=device)
    start = (i * size) // bins
    end = ((i + 1) * size + bins - 1) // bins
    j = torch.arange(size, device=device)
    inside = (j >= start[:, None]) & (j < end[:, None])
    return inside.to(dtype) / (end - start).to(dtype)[:, None]


def adaptive_avg_pool2d(x: Tensor, output_size: int | Sequence[int]) -> Tensor:
    """``B×C×H×W`` → ``B×C×h×w`` with PyTorch's adaptive-average windows (``output_size`` h or (h, w)).

    ``F.adaptive_avg_pool2d`` in eager mode; while tracing, :func:`matrix_adaptive_avg_pool2d`.
    """
    if not torch.compiler.is_compiling():
        return F.adaptive_avg_pool2d(x, output_size)
    return matrix_adaptive_avg_pool2d(x, output_size)


def matrix_adaptive_avg_pool2d(x: Tensor, output_size: int | Sequence[int]) -> Tensor:
    """Adaptive average pooling as ``rows @ x @ colsᵀ`` with :func:`pooling_matrix` (equals
    ``F.adaptive_avg_pool2d`` up to float rounding: the mean is taken as a weighted sum)."""
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    rows = pooling_matrix(x.shape[-2], oh, device=x.device, dtype=x.dtype)  # oh×H
    cols = pooling_matrix(x.shape[-1], ow, device=x.device, dtype=x.dtype)  # ow×W
    return rows @ x @ cols.transpose(0, 1)


class AdaptiveAvgPool2d(nn.Module):
    """Module form of :func:`adaptive_avg_pool2d` (no parameters, a drop-in for ``nn.AdaptiveAvgPool2d``)."""

    def __init__(self, output_size: int | Sequence[int]) -> None:
        super().__init__()
        self.output_size = output_size

    def forward(self, x: Tensor) -> Tensor:
        return adaptive_avg_pool2d(x, self.output_size)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"
