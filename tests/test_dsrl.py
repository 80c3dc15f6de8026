"""DSRL wrapper: SSSR/SISR shapes, inference export, FLOPs of the deconvs, loss terms and weights."""
from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaleseg.errors import ConfigError, DataError
from scaleseg.losses.fa import dense_fa_loss
from scaleseg.models.backbone import Backbone
from scaleseg.models.dsrl import (
    DSRL,
    DSRLInferenceModel,
    FeatureTransform,
    SISRBranch,
    SSSRHead,
    count_flops,
    denormalize,
    sr_metrics,
)
from scaleseg.models.espnetv2 import espnetv2_seg
from scaleseg.models.heads import AuxFCNHead, DeepLabV3PlusHead
from scaleseg.models.segmentor import SegmentationModel
from scaleseg.types import StepInfo

K = 5


def _espnet() -> nn.Module:
    torch.manual_seed(0)
    return espnetv2_seg(K, 0.5)


def _deeplab(aux: bool = False) -> SegmentationModel:
    torch.manual_seed(0)
    backbone = Backbone("test_resnet", output_stride=16)
    head = DeepLabV3PlusHead(backbone.channels, K, output_stride=16, aspp_channels=16)
    aux_head = AuxFCNHead(backbone.channels[-2], K, 8, dropout=0.0) if aux else None  # deterministic
    return SegmentationModel(backbone, head, K, aux_head=aux_head)


def _batch(b: int = 2, h: int = 32, w: int = 48, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hr = torch.randn(b, 3, 2 * h, 2 * w, generator=g)
    mask = torch.randint(0, K, (b, 2 * h, 2 * w), generator=g)
    mask[:, :3] = 255
    return {"image": F.interpolate(hr, size=(h, w), mode="bilinear", antialias=True), "image_hr": hr, "mask": mask}


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------- modules
def test_sssr_head_structure_and_shape() -> None:
    head = SSSRHead(K, 2)
    deconv = head.blocks[0][0]
    assert isinstance(deconv, nn.ConvTranspose2d) and deconv.bias is None
    assert (deconv.kernel_size, deconv.stride, deconv.padding, deconv.output_padding) == ((3, 3), (2, 2), (1, 1), (1, 1))
    assert isinstance(head.blocks[0][1], nn.BatchNorm2d) and isinstance(head.blocks[0][2], nn.PReLU)
    assert isinstance(SSSRHead(K, 1, act="relu").blocks[0][2], nn.ReLU)
    assert head(torch.randn(1, K, 7, 9)).shape == (1, K, 28, 36)
    with pytest.raises(ConfigError, match="act"):
        SSSRHead(K, 1, act="gelu")


def test_sisr_branch_is_espcn_with_pixel_shuffle() -> None:
    torch.manual_seed(0)
    branch = SISRBranch(16, 2)
    feats = torch.randn(2, 16, 8, 12)
    sr, pen = branch(feats, (32, 48))
    assert sr.shape == (2, 3, 32, 48) and pen.shape == (2, 32, 16, 24)
    x = F.interpolate(feats, size=(16, 24), mode="bilinear", align_corners=False)
    h = torch.tanh(branch.conv2(torch.tanh(branch.conv1(x))))
    y = branch.conv3(h)  # B×12×16×24 → pixel (2i+di, 2j+dj) of channel c = y[c·4 + 2·di + dj, i, j]
    torch.testing.assert_close(sr[:, 1, 5::2, 6::2][..., :3, :3], y[:, 1 * 4 + 2 * 1 + 0, 2:5, 3:6])
    assert FeatureTransform(K, 32)(torch.randn(1, K, 4, 4)).min() >= 0


# ----------------------------------------------------------------------------- resolutions
@pytest.mark.parametrize("size", [(32, 48), (30, 45)])
def test_espnetv2_sssr_reaches_label_resolution_with_two_deconvs(size: tuple[int, int]) -> None:
    model = DSRL(_espnet(), lr_scale=0.5).eval()
    assert model.sssr.steps == 2 and model.output_scale == 2  # logits at 1/2 → ×4
    x = torch.randn(1, 3, *size)
    out = model.forward_features(x, return_sr=True)
    assert out["logits"].shape == (1, K, 2 * size[0], 2 * size[1])
    assert out["sr"].shape == (1, 3, 2 * size[0], 2 * size[1])


def test_deeplab_sssr_options_and_quarter_scale() -> None:
    model = DSRL(_deeplab(), lr_scale=0.5).eval()
    assert model.sssr.steps == 1 and model.sssr_stride == 1  # bilinear 1/4 → input, then one deconv
    assert model.sisr.conv1.in_channels == 16 + 48  # DeepLabV3+ decoder concat
    wide = SISRBranch(304, 2)  # a 304-channel decoder is reduced by a 1×1 conv before the resize
    feats = torch.randn(1, 304, 4, 6)
    x = F.interpolate(wide.reduce(feats), size=(8, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(wide(feats, (16, 24))[1], torch.tanh(wide.conv2(torch.tanh(wide.conv1(x)))))
    assert wide.conv1.in_channels == 64
    x = torch.randn(1, 3, 32, 48)
    assert model(x).shape == (1, K, 64, 96)
    three = DSRL(_deeplab(), sssr_stride=4).eval()
    assert three.sssr.steps == 3 and three(x).shape == (1, K, 64, 96)
    quarter = DSRL(_deeplab(), lr_scale=0.25, fa_subsample=8).eval()
    assert quarter.sssr.steps == 2 and quarter(x).shape == (1, K, 128, 192)
    assert quarter.forward_features(x, return_sr=True)["sr"].shape == (1, 3, 128, 192)


def test_bilinear_baseline_is_upsampled_head_logits() -> None:
    model = DSRL(_espnet(), upsample="bilinear", sr_weight=0, fa_weight=0).eval()
    assert model.sssr is None and model.sisr is None and model.fa_transform is None
    x = torch.randn(1, 3, 32, 48)
    low = model.base.head(model.base.backbone(x))["logits"]
    expected = F.interpolate(low, size=(64, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(model(x), expected)


# ----------------------------------------------------------------------------- inference export
@pytest.mark.parametrize("make_base", [_espnet, _deeplab])
def test_export_drops_sisr_and_fa_and_keeps_the_output(make_base) -> None:
    base = make_base()
    base_params = _params(base)
    model = DSRL(base)
    model.train()
    model.training_losses(_batch(), StepInfo())  # move BN statistics away from their init
    model.eval()
    inference = model.export_inference_model()
    assert isinstance(inference, DSRLInferenceModel) and not isinstance(inference, DSRL)
    keys = set(inference.state_dict())
    assert not any(k.startswith(("sisr", "fa")) for k in keys)
    assert any(k.startswith("sisr.") for k in model.state_dict())
    assert any(k.startswith("fa_transform.") for k in model.state_dict())
    assert keys <= set(model.state_dict()) and all(k.startswith(("base.", "sssr.")) for k in keys)
    assert _params(inference) == base_params + _params(model.sssr)
    assert _params(model) == base_params + _params(model.sssr) + _params(model.sisr) + _params(model.fa_transform)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(inference(x), model(x), rtol=0, atol=0)
    filtered = {k: v for k, v in model.state_dict().items() if k in keys}
    DSRLInferenceModel(make_base(), SSSRHead(K, model.sssr.steps), sssr_stride=model.sssr_stride).load_state_dict(
        filtered, strict=True
    )


def test_export_drops_the_aux_head() -> None:
    model = DSRL(_deeplab(aux=True), sr_weight=0, fa_weight=0)
    inference = model.export_inference_model()
    assert not any(".aux_head." in k or k.startswith("base.aux_head") for k in inference.state_dict())
    assert "aux" not in inference.forward_features(torch.randn(1, 3, 32, 48))


# ----------------------------------------------------------------------------- FLOPs
def test_count_flops_includes_the_transposed_convolutions() -> None:
    h, w = 32, 48
    sssr = DSRL(_espnet(), sr_weight=0, fa_weight=0)
    bilinear = DSRL(_espnet(), upsample="bilinear", sr_weight=0, fa_weight=0)
    # two K→K 3×3 deconvs on inputs of 16×24 and 32×48: 2 FLOPs per MAC, MAC = Cin·Cout·9·Hin·Win
    expected = 2 * K * K * 9 * (16 * 24 + 32 * 48)
    assert count_flops(sssr, (1, 3, h, w)) - count_flops(bilinear, (1, 3, h, w)) == expected
    assert count_flops(bilinear, (1, 3, h, w)) == count_flops(bilinear.base, (1, 3, h, w))
    assert count_flops(sssr, (2, 3, h, w)) == 2 * count_flops(sssr, (1, 3, h, w))
    assert sssr.training  # count_flops restores the mode


# ----------------------------------------------------------------------------- losses
def test_training_losses_terms_and_weights() -> None:
    model = DSRL(_espnet(), sr_weight=0.3, fa_weight=2.0)
    batch = _batch()
    model.train()
    losses = model.training_losses(batch, StepInfo())
    assert set(losses) == {"ce", "sr", "fa"}
    # recompute by hand from the same (train-mode, batch-statistics) forward
    run = model.forward_features(batch["image"], (64, 96), return_sr=True)
    logits, sr = run["logits"], run["sr"]
    ce = F.cross_entropy(logits, batch["mask"], ignore_index=255)
    mse = ((sr - batch["image_hr"]) ** 2).mean()
    seg = F.avg_pool2d(model.fa_transform(run["sssr_full"]), 2)  # label res → SISR grid (r = 2)
    fa = dense_fa_loss(seg, run["sisr_feat"], 4)  # 8 at label resolution = 4 on the SISR grid
    torch.testing.assert_close(losses["ce"], ce)
    torch.testing.assert_close(losses["sr"], 0.3 * mse)
    torch.testing.assert_close(losses["fa"], 2.0 * fa, rtol=1e-5, atol=1e-7)
    assert fa > 0
    sum(losses.values()).backward()
    for name in ("sssr", "sisr", "fa_transform", "base"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name


def test_default_weights_and_sssr_only_variant() -> None:
    model = DSRL(_deeplab(aux=True))
    assert (model.sr_weight, model.fa_weight, model.fa_subsample) == (0.1, 1.0, 8)
    batch = _batch()
    losses = model.training_losses(batch, StepInfo())
    assert set(losses) == {"ce", "aux", "sr", "fa"}
    run = model.forward_features(batch["image"], (64, 96), return_sr=True)
    aux_ce = F.cross_entropy(run["aux"], batch["mask"], ignore_index=255)
    assert run["aux"].shape == (2, K, 64, 96)
    torch.testing.assert_close(losses["aux"], 0.4 * aux_ce)
    only = DSRL(_espnet(), sr_weight=0, fa_weight=0)
    assert only.sisr is None and only.fa_transform is None and only.fa is None
    assert set(only.training_losses({k: v for k, v in batch.items() if k != "image_hr"}, StepInfo())) == {"ce"}
    assert "sr" not in only.forward_features(batch["image"], return_sr=True)


def test_odd_hr_size_uses_the_mask_size() -> None:
    model = DSRL(_espnet(), sr_weight=0, fa_weight=0)
    hr_h, hr_w = 61, 95  # LR = round(h/2): 31×48 → 2× = 62×96, one pixel more than the mask
    x = torch.randn(1, 3, 31, 48)
    mask = torch.randint(0, K, (1, hr_h, hr_w))
    losses = model.training_losses({"image": x, "mask": mask}, StepInfo())
    assert torch.isfinite(losses["ce"])
    assert model.forward_features(x, (hr_h, hr_w))["logits"].shape == (1, K, hr_h, hr_w)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ConfigError, match="lr_scale"):
        DSRL(_espnet(), lr_scale=0.3)
    with pytest.raises(ConfigError, match="upsample"):
        DSRL(_espnet(), upsample="nearest")
    with pytest.raises(ConfigError, match="fa_subsample"):
        DSRL(_espnet(), fa_subsample=3)
    with pytest.raises(ConfigError, match="SegmentationModel"):
        DSRL(nn.Conv2d(3, 3, 1))
    model = DSRL(_espnet())
    batch = _batch()
    with pytest.raises(DataError, match="label size"):
        model.training_losses({**batch, "mask": batch["mask"][:, :32]}, StepInfo())
    with pytest.raises(DataError, match="image_hr"):
        model.training_losses({k: v for k, v in batch.items() if k != "image_hr"}, StepInfo())


# ----------------------------------------------------------------------------- SR metrics
def test_denormalize_and_sr_metrics() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 32, 32, generator=g)
    norm = (img - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(denormalize(norm, mean, std), img)
    assert denormalize(norm + 100, mean, std).max() == 1.0
    noisy = (img + 0.05 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    metrics = sr_metrics()
    metrics.update(noisy, img)
    values = metrics.compute()
    psnr = 10 * math.log10(1.0 / float(((noisy - img) ** 2).mean()))
    assert abs(float(values["psnr"]) - psnr) < 1e-3
    assert 0 < float(values["ssim"]) < 1
    same = sr_metrics()
    same.update(img, img)
    assert abs(float(same.compute()["ssim"]) - 1.0) < 1e-5
