"""MobileNetV2 (timm ``mobilenetv2_100``) as the trunk at output stride 8 and 16: strides and channels,
dilation equivalent to the strided network, and every arch/method a ResNet works in."""
from __future__ import annotations

import pytest
import torch

from scaleseg.config import load_config
from scaleseg.models.backbone import Backbone
from scaleseg.models.factory import create_model
from scaleseg.types import StepInfo

NAME = "mobilenetv2_100"
K = 5


@pytest.mark.parametrize(("output_stride", "strides"), [(32, [4, 8, 16, 32]), (16, [4, 8, 16, 16]), (8, [4, 8, 8, 8])])
def test_channels_and_strides(output_stride: int, strides: list[int]) -> None:
    backbone = Backbone(NAME, output_stride=output_stride)
    assert backbone.channels == [24, 32, 96, 320]  # blocks 1, 2, 4, 6 (the 320-wide last block, not the 1280 head)
    assert backbone.strides == strides and backbone.out_indices == (1, 2, 3, 4)
    feats = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [(c, 64 // s, 96 // s) for c, s in zip(backbone.channels, strides)]


@pytest.mark.parametrize("output_stride", [16, 8])
def test_dilation_reproduces_the_strided_network_on_its_grid(output_stride: int) -> None:
    """À trous: with the same weights, the dilated trunk's features sampled every 32/stride pixels equal
    the undilated trunk's features (exact up to float rounding, borders included)."""
    torch.manual_seed(0)
    strided = Backbone(NAME).eval()
    dilated = Backbone(NAME, output_stride=output_stride).eval()
    dilated.load_state_dict(strided.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        reference, dense = strided(x), dilated(x)
    for ref, feat, s_ref, s in zip(reference, dense, strided.strides, dilated.strides):
        step = s_ref // s
        torch.testing.assert_close(feat[..., ::step, ::step], ref, atol=1e-4, rtol=1e-4)
    dw = [m for m in dilated.model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert max(m.dilation[0] for m in dw) == 32 // output_stride
    assert sum(m.stride[0] == 2 for m in dw) == {16: 3, 8: 2}[output_stride]  # strided dw convs left


def test_deeplabv3plus_low_level_feature_is_stride_4() -> None:
    model = create_model(load_config(None, ["model.backbone=" + NAME, "model.output_stride=16"]), K)
    head = model.head
    assert model.backbone.strides[head.feature_index] == 4
    assert head.low_level[0].in_channels == 24 and head.aspp.branches[0][0].in_channels == 320
    assert head.aspp.dilations == (6, 12, 18)


CASES = {
    "deeplabv3plus": ["model.arch=deeplabv3plus", "model.aux_head=true"],
    "deeplabv3": ["model.arch=deeplabv3"],
    "fcn": ["model.arch=fcn"],
    "pspnet": ["model.arch=pspnet"],
    **{f"mcibi-{a}": [f"model.arch={a}", "model.mcibi.enabled=true", "model.mcibi.channels=16"]
       for a in ("deeplabv3plus", "deeplabv3", "fcn", "pspnet")},
    "hmsa": ["model.arch=deeplabv3plus", "model.hmsa.mode=hierarchical", "model.hmsa.attn_channels=8"],
    "dsrl": ["model.arch=deeplabv3plus", "model.dsrl.enabled=true", "model.dsrl.fa_subsample=4"],
}


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_arch_and_method_builds_and_trains(case: str, output_stride: int) -> None:
    cfg = load_config(None, [f"model.backbone={NAME}", f"model.output_stride={output_stride}",
                             "model.head_channels=16", *CASES[case]])
    torch.manual_seed(0)
    model = create_model(cfg, K).train()
    scale = 2 if cfg.model.dsrl.enabled else 1
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(2, 3, 64, 96, generator=g),
             "image_hr": torch.randn(2, 3, 64 * scale, 96 * scale, generator=g),
             "mask": torch.randint(0, K, (2, 64 * scale, 96 * scale), generator=g)}
    losses = model.training_losses(batch, StepInfo(0, 10, 1))
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    first = next(model.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0  # the trunk's stem receives gradient
    model.eval()
    with torch.no_grad():
        assert model(batch["image"][:1]).shape == (1, K, 64 * scale, 96 * scale)
