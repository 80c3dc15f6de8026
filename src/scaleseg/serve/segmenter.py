"""The inference behind ``scaleseg serve``: decode an upload, bound its size, run the configured
inference (exactly ``scaleseg predict``'s), and summarise the label map.

Image decoding and the predictor are the ones ``scaleseg predict`` uses (PIL ``convert("RGB")``,
:func:`scaleseg.engine.evaluate.normalize`, :func:`scaleseg.engine.task.make_predictor`), so the
label PNG of ``POST /predict`` equals ``<name>_label.png`` of ``scaleseg predict`` on the same file.
"""
from __future__ import annotations

import copy
import io
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..config import Config
from ..data.spec import DatasetSpec

__all__ = ["BadImage", "ImageTooLarge", "Segmentation", "Segmenter", "ServeSettings", "decode_image"]


class BadImage(ValueError):
    """The upload is not a decodable image (HTTP 415 for a non-image, 400 for a truncated one)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ImageTooLarge(ValueError):
    """The upload or its pixel count is over the configured limit (HTTP 413)."""


@dataclass(frozen=True)
class ServeSettings:
    """Limits of the server.

    ``max_side``: longest image side inferred at once; a larger image is downscaled to it (labels are
    upsampled back with nearest neighbour), or with ``tile`` run at full size by sliding windows of
    ``max_side``×``max_side``. ``max_upload_bytes``: largest accepted request body. ``max_pixels``:
    largest decoded image (a guard against decompression bombs), checked before decoding.
    """

    max_side: int = 1024
    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    tile: bool = False


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Upload bytes → ``H×W×3`` uint8 RGB, as ``scaleseg predict`` reads files.

    Raises :class:`BadImage` (415: not an image; 400: truncated/corrupt) or :class:`ImageTooLarge`.
    """
    if not data:
        raise BadImage("empty upload: expected an image file (PNG, JPEG, ...)", 400)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        if isinstance(err, UnidentifiedImageError):
            raise BadImage("not an image: the upload is no format Pillow can read (PNG, JPEG, BMP, TIFF, WebP, ...)", 415) from None
        raise ImageTooLarge(f"image too large to decode: {err}") from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageTooLarge(f"image of {width}×{height} = {width * height / 1e6:.1f} MP exceeds the "
                                f"{max_pixels / 1e6:.1f} MP limit")
        try:
            img.load()
            return np.array(img.convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise BadImage(f"truncated or corrupt {img.format or 'image'} file: {first}", 400) from None


@dataclass
class Segmentation:
    """Result of one request: ``labels`` ``H×W`` uint8 train ids at the upload's size, timings in
    ms, how the size limit was applied, per-class pixel counts and (HMSA) attention maps in [0, 1]."""

    labels: np.ndarray
    inference_ms: float
    resize: dict[str, Any]
    counts: np.ndarray
    attention: dict[float, np.ndarray] = field(default_factory=dict)
    attention_ms: float = 0.0


class Segmenter:
    """A trained model with its config and dataset spec; :meth:`segment` is thread-safe (one at a time)."""

    def __init__(self, model: torch.nn.Module, cfg: Config, spec: DatasetSpec, settings: ServeSettings) -> None:
        from ..engine.task import make_predictor
        from ..models.hmsa import HierarchicalAttention

        self.model = model.eval()
        self.cfg = cfg
        self.spec = spec
        self.settings = settings
        self.device = next(model.parameters()).device
        self.predict_fn = make_predictor(self.model, cfg)
        tiled = copy.deepcopy(cfg)
        side = settings.max_side
        tiled.eval.mode, tiled.eval.crop_size = "slide", [side, side]
        tiled.eval.stride = [max(1, 2 * side // 3)] * 2
        self.tiled_fn = make_predictor(self.model, tiled)
        self.hierarchical = isinstance(model, HierarchicalAttention) and cfg.eval.scale_mode in ("auto", "hierarchical")
        # as make_predictor: a hierarchical model without eval.scales chains its own infer_scales
        self.scales = tuple(cfg.eval.scales or (model.infer_scales if self.hierarchical else [1.0]))
        self._lock = threading.Lock()

    @property
    def attention_scales(self) -> tuple[float, ...]:
        """Scales whose attention gates a hierarchical model uses (all but the highest)."""
        if not self.hierarchical or len(self.scales) < 2:
            return ()
        return tuple(s for s in sorted(self.scales, reverse=True)[1:])

    def segment(self, image: np.ndarray, *, attention: bool = False) -> Segmentation:
        """``H×W×3`` uint8 → :class:`Segmentation` (labels at ``H×W``)."""
        from ..engine.evaluate import normalize

        height, width = image.shape[:2]
        side = self.settings.max_side
        resize: dict[str, Any] = {"mode": "none", "inferred_size": [height, width],
                                  "message": f"inferred at the full {width}×{height}"}
        work = image
        tile = False
        if max(height, width) > side:
            if self.settings.tile:
                tile = True
                stride = max(1, 2 * side // 3)  # the windows of scaleseg.inference.slide
                n = ((max(height - side, 0) + stride - 1) // stride + 1) * ((max(width - side, 0) + stride - 1) // stride + 1)
                resize = {"mode": "tiled", "inferred_size": [height, width], "windows": int(n),
                          "message": f"{width}×{height} is larger than {side} px: sliding-window inference with "
                                     f"{side}×{side} windows ({n} windows)"}
            else:
                f = side / max(height, width)
                h2, w2 = max(1, round(height * f)), max(1, round(width * f))
                work = np.array(Image.fromarray(image).resize((w2, h2), Image.BILINEAR))
                resize = {"mode": "downscaled", "inferred_size": [h2, w2],
                          "message": f"{width}×{height} is larger than {side} px: downscaled to {w2}×{h2} for "
                                     f"inference, labels upsampled (nearest) to {width}×{height}"}
        attn: dict[float, np.ndarray] = {}
        attention_ms = 0.0
        with self._lock, torch.inference_mode():
            x = normalize(work[None], self.model.mean, self.model.std, self.device)
            start = time.perf_counter()
            logits = (self.tiled_fn if tile else self.predict_fn)(x)
            if logits.shape[-2:] != x.shape[-2:]:  # DSRL: logits at 2× the input, as scaleseg predict
                logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
            labels = logits.argmax(1).to(torch.uint8)[0].cpu().numpy()
            inference_ms = 1000 * (time.perf_counter() - start)
            if attention and self.attention_scales and not tile:
                start = time.perf_counter()
                out = self.model.forward_features(x, scales=self.scales, return_scales=True)
                for s in self.attention_scales:
                    a = out.get(f"attn_{float(s)}x")
                    if a is not None:
                        a = F.interpolate(a, size=x.shape[-2:], mode="bilinear", align_corners=False)
                        attn[float(s)] = a[0, 0].clamp(0, 1).cpu().numpy()
                attention_ms = 1000 * (time.perf_counter() - start)
        if labels.shape != (height, width):
            labels = np.array(Image.fromarray(labels).resize((width, height), Image.NEAREST))
            attn = {s: np.array(Image.fromarray(a.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR))
                    for s, a in attn.items()}
        counts = np.bincount(labels.ravel(), minlength=256)[: self.spec.num_classes]
        return Segmentation(labels, inference_ms, resize, counts, attn, attention_ms)
