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
training images by :func:`calibrate_threshold`). Each ``tile``×``tile`` tile of the 1.0-resolution
grid scores its *flagged mass* ``Σ max(0, threshold · W − m)`` (how many of its pixels a top-scale
swing of ``threshold`` logits could flip, and by how much). Each selected tile runs at scale ``S``
in a window of one fixed size (the tile at ``S`` with ``margin`` px of context on each side, on the
model's stride grid), so all windows of a batch run in one batched call: on a CPU a call on a small
window costs several times its pixels. The tiles of most mass are selected, as many as keep the
windows within ``budget`` of the top-scale image (``budget=None``: every tile that holds a flagged
pixel), and ``P`` is formed in their cores. Elsewhere ``P = P_lo`` (``Down(p_S)`` is estimated by ``p₁``).

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
from scaleseg.tiling import _scaled, hmsa_unit

__all__ = ["SparseResult", "sparse_hierarchical", "tile_scores", "window_size", "window_start",
           "calibrate_threshold", "top_scale_weight", "top2_margin"]


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


def tile_scores(margin: Tensor, weight: Tensor, threshold: float, tile: int) -> Tensor:
    """``B×⌈H/tile⌉×⌈W/tile⌉`` flagged mass: per tile the sum of ``max(0, threshold · weight − margin)``
    (positive exactly on the tiles that hold a flagged pixel, ``margin < threshold · weight``)."""
    mass = (threshold * weight - margin).clamp_min(0)
    return F.avg_pool2d(mass, tile, tile, ceil_mode=True, divisor_override=1)[:, 0]


def window_size(core: int, margin: int, align: int, limit: int) -> int:
    """Side of the fixed-size top-scale window around a ``core``-px tile: the core, ``margin`` px on
    each side and room to start on the ``align`` grid, a multiple of ``align``; at most ``limit``
    (the image: then the window is the whole side and starts at 0)."""
    side = -(-(core + 2 * margin) // align) * align + (align if margin < align else 0)
    return min(side, limit)


def window_start(core0: int, margin: int, side: int, align: int, limit: int) -> int:
    """Top-left of a ``side``-px window holding a core that starts at ``core0``: ``margin`` px before
    it, on the ``align`` grid, shifted inside the image (flush with its end at the far border)."""
    return min(max(0, (core0 - margin) // align * align), limit - side)


def _chunks(windows: Tensor, unit: Any, max_pixels: int = 1 << 20) -> Tensor:
    """``unit``'s top-scale logits for ``N×3×h×w`` windows, in batches of at most ``max_pixels``."""
    per = max(1, max_pixels // (windows.shape[-2] * windows.shape[-1]))
    return torch.cat([unit(windows[i : i + per])["logits"] for i in range(0, windows.shape[0], per)])


def sparse_hierarchical(model: nn.Module, x: Tensor, scales: Sequence[float] = (0.5, 1.0, 2.0), *,
                        threshold: float = 2.0, tile: int = 8, margin: int = 8,
                        budget: float | None = 0.15, max_fraction: float = 0.6) -> SparseResult:
    """Sparse hierarchical inference of ``model`` (``HierarchicalAttention``) on ``x`` ``B×3×H×W``
    (see the module docstring). ``tile`` in 1.0-scale pixels, ``margin`` in top-scale pixels,
    ``budget`` the fraction of each top-scale image that the windows may run (``None``: every tile
    with a flagged pixel). When the windows would still cover more than ``max_fraction`` of the
    top-scale image, the top scale runs densely instead and ``P = P_lo + W · (Down(p_S) − p₁)`` is
    the dense chain (to float rounding), at the cost of dense inference: the lower scales are not
    run again."""
    if tile < 1 or margin < 0 or (budget is not None and not 0 <= budget <= 1):
        raise ConfigError(f"eval.sparse_tile={tile} / eval.sparse_margin={margin} / eval.sparse_budget={budget}: "
                          "expected tile >= 1, margin >= 0, budget in [0, 1] or null")
    top, lower = _split_scales(scales)
    n, (h, w) = x.shape[0], x.shape[-2:]
    parts = top_scale_weight(model, x, lower)
    hs, ws = _scaled(h, w, top)
    ratio = (Fraction(hs, h), Fraction(ws, w))
    align = (math.lcm(int(model.stride), ratio[0].numerator), math.lcm(int(model.stride), ratio[1].numerator))
    side = (window_size(math.ceil(tile * ratio[0]), margin, align[0], hs),
            window_size(math.ceil(tile * ratio[1]), margin, align[1], ws))
    m = top2_margin(parts["P_lo"])
    scores = tile_scores(m, parts["W"], threshold, tile).cpu()
    positive = scores.flatten(1) > 0
    if budget is None:
        keep = positive.sum(1)
    else:  # as many windows as the budget pays for, the tiles of most flagged mass first
        keep = positive.sum(1).clamp_max(int(budget * hs * ws) // (side[0] * side[1]))
    rank = scores.flatten(1).argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # 0 = most mass
    tiles = (rank < keep[:, None]).view_as(scores)
    unit = hmsa_unit(model, with_attn=False)
    xs = _resize(x, (hs, ws))
    result = SparseResult(parts["P_lo"], tiles.to(x.device), top_px=hs * ws * n)
    if int(keep.sum()) * side[0] * side[1] > max_fraction * result.top_px:  # densely, by the same identity
        down = _resize(unit(xs)["logits"], (h, w))  # (the lower scales already ran: not run twice)
        result.logits = parts["P_lo"] + parts["W"] * (down - parts["p1"])
        result.computed_px, result.core_px = result.top_px, result.top_px
        result.windows = [[(0, hs, 0, ws)] for _ in range(n)]
        return result
    plan = []  # (image, core at 1.0, core at the top scale, window start)
    for b, ty, tx in tiles.nonzero().tolist():
        c = (ty * tile, min((ty + 1) * tile, h), tx * tile, min((tx + 1) * tile, w))
        core = (int(c[0] * ratio[0]), int(c[1] * ratio[0]), int(c[2] * ratio[1]), int(c[3] * ratio[1]))
        start = (window_start(core[0], margin, side[0], align[0], hs), window_start(core[2], margin, side[1], align[1], ws))
        plan.append((b, c, core, start))
    result.windows = [[(y, y + side[0], x0, x0 + side[1]) for bb, _, _, (y, x0) in plan if bb == b] for b in range(n)]
    if not plan:
        return result
    batch = torch.stack([xs[b, :, y : y + side[0], x0 : x0 + side[1]] for b, _, _, (y, x0) in plan])
    p_top = _chunks(batch, unit)  # every window in one batch (a memory-bounded few): no call per window
    # Down(p_S) of every window at once, as a whole-image resize would (tiling.resized_core), then
    # each core into place: the fuse is one vectorised step, not a handful of small ops per window
    down = F.interpolate(p_top, scale_factor=(float(1 / ratio[0]), float(1 / ratio[1])), mode="bilinear",
                         align_corners=False, recompute_scale_factor=False)
    p1, weight = parts["p1"], parts["W"]
    top_down, hit = torch.zeros_like(p1), torch.zeros_like(weight, dtype=torch.bool)
    for i, (b, (cy0, cy1, cx0, cx1), core, (y, x0)) in enumerate(plan):
        wy, wx = Fraction(y) / ratio[0], Fraction(x0) / ratio[1]
        if wy.denominator != 1 or wx.denominator != 1:
            raise RuntimeError(f"sparse: window at {(y, x0)} not aligned to the ratios {ratio}")
        top_down[b, :, cy0:cy1, cx0:cx1] = down[i, :, cy0 - int(wy) : cy1 - int(wy), cx0 - int(wx) : cx1 - int(wx)]
        hit[b, :, cy0:cy1, cx0:cx1] = True
        result.core_px += (core[1] - core[0]) * (core[3] - core[2])
    result.logits = torch.where(hit, parts["P_lo"] + weight * (top_down - p1), parts["P_lo"])
    result.computed_px = len(plan) * side[0] * side[1]
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
    return {"threshold": e.sparse_threshold, "tile": e.sparse_tile, "margin": e.sparse_margin,
            "budget": e.sparse_budget}
