"""Visualisation: palette images, overlays, attention maps, atomic PNG/HTML writing.

Label maps use train ids with ``ignore_index`` (255) shown black. Files are written atomically
(a temporary file in the target folder, then ``os.replace``), so an interrupted run never leaves
a truncated PNG or HTML page behind.
"""
from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import numpy as np
from PIL import Image

from scaleseg.errors import ConfigError, DataError
from scaleseg.files import atomic_write  # re-exported: the one atomic writer

__all__ = [
    "colorize",
    "overlay",
    "save_png",
    "attention_to_image",
    "attention_to_color",
    "write_html",
    "atomic_write",
]

PaletteLike = Any  # 256×3 / K×3 uint8 array, or a list of K (r, g, b) colours


def _to_numpy(array: Any) -> np.ndarray:
    """Torch tensors (any device) and array-likes → numpy array."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _palette_array(palette: PaletteLike) -> np.ndarray:
    """Validate a palette → ``N×3`` uint8 array (N ≤ 256)."""
    pal = np.asarray(_to_numpy(palette))
    if pal.ndim != 2 or pal.shape[1] != 3 or not 0 < pal.shape[0] <= 256:
        raise ConfigError(f"palette of shape {pal.shape}: expected N×3 colours with 1 <= N <= 256")
    if pal.min() < 0 or pal.max() > 255:
        raise ConfigError(f"palette values in [{pal.min()}, {pal.max()}]: expected 0..255")
    return pal.astype(np.uint8)


def colorize(labels: Any, palette: PaletteLike, ignore_index: int = 255) -> np.ndarray:
    """``H×W`` int labels (array or tensor) → ``H×W×3`` uint8 colours.

    ``palette`` is a 256×3 uint8 array or a list of K colours; ``ignore_index`` and ids outside the
    palette are black. Works for any label shape ``(...)`` → ``(..., 3)``.
    """
    lab = _to_numpy(labels)
    if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == np.bool_):
        raise DataError(f"labels of dtype {lab.dtype}: expected integer class ids")
    pal = _palette_array(palette)
    lut = np.concatenate([pal, np.zeros((1, 3), np.uint8)])  # last row: black for ignore/unknown
    lab = lab.astype(np.int64)
    known = (lab >= 0) & (lab < len(pal)) & (lab != ignore_index)
    return lut[np.where(known, lab, len(pal))]


def overlay(image: Any, color: Any, alpha: float = 0.5, mask: Any = None) -> np.ndarray:
    """Blend ``H×W×3`` uint8 ``color`` over ``H×W×3`` uint8 ``image``: ``(1−a)·image + a·color``.

    Only pixels where ``mask`` (``H×W`` bool) is True are blended; the others show the image. With
    ``mask=None`` the non-black pixels of ``color`` are blended, so the black ignore/unknown pixels of
    ``colorize`` show the image. Rounded to the nearest integer.
    """
    img, col = _to_numpy(image), _to_numpy(color)
    if img.shape != col.shape or img.ndim != 3 or img.shape[2] != 3:
        raise DataError(f"overlay of image {img.shape} and colour {col.shape}: expected equal H×W×3")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha={alpha}: expected a value in [0, 1]")
    sel = col.any(axis=-1) if mask is None else _to_numpy(mask).astype(bool)
    if sel.shape != img.shape[:2]:
        raise DataError(f"mask of shape {sel.shape}: expected {img.shape[:2]}")
    # float32, in place: a 4000×3000 overlay stays at two image-sized float buffers (144 MB each)
    blend = img.astype(np.float32)
    blend *= np.float32(1.0 - alpha)
    blend += np.multiply(col, np.float32(alpha), dtype=np.float32)
    np.rint(blend, out=blend)
    np.clip(blend, 0, 255, out=blend)
    return np.where(sel[..., None], blend.astype(np.uint8), img.astype(np.uint8))


def _to_pil(array: np.ndarray, palette: PaletteLike | None) -> Image.Image:
    """``H×W`` labels (uint8/uint16 range) or ``H×W×3``/``H×W×4`` uint8 → PIL image ("P" if palette)."""
    if array.ndim == 2 and (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if lo >= 0 and hi <= 255:
            img = Image.fromarray(array.astype(np.uint8))  # mode "L"
            if palette is not None:
                pal = np.zeros((256, 3), np.uint8)
                given = _palette_array(palette)
                pal[: len(given)] = given
                img.putpalette(pal.reshape(-1).tobytes())  # turns the "L" image into a "P" image
            return img
        if palette is None and lo >= 0 and hi <= 65535:
            return Image.fromarray(array.astype(np.uint16))
        raise DataError(f"label values in [{lo}, {hi}]: expected 0..255 (0..65535 without a palette)")
    if array.ndim == 3 and array.shape[2] in (3, 4) and array.dtype == np.uint8:
        if palette is not None:
            raise ConfigError("palette given for a colour image: palettes apply to H×W label maps only")
        return Image.fromarray(array)
    raise DataError(
        f"array of shape {array.shape} and dtype {array.dtype}: expected H×W integer labels or H×W×3 uint8"
    )


def save_png(path: str | os.PathLike[str], array: Any, palette: PaletteLike | None = None) -> Path:
    """Write ``array`` as a PNG atomically, creating parent folders.

    ``H×W`` integer labels are stored exactly (mode "L", or "I;16" above 255); with ``palette``
    (256×3 or K colours) they are stored as a palette ("P") PNG whose indices are the labels.
    ``H×W×3``/``H×W×4`` uint8 arrays are stored as RGB/RGBA.
    """
    img = _to_pil(_to_numpy(array), palette)
    return atomic_write(path, lambda fh: img.save(fh, format="PNG"))


def _attention_array(attn: Any) -> np.ndarray:
    """Validate an ``H×W`` attention map → float64 array clipped to [0, 1]."""
    a = _to_numpy(attn).astype(np.float64)
    if a.ndim != 2:
        raise DataError(f"attention of shape {a.shape}: expected H×W")
    if np.isnan(a).any():
        raise DataError("attention map holds NaN values")
    return np.clip(a, 0.0, 1.0)


def attention_to_image(attn: Any) -> np.ndarray:
    """``H×W`` float attention in [0, 1] → ``H×W`` uint8 (``rint(255·a)``; values clipped to [0, 1])."""
    return np.rint(_attention_array(attn) * 255.0).astype(np.uint8)


def attention_to_color(attn: Any) -> np.ndarray:
    """``H×W`` float attention in [0, 1] → ``H×W×3`` uint8 with a "jet" colour map (blue → red).

    Uses the piecewise-linear jet formula ``c = clip(1.5 − |4a − k|, 0, 1)`` with k = 3, 2, 1 for
    r, g, b, which avoids a matplotlib dependency.
    """
    a = _attention_array(attn)
    k = np.array([3.0, 2.0, 1.0])
    rgb = np.clip(1.5 - np.abs(4.0 * a[..., None] - k), 0.0, 1.0)
    return np.rint(rgb * 255.0).astype(np.uint8)


_HTML_STYLE = """body{font-family:sans-serif;margin:1em}
.row{display:flex;flex-wrap:wrap;gap:8px;margin-bottom:12px;align-items:flex-start}
figure{margin:0}figcaption{font-size:small;text-align:center}
img{max-width:480px;height:auto;image-rendering:pixelated}
pre{font-size:small}"""


def write_html(
    path: str | os.PathLike[str],
    title: str,
    rows: Sequence[dict[str, str]],
    header: str = "",
    table_html: str = "",
) -> Path:
    """Write a static HTML page atomically: one row per sample, one captioned image per entry.

    ``rows`` are dicts ``{caption: image path relative to the page}``; ``title`` and ``header`` are
    plain text (escaped); ``table_html`` is inserted as-is (trusted HTML, e.g. a ``<pre>`` table).
    """
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_HTML_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if header:
        parts.append(f"<p>{html.escape(header)}</p>")
    if table_html:
        parts.append(table_html)
    for row in rows:
        figures = [
            f'<figure><img src="{html.escape(quote(str(src)))}" alt="{html.escape(caption)}" loading="lazy">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            for caption, src in row.items()
        ]
        parts.append('<div class="row">' + "".join(figures) + "</div>")
    parts.append("</body></html>\n")
    text = "\n".join(parts).encode("utf-8")

    def write(fh: IO[bytes]) -> None:
        fh.write(text)

    return atomic_write(path, write)
