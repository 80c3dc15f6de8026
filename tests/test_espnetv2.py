"""ESPNetv2: EESP structure, encoder/decoder shapes for every width, published size and cost."""
from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from scaleseg.errors import ConfigError
from scaleseg.models.espnetv2 import (
    CHANNELS,
    EESP,
    DownSampler,
    ESPNetv2Backbone,
    ESPNetv2Head,
    Shuffle,
    edgenets_key_map,
    eesp_dilations,
    espnetv2_seg,
)


def test_eesp_dilations_follow_the_receptive_field_limit() -> None:
    assert eesp_dilations(4, 13) == [1, 2, 3, 4]  # kernels 3, 5, 7, 9 all within 13
    assert eesp_dilations(4, 9) == [1, 2, 3, 4]
    assert eesp_dilations(4, 7) == [1, 1, 2, 3]  # 9 > 7 → 3×3, sorted
    assert eesp_dilations(4, 5) == [1, 1, 1, 2]
    unit = EESP(16, 16, r_lim=7)
    assert [m.conv.dilation[0] for m in unit.spp_dw] == [1, 1, 2, 3]
    assert all(m.conv.groups == 4 for m in unit.spp_dw)  # depthwise on n = 16 / 4 channels
    assert unit.proj_1x1.conv.groups == 4 and unit.conv_1x1_exp.conv.groups == 4


def test_eesp_forward_matches_hand_composition() -> None:
    torch.manual_seed(0)
    unit = EESP(16, 16, r_lim=13).eval()
    x = torch.randn(2, 16, 9, 11)
    reduced = unit.proj_1x1(x)
    branches = [dw(reduced) for dw in unit.spp_dw]
    fused = torch.cumsum(torch.stack(branches), dim=0)  # hierarchical fusion: b1, b1+b2, b1+b2+b3, ...
    merged = unit.conv_1x1_exp(unit.br_after_cat(torch.cat(list(fused), dim=1)))
    expected = unit.module_act(merged + x)  # residual (same shape), then PReLU
    torch.testing.assert_close(unit(x), expected)
    down = EESP(16, 32, stride=2, down_method="avg").eval()
    assert down(x).shape == (2, 32, 5, 6)
    with pytest.raises(ConfigError, match="n_out=24"):
        EESP(16, 24)


def test_downsampler_concat_and_input_reinforcement() -> None:
    torch.manual_seed(0)
    block = DownSampler(16, 32, image_pools=2).eval()
    x = torch.randn(1, 16, 10, 14)
    image = torch.randn(1, 3, 20, 28)
    out = block(x, image)
    assert out.shape == (1, 32, 5, 7)
    pooled = F.avg_pool2d(F.avg_pool2d(image, 3, 2, 1), 3, 2, 1)
    expected = block.act(torch.cat([block.avg(x), block.eesp(x)], 1) + block.inp_reinf(pooled))
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, block(x, None))


def test_shuffle_is_the_channel_permutation() -> None:
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert Shuffle(3)(x).flatten().tolist() == [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]


@pytest.mark.parametrize("s", sorted(CHANNELS))
def test_shapes_for_every_width(s: float) -> None:
    torch.manual_seed(0)
    backbone = ESPNetv2Backbone(s).eval()
    assert backbone.channels == list(CHANNELS[s][:4]) and backbone.strides == [2, 4, 8, 16]
    x = torch.randn(1, 3, 50, 70)  # not a multiple of 16
    feats = backbone(x)
    for f, c, stride in zip(feats, backbone.channels, backbone.strides):
        assert f.shape == (1, c, math.ceil(50 / stride), math.ceil(70 / stride))
    head = ESPNetv2Head(backbone.channels, 7).eval()
    out = head(feats)
    assert out["logits"].shape == (1, 7, 25, 35) and out["feats"].shape == (1, 32, 25, 35)


def test_segmentation_model_contract() -> None:
    torch.manual_seed(0)
    model = espnetv2_seg(5, 0.5).eval()
    assert model.stride == 16 and model.num_classes == 5 and model.mean == (0.485, 0.456, 0.406)
    out = model.forward_features(torch.randn(2, 3, 45, 61))
    assert out["logits"].shape == (2, 5, 45, 61)
    assert out["feats"].shape == (2, 32, 24, 32)  # 1/2 of the input padded to 48×64
    low = model.head(model.backbone(torch.randn(2, 3, 48, 64)))["logits"]
    assert low.shape == (2, 5, 24, 32)


def test_invalid_width_raises() -> None:
    with pytest.raises(ConfigError, match="s=0.75"):
        ESPNetv2Backbone(0.75)


def test_published_size_and_cost_s2() -> None:
    """EdgeNets model zoo, ESPNetv2-seg s=2.0 Cityscapes: 0.79 M params, 674.78 M conv MACs at 512×256."""
    model = espnetv2_seg(20, 2.0).eval()  # EdgeNets' Cityscapes model has 20 outputs
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - 0.79e6) < 0.005e6
    assert abs(sum(p.numel() for p in espnetv2_seg(19, 2.0).parameters()) - params) < 2000
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 256, 512))
    macs = counter.get_total_flops() / 2
    assert abs(macs - 674.78e6) / 674.78e6 < 0.002


EDGENETS_KEYS = [  # written out from EdgeNets' module structure (nn_layers/*, model/segmentation/espnetv2.py)
    "base_net.level1.conv.weight",
    "base_net.level1.act.weight",
    "base_net.level2_0.eesp.proj_1x1.conv.weight",
    "base_net.level2_0.eesp.spp_dw.3.conv.weight",
    "base_net.level2_0.eesp.conv_1x1_exp.bn.running_mean",
    "base_net.level2_0.eesp.br_after_cat.act.weight",
    "base_net.level2_0.inp_reinf.0.conv.weight",
    "base_net.level2_0.inp_reinf.1.bn.weight",
    "base_net.level2_0.act.weight",
    "base_net.level3.2.module_act.weight",
    "base_net.level4.6.proj_1x1.bn.bias",
    "bu_dec_l1.projection_layer.cbr.0.weight",
    "bu_dec_l1.stages.4.weight",
    "bu_dec_l1.merge_layer.0.br.0.weight",
    "bu_dec_l1.merge_layer.2.cbr.2.weight",
    "bu_dec_l1.merge_layer.3.weight",
    "bu_dec_l1.br.br.1.weight",
    "bu_dec_l4.merge_layer.3.bias",
    "merge_enc_dec_l2.wt_layer.1.weight",
    "merge_enc_dec_l4.expansion_layer.cbr.1.running_var",
    "bu_br_l3.1.weight",
]


def test_edgenets_key_names_map_onto_the_model() -> None:
    keys = set(espnetv2_seg(20, 2.0).state_dict())
    missing = [k for k in EDGENETS_KEYS if edgenets_key_map(k) not in keys]
    assert not missing
    assert "head.bu_dec_l4.br.br.0.weight" not in keys  # last block has no BN+PReLU, but a bias


def test_official_upsampling_and_projection_options() -> None:
    """``align_corners=True`` (EdgeNets' head) upsamples the stride-2 logits with align_corners=True;
    ``proj_planes`` overrides EdgeNets' min(K // 2, 16) rule (19 classes would give 9, its 20-output
    checkpoints have 10)."""
    torch.manual_seed(0)
    assert espnetv2_seg(19, 2.0).head.proj_planes == 9 and espnetv2_seg(20, 2.0).head.proj_planes == 10
    official = espnetv2_seg(19, 0.5, proj_planes=10, align_corners=True).eval()
    assert official.head.proj_planes == 10 and official.head.bu_dec_l4.merge_layer[3].weight.shape == (19, 10, 1, 1)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        low = official.head(official.backbone(x))["logits"]
        out = official(x)
        torch.testing.assert_close(out, F.interpolate(low, size=(64, 96), mode="bilinear", align_corners=True))
        official.head.upsample_align_corners = False
        plain = official(x)
    torch.testing.assert_close(plain, F.interpolate(low, size=(64, 96), mode="bilinear", align_corners=False))
    assert (plain - out).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="proj_planes=0"):
        ESPNetv2Head([32, 64, 128, 256], 19, proj_planes=0)
