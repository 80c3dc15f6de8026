"""timm's TensorFlow-style "SAME" padding layers, with the padding computed in integer arithmetic.

timm's ``pad_same`` computes ``math.ceil(size / stride)``; traced with a symbolic size that becomes a
``math.ceil`` node, which ``torch.export.save`` cannot serialise (``op ceil is not in _SYM_OPS``).
``AvgPool2dSame`` appears in every avg-down ResNet (``test_resnet``, ``resnet50d``) at output stride
8/16, ``Conv2dSame``/``MaxPool2dSame`` in the ``tf_`` EfficientNets. :func:`make_exportable` swaps
those modules' classes for subclasses whose padding is ``((size + s − 1) // s − 1)·s + (k − 1)·d + 1
− size`` (the same values as timm's formula), so the parameters and their names are unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
from torch import Tensor, nn

__all__ = ["make_exportable", "pad_same"]


def _same(size: int, kernel: int, stride: int, dilation: int) -> int:
    return torch.sym_max(((size + stride - 1) // stride - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def pad_same(x: Tensor, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int] = (1, 1),
             value: float = 0.0) -> Tensor:
    """timm's ``pad_same`` (TensorFlow "SAME": extra pixel at the bottom/right) in integer arithmetic."""
    pad_h = _same(x.shape[-2], kernel[0], stride[0], dilation[0])
    pad_w = _same(x.shape[-1], kernel[1], stride[1], dilation[1])
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)


class _AvgPool2dSame(AvgPool2dSame):
    def forward(self, x: Tensor) -> Tensor:
        x = pad_same(x, self.kernel_size, self.stride)
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad)


class _MaxPool2dSame(MaxPool2dSame):
    def forward(self, x: Tensor) -> Tensor:
        x = pad_same(x, self.kernel_size, self.stride, self.dilation, value=-float("inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride, (0, 0), self.dilation, self.ceil_mode)


class _Conv2dSame(Conv2dSame):
    def forward(self, x: Tensor) -> Tensor:
        x = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


_SWAP = ((AvgPool2dSame, _AvgPool2dSame), (MaxPool2dSame, _MaxPool2dSame), (Conv2dSame, _Conv2dSame))


def make_exportable(model: nn.Module) -> nn.Module:
    """Swap timm's SAME-padding modules in ``model`` (in place) for the integer-padding subclasses."""
    for module in model.modules():
        for timm_cls, ours in _SWAP:
            if type(module) is timm_cls:
                module.__class__ = ours
    return model
