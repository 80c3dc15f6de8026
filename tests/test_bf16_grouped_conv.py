"""The guard against oneDNN's wrong bf16 weight gradients of grouped dilated channels-last convs."""
import copy

import pytest
import torch
from torch import nn

from scaleseg.config import load_config
from scaleseg.engine.bf16_grouped_conv import GuardedGroupedDilatedConv2d, guard_grouped_dilated_convs
from scaleseg.engine.speed import to_channels_last

# shapes where this machine's oneDNN (torch 2.14.1, AVX512-BF16, no AMX) gave weight gradients
# off by 1.4x-1e28 of their magnitude without the guard
SHAPES = [(64, 40, 40, 2, 64), (256, 22, 30, 6, 256), (32, 22, 30, 3, 8)]


def _weight_grad(conv: nn.Conv2d, x: torch.Tensor, gy: torch.Tensor, bf16: bool) -> torch.Tensor:
    conv.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = conv(x)
    (y.float() * gy).sum().backward()
    return conv.weight.grad.clone()


@pytest.mark.parametrize("c,h,w,d,groups", SHAPES)
def test_guarded_conv_in_channels_last_bf16_has_the_float32_weight_gradient(c, h, w, d, groups):
    torch.manual_seed(0)
    plain = nn.Conv2d(c, c, 3, padding=d, dilation=d, groups=groups, bias=False)
    x, gy = torch.randn(2, c, h, w), torch.randn(2, c, h, w)
    reference = _weight_grad(plain, x, gy, bf16=False)  # float32, NCHW
    guarded = to_channels_last(copy.deepcopy(plain))
    assert type(guarded) is GuardedGroupedDilatedConv2d
    got = _weight_grad(guarded, x.contiguous(memory_format=torch.channels_last), gy, bf16=True)
    assert float((got - reference).abs().max() / reference.abs().max()) < 0.02  # bf16 rounding: ~0.004


def test_guard_is_the_plain_conv_outside_bf16_training_and_keeps_parameters():
    torch.manual_seed(0)
    plain = nn.Conv2d(32, 32, 3, padding=2, dilation=2, groups=32, bias=True)
    guarded = copy.deepcopy(plain)
    weight = guarded.weight
    assert guard_grouped_dilated_convs(guarded) == [""]
    assert guarded.weight is weight and guarded.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(1, 32, 12, 16).contiguous(memory_format=torch.channels_last)
    for grad, bf16 in ((True, False), (False, True)):  # float32 training; bf16 inference
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            a, b = plain(x), guarded(x)
        assert a.dtype == b.dtype and torch.equal(a, b)
        assert a.is_contiguous(memory_format=torch.channels_last) == b.is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = guarded(x)
    assert out.dtype == torch.bfloat16 and out.is_contiguous()  # the guarded path: bf16, NCHW


def test_only_grouped_dilated_plain_convs_are_guarded_in_a_separable_deeplab():
    import scaleseg

    cfg = load_config(None, ["model.backbone=test_resnet", "model.pretrained=false", "model.separable=true",
                             "model.head_channels=16"])
    model = scaleseg.create_model(cfg, 5)
    names = guard_grouped_dilated_convs(model)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    expected = [n for n, m in convs.items() if m.groups > 1 and max(m.dilation) > 1]
    assert names == expected and len(names) >= 3  # the three atrous ASPP branches' depthwise convs
    assert all(".aspp.branches." in n for n in names)
    assert all(type(m) is nn.Conv2d for n, m in convs.items() if n not in names)
