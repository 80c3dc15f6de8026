import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaleseg.errors import ConfigError
from scaleseg.models.heads import (
    ASPP,
    PPM,
    AuxFCNHead,
    ConvBNReLU,
    DeepLabV3Head,
    DeepLabV3PlusHead,
    FCNHead,
    PSPHead,
    SeparableConvBNReLU,
    aspp_dilations,
)

CHANNELS = [8, 12, 16, 24]


def _features(strides, size=64, batch=2):
    torch.manual_seed(0)
    return [torch.randn(batch, c, size // s, size // s) for c, s in zip(CHANNELS, strides)]


def test_conv_bn_relu_keeps_size_with_dilation():
    block = ConvBNReLU(3, 5, 3, dilation=4)
    conv, bn, act = block
    assert conv.dilation == (4, 4) and conv.padding == (4, 4) and conv.bias is None
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(act, nn.ReLU)
    out = block(torch.randn(2, 3, 9, 11))
    assert out.shape == (2, 5, 9, 11) and bool((out >= 0).all())


def test_aspp_dilations_scale_with_output_stride():
    assert aspp_dilations(16) == (6, 12, 18)
    assert aspp_dilations(8) == (12, 24, 36)
    assert aspp_dilations(32) == (3, 6, 9)
    with pytest.raises(ConfigError, match="output_stride=4"):
        aspp_dilations(4)
    for os_, rates in [(8, (12, 24, 36)), (16, (6, 12, 18))]:
        head = DeepLabV3PlusHead(CHANNELS, 5, output_stride=os_)
        convs = [branch[0] for branch in head.aspp.branches]
        assert convs[0].kernel_size == (1, 1)
        assert [c.dilation[0] for c in convs[1:]] == list(rates)
        assert [c.padding[0] for c in convs[1:]] == list(rates)


def test_aspp_structure_and_output():
    aspp = ASPP(24, 32, (1, 2, 3))
    x = torch.randn(2, 24, 7, 9)
    assert aspp(x).shape == (2, 32, 7, 9)
    project = aspp.project[0][0]
    assert project.in_channels == 5 * 32 and project.kernel_size == (1, 1)
    assert isinstance(aspp.project[1], nn.Dropout) and aspp.project[1].p == 0.1


def test_aspp_pooling_branch_matches_pooled_batchnorm():
    """BN on the broadcast map has the same batch statistics as BN on the B×C×1×1 pooled map."""
    torch.manual_seed(0)
    aspp = ASPP(6, 4, (1, 2, 3))
    x = torch.randn(3, 6, 5, 7)
    pooled = aspp.pool_conv(F.adaptive_avg_pool2d(x, 1))  # B×C×1×1, the reference layout
    bn = aspp.pool_bn
    expected = F.relu(F.batch_norm(pooled, None, None, bn.weight, bn.bias, training=True, eps=bn.eps))
    got = F.relu(bn(pooled.expand(-1, -1, 5, 7)))
    torch.testing.assert_close(got, expected.expand(-1, -1, 5, 7))
    aspp.train()
    assert aspp(torch.randn(1, 6, 5, 7)).shape == (1, 4, 5, 7)  # batch size 1 trains


def test_ppm_pools_each_bin_and_concatenates():
    ppm = PPM(16, 8, bins=(1, 2, 3, 6))
    assert ppm.bottleneck[0].in_channels == 16 + 4 * 8 and ppm.bottleneck[0].kernel_size == (3, 3)
    sizes = []
    def record(module, inputs, output):
        sizes.append(tuple(output.shape[2:]))

    hooks = [stage[0].register_forward_hook(record) for stage in ppm.stages]
    out = ppm(torch.randn(2, 16, 12, 12))
    for hook in hooks:
        hook.remove()
    assert sizes == [(1, 1), (2, 2), (3, 3), (6, 6)]
    assert out.shape == (2, 8, 12, 12)


def test_ppm_pooled_branch_equals_manual():
    torch.manual_seed(0)
    ppm = PPM(4, 3, bins=(2,)).eval()
    x = torch.randn(1, 4, 8, 8)
    manual = x.view(1, 4, 2, 4, 2, 4).mean(dim=(3, 5))  # 2×2 average pooling by hand
    stage = ppm.stages[0]
    torch.testing.assert_close(stage[0](x), manual)
    branch = F.interpolate(stage[1](manual), size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ppm(x), ppm.bottleneck(torch.cat([x, branch], dim=1)))


@pytest.mark.parametrize(("output_stride", "strides"), [(8, [4, 8, 8, 8]), (16, [4, 8, 16, 16])])
def test_deeplabv3plus_shapes(output_stride, strides):
    head = DeepLabV3PlusHead(CHANNELS, 5, output_stride=output_stride).eval()
    feats = _features(strides)
    ctx = head.context(feats)
    assert ctx.shape == (2, 256, 64 // strides[-1], 64 // strides[-1])
    out = head(feats)
    assert strides[head.feature_index] == 4
    assert out["logits"].shape == (2, 5, 16, 16)
    assert out["feats"].shape == (2, 304, 16, 16)
    assert head.context_channels == 256 and head.feat_channels == 304
    torch.testing.assert_close(out["logits"], head.decode(ctx, feats)["logits"])
    # logits are the reference head applied to feats; the context really feeds the decoder
    torch.testing.assert_close(out["logits"], head.final(out["feats"]))
    assert not torch.allclose(head.decode(ctx + 1, feats)["logits"], out["logits"])


def test_deeplabv3plus_final_layers_follow_reference():
    head = DeepLabV3PlusHead(CHANNELS, 7, output_stride=16)
    conv0, conv1, cls = head.final[0][0], head.final[1][0], head.final[2]
    assert (conv0.in_channels, conv0.out_channels, conv0.kernel_size) == (304, 256, (3, 3))
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size) == (256, 256, (3, 3))
    assert (cls.in_channels, cls.out_channels, cls.kernel_size, cls.bias) == (256, 7, (1, 1), None)
    assert head.low_level[0].in_channels == CHANNELS[0] and head.low_level[0].out_channels == 48


def test_deeplabv3_head():
    head = DeepLabV3Head(CHANNELS, 5, output_stride=16).eval()
    out = head(_features([4, 8, 16, 16]))
    assert head.feature_index == 3
    assert out["logits"].shape == (2, 5, 4, 4) and out["feats"].shape == (2, 256, 4, 4)
    torch.testing.assert_close(out["logits"], head.classifier(out["feats"]))


def test_fcn_head_context_is_identity():
    head = FCNHead(CHANNELS, 5, channels=32).eval()
    feats = _features([4, 8, 16, 32])
    assert head.context(feats) is feats[-1]
    assert head.context_channels == 24 and head.feat_channels == 32
    assert [m[0].kernel_size for m in head.convs] == [(3, 3), (3, 3)]
    out = head(feats)
    assert out["logits"].shape == (2, 5, 2, 2) and out["feats"].shape == (2, 32, 2, 2)
    torch.testing.assert_close(out["logits"], head.classifier(out["feats"]))  # eval: dropout is a no-op


def test_psp_head():
    head = PSPHead(CHANNELS, 5, channels=32).eval()
    feats = _features([4, 8, 8, 8])
    out = head(feats)
    assert head.context_channels == head.feat_channels == 32
    assert out["logits"].shape == (2, 5, 8, 8) and out["feats"].shape == (2, 32, 8, 8)
    torch.testing.assert_close(out["feats"], head.context(feats))


def test_aux_fcn_head():
    head = AuxFCNHead(16, 5, channels=8).eval()
    x = torch.randn(2, 16, 6, 5)
    out = head(x)
    assert out.shape == (2, 5, 6, 5)
    torch.testing.assert_close(out, head.classifier(head.conv(x)))


def test_invalid_level_index():
    with pytest.raises(ConfigError, match="low_level_index=4"):
        DeepLabV3PlusHead(CHANNELS, 5, output_stride=16, low_level_index=4)


def test_separable_conv_is_depthwise_then_pointwise():
    torch.manual_seed(0)
    block = SeparableConvBNReLU(6, 10, 3, dilation=2).eval()
    dw, bn0, _, pw, bn1, _ = block
    assert (dw.groups, dw.in_channels, dw.out_channels, dw.dilation, dw.padding) == (6, 6, 6, (2, 2), (2, 2))
    assert pw.kernel_size == (1, 1) and dw.bias is None and pw.bias is None
    for bn in (bn0, bn1):  # non-trivial statistics so BN is not an identity
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 6, 9, 11)
    # by hand: per-channel 3×3 dilated conv, BN, ReLU, then channel mixing, BN, ReLU
    depth = torch.cat([F.conv2d(x[:, c : c + 1], dw.weight[c : c + 1], padding=2, dilation=2) for c in range(6)], 1)
    depth = F.relu(F.batch_norm(depth, bn0.running_mean, bn0.running_var, bn0.weight, bn0.bias, eps=bn0.eps))
    point = torch.einsum("oc,bchw->bohw", pw.weight[:, :, 0, 0], depth)
    point = F.relu(F.batch_norm(point, bn1.running_mean, bn1.running_var, bn1.weight, bn1.bias, eps=bn1.eps))
    torch.testing.assert_close(block(x), point)
    # parameters: 9·Cin (depthwise) + Cin·Cout (pointwise) + 2·(Cin + Cout) (BN affine)
    assert sum(p.numel() for p in block.parameters()) == 9 * 6 + 6 * 10 + 2 * (6 + 10)


def test_separable_deeplabv3plus_head():
    full = DeepLabV3PlusHead(CHANNELS, 5, output_stride=16)
    sep = DeepLabV3PlusHead(CHANNELS, 5, output_stride=16, separable=True).eval()
    # ASPP: 1×1 branch stays a full conv, the three atrous branches are separable with the OS16 rates
    assert sep.aspp.branches[0][0].kernel_size == (1, 1) and sep.aspp.branches[0][0].groups == 1
    atrous = [branch[0] for branch in sep.aspp.branches[1:]]
    assert [(c.groups, c.dilation[0]) for c in atrous] == [(24, 6), (24, 12), (24, 18)]
    # decoder: two separable 3×3 convs 304 → 256 → 256, then the 1×1 classifier
    assert [m[0].groups for m in sep.final[:2]] == [304, 256]
    assert [m[3].out_channels for m in sep.final[:2]] == [256, 256]
    n_full = sum(p.numel() for p in full.final.parameters())
    n_sep = sum(p.numel() for p in sep.final.parameters())
    assert n_full == 304 * 256 * 9 + 256 * 256 * 9 + 4 * 256 + 256 * 5
    assert n_sep == (304 * 9 + 304 * 256 + 2 * (304 + 256)) + (256 * 9 + 256 * 256 + 4 * 256) + 256 * 5
    out = sep(_features([4, 8, 16, 16]))
    assert out["logits"].shape == (2, 5, 16, 16) and out["feats"].shape == (2, 304, 16, 16)


def test_deeplabv3plus_decoder_convs_and_channels():
    head = DeepLabV3PlusHead(CHANNELS, 5, output_stride=16, decoder_convs=1, decoder_channels=64).eval()
    assert len(head.final) == 2  # one 3×3 conv + classifier
    assert (head.final[0][0].in_channels, head.final[0][0].out_channels) == (304, 64)
    assert head.final[1].in_channels == 64
    assert head(_features([4, 8, 16, 16]))["logits"].shape == (2, 5, 16, 16)
    with pytest.raises(ConfigError, match="decoder_convs=0"):
        DeepLabV3PlusHead(CHANNELS, 5, output_stride=16, decoder_convs=0)


def test_separable_deeplabv3_head():
    head = DeepLabV3Head(CHANNELS, 5, output_stride=16, separable=True).eval()
    assert head.bottleneck[0].groups == 256 and head.aspp.branches[1][0].groups == 24
    assert head(_features([4, 8, 16, 16]))["logits"].shape == (2, 5, 4, 4)
