"""Memory-bounded inference in tiles whose logits equal whole-image inference.

When an image (or a scale of it) has more pixels than a budget, the network runs on **windows**: a
grid of *cores* partitions the image, each window is its core plus a context *margin* on every side
(clamped to the image), and only the core of each window's output is kept. With a margin of at
least the network's receptive-field radius every core pixel sees exactly the context it sees in the
whole image, so the stitched logits equal whole-image inference everywhere (float rounding only),
not just away from the seams. Peak memory is that of one window, whatever the image size.

Three details make this exact rather than approximate:

* **alignment**: window starts are multiples of the model's stride (its downsampling grid then
  coincides with the whole image's) and of the resize ratios the caller needs;
* **image pooling**: an ASPP pools its input over the whole image. A first pass over the windows
  (backbone only, stopped at the ASPP) sums that input over each core's feature cells; the second
  pass runs the windows with the image-wide mean (``ASPP.image_mean``). Heads that pool image
  *regions* (PPM, OCR's object regions) are not made exact: their tiled logits are approximate,
  and :func:`tile_plan_note` says so;
* **resizing on write**: a core's output can be resized into a buffer of another size on the fly
  (``F.interpolate`` with the whole image's scale factor, taps taken from the window's margin),
  so the hierarchical chain never holds logits at the size of its largest scale.

The margin is measured once per model by :func:`receptive_radius` (a forward-difference probe on
two thin strips) unless given.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleseg.errors import ConfigError

__all__ = ["Tile", "plan_tiles", "receptive_radius", "image_pooling_modules", "tiled_maps", "tiled_logits",
           "resized_core", "tile_plan_note", "hierarchical_logits", "TiledInference", "chain_function"]

log = logging.getLogger("scaleseg.inference")
_MMAP_PINNED = False


def _return_freed_windows_to_the_os() -> None:
    """Pin glibc's mmap threshold (1 MiB) once per process, on Linux/glibc only. glibc raises the
    threshold dynamically after each large free, so the next window's tensors come from the heap and
    are never given back: resident memory grows with the number of windows. With a fixed threshold
    a window's buffers are mmapped and unmapped when freed, so tiled inference stays at one window.
    No-op where there is no glibc (and on CUDA tensors, which do not use malloc)."""
    global _MMAP_PINNED
    if _MMAP_PINNED:
        return
    _MMAP_PINNED = True
    from scaleseg.engine.speed import M_MMAP_THRESHOLD, glibc_mallopt

    glibc_mallopt((M_MMAP_THRESHOLD, 1 << 20))
UnitFn = Callable[[Tensor], dict[str, Tensor]]
"""``window B×3×h×w → {"logits": B×K×h×w, optionally "attn": B×1×h×w}`` at the window's size."""


@dataclass(frozen=True)
class Tile:
    """One window ``[y0, y1) × [x0, x1)`` and the core ``[cy0, cy1) × [cx0, cx1)`` it contributes."""

    y0: int
    y1: int
    x0: int
    x1: int
    cy0: int
    cy1: int
    cx0: int
    cx1: int

    @property
    def pixels(self) -> int:
        return (self.y1 - self.y0) * (self.x1 - self.x0)


def _axis(size: int, n: int, margin: int, align: int) -> list[tuple[int, int, int, int]] | None:
    """``n`` cores of an axis (aligned boundaries, the last one ends at ``size``) with their
    windows: (w0, w1, c0, c1). None when ``n`` aligned cores cannot be formed."""
    step = math.ceil(math.ceil(size / n) / align) * align
    bounds = list(range(0, size, step)) + [size]
    if len(bounds) - 1 != n:
        return None
    out = []
    for c0, c1 in zip(bounds, bounds[1:]):
        w0 = max(0, (c0 - margin) // align * align)
        out.append((w0, min(size, c1 + margin), c0, c1))
    return out


_MAX_SPLITS = 128  # windows per axis considered by plan_tiles


def plan_tiles(height: int, width: int, max_pixels: int, margin: int, align: tuple[int, int]) -> list[Tile]:
    """The cheapest grid (least computed pixels, then fewest windows) whose windows hold at most
    ``max_pixels`` pixels. ``align`` = (row, column) multiple for window starts and core bounds.
    A single window when the image fits. ConfigError when no grid fits the budget."""
    if height * width <= max_pixels:
        return [Tile(0, height, 0, width, 0, height, 0, width)]
    best: tuple[int, int, list, list] | None = None
    ay, ax = align
    for ny in range(1, min(math.ceil(height / ay), _MAX_SPLITS) + 1):
        rows = _axis(height, ny, margin, ay)
        if rows is None:
            continue
        max_h = max(w1 - w0 for w0, w1, _, _ in rows)
        if max_h * ax > max_pixels:
            continue
        sum_h = sum(w1 - w0 for w0, w1, _, _ in rows)
        for nx in range(1, min(math.ceil(width / ax), _MAX_SPLITS) + 1):
            cols = _axis(width, nx, margin, ax)
            if cols is None:
                continue
            if max_h * max(w1 - w0 for w0, w1, _, _ in cols) > max_pixels:
                continue
            cost = sum_h * sum(w1 - w0 for w0, w1, _, _ in cols)
            if best is None or (cost, ny * nx) < (best[0], best[1]):
                best = (cost, ny * nx, rows, cols)
            break  # more columns only cost more once the window fits
    if best is None:
        side = 2 * margin + max(ay, ax)
        raise ConfigError(
            f"eval.max_pixels={max_pixels} is too small for tiled inference of a {height}×{width} image with a "
            f"{margin}-px context margin (the network's receptive field): a window needs at least {side}×{side} px"
        )
    _, _, rows, cols = best
    return [Tile(r[0], r[1], c[0], c[1], r[2], r[3], c[2], c[3]) for r in rows for c in cols]


def tile_plan_note(height: int, width: int, tiles: Sequence[Tile], margin: int, max_pixels: int,
                   approximate: bool) -> str:
    computed = sum(t.pixels for t in tiles) / (height * width)
    note = (f"{height}×{width} image exceeds eval.max_pixels={max_pixels}: tiled inference in {len(tiles)} windows "
            f"with a {margin}-px context margin ({computed:.2f}× the pixels)")
    if approximate:
        note += "; the head pools image regions (PPM/OCR), so tiled logits are approximate"
    return note


# ---------------------------------------------------------------------------------------------
# image pooling across windows


class _Collected(Exception):
    """Raised by the collecting hook to stop a window's forward right after the ASPP input."""


def image_pooling_modules(model: nn.Module) -> tuple[list[nn.Module], bool]:
    """(ASPP modules, whether other image/region pooling makes tiling approximate)."""
    from scaleseg.models.heads import ASPP, PPM

    aspp = [m for m in model.modules() if isinstance(m, ASPP)]
    other = any(isinstance(m, PPM) or type(m).__name__ == "SpatialGather" for m in model.modules())
    return aspp, other or len(aspp) > 1


def _collect_image_mean(unit: UnitFn, xs: Tensor, tiles: Sequence[Tile], aspp: nn.Module, stride: int) -> Tensor:
    """Mean of the ASPP input over the whole (padded) feature grid, summed core by core."""
    total: list[Tensor] = []
    box: list[tuple[int, int, int, int]] = []

    def hook(module: nn.Module, args: tuple) -> None:
        feat = args[0]
        y0, y1, x0, x1 = box[0]
        total.append(feat[..., y0:y1, x0:x1].sum(dim=(2, 3), keepdim=True))
        raise _Collected

    handle = aspp.register_forward_pre_hook(hook)
    try:
        for t in tiles:
            box[:] = [((t.cy0 - t.y0) // stride, math.ceil((t.cy1 - t.y0) / stride),
                       (t.cx0 - t.x0) // stride, math.ceil((t.cx1 - t.x0) / stride))]
            try:
                unit(xs[..., t.y0 : t.y1, t.x0 : t.x1])
            except _Collected:
                pass
            else:
                raise RuntimeError("the ASPP was not reached in a window: cannot pool the image across windows")
    finally:
        handle.remove()
    cells = math.ceil(xs.shape[-2] / stride) * math.ceil(xs.shape[-1] / stride)
    return torch.stack(total).sum(0) / cells


def tiled_maps(unit: UnitFn, xs: Tensor, tiles: Sequence[Tile], stride: int, aspp: Sequence[nn.Module] = (),
               collect_tiles: Sequence[Tile] | None = None) -> Iterator[tuple[Tile, dict[str, Tensor]]]:
    """Run ``unit`` on every window of ``xs`` (``B×3×H×W``), yielding (tile, window outputs). With
    one ASPP and more than one window, its image pooling is made image-wide (two passes); the first
    pass runs on ``collect_tiles`` (default ``tiles``), whose margin need only cover the layers
    before the ASPP."""
    if len(tiles) > 1 and len(aspp) == 1:
        mean = _collect_image_mean(unit, xs, collect_tiles or tiles, aspp[0], stride)
        aspp[0].image_mean = mean
        try:
            for t in tiles:
                yield t, unit(xs[..., t.y0 : t.y1, t.x0 : t.x1])
        finally:
            aspp[0].image_mean = None
    else:
        for t in tiles:
            yield t, unit(xs[..., t.y0 : t.y1, t.x0 : t.x1])


def resized_core(window: Tensor, offset: tuple[int, int], core: tuple[int, int, int, int],
                 ratio: tuple[Fraction, Fraction]) -> tuple[tuple[int, int, int, int], Tensor]:
    """The core ``(cy0, cy1, cx0, cx1)`` of ``window`` (whose top-left pixel is ``offset`` in the
    source image), resized by the source/target size ``ratio`` per axis exactly as a whole-image
    bilinear resize (``align_corners=False``) would: ((ty0, ty1, tx0, tx1) in the target, tensor).
    Core bounds and the offset must be multiples of the ratios' numerators; the taps just outside
    the core come from the window's margin."""
    cy0, cy1, cx0, cx1 = core
    oy, ox = offset
    ry, rx = ratio
    bounds = [cy0 / ry, cy1 / ry, cx0 / rx, cx1 / rx, oy / ry, ox / rx]
    if any(b.denominator != 1 for b in bounds):
        raise RuntimeError(f"resized_core: core {core} / offset {offset} not aligned to the ratios {ratio}")
    ty0, ty1, tx0, tx1, wy, wx = (int(b) for b in bounds)
    if ry == 1 and rx == 1:
        return (ty0, ty1, tx0, tx1), window[..., cy0 - oy : cy1 - oy, cx0 - ox : cx1 - ox]
    scaled = F.interpolate(window, scale_factor=(float(1 / ry), float(1 / rx)), mode="bilinear",
                           align_corners=False, recompute_scale_factor=False)
    new = scaled[..., ty0 - wy : ty1 - wy, tx0 - wx : tx1 - wx]
    if new.shape[-2:] != (ty1 - ty0, tx1 - tx0):
        raise RuntimeError(f"resized_core: window gives {tuple(new.shape[-2:])}, core needs {(ty1 - ty0, tx1 - tx0)}")
    return (ty0, ty1, tx0, tx1), new


def aspp_input_unit(unit: UnitFn, aspp: nn.Module, stride: int) -> UnitFn:
    """``window → {"feat": the ASPP's input, repeated to the window's pixels}``: the part of the
    network the first (pooling) pass runs, for :func:`receptive_radius`."""

    def probe(window: Tensor) -> dict[str, Tensor]:
        seen: list[Tensor] = []

        def hook(module: nn.Module, args: tuple) -> None:
            seen.append(args[0])
            raise _Collected

        handle = aspp.register_forward_pre_hook(hook)
        try:
            unit(window)
        except _Collected:
            pass
        finally:
            handle.remove()
        feat = seen[0].repeat_interleave(stride, -2).repeat_interleave(stride, -1)
        return {"feat": feat[..., : window.shape[-2], : window.shape[-1]]}

    return probe


def tiled_logits(fn: Callable[[Tensor], Tensor], x: Tensor, max_pixels: int, stride: int, margin: int,
                 aspp: Sequence[nn.Module] = (), approximate: bool = False,
                 collect_margin: int | None = None, labels: bool = False) -> Tensor:
    """Single-scale logits ``B×K×H×W`` of ``fn`` on ``x``, in windows of at most ``max_pixels``
    (``collect_margin``: the margin of the ASPP pooling pass, default ``margin``). ``labels``: the
    argmax of each window's core instead, ``B×H×W`` uint8 (≤ 256 classes) or int64, so no image-sized
    float logits buffer is ever held (what ``scaleseg predict`` needs)."""
    h, w = x.shape[-2:]
    tiles = plan_tiles(h, w, max_pixels, margin, (stride, stride))
    if len(tiles) > 1:
        _note_once(tile_plan_note(h, w, tiles, margin, max_pixels, approximate))
        _return_freed_windows_to_the_os()
    if len(tiles) == 1:
        return fn(x).argmax(1) if labels else fn(x)
    out: Tensor | None = None
    collect = None if collect_margin is None else plan_tiles(h, w, max_pixels, collect_margin, (stride, stride))
    for t, maps in tiled_maps(lambda win: {"logits": fn(win)}, x, tiles, stride, aspp, collect):
        logits = maps["logits"]
        if logits.shape[-2:] != (t.y1 - t.y0, t.x1 - t.x0):
            raise ConfigError(f"tiled inference needs logits at the input size; this model gives "
                              f"{tuple(logits.shape[-2:])} for a {(t.y1 - t.y0, t.x1 - t.x0)} window (DSRL?): "
                              "set eval.max_pixels=null or eval.mode=slide")
        core = logits[..., t.cy0 - t.y0 : t.cy1 - t.y0, t.cx0 - t.x0 : t.cx1 - t.x0]
        if labels:
            core = core.argmax(1)
        if out is None:
            dtype = (torch.uint8 if logits.shape[1] <= 256 else torch.int64) if labels else logits.dtype
            out = logits.new_empty(*core.shape[:-2], h, w, dtype=dtype)
        out[..., t.cy0 : t.cy1, t.cx0 : t.cx1] = core
    assert out is not None
    return out


_NOTED: set[str] = set()


def _note_once(message: str) -> None:
    if message not in _NOTED:
        _NOTED.add(message)
        log.warning(message)


# ---------------------------------------------------------------------------------------------
# receptive field


def receptive_radius(unit: UnitFn, stride: int, aspp: Sequence[nn.Module] = (), device: torch.device | None = None,
                     start: int = 2048, limit: int = 16384) -> int:
    """Radius in pixels of the region of the input that can change one output pixel of ``unit``
    (logits and attention), rounded up to ``stride`` plus one ``stride`` of safety.

    Forward-difference probe on two thin strips (a row and a column through the centre), on two
    random inputs (a ReLU one input leaves closed the other may open): a large change of the centre
    pixel, and the extent of the outputs that change at all. It measures the function the model
    computes: a random-init timm ResNet, whose residual branches start at zero (``zero_init_last``),
    reaches far less than the same network trained. The strips are
    long from the start (dilated taps jump: a short strip would hide a tap that lands outside it)
    and grow while the change reaches beyond a quarter of their length. ASPP image pooling is held
    at a constant (it is handled across windows separately), so it does not spread the change."""
    for m in aspp:
        m.image_mean = torch.zeros(1, m.pool_conv.in_channels, 1, 1, device=device)
    try:
        length = start
        while True:
            radius = max(_strip_extent(unit, length, stride, axis, device, seed)
                         for axis in (-1, -2) for seed in (0, 1))
            if radius < length // 4:
                return math.ceil(radius / stride) * stride + stride
            if length >= limit:
                raise ConfigError(f"receptive field wider than {limit} px; set eval.tile_margin explicitly")
            length *= 2
    finally:
        for m in aspp:
            m.image_mean = None


def _strip_extent(unit: UnitFn, length: int, stride: int, axis: int, device: torch.device | None, seed: int) -> int:
    thin = 4 * stride
    shape = (1, 3, thin, length) if axis == -1 else (1, 3, length, thin)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device)
    y = x.clone()
    centre = length // 2
    if axis == -1:
        y[..., thin // 2, centre] += 100.0
    else:
        y[..., centre, thin // 2] += 100.0
    with torch.inference_mode():
        a, b = unit(x), unit(y)
    changed = torch.zeros(shape[-2:], dtype=torch.bool, device=x.device)
    for key in a:
        changed |= (a[key] != b[key]).flatten(0, 1).any(0)
    line = changed.any(dim=0) if axis == -1 else changed.any(dim=1)
    idx = line.nonzero().flatten()
    if idx.numel() == 0:
        return 0
    return int(max(centre - idx.min(), idx.max() - centre))


# ---------------------------------------------------------------------------------------------
# hierarchical multi-scale attention in tiles


def _scaled(h: int, w: int, s: float) -> tuple[int, int]:
    """HMSA's scaled size: ``floor(H·s) × floor(W·s)`` (at least 1)."""
    return max(1, math.floor(h * s)), max(1, math.floor(w * s))


def _to_input(t: Tensor, size: Sequence[int], stride: int) -> Tensor:
    """A feature-resolution map covering the stride-padded input, resized to it and cropped."""
    h, w = int(size[0]), int(size[1])
    ph, pw = math.ceil(h / stride) * stride, math.ceil(w / stride) * stride
    if tuple(t.shape[-2:]) != (ph, pw):
        t = F.interpolate(t, size=(ph, pw), mode="bilinear", align_corners=False)
    return t[..., :h, :w]


def hmsa_unit(model: nn.Module, with_attn: bool) -> UnitFn:
    """One scale of a ``HierarchicalAttention`` model on a window: its base's logits and, with
    ``with_attn``, the gate (``model.attention``) at the window's size."""
    from scaleseg.models.contract import Run

    def unit(window: Tensor) -> dict[str, Tensor]:
        out = model.base.forward_features(window)
        res = {"logits": out["logits"]}
        if with_attn:
            res["attn"] = model.attention(Run(out, 1.0))
        return res

    return unit


@dataclass
class TiledInference:
    """The pixel budget of tiled inference for one model: ``max_pixels`` per window, ``margin``
    (None: :func:`receptive_radius`, measured on first use and kept)."""

    model: nn.Module
    max_pixels: int
    margin: int | None = None

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise ConfigError(f"eval.max_pixels={self.max_pixels}: expected a positive number of pixels")
        self.aspp, self.approximate = image_pooling_modules(self.model)
        self.stride = int(self.model.stride)
        self.collect_margin: int | None = None
        # windows are cut on the input grid: models whose output grid differs (DSRL) or that
        # stretch unpadded inputs instead of padding (input_fit=stretch) run whole
        self.enabled = getattr(self.model, "output_scale", 1) == 1 and not any(
            getattr(m, "input_fit", "pad") == "stretch" for m in self.model.modules())

    def margin_for(self, unit: UnitFn, device: torch.device) -> int:
        """The context margin of the windows: ``eval.tile_margin``, else the measured receptive field.
        Also measures the (smaller) margin of the ASPP pooling pass, :attr:`collect_margin`."""
        if self.margin is None:
            self.margin = receptive_radius(unit, self.stride, self.aspp, device)
            log.info("receptive field of the network: %d px (the context margin of tiled inference)", self.margin)
        if self.collect_margin is None:
            self.collect_margin = self.margin
            if len(self.aspp) == 1:
                probe = aspp_input_unit(unit, self.aspp[0], self.stride)
                self.collect_margin = min(self.margin, receptive_radius(probe, self.stride, (), device))
        return self.margin

    def fits(self, h: int, w: int) -> bool:
        if h * w > self.max_pixels and not self.enabled:
            _note_once(f"{h}×{w} image exceeds eval.max_pixels={self.max_pixels}, but this model's output grid "
                       "is not its input grid (DSRL / input_fit=stretch): running it whole")
            return True
        return h * w <= self.max_pixels

    def logits(self, fn: Callable[[Tensor], Tensor], x: Tensor, labels: bool = False) -> Tensor:
        """Single-scale logits of ``fn`` (the plain model) on ``x``, tiled above the budget; with
        ``labels`` their argmax (``B×H×W``), taken window by window above the budget."""
        h, w = x.shape[-2:]
        if self.fits(h, w):
            return fn(x).argmax(1) if labels else fn(x)
        margin = self.margin_for(lambda win: {"logits": fn(win)}, x.device)
        return tiled_logits(fn, x, self.max_pixels, self.stride, margin, self.aspp, self.approximate,
                            self.collect_margin, labels=labels)


def hierarchical_logits(model: nn.Module, x: Tensor, scales: Sequence[float], tiling: TiledInference) -> Tensor:
    """``HierarchicalAttention`` chained over ``scales`` (``nscale_forward``'s fusion, output at the
    1.0 size), each scale whose image exceeds ``tiling.max_pixels`` run in windows. Every step's
    result is written straight at the size the next step reads it, so no buffer is larger than
    ``K × (second-largest scaled size)``."""
    from scaleseg.models.hmsa import check_scales

    order = sorted(check_scales(scales, "scales"), reverse=True)
    h, w = x.shape[-2:]
    if all(tiling.fits(*_scaled(h, w, s)) for s in order):
        return model.forward_features(x, scales=order)["logits"]
    size1 = (h, w)
    pred: Tensor | None = None
    for i, s in enumerate(order):
        hs, ws = _scaled(h, w, s)
        xs = x if s == 1.0 else F.interpolate(x, size=(hs, ws), mode="bilinear", align_corners=False)
        nxt = order[i + 1] if i + 1 < len(order) else None
        target = _scaled(h, w, nxt) if s >= 1.0 and nxt is not None and nxt >= 1.0 else size1
        ratio = (Fraction(hs, target[0]), Fraction(ws, target[1]))
        align = (math.lcm(tiling.stride, ratio[0].numerator), math.lcm(tiling.stride, ratio[1].numerator))
        unit = hmsa_unit(model, with_attn=i > 0)
        # one margin for every scale, measured with the attention head (the wider of the two units)
        margin = 0 if tiling.fits(hs, ws) else tiling.margin_for(hmsa_unit(model, with_attn=True), x.device)
        tiles = plan_tiles(hs, ws, tiling.max_pixels, margin, align)
        if len(tiles) > 1:
            _note_once(f"scale {s:g}: " + tile_plan_note(hs, ws, tiles, tiling.margin or 0, tiling.max_pixels,
                                                         tiling.approximate))
        new: Tensor | None = pred if s < 1.0 else None
        collect = None
        if len(tiles) > 1 and tiling.collect_margin is not None:
            collect = plan_tiles(hs, ws, tiling.max_pixels, tiling.collect_margin, (tiling.stride, tiling.stride))
        for t, maps in tiled_maps(unit, xs, tiles, tiling.stride, tiling.aspp, collect):
            core = (t.cy0, t.cy1, t.cx0, t.cx1)
            p = maps["logits"]
            if s >= 1.0:
                cp = p[..., t.cy0 - t.y0 : t.cy1 - t.y0, t.cx0 - t.x0 : t.cx1 - t.x0]
                if pred is not None:
                    a = maps["attn"][..., t.cy0 - t.y0 : t.cy1 - t.y0, t.cx0 - t.x0 : t.cx1 - t.x0]
                    cp = a * cp + (1 - a) * pred[..., t.cy0 : t.cy1, t.cx0 : t.cx1]
                (ty0, ty1, tx0, tx1), val = resized_core(cp, (t.cy0, t.cx0), core, ratio)
                if new is None:
                    new = p.new_empty(*p.shape[:2], *target)
                new[..., ty0:ty1, tx0:tx1] = val
            else:
                assert new is not None
                a = maps["attn"]
                (ty0, ty1, tx0, tx1), ap = resized_core(a * p, (t.y0, t.x0), core, ratio)
                _, a_up = resized_core(a, (t.y0, t.x0), core, ratio)
                region = new[..., ty0:ty1, tx0:tx1]
                new[..., ty0:ty1, tx0:tx1] = ap + (1 - a_up) * region
        pred = new
    assert pred is not None
    return pred


def chain_function(model: nn.Module, scales: Sequence[float], e: Any,
                   tiling: TiledInference | None) -> Callable[[Tensor], Tensor]:
    """``x → logits`` of a ``HierarchicalAttention`` model chained over ``scales`` as the eval
    config ``e`` asks: sparse top scale (``e.sparse``), tiled above the budget, or dense."""
    if e.sparse:
        from scaleseg.sparse import config_kwargs, sparse_hierarchical

        kwargs = config_kwargs(e)
        return lambda x: sparse_hierarchical(model, x, scales, **kwargs).logits
    if tiling is not None:
        return lambda x: hierarchical_logits(model, x, scales, tiling)
    return lambda x: model.forward_features(x, scales=scales)["logits"]
