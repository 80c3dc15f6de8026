"""Logits-level inference: whole image, sliding window, horizontal flip and multi-scale pooling.

Every helper takes a model (any callable ``x: B×3×H×W -> B×K×h×w`` logits) or a logits function and
returns ``B×K×H×W`` float logits at the input size (``B×K×sH×sW`` with ``output_scale=s``, for models
whose output grid is finer than their input, i.e. DSRL). Fusion over windows, flips and scales is done on
logits, never on probabilities. Call them under ``torch.inference_mode()`` (the evaluation loops do)
so no autograd graph is kept.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from scaleseg.errors import ConfigError
from scaleseg.models.shapes import same_size

__all__ = ["whole", "slide", "flip", "scale_pooling", "Inferencer", "LogitsFn"]

LogitsFn = Callable[[Tensor], Tensor]
"""``x: B×3×H×W -> B×K×H×W`` logits."""


def _resize(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (``align_corners=False``) resize of ``B×K×h×w`` logits to ``size``; no-op if equal."""
    if same_size(logits.shape[-2:], size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _pair(value: int | Sequence[int], key: str) -> tuple[int, int]:
    """``7 -> (7, 7)``, ``(h, w) -> (h, w)``; positive ints only, else ConfigError naming ``key``."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ConfigError(f"{key}={value!r}: expected a positive int or a pair (h, w) of positive ints")
    return pair  # type: ignore[return-value]


def _out_size(x: Tensor, output_scale: int) -> tuple[int, int]:
    """The logits size for input ``x``: ``(s·H, s·W)`` (s = the model's ``output_scale``, 2 for DSRL)."""
    return (x.shape[-2] * output_scale, x.shape[-1] * output_scale)


def whole(model: LogitsFn, x: Tensor, output_scale: int = 1) -> Tensor:
    """Run ``model`` on the whole ``B×3×H×W`` image; logits are resized to ``s·H×s·W`` if needed
    (``s = output_scale``: a DSRL model's logits stay at its output resolution)."""
    return _resize(model(x), _out_size(x, output_scale))


def _window_starts(size: int, crop: int, stride: int) -> list[int]:
    """mmseg grid: ``ceil((size − crop) / stride) + 1`` windows, the last one aligned to the border."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    return [min(i * stride, size - crop) for i in range(n)]


def slide(
    model: LogitsFn,
    x: Tensor,
    crop_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    batch_size: int = 4,
    output_scale: int = 1,
) -> Tensor:
    """Sliding-window inference on ``B×3×H×W`` images → ``B×K×sH×sW`` logits (mmseg "slide" mode;
    ``s = output_scale``, each window's logits are placed at ``s×`` its position).

    Windows of ``crop_size = (h, w)`` start every ``stride = (sh, sw)`` pixels (default: 2/3 of the
    crop), the last window of each row/column aligned to the border. Overlapping logits are summed
    and divided by the per-pixel window count. An image smaller than the crop is zero-padded at the
    bottom/right (zero = the mean colour after normalisation) and the result cropped back (mmseg
    leaves this padding to its data pre-processor; here it is part of ``slide``).
    At most ``batch_size`` crops (over windows and images) go through ``model`` at once, so memory
    is bounded by the crop size, not the image size.
    """
    ch, cw = _pair(crop_size, "crop_size")
    if stride is None:
        stride = (max(1, 2 * ch // 3), max(1, 2 * cw // 3))
    sh, sw = _pair(stride, "stride")
    if sh > ch or sw > cw:
        raise ConfigError(f"stride={(sh, sw)} larger than crop_size={(ch, cw)}: pixels would be skipped")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: expected >= 1")
    b, _, h, w = x.shape
    ph, pw = max(h, ch), max(w, cw)
    if (ph, pw) != (h, w):
        x = F.pad(x, (0, pw - w, 0, ph - h))
    windows = [(y, xx) for y in _window_starts(ph, ch, sh) for xx in _window_starts(pw, cw, sw)]
    jobs = [(i, y, xx) for y, xx in windows for i in range(b)]
    logits: Tensor | None = None
    s = output_scale
    count = torch.zeros(1, 1, ph * s, pw * s, device=x.device, dtype=x.dtype)
    for y, xx in windows:
        count[..., y * s : (y + ch) * s, xx * s : (xx + cw) * s] += 1
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        crops = torch.cat([x[i : i + 1, :, y : y + ch, xx : xx + cw] for i, y, xx in chunk])
        out = _resize(model(crops), (ch * s, cw * s))
        if logits is None:
            logits = out.new_zeros(b, out.shape[1], ph * s, pw * s)
        for (i, y, xx), crop_logits in zip(chunk, out):
            logits[i, :, y * s : (y + ch) * s, xx * s : (xx + cw) * s] += crop_logits
    assert logits is not None  # at least one window always exists
    return (logits / count)[..., : h * s, : w * s]


def flip(fn: LogitsFn, x: Tensor) -> Tensor:
    """Mean of ``fn(x)`` and the un-flipped ``fn(hflip(x))`` logits: ``B×K×H×W``."""
    return 0.5 * (fn(x) + fn(x.flip(-1)).flip(-1))


def scale_pooling(fn: LogitsFn, x: Tensor, scales: Sequence[float], mode: str = "avg", output_scale: int = 1) -> Tensor:
    """Multi-scale inference pooled over scales: the average/max pooling baselines of HMSA.

    For each scale ``s``, ``x`` (``B×3×H×W``) is resized bilinearly (``align_corners=False``) to
    ``round(s·H) × round(s·W)``, ``fn`` is run and its logits are resized back to ``H×W`` (``o·H×o·W``
    for a model with ``output_scale`` o, e.g. DSRL); the result
    is the element-wise mean (``mode="avg"``, as NVIDIA's code does) or max (``mode="max"``) over
    scales. Scales are processed one at a time, keeping a running sum/max to bound memory.
    """
    _check_scales(scales, mode)
    h, w = x.shape[-2:]
    pooled: Tensor | None = None
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        xs = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        out = _resize(fn(xs), _out_size(x, output_scale))
        if pooled is None:
            pooled = out
        elif mode == "avg":
            pooled = pooled + out
        else:
            pooled = torch.maximum(pooled, out)
    assert pooled is not None
    return pooled / len(scales) if mode == "avg" else pooled


def _check_scales(scales: Sequence[float] | None, mode: str) -> None:
    if mode not in ("avg", "max"):
        raise ConfigError(f"scale_mode={mode!r}: expected 'avg' or 'max'")
    if scales is None or len(scales) == 0:
        raise ConfigError(f"scales={scales!r}: expected a non-empty list of positive floats")
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in scales):
        raise ConfigError(f"scales={list(scales)!r}: expected positive numbers")


@dataclass
class Inferencer:
    """Config-driven inference: ``Inferencer(...)(model, x) -> B×K×H×W`` logits.

    Logits come out at ``output_scale`` × the input size (the model's ``output_scale``: 2 for a DSRL
    model at ``lr_scale`` 0.5, so its super-resolved logits are never down- and up-sampled again).
    Composition, innermost first: ``whole`` or ``slide`` (``crop_size``, ``stride``, ``batch_size``)
    → optional horizontal ``flip`` averaging → optional ``scales`` pooling (``scale_mode`` avg|max).
    ``tiling`` (a :class:`scaleseg.tiling.TiledInference`): in ``whole`` mode an image (or scaled
    image) above its pixel budget runs in windows with a receptive-field margin instead, with the
    same logits. Then optional ``input_scale``: the image alone is resized by that factor (bilinear,
    antialiased like the training transforms' resize) before everything else and the logits are resized
    back to the input ``H×W``, so a model trained at a reduced resolution is scored against labels at
    their own resolution (unlike ``eval.base_size``, which also downsizes the labels).
    Invalid or contradictory arguments raise ConfigError at construction.
    """

    mode: str = "whole"
    crop_size: int | Sequence[int] | None = None
    stride: int | Sequence[int] | None = None
    flip: bool = False
    scales: Sequence[float] | None = None
    scale_mode: str = "avg"
    batch_size: int = 4
    tiling: Any = None
    input_scale: float | None = None
    output_scale: int = 1

    def __post_init__(self) -> None:
        if self.input_scale is not None and not (
            isinstance(self.input_scale, (int, float)) and not isinstance(self.input_scale, bool) and self.input_scale > 0
        ):
            raise ConfigError(f"input_scale={self.input_scale!r}: expected a positive factor (e.g. 0.5)")
        if self.mode not in ("whole", "slide"):
            raise ConfigError(f"inference mode={self.mode!r}: expected 'whole' or 'slide'")
        if self.mode == "slide":
            if self.crop_size is None:
                raise ConfigError("inference mode='slide' needs crop_size (h, w)")
            self.crop_size = _pair(self.crop_size, "crop_size")
            if self.stride is not None:
                self.stride = _pair(self.stride, "stride")
                if self.stride[0] > self.crop_size[0] or self.stride[1] > self.crop_size[1]:
                    raise ConfigError(
                        f"stride={self.stride} larger than crop_size={self.crop_size}: "
                        "pixels would be skipped"
                    )
            if not isinstance(self.batch_size, int) or self.batch_size < 1:
                raise ConfigError(f"batch_size={self.batch_size!r}: expected a positive int")
        elif self.crop_size is not None or self.stride is not None:
            raise ConfigError(
                f"crop_size={self.crop_size!r}/stride={self.stride!r} are only used by mode='slide', "
                "not mode='whole'"
            )
        if self.scales is not None:
            _check_scales(self.scales, self.scale_mode)
            self.scales = [float(s) for s in self.scales]
        elif self.scale_mode not in ("avg", "max"):
            raise ConfigError(f"scale_mode={self.scale_mode!r}: expected 'avg' or 'max'")

    def __call__(self, model: LogitsFn, x: Tensor) -> Tensor:
        """``x``: ``B×3×H×W`` normalised images → ``B×K×sH×sW`` logits (s = ``output_scale``)."""

        def base(xs: Tensor) -> Tensor:
            if self.mode == "slide":
                crop = self.crop_size
                return slide(model, xs, crop, self.stride, self.batch_size, self.output_scale)  # type: ignore[arg-type]
            if self.tiling is not None and not self.tiling.fits(*xs.shape[-2:]):
                return _resize(self.tiling.logits(model, xs), _out_size(xs, self.output_scale))
            return whole(model, xs, self.output_scale)

        def flipped(xs: Tensor) -> Tensor:
            return flip(base, xs) if self.flip else base(xs)

        def pooled(xs: Tensor) -> Tensor:
            if self.scales is None:
                return flipped(xs)
            return scale_pooling(flipped, xs, self.scales, self.scale_mode, self.output_scale)

        if self.input_scale is None or self.input_scale == 1.0:
            return pooled(x)
        return _resize(pooled(resize_image(x, self.input_scale)), _out_size(x, self.output_scale))


    def labels(self, model: LogitsFn, x: Tensor) -> Tensor:
        """``B×H×W`` argmax labels of ``self(model, x)``. Plain whole-image inference above the tiling
        budget (no flip, scales or ``input_scale`` to fuse) takes the argmax window by window, so no
        image-sized logits are held: peak memory is one window's, not the image's."""
        plain = self.mode == "whole" and not self.flip and self.scales is None and self.input_scale in (None, 1.0)
        if plain and self.tiling is not None and not self.tiling.fits(*x.shape[-2:]):
            return self.tiling.logits(model, x, labels=True)
        return self(model, x).argmax(1)


def resize_image(x: Tensor, factor: float) -> Tensor:
    """``B×3×H×W`` → ``B×3×round(H·f)×round(W·f)``: bilinear, ``align_corners=False``, antialiased
    when shrinking (as ``torchvision``'s resize of the training transforms)."""
    h, w = x.shape[-2:]
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    if size == (h, w):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=factor < 1)
