"""Tiled (memory-bounded) inference equals whole-image inference: the plan, the receptive-field
probe, single-scale logits with ASPP image pooling across windows, and the hierarchical chain."""
from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

import scaleseg
from scaleseg.config import load_config
from scaleseg.errors import ConfigError
from scaleseg.tiling import (
    TiledInference,
    hierarchical_logits,
    image_pooling_modules,
    plan_tiles,
    receptive_radius,
    tiled_logits,
)

K = 5
TINY = ["model.backbone=test_resnet", "model.head_channels=8", "model.decoder_channels=8", "model.output_stride=8"]


def _model(*extra: str) -> nn.Module:
    torch.manual_seed(0)
    model = scaleseg.create_model(load_config(None, TINY + list(extra)), K).eval()
    for m in model.modules():  # non-trivial BN statistics, so that every layer matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| relative to the largest |b| (the random tiny network's logits are small)."""
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(("h", "w", "budget", "margin", "align"), [
    (100, 700, 100 * 300, 40, (8, 8)), (333, 517, 200 * 200, 24, (16, 8)), (64, 64, 64 * 64, 50, (8, 8)),
])
def test_plan_partitions_the_image_within_the_budget(h, w, budget, margin, align):
    tiles = plan_tiles(h, w, budget, margin, align)
    cover = torch.zeros(h, w, dtype=torch.int64)
    for t in tiles:
        cover[t.cy0 : t.cy1, t.cx0 : t.cx1] += 1
        assert t.pixels <= budget
        assert t.y0 % align[0] == 0 and t.x0 % align[1] == 0  # the model's stride grid is kept
        assert t.cy0 % align[0] == 0 and t.cx0 % align[1] == 0
        # a margin on every side that is not the image border
        assert t.y0 == 0 or t.cy0 - t.y0 >= margin
        assert t.x0 == 0 or t.cx0 - t.x0 >= margin
        assert t.y1 == h or t.y1 - t.cy1 >= margin
        assert t.x1 == w or t.x1 - t.cx1 >= margin
    assert bool((cover == 1).all())  # cores partition the image
    assert (len(tiles) == 1) == (h * w <= budget)


def test_plan_refuses_a_budget_below_the_margin():
    with pytest.raises(ConfigError, match="eval.max_pixels=1000"):
        plan_tiles(500, 500, 1000, 100, (8, 8))


def test_receptive_radius_of_known_convolutions():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=4, dilation=4),
                        nn.ReLU(), nn.Conv2d(4, 2, 5, padding=2))
    # 1 + 4 + 2 = 7 px, rounded up to the stride (here 1) plus one stride of safety
    assert receptive_radius(lambda x: {"logits": net(x)}, 1, start=64) == 8
    pooled = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                           nn.Upsample(scale_factor=2))
    # 1 + (1 px at stride 2) = 3 px, the pooling window and the bilinear-free upsample add ≤ 1 px
    assert receptive_radius(lambda x: {"logits": pooled(x)}, 2, start=64) in (4, 6)
    # a dilated tap lands outside a strip shorter than twice its reach, so the probe starts long
    far = nn.Conv2d(3, 2, 3, padding=300, dilation=300)
    assert receptive_radius(lambda x: {"logits": far(x)}, 1, start=64) == 1  # hidden in a short strip
    assert receptive_radius(lambda x: {"logits": far(x)}, 1) == 301


def test_tiled_logits_equal_whole_image_with_aspp_image_pooling():
    model = _model()
    aspp, approximate = image_pooling_modules(model)
    assert len(aspp) == 1 and not approximate
    margin = receptive_radius(lambda x: {"logits": model(x)}, model.stride, aspp)
    assert 288 <= margin <= 400  # ASPP rate 36 at stride 8 reaches 288 px
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 120, 1500, generator=g)
    with torch.inference_mode():
        dense = model(x)
        budget = 120 * 1000
        tiled = tiled_logits(model, x, budget, model.stride, margin, aspp)
        assert len(plan_tiles(120, 1500, budget, margin, (8, 8))) >= 2
        assert _rel(tiled, dense) < 1e-5  # everywhere, seams included
        # the pooling pass only needs the context of the layers before the ASPP
        tiling = TiledInference(model, max_pixels=budget)
        assert _rel(tiling.logits(model, x), dense) < 1e-5
        assert tiling.margin == margin and tiling.collect_margin < margin // 2
        # without the image-wide pooling, each window pools itself: clearly different
        local = tiled_logits(model, x, budget, model.stride, margin, ())
        assert _rel(local, dense) > 1e-4
        # a margin below the receptive field is visibly wrong near the seams
        short = tiled_logits(model, x, budget, model.stride, margin // 4, aspp)
        assert _rel(short, dense) > 1e-4


def test_hierarchical_logits_in_tiles_equal_the_dense_chain(caplog):
    model = _model("model.hmsa.mode=hierarchical", "model.hmsa.attn_channels=8")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 96, 640, generator=g)
    tiling = TiledInference(model, max_pixels=192 * 1000)  # scale 2.0 (192×1280) needs windows
    caplog.set_level(logging.WARNING, logger="scaleseg.inference")
    with torch.inference_mode():
        for scales in ((0.5, 1.0, 2.0), (0.25, 0.5, 1.0, 2.0), (1.0, 2.0)):
            dense = model.forward_features(x, scales=scales)["logits"]
            tiled = hierarchical_logits(model, x, scales, tiling)
            assert _rel(tiled, dense) < 1e-5, scales
    assert any("scale 2: 192×1280 image exceeds eval.max_pixels=192000: tiled inference" in r.message
               for r in caplog.records)
    assert tiling.margin is not None and tiling.margin >= 288
    # every scale tiles when each exceeds the budget: an FCN head (no ASPP) has a smaller field
    fcn = _model("model.arch=fcn", "model.hmsa.mode=hierarchical", "model.hmsa.attn_channels=8")
    small = TiledInference(fcn, max_pixels=30_000)
    x = torch.randn(1, 3, 120, 1100, generator=g)
    with torch.inference_mode():
        dense = fcn.forward_features(x, scales=(0.5, 1.0))["logits"]
        assert _rel(hierarchical_logits(fcn, x, (0.5, 1.0), small), dense) < 1e-5
    assert small.margin < 200
    assert any(r.message.startswith("scale 0.5: 60×550 image exceeds") for r in caplog.records)
    assert any(r.message.startswith("scale 1: 120×1100 image exceeds") for r in caplog.records)


def test_predictor_switches_to_tiles_above_eval_max_pixels(caplog):
    from scaleseg.engine.task import make_predictor

    model = _model()
    x = torch.randn(1, 3, 96, 1400, generator=torch.Generator().manual_seed(3))
    whole = make_predictor(model, load_config(None, TINY + ["eval.max_pixels=null"]))
    tiled = make_predictor(model, load_config(None, TINY + ["eval.max_pixels=100000", "eval.tile_margin=400"]))
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="scaleseg.inference"):
        assert _rel(tiled(x), whole(x)) < 1e-5
    assert any("96×1400 image exceeds eval.max_pixels=100000" in r.message for r in caplog.records)
    with pytest.raises(ConfigError, match="eval.max_pixels"):
        load_config(None, ["eval.max_pixels=0"])


def test_label_predictor_takes_the_argmax_window_by_window():
    """make_predictor(labels=True), as `scaleseg predict` uses it: above the budget the argmax is taken
    per window into a B×H×W uint8 map (never image-sized float logits) and equals the argmax of the
    whole-image logits wherever the top two classes are not tied within the tiling error."""
    from scaleseg.engine.task import make_predictor

    model = _model()
    x = torch.randn(2, 3, 96, 1400, generator=torch.Generator().manual_seed(4))
    cfg = load_config(None, TINY + ["eval.max_pixels=100000", "eval.tile_margin=400"])
    with torch.inference_mode():
        whole = make_predictor(model, load_config(None, TINY + ["eval.max_pixels=null"]))(x)
        labels = make_predictor(model, cfg, labels=True)(x)
        small = make_predictor(model, cfg, labels=True)(x[..., :200])  # within the budget: whole
    assert labels.shape == (2, 96, 1400) and labels.dtype == torch.uint8
    top2 = whole.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4 * whole.abs().max()
    assert clear.float().mean() > 0.99
    assert torch.equal(labels.long()[clear], whole.argmax(1)[clear])
    assert torch.equal(small, model(x[..., :200]).argmax(1))
    # flip (or scales) fuse logits first: the label predictor then argmaxes the fused logits
    flip_cfg = load_config(None, TINY + ["eval.max_pixels=100000", "eval.tile_margin=400", "eval.flip=true"])
    with torch.inference_mode():
        fused = make_predictor(model, flip_cfg)(x)
        assert torch.equal(make_predictor(model, flip_cfg, labels=True)(x), fused.argmax(1))
