"""Attention-guided sparse high-resolution inference for hierarchical multi-scale attention
(``eval.sparse``): the expensive top scale (2.0) runs only on the tiles where it can change the
fused prediction. See ``docs/sparse_inference.md``.

For scales ``(…, s_lo, 1, S)`` with one scale ``S > 1`` the hierarchical chain is affine in the
top scale's logits. With ``P_lo`` the chain without ``S`` (the 1.0 scale first) and ``p₁``, ``a₁``
the 1.0 scale's logits and gate,

    P = P_lo + W · (Down(p_S) − p₁),      W = (1 − a₁) · Π_{s<1} (1 − Up(a_s)),

so ``W`` (``B×1×H×W``, in [0, 1]) is exactly the weight the chain gives the top scale at each pixel,
known before ``S`` runs. The top scale can flip the fused argmax only where ``W`` times the logit
change between scales exceeds the margin ``m`` between the two best classes of ``P_lo``. A pixel is
*flagged* when ``m < threshold · W`` (``threshold``: the logit change to expect, calibrated on
training images by :func:`calibrate_threshold`); the 1.0-resolution grid of ``tile``×``tile``
tiles that hold a flagged pixel is selected; runs of adjacent selected tiles in a row (and equal
runs in consecutive rows) form windows, each run at scale ``S`` with a ``margin`` of context, and
``P`` is formed there. Elsewhere ``P = P_lo`` (``Down(p_S)`` is estimated by ``p₁``).

Deliberate difference from dense inference: a window sees ``margin`` px of context and pools its
ASPP over itself, so inside the tiles ``p_S`` is close to, not equal to, the dense ``p_S``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleseg.errors import ConfigError
from scaleseg.tiling import _scaled, hmsa_unit, resized_core

__all__ = ["SparseResult", "sparse_hierarchical", "select_tiles", "tile_windows", "calibrate_threshold",
           "top_scale_weight", "top2_margin"]


@dataclass
class SparseResult:
    """Fused logits and what the top scale cost: ``tiles`` (``B×th×tw`` bool, the selected grid),
    ``windows`` (per image, ``(y0, y1, x0, x1)`` at the top scale), ``computed_px`` (top-scale
    pixels run, margins included), ``top_px`` (pixels of the whole top-scale image, per image × B)."""

    logits: Tensor
    tiles: Tensor
    windows: list[list[tuple[int, int, int, int]]] = field(default_factory=list)
    computed_px: int = 0
    top_px: int = 0
    core_px: int = 0

    @property
    def pixel_fraction(self) -> float:
        return self.computed_px / max(self.top_px, 1)


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _split_scales(scales: Sequence[float]) -> tuple[float, list[float]]:
    from scaleseg.models.hmsa import check_scales

    order = sorted(check_scales(scales, "scales"), reverse=True)
    if len(order) < 2 or order[0] <= 1.0 or order[1] != 1.0:
        raise ConfigError(f"eval.sparse needs scales with exactly one scale above 1.0 (e.g. [0.5, 1.0, 2.0]); got {list(scales)}")
    return order[0], order[2:]


def top_scale_weight(model: nn.Module, x: Tensor, lower: Sequence[float]) -> dict[str, Tensor]:
    """Run 1.0 and the ``lower`` scales densely: ``p1``, ``a1``, ``P_lo`` (chain without the top
    scale) and ``W`` (the top scale's weight in the full chain), all at the 1.0 size."""
    size = x.shape[-2:]
    one = hmsa_unit(model, with_attn=True)(x)
    p1, a1 = one["logits"], one["attn"]
    pred, keep = p1, torch.ones_like(a1)
    for s in sorted(lower, reverse=True):
        xs = _resize(x, _scaled(*size, s))
        out = hmsa_unit(model, with_attn=True)(xs)
        a_up = _resize(out["attn"], size)
        pred = _resize(out["attn"] * out["logits"], size) + (1 - a_up) * pred
        keep = keep * (1 - a_up)
    return {"p1": p1, "a1": a1, "P_lo": pred, "W": keep * (1 - a1)}


def top2_margin(logits: Tensor) -> Tensor:
    """``B×1×H×W`` difference between the two largest logits (0 = a tie)."""
    top = logits.topk(2, dim=1).values
    return top[:, :1] - top[:, 1:2]


def select_tiles(margin: Tensor, weight: Tensor, threshold: float, tile: int) -> Tensor:
    """``B×⌈H/tile⌉×⌈W/tile⌉`` bool: tiles holding a pixel with ``margin < threshold · weight``."""
    flagged = (margin < threshold * weight).float()
    return F.max_pool2d(flagged, tile, tile, ceil_mode=True)[:, 0] > 0


def tile_windows(tiles: Tensor) -> list[tuple[int, int, int, int]]:
    """One image's ``th×tw`` selection → rectangles ``(ty0, ty1, tx0, tx1)`` in tile units: runs
    of selected tiles in a row, merged with the same run in the rows below."""
    rects: list[list[int]] = []
    open_: dict[tuple[int, int], list[int]] = {}
    sel = tiles.cpu().tolist()
    for ty, row in enumerate(sel):
        runs, tx = [], 0
        while tx < len(row):
            if row[tx]:
                start = tx
                while tx < len(row) and row[tx]:
                    tx += 1
                runs.append((start, tx))
            else:
                tx += 1
        nxt: dict[tuple[int, int], list[int]] = {}
        for run in runs:
            rect = open_.get(run)
            if rect is not None and rect[1] == ty:
                rect[1] = ty + 1
            else:
                rect = [ty, ty + 1, run[0], run[1]]
                rects.append(rect)
            nxt[run] = rect
        open_ = nxt
    return [tuple(r) for r in rects]  # type: ignore[misc]


def sparse_hierarchical(model: nn.Module, x: Tensor, scales: Sequence[float] = (0.5, 1.0, 2.0), *,
                        threshold: float = 2.0, tile: int = 16, margin: int = 32,
                        max_fraction: float = 0.6) -> SparseResult:
    """Sparse hierarchical inference of ``model`` (``HierarchicalAttention``) on ``x`` ``B×3×H×W``
    (see the module docstring). ``tile`` in 1.0-scale pixels, ``margin`` in top-scale pixels.
    When the windows would cover more than ``max_fraction`` of the top-scale image, the top scale
    runs densely instead and ``P = P_lo + W · (Down(p_S) − p₁)`` is the dense chain (to float
    rounding), at the cost of dense inference: the lower scales are not run again."""
    if tile < 1 or margin < 0:
        raise ConfigError(f"eval.sparse_tile={tile} / eval.sparse_margin={margin}: expected tile >= 1, margin >= 0")
    top, lower = _split_scales(scales)
    h, w = x.shape[-2:]
    parts = top_scale_weight(model, x, lower)
    tiles = select_tiles(top2_margin(parts["P_lo"]), parts["W"], threshold, tile)
    hs, ws = _scaled(h, w, top)
    ratio = (Fraction(hs, h), Fraction(ws, w))
    stride = int(model.stride)
    align_y = math.lcm(stride, ratio[0].numerator)
    align_x = math.lcm(stride, ratio[1].numerator)
    xs = _resize(x, (hs, ws))
    unit = hmsa_unit(model, with_attn=False)
    result = SparseResult(parts["P_lo"].clone(), tiles, top_px=hs * ws * x.shape[0])
    plans = []
    for b in range(x.shape[0]):
        boxes = []
        for ty0, ty1, tx0, tx1 in tile_windows(tiles[b]):
            # core at 1.0 → at the top scale (exact multiples of the ratio), window with margin
            cy0, cy1 = ty0 * tile, min(ty1 * tile, h)
            cx0, cx1 = tx0 * tile, min(tx1 * tile, w)
            core = (int(cy0 * ratio[0]), int(cy1 * ratio[0]), int(cx0 * ratio[1]), int(cx1 * ratio[1]))
            win = (max(0, (core[0] - margin) // align_y * align_y), min(hs, core[1] + margin),
                   max(0, (core[2] - margin) // align_x * align_x), min(ws, core[3] + margin))
            boxes.append(((cy0, cy1, cx0, cx1), core, win))
        plans.append(boxes)
    computed = sum((wy1 - wy0) * (wx1 - wx0) for boxes in plans for _, _, (wy0, wy1, wx0, wx1) in boxes)
    if computed > max_fraction * result.top_px:  # the top scale densely, fused by the same identity
        down = _resize(unit(xs)["logits"], (h, w))  # (the lower scales already ran: not run twice)
        result.logits = parts["P_lo"] + parts["W"] * (down - parts["p1"])
        result.computed_px, result.core_px = result.top_px, result.top_px
        result.windows = [[(0, hs, 0, ws)] for _ in range(x.shape[0])]
        return result
    p1, weight = parts["p1"], parts["W"]
    for b, boxes in enumerate(plans):
        result.windows.append([win for _, _, win in boxes])
        for (cy0, cy1, cx0, cx1), core, (wy0, wy1, wx0, wx1) in boxes:
            p_top = unit(xs[b : b + 1, :, wy0:wy1, wx0:wx1])["logits"]
            sub = p_top[..., core[0] - wy0 : core[1] - wy0, core[2] - wx0 : core[3] - wx0]
            _, down = resized_core(sub, (core[0], core[2]), core, ratio)
            region = (b, slice(None), slice(cy0, cy1), slice(cx0, cx1))
            result.logits[region] = result.logits[region] + weight[region] * (down[0] - p1[region])
            result.computed_px += (wy1 - wy0) * (wx1 - wx0)
            result.core_px += (core[1] - core[0]) * (core[3] - core[2])
    return result


def calibrate_threshold(model: nn.Module, images: Iterable[Tensor], scales: Sequence[float] = (0.5, 1.0, 2.0),
                        recall: float = 0.98) -> float:
    """The smallest threshold whose flags catch ``recall`` of the pixels whose fused argmax the top
    scale really changes (dense top scale), over ``images`` (``B×3×H×W``, training images)."""
    top, lower = _split_scales(scales)
    ratios: list[Tensor] = []
    with torch.inference_mode():
        for x in images:
            parts = top_scale_weight(model, x, lower)
            full = model.forward_features(x, scales=scales)["logits"]
            changed = full.argmax(1, keepdim=True) != parts["P_lo"].argmax(1, keepdim=True)
            need = top2_margin(parts["P_lo"]) / parts["W"].clamp_min(1e-6)  # flagged iff need < threshold
            ratios.append(need[changed])
    values = torch.cat(ratios) if ratios else torch.zeros(0)
    if values.numel() == 0:
        return 0.0
    return float(torch.quantile(values.double(), recall)) * 1.0001


def config_kwargs(e: Any) -> dict[str, Any]:
    """``sparse_hierarchical`` keyword arguments from an ``EvalConfig``."""
    return {"threshold": e.sparse_threshold, "tile": e.sparse_tile, "margin": e.sparse_margin}
