"""A guard against a oneDNN bug: wrong weight gradients of grouped, dilated channels-last convs in bf16.

On the CPU, under ``torch.autocast(dtype=bfloat16)``, oneDNN's ``jit_bf16`` backward-weights kernel
gives a grouped conv (``groups > 1``: depthwise included) with ``dilation > 1`` and stride 1 in
channels-last (NHWC) layout a weight gradient that is wrong by more than its own magnitude (up to
1e28 relative error), and for some shapes crashes the process. Seen with torch 2.14.1 on an
AVX512-BF16 CPU without AMX: 53 of 72 such shapes wrong or crashing, none in NCHW, none with
``groups=1`` or stride 2, forward and input gradients correct. DeepLabV3+ with separable ASPP
(rate 6 at 22×30) diverged from it within 31 steps (non-finite BatchNorm statistics).

:func:`guard_grouped_dilated_convs` makes each such ``nn.Conv2d`` run in NCHW when, and only when,
the bug can bite: a CPU tensor, bf16 autocast on, gradients enabled. Elsewhere (inference, float32,
CUDA, ONNX export) it is the plain conv. Parameters, ``state_dict`` and checkpoints are unchanged.
The cost is two layout conversions of that conv's input and output; these convs are small: a
training step of the strong recipe's network at 4×352×480 took 0.912 s guarded, 0.942 s unguarded.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["GuardedGroupedDilatedConv2d", "guard_grouped_dilated_convs", "is_grouped_dilated"]


def is_grouped_dilated(module: nn.Module) -> bool:
    """A plain 2-D conv with ``groups > 1`` and a dilation above 1: the shape class the bug hits."""
    return type(module) is nn.Conv2d and module.groups > 1 and max(module.dilation) > 1


def _bug_can_bite(x: Tensor) -> bool:
    return (x.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


class GuardedGroupedDilatedConv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes in NCHW under CPU bf16 autocast with gradients on (module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        if _bug_can_bite(x):
            # clone: a depthwise weight (C×1×k×k) in channels-last also counts as contiguous, and
            # .contiguous() would keep its NHWC strides, which still select the broken kernel
            weight = self.weight.clone(memory_format=torch.contiguous_format)
            return self._conv_forward(x.contiguous(), weight, self.bias)
        return super().forward(x)


def guard_grouped_dilated_convs(model: nn.Module) -> list[str]:
    """Turn every grouped dilated ``nn.Conv2d`` of ``model`` into :class:`GuardedGroupedDilatedConv2d`
    in place (same parameters and buffers); returns their names."""
    guarded = []
    for name, module in model.named_modules():
        if is_grouped_dilated(module):
            module.__class__ = GuardedGroupedDilatedConv2d
            guarded.append(name)
    return guarded
