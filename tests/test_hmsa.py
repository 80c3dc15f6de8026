"""HMSA fusion formulas, baselines and losses against hand-written references on mock base models."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleseg.errors import ConfigError
from scaleseg.losses.ce import CrossEntropyLoss
from scaleseg.losses.rmi import RMICriterion
from scaleseg.models.hmsa import (
    AttentionHead,
    ExplicitAttention,
    HierarchicalAttention,
    ScalePooling,
    deeplabv3plus_os8,
    hierarchical_fusion,
)
from scaleseg.models.contract import ContractModel, Grid
from scaleseg.types import StepInfo

K, C = 4, 6


def up(t: Tensor, size) -> Tensor:
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)


class ConvBase(ContractModel):
    """Tiny trainable contract model: logits at input size, aux, feats at stride 4 (input multiple of 4)."""

    num_classes, mean, std, stride = K, (0.5,) * 3, (0.25,) * 3, 4

    def __init__(self, aux: bool = True) -> None:
        super().__init__()
        self.feat = nn.Conv2d(3, C, 3, padding=1)
        self.cls = nn.Conv2d(C, K, 1)
        self.aux = nn.Conv2d(C, K, 1) if aux else None
        self.criterion = CrossEntropyLoss()

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        feats = F.avg_pool2d(torch.tanh(self.feat(x)), 4)
        size = tuple(x.shape[-2:])
        out = {"logits": up(self.cls(feats), size), "feats": feats, "grid": Grid(size, size)}
        if self.aux is not None:
            out["aux"] = up(self.aux(feats), x.shape[-2:])
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)["logits"]


class TableBase(ContractModel):
    """Returns fixed random logits/aux/feats per input size: the test controls every per-scale output."""

    num_classes, mean, std, stride = K, (0.0,) * 3, (1.0,) * 3, 1

    def __init__(self, sizes: list[tuple[int, int]], seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = {
            s: {"logits": torch.randn(1, K, *s, generator=g), "aux": torch.randn(1, K, *s, generator=g),
                "feats": torch.randn(1, C, s[0] // 2, s[1] // 2, generator=g)}
            for s in sizes
        }
        self.seen: list[tuple[int, int]] = []
        self.criterion = CrossEntropyLoss()

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        size = tuple(x.shape[-2:])
        self.seen.append(size)
        return {**self.table[size], "grid": Grid(size, size)}


class GateFromFeats(nn.Module):
    """Attention stand-in with a known value: sigmoid of the first feature channel."""

    def forward(self, feats: Tensor) -> Tensor:
        return torch.sigmoid(feats[:, :1])


def test_attention_head_layout_and_init() -> None:
    torch.manual_seed(0)
    head = AttentionHead(C).eval()
    names = [n for n, _ in head.named_children()]
    assert names == ["conv0", "bn0", "re0", "conv1", "bn1", "re1", "conv2", "sig"]
    assert head.conv0.bias is None and head.conv1.bias is None and head.conv2.bias is None
    assert head.conv0.out_channels == 256 and head.conv2.out_channels == 1
    with torch.no_grad():
        a = head(torch.randn(2, C, 8, 8))
    assert a.shape == (2, 1, 8, 8)
    assert float((a - 0.5).abs().max()) < 0.05  # default init: an equal blend at start


def test_two_scale_training_fusion_equals_nscale_inference() -> None:
    torch.manual_seed(0)
    model = HierarchicalAttention(ConvBase(), C).eval()
    # train BN statistics a little so eval-mode BN is not the identity
    with torch.no_grad():
        for m in model.scale_attn.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 40)
    two = model.two_scale_forward(x, return_scales=True)
    chain = model.forward_features(x, scales=(1.0, 0.5), return_scales=True)
    for key in ("logits", "aux", "pred_0.5x", "attn_0.5x", "pred_1.0x"):
        torch.testing.assert_close(two[key], chain[key], atol=1e-6, rtol=0)
    # and the two-scale formula by hand
    p_lo, a_lo, p_hi = two["pred_0.5x"], two["attn_0.5x"], two["pred_1.0x"]
    assert p_lo.shape[-2:] == a_lo.shape[-2:] == (16, 20)
    want = up(a_lo * p_lo, (32, 40)) + (1 - up(a_lo, (32, 40))) * p_hi
    torch.testing.assert_close(two["logits"], want, atol=1e-6, rtol=0)
    assert not torch.allclose(up(a_lo, (32, 40)) * up(p_lo, (32, 40)), up(a_lo * p_lo, (32, 40)))


def test_nscale_chain_matches_hand_formula() -> None:
    h, w = 33, 30  # odd sizes: scaled sizes are floor(H·s)
    sizes = {2.0: (66, 60), 1.0: (33, 30), 0.5: (16, 15), 0.25: (8, 7)}
    base = TableBase(list(sizes.values()))
    model = HierarchicalAttention(base, C, infer_scales=(0.5, 1.0, 2.0)).eval()
    model.scale_attn = GateFromFeats()
    x = torch.randn(1, 3, h, w)
    out = model.forward_features(x, return_scales=True)
    assert base.seen == [sizes[2.0], sizes[1.0], sizes[0.5]]  # high → low
    t = base.table

    def gate(s: float) -> Tensor:  # predicted at feature resolution, then upsampled to the scale's input
        return up(torch.sigmoid(t[sizes[s]]["feats"][:, :1]), sizes[s])

    for key in ("logits", "aux"):
        p = {s: t[sizes[s]][key] for s in sizes}
        want = p[2.0]
        want = gate(1.0) * p[1.0] + (1 - gate(1.0)) * up(want, sizes[1.0])
        want = up(gate(0.5) * p[0.5], sizes[1.0]) + (1 - up(gate(0.5), sizes[1.0])) * want
        torch.testing.assert_close(out[key], want, atol=1e-6, rtol=0)
    assert out["logits"].shape == (1, K, h, w)
    assert "attn_2.0x" not in out and out["attn_0.5x"].shape == (1, 1, 16, 15)
    torch.testing.assert_close(out["pred_2.0x"], t[sizes[2.0]]["logits"])

    # four scales, given unsorted: 0.25 acts last
    base.seen.clear()
    out4 = model.forward_features(x, scales=[1.0, 0.25, 2.0, 0.5])
    assert base.seen == [sizes[2.0], sizes[1.0], sizes[0.5], sizes[0.25]]
    want = out["logits"]
    want = up(gate(0.25) * t[sizes[0.25]]["logits"], sizes[1.0]) + (1 - up(gate(0.25), sizes[1.0])) * want
    torch.testing.assert_close(out4["logits"], want, atol=1e-6, rtol=0)


def test_hierarchical_fusion_of_a_superset_run_equals_a_run_over_the_subset() -> None:
    torch.manual_seed(3)
    model = HierarchicalAttention(ConvBase(), C).eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        union = model.forward_features(x, scales=(0.25, 0.5, 1.0, 2.0), return_scales=True)
        for subset in ((0.25, 0.5, 1.0, 2.0), (0.5, 1.0, 2.0), (0.5, 1.0), (1.0, 2.0), (1.0,)):
            alone = model.forward_features(x, scales=subset)["logits"]
            torch.testing.assert_close(hierarchical_fusion(union, subset), alone, atol=0, rtol=0)
    # a run over (0.5, 1.0) has no 2.0 logits and no attention at 1.0 (its highest scale)
    with torch.no_grad():
        pair = model.forward_features(x, scales=(0.5, 1.0), return_scales=True)
    with pytest.raises(ConfigError, match=r"scales=\[0\.5, 1\.0, 2\.0\].*pred_2\.0x, attn_1\.0x"):
        hierarchical_fusion(pair, (0.5, 1.0, 2.0))


def test_train_mode_uses_two_scales_and_eval_uses_infer_scales() -> None:
    base = TableBase([(16, 16), (8, 8), (32, 32)])
    model = HierarchicalAttention(base, C, infer_scales=(1.0, 2.0))
    model.scale_attn = GateFromFeats()
    x = torch.randn(1, 3, 16, 16)
    model.train()
    model.forward_features(x)
    assert base.seen == [(8, 8), (16, 16)]
    base.seen.clear()
    model.eval()
    model.forward_features(x)
    assert base.seen == [(32, 32), (16, 16)]


def test_single_scale_inference_is_the_base_model() -> None:
    torch.manual_seed(4)
    model = HierarchicalAttention(ConvBase(), C, infer_scales=(1.0,)).eval()
    x = torch.randn(1, 3, 24, 32)
    with torch.no_grad():
        out = model.forward_features(x)
        ref = model.base.forward_features(x)
    for key in ("logits", "aux", "feats"):
        torch.testing.assert_close(out[key], ref[key], atol=0, rtol=0)


def test_scale_lists_without_one_raise_config_error() -> None:
    with pytest.raises(ConfigError, match=r"infer_scales=\[0\.5, 2\.0\].*1\.0"):
        HierarchicalAttention(ConvBase(), C, infer_scales=(0.5, 2.0))
    with pytest.raises(ConfigError, match="train_scales"):
        HierarchicalAttention(ConvBase(), C, train_scales=(0.5, 0.75))
    with pytest.raises(ConfigError, match="train_scales"):
        HierarchicalAttention(ConvBase(), C, train_scales=(1.0, 2.0))
    model = HierarchicalAttention(ConvBase(), C).eval()
    with pytest.raises(ConfigError, match=r"scales=\[0\.5, 0\.75\]"):
        model.forward_features(torch.randn(1, 3, 16, 16), scales=[0.5, 0.75])
    with pytest.raises(ConfigError, match="scales="):
        ExplicitAttention(ConvBase(), C, scales=(0.5, 2.0))


def test_training_losses_terms() -> None:
    torch.manual_seed(1)
    model = HierarchicalAttention(ConvBase(), C).train()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.randint(0, K, (2, 32, 32))
    mask[:, :4] = 255
    torch.manual_seed(5)
    losses = model.training_losses({"image": x, "mask": mask}, StepInfo())
    assert set(losses) == {"main", "aux", "pred_0.5x", "pred_1.0x"}
    sum(losses.values()).backward()
    assert model.scale_attn.conv0.weight.grad is not None and model.base.aux.weight.grad is not None
    torch.manual_seed(5)
    out = model.two_scale_forward(x, return_scales=True)  # same BN batch statistics → same values
    ce = CrossEntropyLoss()
    torch.testing.assert_close(losses["main"], ce(out["logits"], mask))
    torch.testing.assert_close(losses["aux"], 0.4 * ce(out["aux"], mask))
    torch.testing.assert_close(losses["pred_0.5x"], 0.05 * ce(up(out["pred_0.5x"], (32, 32)), mask))
    torch.testing.assert_close(losses["pred_1.0x"], 0.05 * ce(out["pred_1.0x"], mask))

    # RMI criterion: RMI + BCE on the fused logits, BCE only on aux and per-scale terms
    rmi_model = HierarchicalAttention(ConvBase(), C, criterion=RMICriterion(K), per_scale_weight=0.1).eval()
    out = rmi_model.two_scale_forward(x, return_scales=True)
    losses = rmi_model.training_losses({"image": x, "mask": mask}, StepInfo())
    bce = RMICriterion(K, do_rmi=False)
    torch.testing.assert_close(losses["main"], RMICriterion(K)(out["logits"], mask))
    torch.testing.assert_close(losses["aux"], 0.4 * bce(out["aux"], mask))
    torch.testing.assert_close(losses["pred_1.0x"], 0.1 * bce(out["pred_1.0x"], mask))
    assert not torch.allclose(losses["main"], bce(out["logits"], mask))

    # no aux head on the base, per-scale supervision off → only the main term
    plain = HierarchicalAttention(ConvBase(aux=False), C, per_scale_weight=0.0)
    assert set(plain.training_losses({"image": x, "mask": mask}, StepInfo())) == {"main"}


def test_ocr_aux_rmi_puts_rmi_on_aux_only_as_nvidia() -> None:
    """NVIDIA MscaleOCR with --ocr_aux_loss_rmi: loss = 0.4·RMI(aux) + RMI(main) + w·(BCE(p_lo) + BCE(p_hi)).
    Before, an RMI aux criterion also put RMI on the per-scale terms."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    mask = torch.randint(0, K, (2, 32, 32))
    mask[:, :4] = 255
    rmi, bce = RMICriterion(K), RMICriterion(K, do_rmi=False)
    model = HierarchicalAttention(ConvBase(), C, criterion=RMICriterion(K, aux_rmi=True), per_scale_weight=0.05).eval()
    losses = model.training_losses({"image": x, "mask": mask}, StepInfo())
    out = model.two_scale_forward(x, return_scales=True)
    want = {
        "main": rmi(out["logits"], mask),
        "aux": 0.4 * rmi(out["aux"], mask),
        "pred_0.5x": 0.05 * bce(up(out["pred_0.5x"], (32, 32)), mask),
        "pred_1.0x": 0.05 * bce(out["pred_1.0x"], mask),
    }
    assert set(losses) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(losses[key], value)
    # an explicit aux criterion is used for the aux term only; per-scale terms stay BCE
    explicit = HierarchicalAttention(ConvBase(), C, criterion=RMICriterion(K), aux_criterion=RMICriterion(K)).eval()
    explicit.load_state_dict(model.state_dict())
    got = explicit.training_losses({"image": x, "mask": mask}, StepInfo())
    torch.testing.assert_close(sum(got.values()), sum(want.values()))
    old_per_scale = 0.05 * (rmi(up(out["pred_0.5x"], (32, 32)), mask) + rmi(out["pred_1.0x"], mask))
    assert abs((old_per_scale - want["pred_0.5x"] - want["pred_1.0x"]).item()) > 1e-3  # the old behaviour differs


def test_explicit_attention_softmax_weights_and_fusion() -> None:
    torch.manual_seed(2)
    model = ExplicitAttention(ConvBase(), C, scales=(0.5, 1.0, 2.0)).eval()
    x = torch.randn(2, 3, 32, 24)
    out = model.forward_features(x, return_scales=True)
    w = out["weights"]
    assert w.shape == (2, 3, 32, 24)
    torch.testing.assert_close(w.sum(1), torch.ones(2, 32, 24), atol=1e-6, rtol=0)
    assert float(w.detach().min()) > 0
    # by hand: features resized to the 1.0 feature size, 3×3 conv/BN/ReLU/1×1, softmax, upsample
    runs = {s: model.base.forward_features(up(x, (int(32 * s), int(24 * s))) if s != 1 else x) for s in (0.5, 1.0, 2.0)}
    cat = torch.cat([up(runs[s]["feats"], (8, 6)) for s in (0.5, 1.0, 2.0)], 1)
    weights = up(torch.softmax(model.scale_attn(cat), 1), (32, 24))
    want = sum(weights[:, i : i + 1] * up(runs[s]["logits"], (32, 24)) for i, s in enumerate((0.5, 1.0, 2.0)))
    torch.testing.assert_close(out["logits"], want, atol=1e-6, rtol=0)
    assert out["logits"].shape == (2, K, 32, 24) and out["aux"].shape == (2, K, 32, 24)
    model.train()
    losses = model.training_losses({"image": x, "mask": torch.randint(0, K, (2, 32, 24))}, StepInfo())
    assert set(losses) == {"main", "aux", "pred_0.5x", "pred_1.0x", "pred_2.0x"}
    sum(losses.values()).backward()
    assert model.scale_attn.conv0.weight.grad.abs().sum() > 0


def test_explicit_attention_head_layouts() -> None:
    """Published head (Chen et al. / NVIDIA ASDV3P default): 3×3 → 512, ReLU, 1×1 → S, no norm, no bias,
    and the 1×1 conv without NVIDIA's padding=1 (which grew an h×w map to (h+2)×(w+2))."""
    published = ExplicitAttention(ConvBase(), C, scales=(0.5, 1.0, 2.0)).eval()
    assert [n for n, _ in published.scale_attn.named_children()] == ["conv0", "re0", "conv1"]
    conv0, conv1 = published.scale_attn.conv0, published.scale_attn.conv1
    assert (conv0.in_channels, conv0.out_channels, conv0.kernel_size, conv0.padding) == (3 * C, 512, (3, 3), (1, 1))
    assert (conv1.out_channels, conv1.kernel_size, conv1.padding) == (3, (1, 1), (0, 0))
    assert sum(p.numel() for p in published.scale_attn.parameters()) == 3 * C * 512 * 9 + 512 * 3  # 84480
    feats = torch.randn(2, 3 * C, 5, 7)
    with torch.no_grad():
        want = F.conv2d(F.relu(F.conv2d(feats, conv0.weight, padding=1)), conv1.weight)
        torch.testing.assert_close(published.scale_attn(feats), want)
        assert want.shape == (2, 3, 5, 7)
        grown = F.conv2d(F.relu(F.conv2d(feats, conv0.weight, padding=1)), conv1.weight, padding=1)
        assert grown.shape == (2, 3, 7, 9)  # the reference's bug, for the record
    old = ExplicitAttention(ConvBase(), C, scales=(0.5, 1.0, 2.0), head_layout="bn")
    assert [n for n, _ in old.scale_attn.named_children()] == ["conv0", "bn0", "re0", "conv1"]
    assert old.scale_attn.conv0.out_channels == 256
    assert sum(p.numel() for p in old.scale_attn.parameters()) == 3 * C * 256 * 9 + 2 * 256 + 256 * 3  # 42752
    assert ExplicitAttention(ConvBase(), C, head_layout="published", attn_bottleneck=64).scale_attn.conv0.out_channels == 64
    with pytest.raises(ConfigError, match="head_layout='bnx'"):
        ExplicitAttention(ConvBase(), C, head_layout="bnx")


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_scale_pooling_matches_hand_computation(mode: str) -> None:
    torch.manual_seed(3)
    base = ConvBase()
    model = ScalePooling(base, scales=(0.5, 1.0, 2.0), mode=mode).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model.forward_features(x)
    per_scale = torch.stack([up(base.forward_features(up(x, (int(32 * s),) * 2))["logits"], (32, 32))
                             for s in (0.5, 1.0, 2.0)])
    want = per_scale.mean(0) if mode == "avg" else per_scale.max(0).values
    torch.testing.assert_close(out["logits"], want, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["feats"], base.forward_features(x)["feats"])
    model.train()  # training is single scale: the base model itself
    torch.testing.assert_close(model.forward_features(x)["logits"], base.forward_features(x)["logits"])
    with pytest.raises(ConfigError, match="scale_mode"):
        ScalePooling(base, mode="median")


def test_contract_attributes_and_predict() -> None:
    base = ConvBase()
    model = HierarchicalAttention(base, C)
    assert (model.num_classes, model.mean, model.std, model.stride) == (K, base.mean, base.std, 4)
    image = torch.randint(0, 256, (3, 20, 28), dtype=torch.uint8)
    labels = model.train().predict(image)
    assert model.training  # mode restored
    assert labels.shape == (20, 28) and labels.dtype == torch.int64
    x = ((image.float() / 255 - 0.5) / 0.25).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(labels, model.eval()(x).argmax(1)[0])


def test_deeplabv3plus_os8_builds_and_wraps() -> None:
    model = deeplabv3plus_os8(3, backbone="test_resnet")
    assert model.backbone.strides[-1] == 8 and model.head.feat_channels == 304
    hmsa = HierarchicalAttention(model, model.head.feat_channels).eval()
    with torch.no_grad():
        out = hmsa.forward_features(torch.randn(1, 3, 36, 44), return_scales=True)
    assert out["logits"].shape == (1, 3, 36, 44) and out["attn_0.5x"].shape == (1, 1, 18, 22)
    assert out["feats"].shape == (1, 304, 10, 12)  # the input is padded to 40×48 (stride 8) inside
    # the gate covers the padded input: upsample to 40×48, then crop to 36×44
    with torch.no_grad():
        gate = up(hmsa.scale_attn(out["feats"]), (40, 48))[..., :36, :44]
        naive = up(hmsa.scale_attn(out["feats"]), (36, 44))
    torch.testing.assert_close(out["attn_1.0x"], gate, atol=1e-6, rtol=0)
    assert not torch.allclose(out["attn_1.0x"], naive, atol=1e-4)


# ----------------------------------------------------------------------------- sizes off the stride
def test_input_fit_pad_and_stretch_place_feature_maps_where_hand_computed():
    """A head map of n cells over h input pixels: pad-and-crop puts cell i's centre at (i + ½)·s
    (s = stride); NVIDIA's stretch at (i + ½)·h/n. Pinned on a ramp t[i] = i at h = 30, stride 4."""
    from scaleseg.models.contract import Grid

    ramp = torch.arange(8, dtype=torch.float32).view(1, 1, 1, 8)  # ceil(30 / 4) = 8 cells
    pad = Grid((1, 30), (1, 32)).to_output(ramp)[0, 0, 0]
    stretch = Grid((1, 30), (1, 30)).to_output(ramp)[0, 0, 0]
    x = torch.arange(30) + 0.5  # pixel centres
    torch.testing.assert_close(pad, (x / 4 - 0.5).clamp(0, 7))
    torch.testing.assert_close(stretch, (x * 8 / 30 - 0.5).clamp(0, 7))
    # the two differ by up to 1.875 px of position at h = 30 (value ÷ cells-per-pixel)
    assert abs(float((stretch - pad).abs().max()) * 4 - 1.875) < 0.3


def test_stretch_models_run_unpadded_and_stretch_logits_and_attention():
    from scaleseg.config import load_config
    from scaleseg.models.factory import create_model

    cfg = load_config(None, ["model.backbone=test_resnet", "model.output_stride=8", "model.head_channels=8",
                             "model.hmsa.mode=hierarchical", "model.hmsa.attn_channels=8", "model.input_fit=stretch"])
    torch.manual_seed(0)
    model = create_model(cfg, K).eval()
    x = torch.randn(1, 3, 30, 46)
    base = model.base
    with torch.no_grad():
        out = base.forward_features(x)
        head = base.head(base.backbone(x))  # unpadded input, as NVIDIA's trunk sees it
        torch.testing.assert_close(out["logits"], up(head["logits"], (30, 46)))
        res = model.forward_features(x, scales=[0.5, 1.0], return_scales=True)
        lo = base.forward_features(up(x, (15, 23)))
        torch.testing.assert_close(res["attn_0.5x"], up(model.scale_attn(lo["feats"]), (15, 23)))
    padded = create_model(load_config(None, [*cfg_args(cfg), "model.input_fit=pad"]), K).eval()
    padded.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (padded.base(x) - out["logits"]).abs().max() > 1e-3  # the choice matters off the stride


def cfg_args(cfg) -> list[str]:
    m = cfg.model
    return [f"model.backbone={m.backbone}", f"model.output_stride={m.output_stride}",
            f"model.head_channels={m.head_channels}", "model.hmsa.mode=hierarchical", "model.hmsa.attn_channels=8"]
