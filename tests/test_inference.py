"""whole / slide / flip / scale pooling / Inferencer against hand-computed logits."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaleseg.errors import ConfigError
from scaleseg.inference import Inferencer, flip, scale_pooling, slide, whole


def conv_net(k: int = 4, layers: int = 2, kernel: int = 3, seed: int = 0) -> nn.Module:
    """Tiny deterministic conv model; ``layers >= 2`` with 3×3 kernels is not translation-equivariant
    at the borders of a crop (zero padding), so window placement matters."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    cin = 3
    for i in range(layers):
        cout = k if i == layers - 1 else 8
        mods.append(nn.Conv2d(cin, cout, kernel, padding=kernel // 2))
        if i < layers - 1:
            mods.append(nn.ReLU())
        cin = cout
    return nn.Sequential(*mods).eval()


class CropMean(nn.Module):
    """Logits = per-crop mean of channel 0, broadcast over K=2 channels (+/-): position dependent."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        m = x[:, :1].mean(dim=(2, 3), keepdim=True).expand(-1, 1, *x.shape[-2:])
        return torch.cat([m, -m], dim=1)


def row_image(values: list[float]) -> torch.Tensor:
    """1×3×1×W image whose channel 0 holds ``values``."""
    x = torch.zeros(1, 3, 1, len(values), dtype=torch.float64)
    x[0, 0, 0] = torch.tensor(values, dtype=torch.float64)
    return x


@torch.no_grad()
def test_slide_crop_equal_to_image_equals_whole_on_non_equivariant_model():
    model = conv_net(layers=2)
    x = torch.randn(2, 3, 10, 12)
    torch.testing.assert_close(slide(model, x, (10, 12), (5, 5)), whole(model, x), rtol=0, atol=0)


@torch.no_grad()
def test_slide_crop_larger_than_image_pads_and_crops_back():
    # A single zero-padded 3×3 conv sees the same zeros in the padded region as in its own padding.
    model = conv_net(layers=1)
    x = torch.randn(2, 3, 7, 9)
    out = slide(model, x, (12, 16), (6, 8))
    assert out.shape == (2, 4, 7, 9)
    torch.testing.assert_close(out, whole(model, x), rtol=0, atol=1e-6)


@torch.no_grad()
def test_slide_equals_whole_for_translation_equivariant_model():
    model = conv_net(layers=2, kernel=1)  # 1×1 convs: every pixel independent of its neighbours
    x = torch.randn(2, 3, 23, 31)
    for crop, stride, bs in [((8, 8), (5, 6), 4), ((10, 7), (10, 7), 1), ((23, 5), (3, 2), 7)]:
        out = slide(model, x, crop, stride, batch_size=bs)
        torch.testing.assert_close(out, whole(model, x), atol=1e-6, rtol=0)


def test_slide_count_map_normalisation_hand_example():
    # W=6, crop 3, stride 2: windows start at 0, 2 and 3 (last aligned to the border).
    # Crop means of 0..5: [0..2] -> 1, [2..4] -> 3, [3..5] -> 4.
    out = slide(CropMean(), row_image([0, 1, 2, 3, 4, 5]), crop_size=(1, 3), stride=(1, 2))
    expected = torch.tensor([1, 1, (1 + 3) / 2, (3 + 4) / 2, (3 + 4) / 2, 4], dtype=torch.float64)
    torch.testing.assert_close(out[0, 0, 0], expected)
    torch.testing.assert_close(out[0, 1, 0], -expected)
    # W=5, crop 3, stride 2: windows at 0 and 2 exactly.
    out = slide(CropMean(), row_image([0, 1, 2, 3, 4]), crop_size=(1, 3), stride=(1, 2))
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([1, 1, 2, 3, 3], dtype=torch.float64))


def test_slide_pads_small_image_with_zeros():
    x = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    x[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = slide(CropMean(), x, crop_size=4, stride=2)
    assert out.shape == (1, 2, 2, 2)
    torch.testing.assert_close(out[0, 0], torch.full((2, 2), 10 / 16, dtype=torch.float64))


def test_slide_2d_matches_window_by_window_reference_and_bounds_batches():
    model = CropMean()
    x = torch.randn(3, 3, 9, 11, dtype=torch.float64)
    out = slide(model, x, crop_size=(5, 6), stride=(3, 4), batch_size=4)
    # windows: rows start at 0, 3, 4; cols at 0, 4, 5 -> 9 windows × 3 images = 27 crops.
    assert model.batch_sizes == [4] * 6 + [3]
    ref = torch.zeros(3, 2, 9, 11, dtype=torch.float64)
    cnt = torch.zeros(9, 11, dtype=torch.float64)
    for y in (0, 3, 4):
        for xx in (0, 4, 5):
            for b in range(3):
                m = x[b, 0, y : y + 5, xx : xx + 6].mean()
                ref[b, 0, y : y + 5, xx : xx + 6] += m
                ref[b, 1, y : y + 5, xx : xx + 6] -= m
            cnt[y : y + 5, xx : xx + 6] += 1
    torch.testing.assert_close(out, ref / cnt)


def test_slide_default_stride_and_bad_arguments():
    model = conv_net(layers=1, kernel=1)
    x = torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(slide(model, x, 6), whole(model, x), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="stride"):
        slide(model, x, (4, 4), (5, 2))
    with pytest.raises(ConfigError, match="crop_size"):
        slide(model, x, (0, 4))


def test_whole_resizes_low_resolution_logits():
    x = torch.randn(1, 3, 8, 10)
    out = whole(lambda t: t[..., ::2, ::2], x)
    assert out.shape == (1, 3, 8, 10)
    expected = F.interpolate(x[..., ::2, ::2], size=(8, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected)


@torch.no_grad()
def test_flip_on_flip_equivariant_model_equals_whole():
    model = conv_net(layers=1)
    conv = model[0]
    conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)  # left-right symmetric kernels
    x = torch.randn(2, 3, 7, 9)
    torch.testing.assert_close(flip(model, x), model(x), atol=1e-6, rtol=0)


def test_flip_averages_unflipped_logits():
    # Logits = column index (independent of x): the un-flipped flip pass gives W-1-col, mean (W-1)/2.
    def fn(t: torch.Tensor) -> torch.Tensor:
        return torch.arange(t.shape[-1], dtype=t.dtype).expand(t.shape[0], 2, t.shape[2], -1)

    x = torch.randn(1, 3, 2, 5)
    torch.testing.assert_close(flip(fn, x), torch.full((1, 2, 2, 5), 2.0))
    # Logits = x itself: flip(fn) must return x exactly (hflip undone).
    torch.testing.assert_close(flip(lambda t: t * 1.0, x), x)


@torch.no_grad()
def test_scale_pooling_single_unit_scale_equals_whole():
    model = conv_net(layers=2)
    x = torch.randn(2, 3, 11, 13)
    for mode in ("avg", "max"):
        torch.testing.assert_close(scale_pooling(model, x, [1.0], mode), whole(model, x), rtol=0, atol=0)


def size_logits(t: torch.Tensor) -> torch.Tensor:
    """Constant logits [h, -h] where h is the input height (so the resized input size is visible)."""
    h = float(t.shape[-2])
    out = torch.empty(t.shape[0], 2, *t.shape[-2:], dtype=t.dtype)
    out[:, 0], out[:, 1] = h, -h
    return out


def test_scale_pooling_avg_and_max_hand_computed():
    x = torch.randn(2, 3, 8, 12)
    # heights at scales 0.5, 1, 2, 0.75: 4, 8, 16, 6
    avg = scale_pooling(size_logits, x, [0.5, 1.0, 2.0, 0.75], "avg")
    assert avg.shape == (2, 2, 8, 12)
    torch.testing.assert_close(avg[:, 0], torch.full((2, 8, 12), (4 + 8 + 16 + 6) / 4))
    torch.testing.assert_close(avg[:, 1], torch.full((2, 8, 12), -(4 + 8 + 16 + 6) / 4))
    mx = scale_pooling(size_logits, x, [0.5, 1.0, 2.0, 0.75], "max")
    torch.testing.assert_close(mx[:, 0], torch.full((2, 8, 12), 16.0))
    torch.testing.assert_close(mx[:, 1], torch.full((2, 8, 12), -4.0))


def test_scale_pooling_resizes_input_bilinearly():
    # Identity model at scale 0.5: result = up(down(x)) with bilinear, align_corners=False.
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    down = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)
    up = F.interpolate(down, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(scale_pooling(lambda t: t * 1.0, x, [0.5]), up)
    torch.testing.assert_close(scale_pooling(lambda t: t * 1.0, x, [0.5, 1.0]), (up + x) / 2)


@torch.no_grad()
def test_inferencer_composes_slide_flip_and_scales():
    model = conv_net(layers=2)
    x = torch.randn(1, 3, 12, 14)
    inf = Inferencer(
        mode="slide", crop_size=(8, 8), stride=(4, 5), flip=True, scales=[0.5, 1.0], scale_mode="max"
    )

    def slide_flip(t: torch.Tensor) -> torch.Tensor:
        return flip(lambda u: slide(model, u, (8, 8), (4, 5)), t)

    expected = scale_pooling(slide_flip, x, [0.5, 1.0], "max")
    torch.testing.assert_close(inf(model, x), expected, rtol=0, atol=0)
    torch.testing.assert_close(Inferencer()(model, x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(Inferencer(flip=True)(model, x), flip(model, x), rtol=0, atol=0)
    assert Inferencer(mode="slide", crop_size=8).crop_size == (8, 8)


def test_input_scale_resizes_only_the_image_and_returns_logits_at_its_size():
    model = conv_net(layers=2)
    x = torch.randn(2, 3, 36, 48)
    seen: list[tuple[int, ...]] = []

    def spy(t: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(t.shape))
        return model(t)

    out = Inferencer(input_scale=0.5)(spy, x)
    assert seen == [(2, 3, 18, 24)] and out.shape == (2, 4, 36, 48)
    # hand-built: antialiased bilinear shrink of the image, model, bilinear enlargement of the logits
    small = F.interpolate(x, size=(18, 24), mode="bilinear", align_corners=False, antialias=True)
    expected = F.interpolate(model(small), size=(36, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # composes with flip and scale pooling, which then run on the shrunk image
    composed = Inferencer(input_scale=0.5, flip=True, scales=[1.0, 2.0])(model, x)
    inner = scale_pooling(lambda t: flip(model, t), small, [1.0, 2.0], "avg")
    torch.testing.assert_close(composed, F.interpolate(inner, size=(36, 48), mode="bilinear", align_corners=False),
                               rtol=0, atol=0)
    # scale 1 is the identity; enlarging does not antialias
    torch.testing.assert_close(Inferencer(input_scale=1.0)(model, x), model(x), rtol=0, atol=0)
    big = F.interpolate(x, size=(54, 72), mode="bilinear", align_corners=False)
    torch.testing.assert_close(Inferencer(input_scale=1.5)(model, x),
                               F.interpolate(model(big), size=(36, 48), mode="bilinear", align_corners=False),
                               rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="slide"), "needs crop_size"),
        (dict(mode="tile"), "mode='tile'"),
        (dict(mode="whole", crop_size=(8, 8)), "only used by mode='slide'"),
        (dict(mode="slide", crop_size=(8, 8), stride=(9, 2)), "larger than crop_size"),
        (dict(mode="slide", crop_size=(8, -1)), "crop_size"),
        (dict(scales=[]), "non-empty"),
        (dict(scales=[1.0, 0.0]), "positive"),
        (dict(scales=[1.0], scale_mode="median"), "scale_mode='median'"),
        (dict(scale_mode="sum"), "scale_mode='sum'"),
        (dict(mode="slide", crop_size=8, batch_size=0), "batch_size"),
        (dict(input_scale=0.0), "input_scale"),
        (dict(input_scale=-0.5), "input_scale"),
    ],
)
def test_inferencer_rejects_bad_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Inferencer(**kwargs)


class Doubling(nn.Module):
    """A model whose logits are at 2× its input (a DSRL model's contract, ``output_scale = 2``):
    channels 0–1 upsampled ×2 by nearest neighbour, a pointwise map that any bilinear down-and-up
    resampling changes."""

    output_scale = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x[:, :2], scale_factor=2, mode="nearest")


@torch.no_grad()
def test_output_scale_keeps_super_resolved_logits_in_every_mode():
    """whole, slide, flip and scale pooling return a 2×-output model's logits at 2× the input,
    unchanged by inference (before the fix they were squeezed to the input size and upsampled again)."""
    torch.manual_seed(0)
    model = Doubling()
    x = torch.randn(2, 3, 12, 20, dtype=torch.float64)
    ref = model(x)
    assert ref.shape == (2, 2, 24, 40)
    torch.testing.assert_close(whole(model, x, output_scale=2), ref, rtol=0, atol=0)
    # windows placed at 2× their position, overlaps averaged: a pointwise map is unchanged everywhere
    torch.testing.assert_close(slide(model, x, (8, 8), (5, 6), output_scale=2), ref, rtol=0, atol=1e-12)
    inferencer = Inferencer(output_scale=2)
    torch.testing.assert_close(inferencer(model, x), ref, rtol=0, atol=0)
    pooled = Inferencer(scales=[1.0], output_scale=2)(model, x)
    torch.testing.assert_close(pooled, ref, rtol=0, atol=0)
    two = Inferencer(scales=[0.5, 1.0], output_scale=2)(model, x)
    half = F.interpolate(model(F.interpolate(x, size=(6, 10), mode="bilinear", align_corners=False)),
                         size=(24, 40), mode="bilinear", align_corners=False)
    torch.testing.assert_close(two, (ref + half) / 2, rtol=0, atol=1e-12)
    assert Inferencer(output_scale=2, input_scale=0.5)(model, x).shape == (2, 2, 24, 40)
    # without output_scale the old behaviour: resampled to the input size (what a DSRL model must not get)
    assert not torch.allclose(F.interpolate(whole(model, x), size=(24, 40), mode="bilinear"), ref)


@torch.no_grad()
def test_dsrl_eval_and_predict_keep_the_output_resolution():
    """make_predictor on a DSRL model (and on HMSA ∘ DSRL) returns the model's own 2× logits."""
    import scaleseg
    from scaleseg.config import load_config
    from scaleseg.engine.task import make_predictor

    base = ["model.backbone=test_resnet", "model.head_channels=16", "data.dataset=scalescenes",
            "model.dsrl.enabled=true"]
    for overrides in (base, base + ["model.output_stride=8", "model.hmsa.mode=hierarchical",
                                    "model.hmsa.attn_channels=8", "eval.scales=[1.0]"]):
        cfg = load_config(None, overrides)
        torch.manual_seed(0)
        model = scaleseg.create_model(cfg).eval()
        x = torch.randn(1, 3, 40, 56)
        logits = make_predictor(model, cfg)(x)
        assert logits.shape[-2:] == (80, 112)
        torch.testing.assert_close(logits, model(x), rtol=0, atol=1e-6)
        assert model.predict(torch.rand(3, 40, 56)).shape[-2:] == (80, 112)
