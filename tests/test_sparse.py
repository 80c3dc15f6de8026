"""Sparse top-scale hierarchical inference: the affine decomposition of the chain, tile selection,
windows, and the predictor switch."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

import scaleseg
from scaleseg.config import load_config
from scaleseg.errors import ConfigError
from scaleseg.sparse import (
    calibrate_threshold,
    sparse_hierarchical,
    tile_scores,
    top2_margin,
    top_scale_weight,
    window_size,
    window_start,
)

K = 5
HMSA = ["model.backbone=test_resnet", "model.head_channels=8", "model.decoder_channels=8", "model.output_stride=8",
        "model.hmsa.mode=hierarchical", "model.hmsa.attn_channels=8"]


def _model(*extra: str) -> nn.Module:
    torch.manual_seed(0)
    model = scaleseg.create_model(load_config(None, HMSA + list(extra)), K).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _x(h=64, w=96, seed=0):
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_chain_is_affine_in_the_top_scale():
    """P = P_lo + W·(Down(p_2) − p_1): the decomposition reproduces the dense chain exactly."""
    model = _model()
    x = _x()
    with torch.inference_mode():
        for scales, lower in (((0.5, 1.0, 2.0), [0.5]), ((0.25, 0.5, 1.0, 2.0), [0.25, 0.5])):
            res = model.forward_features(x, scales=scales, return_scales=True)
            parts = top_scale_weight(model, x, lower)
            down = torch.nn.functional.interpolate(res["pred_2.0x"], size=x.shape[-2:], mode="bilinear",
                                                   align_corners=False)
            torch.testing.assert_close(parts["P_lo"] + parts["W"] * (down - parts["p1"]), res["logits"],
                                       rtol=1e-5, atol=1e-5)
            lo = model.forward_features(x, scales=[s for s in scales if s <= 1.0])["logits"]
            torch.testing.assert_close(parts["P_lo"], lo, rtol=1e-5, atol=1e-5)
            assert float(parts["W"].min()) >= 0 and float(parts["W"].max()) <= 1


def test_no_tiles_gives_the_low_chain_and_all_tiles_the_dense_chain():
    fcn = _model("model.arch=fcn")  # no ASPP: with a margin ≥ the receptive field windows are exact
    x = _x(64, 96)
    with torch.inference_mode():
        none = sparse_hierarchical(fcn, x, threshold=0.0)
        assert none.computed_px == 0 and not bool(none.tiles.any())
        torch.testing.assert_close(none.logits, fcn.forward_features(x, scales=(0.5, 1.0))["logits"])
        every = sparse_hierarchical(fcn, x, threshold=float("inf"), tile=16, margin=200, budget=None,
                                    max_fraction=float("inf"))
        assert bool(every.tiles.all())
        torch.testing.assert_close(every.logits, fcn.forward_features(x, scales=(0.5, 1.0, 2.0))["logits"],
                                   rtol=1e-5, atol=1e-5)
        # beyond max_fraction the top scale runs densely: the dense chain, each scale run once
        stem = next(m for m in fcn.modules() if isinstance(m, torch.nn.Conv2d))
        sizes: list = []
        hook = stem.register_forward_hook(lambda m, i, o: sizes.append(tuple(i[0].shape[-2:])))
        capped = sparse_hierarchical(fcn, x, threshold=float("inf"), budget=None, max_fraction=0.5)
        hook.remove()
        assert sorted(sizes) == [(32, 48), (64, 96), (128, 192)]
        assert capped.pixel_fraction == 1.0
        torch.testing.assert_close(capped.logits, fcn.forward_features(x, scales=(0.5, 1.0, 2.0))["logits"],
                                   rtol=1e-5, atol=1e-5)


def test_tile_scores_are_the_flagged_mass_per_tile():
    margin = torch.tensor([[[[5.0, 5.0, 0.1, 0.3], [5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0], [0.2, 5.0, 5.0, 0.4]]]])
    weight = torch.full_like(margin, 0.5)
    weight[..., 3, 0] = 0.01
    scores = tile_scores(margin, weight, threshold=1.0, tile=2)
    # top right: (0.5 − 0.1) + (0.5 − 0.3); bottom right: 0.5 − 0.4; bottom left: 0.01 − 0.2 < 0 → 0
    torch.testing.assert_close(scores, torch.tensor([[[0.0, 0.6], [0.0, 0.1]]]))
    assert top2_margin(torch.tensor([[[[3.0]], [[1.0]], [[2.5]]]])).item() == pytest.approx(0.5)
    # a partial tile at the border sums what it holds (ceil mode, no padding counted)
    torch.testing.assert_close(tile_scores(margin[..., :3, :3], weight[..., :3, :3], 1.0, 2),
                               torch.tensor([[[0.0, 0.4], [0.0, 0.0]]]))


def test_budget_takes_the_tiles_of_most_mass_and_keeps_the_windows_within_it():
    model = _model()
    x = _x(64, 128, seed=1)
    threshold = 50.0  # everything is flagged: the budget alone decides
    with torch.inference_mode():
        parts = top_scale_weight(model, x, [0.5])
        scores = tile_scores(top2_margin(parts["P_lo"]), parts["W"], threshold, 16)
        previous = None
        for budget in (0.0, 0.1, 0.3, 0.5):
            res = sparse_hierarchical(model, x, threshold=threshold, tile=16, margin=16, budget=budget)
            per_image = [sum((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in boxes) for boxes in res.windows]
            assert max(per_image) <= budget * 128 * 256 and res.computed_px == sum(per_image)
            for b in range(2):
                chosen, rest = scores[b][res.tiles[b]], scores[b][~res.tiles[b]]
                if chosen.numel() and rest.numel():
                    assert float(chosen.min()) >= float(rest.max())
            assert previous is None or int(res.tiles.sum()) >= previous
            previous = int(res.tiles.sum())
        assert 0 < previous < res.tiles.numel()
        none = sparse_hierarchical(model, x, threshold=threshold, budget=0.0)
        torch.testing.assert_close(none.logits, parts["P_lo"])
    with pytest.raises(ConfigError, match="sparse_budget"):
        sparse_hierarchical(model, x, budget=1.5)
    with pytest.raises(ConfigError, match="eval.sparse_budget"):
        load_config(None, HMSA + ["eval.sparse_budget=-0.1"])


def test_fixed_windows_hold_their_core_with_its_margin_on_the_stride_grid():
    for core, margin, align, limit in ((32, 16, 8, 256), (32, 3, 8, 256), (32, 0, 8, 256), (30, 5, 6, 90)):
        side = window_size(core, margin, align, limit)
        assert side % align == 0 and side >= core + 2 * margin
        for core0 in range(0, limit - core + 1, 2):
            start = window_start(core0, margin, side, align, limit)
            assert 0 <= start <= core0 and core0 + core <= start + side <= limit
            assert start % align == 0 or start + side == limit
            assert start + side == limit or core0 - start >= min(margin, core0)
    assert window_size(32, 200, 8, 128) == 128 and window_start(96, 200, 128, 8, 128) == 0


def test_sparse_windows_and_pixel_accounting():
    model = _model()
    x = _x(64, 128, seed=1)
    with torch.inference_mode():
        parts = top_scale_weight(model, x, [0.5])
        need = top2_margin(parts["P_lo"]) / parts["W"]
        threshold = float(need.flatten().kthvalue(20).values)  # ~20 flagged pixels: a few tiles
        res = sparse_hierarchical(model, x, threshold=threshold, tile=16, margin=16, budget=None,
                                  max_fraction=float("inf"))
    assert res.top_px == 2 * 128 * 256
    assert 0 < res.core_px <= res.computed_px < res.top_px
    assert res.core_px == int(res.tiles.sum()) * 32 * 32
    assert res.computed_px == int(res.tiles.sum()) * 64 * 64  # 32-px cores with 16 px on each side
    for boxes in res.windows:
        for y0, y1, x0, x1 in boxes:
            assert (y0 % model.stride == 0 or y1 == 128) and (x0 % model.stride == 0 or x1 == 256)
            assert 0 <= y0 < y1 <= 128 and 0 <= x0 < x1 <= 256 and (y1 - y0, x1 - x0) == (64, 64)


def test_calibrated_threshold_catches_the_changes_it_was_fitted_on():
    model = _model()
    images = [_x(64, 96, seed=s) for s in (2, 3)]
    threshold = calibrate_threshold(model, images, recall=1.0)
    assert threshold > 0
    with torch.inference_mode():
        for x in images:
            parts = top_scale_weight(model, x, [0.5])
            dense = model.forward_features(x, scales=(0.5, 1.0, 2.0))["logits"]
            changed = dense.argmax(1, keepdim=True) != parts["P_lo"].argmax(1, keepdim=True)
            flagged = top2_margin(parts["P_lo"]) < threshold * parts["W"]
            assert bool(flagged[changed].all())


def test_predictor_uses_sparse_inference_when_asked():
    from scaleseg.engine.task import make_predictor

    model = _model()
    x = _x()
    cfg = load_config(None, HMSA + ["eval.scales=[0.5,1.0,2.0]", "eval.sparse=true", "eval.sparse_threshold=0"])
    with torch.inference_mode():
        torch.testing.assert_close(make_predictor(model, cfg)(x), model.forward_features(x, scales=(0.5, 1.0))["logits"])
    with pytest.raises(ConfigError, match="eval.sparse"):
        make_predictor(model, load_config(None, HMSA + ["eval.scales=[0.5,1.0]", "eval.sparse=true"]))(x)
    with pytest.raises(ConfigError, match="eval.sparse"):
        plain = scaleseg.create_model(load_config(None, HMSA[:4]), K)
        make_predictor(plain, load_config(None, HMSA[:4] + ["eval.sparse=true"]))
