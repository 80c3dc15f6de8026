"""HRNetV2 trunk and OCR head: shapes, the branch concatenation and the OCR formulas by hand."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm.models.hrnet
import torch
import torch.nn.functional as F

from scaleseg.models.hmsa import HierarchicalAttention
from scaleseg.models.hrnet import HRNetV2
from scaleseg.models.ocr import ObjectAttention, OCRHead, SpatialGather, hrnet_ocr
from scaleseg.types import StepInfo


def test_hrnetv2_concatenates_branches_at_stride_4() -> None:
    torch.manual_seed(0)
    trunk = HRNetV2("hrnet_w18_small").eval()
    assert trunk.channels == [16 + 32 + 64 + 128] and trunk.strides == [4]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        (feats,) = trunk(x)
        branches = trunk.body(x)
    assert [b.shape[-1] for b in branches] == [16, 8, 4, 2]
    want = torch.cat([F.interpolate(b, size=(16, 16), mode="bilinear", align_corners=False) for b in branches], 1)
    torch.testing.assert_close(feats, want)
    # sizes that timm's HRNet rejects (not multiples of 32) are padded inside and cropped back
    with torch.no_grad():
        (odd,) = trunk(torch.randn(1, 3, 42, 70))
    assert odd.shape == (1, 240, 11, 18)


def test_hrnetv2_widths() -> None:
    assert HRNetV2("hrnet_w18").channels == [270]
    # W48 (720 ch) is the same code with timm's wider config; building it costs ~8 s, so check the config
    assert sum(timm.models.hrnet.cfg_cls["hrnet_w48"]["stage4"]["num_channels"]) == 720


def test_spatial_gather_matches_loops() -> None:
    torch.manual_seed(1)
    feats, logits = torch.randn(2, 5, 3, 4), torch.randn(2, 3, 3, 4)
    got = SpatialGather()(feats, logits)
    assert got.shape == (2, 5, 3, 1)
    for b in range(2):
        for k in range(3):
            w = torch.exp(logits[b, k]) / torch.exp(logits[b, k]).sum()
            region = sum(w[i, j] * feats[b, :, i, j] for i in range(3) for j in range(4))
            torch.testing.assert_close(got[b, :, k, 0], region, atol=1e-6, rtol=1e-5)


def test_object_attention_formula() -> None:
    torch.manual_seed(2)
    block = ObjectAttention(in_channels=8, key_channels=4).eval()
    x, proxy = torch.randn(2, 8, 3, 5), torch.randn(2, 8, 6, 1)
    with torch.no_grad():
        got = block(x, proxy)
        q = block.f_pixel(x)[0].reshape(4, -1)  # Ck×HW (image 0)
        k = block.f_object(proxy)[0].reshape(4, -1)  # Ck×K
        v = block.f_down(proxy)[0].reshape(4, -1)  # Ck×K
        sim = torch.softmax(q.T @ k / 2.0, dim=1)  # key_channels ** -0.5 = 1/2
        ctx = (v @ sim.T).reshape(1, 4, 3, 5)
        want = block.f_up(ctx)[0]
    assert got.shape == (2, 8, 3, 5)
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)


def test_ocr_head_shapes_and_composition() -> None:
    torch.manual_seed(3)
    head = OCRHead([20], num_classes=5, mid_channels=32, key_channels=16).eval()
    assert head.conv3x3_ocr[0].kernel_size == (3, 3) and head.conv3x3_ocr[0].bias is not None
    assert head.ocr_distri_head.conv_bn_dropout[0].in_channels == 64
    assert head.ocr_distri_head.conv_bn_dropout[2].p == 0.05
    x = torch.randn(2, 20, 6, 7)
    with torch.no_grad():
        out = head([x])
        mid = head.conv3x3_ocr(x)
        aux = head.aux_head(x)
        ocr = head.ocr_distri_head(mid, head.ocr_gather_head(mid, aux))
    assert out["logits"].shape == (2, 5, 6, 7) and out["aux"].shape == (2, 5, 6, 7)
    assert out["feats"].shape == (2, 32, 6, 7)
    torch.testing.assert_close(out["aux"], aux)
    torch.testing.assert_close(out["feats"], ocr)
    torch.testing.assert_close(out["logits"], head.cls_head(ocr))


def test_hrnet_ocr_model_with_hmsa() -> None:
    torch.manual_seed(4)
    model = hrnet_ocr(5, "hrnet_w18_small", mid_channels=32, key_channels=16)
    assert model.stride == 4
    hmsa = HierarchicalAttention(model, 32, infer_scales=(0.5, 1.0))
    x = torch.randn(2, 3, 64, 64)
    mask = torch.randint(0, 5, (2, 64, 64))
    losses = hmsa.train().training_losses({"image": x, "mask": mask}, StepInfo())
    assert set(losses) == {"main", "aux", "pred_0.5x", "pred_1.0x"}  # the OCR head's own aux is fused
    sum(losses.values()).backward()
    assert hmsa.scale_attn.conv0.weight.grad is not None
    assert model.head.aux_head[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        out = model.eval().forward_features(x[:1, :, :60, :52])
        logits_only = model(x[:1, :, :60, :52])
    assert out["logits"].shape == (1, 5, 60, 52) and out["aux"].shape == (1, 5, 60, 52)
    assert out["feats"].shape == (1, 32, 15, 13)
    torch.testing.assert_close(logits_only, out["logits"])
    # the plain model supervises the OCR aux logits with weight 0.4
    torch.manual_seed(7)
    plain = model.train().training_losses({"image": x, "mask": mask}, StepInfo())
    torch.manual_seed(7)
    ref = model.forward_features(x)
    assert set(plain) == {"ce", "aux"}
    torch.testing.assert_close(plain["aux"], 0.4 * model.criterion(ref["aux"], mask))


def test_hrnet_fusion_is_bilinear_to_the_target_size_as_nvidia_and_hrnet_seg() -> None:
    """Each fusion adds the lower branches resized bilinearly (align_corners=False) to the target
    branch's size, so any input size works (timm's nearest ×2 fusion needs multiples of 32)."""
    from scaleseg.models.hrnet import BilinearFuseModule

    torch.manual_seed(0)
    trunk = HRNetV2("hrnet_w18_small").eval()
    stage = next(m for m in trunk.modules() if isinstance(m, BilinearFuseModule) and m.num_branches == 2)
    x = [torch.randn(1, stage.num_in_chs[0], 11, 18), torch.randn(1, stage.num_in_chs[1], 6, 9)]
    with torch.no_grad():
        got = stage([t.clone() for t in x])
        b = [branch(t) for branch, t in zip(stage.branches, x)]
        up1 = F.interpolate(stage.fuse_layers[0][1](b[1]), size=(11, 18), mode="bilinear", align_corners=False)
        want0 = torch.relu(b[0] + up1)
        want1 = torch.relu(stage.fuse_layers[1][0](b[0]) + b[1])
    torch.testing.assert_close(got[0], want0)
    torch.testing.assert_close(got[1], want1)
    nearest = HRNetV2("hrnet_w18_small", fuse="nearest").eval()
    nearest.load_state_dict(trunk.state_dict())  # same parameters and names
    with torch.no_grad():
        assert (nearest(torch.randn(1, 3, 64, 64))[0] - trunk(torch.randn(1, 3, 64, 64))[0]).abs().max() > 0
