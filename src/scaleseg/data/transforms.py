"""Joint image/mask pipelines on ``torchvision.transforms.v2`` tv_tensors (Image, Mask).

A transform is called as ``transform(image, mask)`` with a ``3×H×W`` uint8 image and an ``H×W``
uint8 mask of train ids, and returns a dict: ``image`` ``3×h×w`` float32 normalised, ``mask``
``h×w`` int64 (255 = ignore). In DSRL pair mode (``lr_scale`` set) it also returns ``image_hr``
(``3×h×w``, normalised) and ``image`` becomes the ``3×round(h·s)×round(w·s)`` bilinear resize of
``image_hr`` (antialias, ``align_corners=False``); ``mask`` stays at the high resolution. Resizing
after normalising equals normalising after resizing (per-channel affine maps commute with a
bilinear filter whose weights sum to 1), so the two images are consistent by construction.

Training order (all geometry at the high resolution, as in NVIDIA's HMSA pipeline): random scale
(optionally after resizing the long edge to ``base_size``, NVIDIA's ``pre_size``; image bilinear or
bicubic with antialias, mask nearest) → pad (image 0 = black before normalisation, mask ignore;
bottom/right) → random crop → horizontal flip → colour jitter → optional Gaussian blur → normalise.
Deliberate differences from NVIDIA's code: padding goes to the bottom/right instead of both sides,
and the blur is applied with probability 0.5 (NVIDIA: always).

All randomness is drawn from torch's global RNG, so ``torch.manual_seed`` (or ``SegDataset``'s
per-sample ``fork_rng``) fixes the crops.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as nnf
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ..errors import ConfigError, DataError
from .spec import IGNORE_INDEX

INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
BLUR_SIGMA = (0.15, 1.3)
BLUR_KERNEL = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1  # 9: covers ±3σ of the widest blur

Point = tuple[float, float]  # (x, y) pixel coordinates in the input image


def _round(value: float) -> int:
    return max(1, math.floor(value + 0.5))


def _wrap(image: torch.Tensor, mask: torch.Tensor) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise DataError(f"transform input image must be a 3×H×W uint8 tensor, got {tuple(image.shape)} {image.dtype}")
    if mask.shape != image.shape[1:]:
        raise DataError(f"transform input mask is {tuple(mask.shape)}; expected H×W = {tuple(image.shape[1:])}")
    return tv_tensors.Image(image), tv_tensors.Mask(mask)


def _resize_pair(
    image: tv_tensors.Image, mask: tv_tensors.Mask, size: list[int], interpolation: InterpolationMode
) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """Image with ``interpolation`` (antialiased), mask always nearest (tv_tensors dispatch)."""
    if list(image.shape[-2:]) == size:
        return image, mask
    return F.resize(image, size, interpolation=interpolation, antialias=True), F.resize(mask, size)


class RandomScale:
    """Resize by ``s ~ U(scale_range)``, times ``base_size / long edge`` when ``base_size`` is set."""

    def __init__(
        self,
        scale_range: tuple[float, float] = (0.5, 2.0),
        base_size: int | None = None,
        interpolation: str = "bilinear",
    ) -> None:
        low, high = scale_range
        if not 0 < low <= high:
            raise ConfigError(f"scale_range {scale_range} is invalid; expected 0 < low <= high")
        if base_size is not None and base_size < 1:
            raise ConfigError(f"base_size {base_size} is invalid; expected a positive long-edge length")
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation '{interpolation}' is unknown; expected 'bilinear' or 'bicubic'")
        self.scale_range = (float(low), float(high))
        self.base_size = base_size
        self.interpolation = INTERPOLATIONS[interpolation]

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        h, w = image.shape[-2:]
        low, high = self.scale_range
        factor = low + (high - low) * float(torch.rand(()))
        if self.base_size is not None:
            factor *= self.base_size / max(h, w)
        return _resize_pair(image, mask, [_round(h * factor), _round(w * factor)], self.interpolation)


class RandomCropAround:
    """Pad (image 0, mask ``ignore_index``, at the bottom/right) up to ``crop_size`` = (H, W), then
    take a uniformly random ``crop_size`` window. With ``point=(x, y)`` the window is drawn uniformly
    among those that contain the point (NVIDIA's centroid crop keeps the centroid inside too)."""

    def __init__(self, crop_size: tuple[int, int], ignore_index: int = IGNORE_INDEX) -> None:
        if len(crop_size) != 2 or min(crop_size) < 1:
            raise ConfigError(f"crop_size {crop_size} is invalid; expected (height, width) > 0")
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.ignore_index = ignore_index

    @staticmethod
    def _offset(size: int, crop: int, at: float | None) -> int:
        low, high = 0, size - crop
        if at is not None:
            at_px = min(max(int(at), 0), size - 1)
            low, high = max(low, at_px - crop + 1), min(high, at_px)
        return int(torch.randint(low, high + 1, ()))

    def __call__(
        self, image: tv_tensors.Image, mask: tv_tensors.Mask, point: Point | None = None
    ) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        crop_h, crop_w = self.crop_size
        h, w = image.shape[-2:]
        pad_h, pad_w = max(crop_h - h, 0), max(crop_w - w, 0)
        if pad_h or pad_w:
            image = F.pad(image, [0, 0, pad_w, pad_h], fill=0)
            mask = F.pad(mask, [0, 0, pad_w, pad_h], fill=self.ignore_index)
        top = self._offset(h + pad_h, crop_h, None if point is None else point[1])
        left = self._offset(w + pad_w, crop_w, None if point is None else point[0])
        return F.crop(image, top, left, crop_h, crop_w), F.crop(mask, top, left, crop_h, crop_w)


class ToSample:
    """uint8 image + mask → sample dict: normalised float32 image, int64 mask; DSRL pairs when
    ``lr_scale`` is set (see the module docstring)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], lr_scale: float | None = None) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(f"mean {tuple(mean)} / std {tuple(std)} are invalid; expected 3 values each, std > 0")
        if lr_scale is not None and not 0 < lr_scale <= 1:
            raise ConfigError(f"lr_scale {lr_scale} is invalid; expected 0 < lr_scale <= 1 (e.g. 0.5)")
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]
        self.lr_scale = lr_scale

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        image = image.as_subclass(torch.Tensor)
        normalised = F.normalize(F.to_dtype(image, torch.float32, scale=True), self.mean, self.std)
        sample = {"image": normalised, "mask": mask.as_subclass(torch.Tensor).long()}
        if self.lr_scale is not None:
            h, w = normalised.shape[-2:]
            size = (_round(h * self.lr_scale), _round(w * self.lr_scale))
            sample["image_hr"] = normalised
            sample["image"] = nnf.interpolate(
                normalised[None], size=size, mode="bilinear", align_corners=False, antialias=True
            )[0]
        return sample


class TrainTransform:
    """Scale → pad/crop (optionally around a point) → flip/jitter/blur → normalise (→ DSRL pair)."""

    def __init__(self, scale: RandomScale, crop: RandomCropAround, photometric: v2.Transform, finish: ToSample):
        self.scale, self.crop, self.photometric, self.finish = scale, crop, photometric, finish

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, point: Point | None = None) -> dict[str, torch.Tensor]:
        """``image`` 3×H×W uint8, ``mask`` H×W uint8; ``point`` (x, y) in input pixels stays in the crop."""
        image_t, mask_t = _wrap(image, mask)
        h, w = image_t.shape[-2:]
        image_t, mask_t = self.scale(image_t, mask_t)
        if point is not None:  # centre of the input pixel, mapped to the resized image
            new_h, new_w = image_t.shape[-2:]
            point = ((int(point[0]) + 0.5) * new_w / w, (int(point[1]) + 0.5) * new_h / h)
        image_t, mask_t = self.crop(image_t, mask_t, point)
        image_t, mask_t = self.photometric(image_t, mask_t)
        return self.finish(image_t, mask_t)


def train_transform(
    crop_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    scale_range: tuple[float, float] = (0.5, 2.0),
    base_size: int | None = None,
    interpolation: str = "bilinear",
    hflip: bool = True,
    color_jitter: float = 0.25,
    blur: bool = False,
    ignore_index: int = IGNORE_INDEX,
    lr_scale: float | None = None,
) -> TrainTransform:
    """Training pipeline; ``crop_size`` is (H, W), ``mean``/``std`` in 0–1 units (timm's
    pretrained_cfg). ``color_jitter`` sets brightness/contrast/saturation/hue (hue capped at 0.5);
    ``blur`` adds a Gaussian blur (p = 0.5, σ ∈ [0.15, 1.3], 9×9 kernel: crops must be ≥ 5 px)."""
    if color_jitter < 0:
        raise ConfigError(f"color_jitter {color_jitter} is invalid; expected >= 0")
    steps: list[v2.Transform] = []
    if hflip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    if color_jitter > 0:
        steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter, min(color_jitter, 0.5)))
    if blur:
        steps.append(v2.RandomApply([v2.GaussianBlur(BLUR_KERNEL, sigma=BLUR_SIGMA)], p=0.5))
    return TrainTransform(
        RandomScale(scale_range, base_size, interpolation),
        RandomCropAround(crop_size, ignore_index),
        v2.Compose(steps) if steps else v2.Identity(),
        ToSample(mean, std, lr_scale),
    )


class EvalTransform:
    """Optional long-edge resize to ``base_size`` (image bilinear antialias, mask nearest) → normalise."""

    def __init__(self, finish: ToSample, base_size: int | None = None) -> None:
        if base_size is not None and base_size < 1:
            raise ConfigError(f"base_size {base_size} is invalid; expected a positive long-edge length")
        self.finish, self.base_size = finish, base_size

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``image`` 3×H×W uint8, ``mask`` H×W uint8 → sample dict."""
        image_t, mask_t = _wrap(image, mask)
        if self.base_size is not None:
            h, w = image_t.shape[-2:]
            factor = self.base_size / max(h, w)
            image_t, mask_t = _resize_pair(
                image_t, mask_t, [_round(h * factor), _round(w * factor)], InterpolationMode.BILINEAR
            )
        return self.finish(image_t, mask_t)


def eval_transform(
    mean: Sequence[float], std: Sequence[float], *, base_size: int | None = None, lr_scale: float | None = None
) -> EvalTransform:
    """Evaluation pipeline (no randomness); DSRL pair mode when ``lr_scale`` is set."""
    return EvalTransform(ToSample(mean, std, lr_scale), base_size)
