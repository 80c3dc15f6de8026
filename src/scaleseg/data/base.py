"""SegDataset: a list of (image, label) files, a DatasetSpec and a joint transform.

Every loader in ``scaleseg.data`` returns a ``SegDataset`` (or a subclass that overrides
``load_raw``). Labels are checked on every load: a raw value that the spec's lookup table maps to
neither a class nor ignore is a ``DataError`` naming the file, the raw values and the raw ignore id.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .spec import DatasetSpec

# transform(image uint8 3×H×W tensor, mask uint8 H×W tensor[, point=(x, y)]) -> sample dict (image, mask, ...)
Transform = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
Pair = tuple[Path, Path | None]
Point = tuple[float, float]  # (x, y) pixel coordinates in the image


def sample_seed(seed: int, epoch: int, index: int, point: Point | None = None) -> int:
    """A 63-bit seed that depends only on (seed, epoch, index[, point]): augmentation is reproducible
    whatever the worker count, the rank layout or a resume. Crops around different points of one
    image (class-uniform sampling) get different seeds."""
    key = f"{seed}:{epoch}:{index}" if point is None else f"{seed}:{epoch}:{index}:{float(point[0])!r}:{float(point[1])!r}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
LABEL_MODES = ("L", "P", "1", "I;16", "I;16L", "I;16B", "I;16N", "I")


def file_error(message: str, path: Path | str, reason: str) -> DataError:
    """A DataError with the one-line ``message`` carrying ``path`` and ``reason`` (for check-data's table)."""
    return DataError(message, path=path, reason=reason)


def _decode_reason(err: BaseException, path: Path) -> str:
    """Pillow's message without the file name (the table shows it in its own column)."""
    text = (str(err) or type(err).__name__).replace(f" '{path}'", "").replace(str(path), "the file")
    return f"cannot decode: {text}"


def _to_uint8(gray: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """One channel of a 16-bit, 32-bit int or float image → uint8 by its real range.

    16-bit (and mode "I" with values in 0..65535) maps 0..65535 onto 0..255 (v/257 rounded), as
    scikit-image's ``img_as_ubyte`` does; float images must hold values in [0, 1] (×255 rounded).
    Anything else is refused: Pillow's ``convert("RGB")`` would clip at 255 and return garbage."""
    if mode == "F":
        if gray.size and not np.isfinite(gray).all():
            raise file_error(f"image {path} is a float image holding NaN or inf; expected values in [0, 1]",
                             path, "float image holding NaN or inf")
        lo, hi = (float(gray.min()), float(gray.max())) if gray.size else (0.0, 0.0)
        if lo < 0 or hi > 1:
            reason = f"float image with values in [{lo:g}, {hi:g}]"
            raise file_error(f"image {path} is a {reason}; expected [0, 1] (or convert it to 8 or 16 bits)", path, reason)
        return np.rint(gray.astype(np.float64) * 255).astype(np.uint8)
    values = gray.astype(np.int64)
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if lo < 0 or hi > 65535:
        reason = f"mode {mode} image with values in [{lo}, {hi}]"
        raise file_error(f"image {path} is a {reason}; expected 8- or 16-bit values", path, reason)
    return ((values + 128) // 257).astype(np.uint8)


def image_to_rgb(img: Image.Image, path: Path) -> np.ndarray:
    """A decoded PIL image → H×W×3 uint8 RGB; 16-bit, 32-bit and float images by their real range."""
    if img.mode in (*SIXTEEN_BIT_MODES, "I", "F"):
        gray = _to_uint8(np.asarray(img), img.mode, path)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.array(img.convert("RGB"))  # writable copy: torch.from_numpy warns on read-only arrays


def read_image(path: Path) -> np.ndarray:
    """H×W×3 uint8 RGB. Corrupt or truncated files raise a DataError naming the file; 16-bit and float
    images are converted by their real range (see :func:`_to_uint8`) or refused."""
    try:
        with Image.open(path) as img:
            img.load()
            return image_to_rgb(img, path)
    except FileNotFoundError:
        raise file_error(f"image file not found: {path}", path, "file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        reason = _decode_reason(err, path)
        raise file_error(f"cannot read image {path}: {err} (expected a readable RGB image file)", path, reason) from None


def read_label(path: Path) -> np.ndarray:
    """H×W uint8 raw label ids (palette PNGs are read as indices, never as colours)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in LABEL_MODES:
                raise file_error(f"label {path} has mode {img.mode}; expected a single-channel id image (mode L or P)",
                                 path, f"label of mode {img.mode}: expected a single-channel id image (L or P)")
            arr = np.array(img)
    except FileNotFoundError:
        raise file_error(f"label file not found: {path}", path, "file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        reason = _decode_reason(err, path)
        raise file_error(f"cannot read label {path}: {err} (expected a single-channel PNG of class ids)", path, reason) from None
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            reason = f"ids outside 0..255 (min {arr.min()}, max {arr.max()})"
            raise file_error(f"label {path} has {reason}", path, reason)
        arr = arr.astype(np.uint8)
    return arr


def _shown(values: np.ndarray) -> str:
    return ", ".join(str(v) for v in values[:10]) + (" ..." if values.size > 10 else "")


def _raw_ignore_ids(spec: DatasetSpec) -> str:
    """The raw values that mean "ignore" (the config's ignore id, e.g. 11 for CamVid's void)."""
    if spec.label_map is None:
        return str(spec.ignore_index)
    ids = np.flatnonzero(spec.label_map == spec.ignore_index)
    own = [int(v) for v in ids if v != spec.ignore_index]
    if not own:
        return str(spec.ignore_index)
    if len(own) > 3:
        return f"{len(own)} raw ids that map to ignore"
    also = f" (also {spec.ignore_index})" if spec.ignore_index in ids else ""
    return ", ".join(map(str, own)) + also


def check_raw_label(raw: np.ndarray, spec: DatasetSpec, path: Path | str) -> None:
    """Raise a DataError if raw label values (before the spec's lookup table) hold an id that maps to
    neither a class nor ignore. The message names the raw values and the raw ignore id(s)."""
    counts = np.bincount(raw.ravel(), minlength=256)
    train = spec.label_map if spec.label_map is not None else np.arange(256)
    valid = (train < spec.num_classes) | (train == spec.ignore_index)
    bad = np.flatnonzero((counts > 0) & ~valid)
    if bad.size:
        classes = _raw_class_ids(train < spec.num_classes)
        reason = f"ids [{_shown(bad)}] outside the classes {classes} and the ignore id {_raw_ignore_ids(spec)}"
        raise DataError(f"label {path} has {reason} (dataset '{spec.name}')", path=path, reason=reason)


def _raw_class_ids(is_class: np.ndarray) -> str:
    """"0..10" for the raw values that map to a class (a contiguous range), else their count."""
    ids = np.flatnonzero(is_class)
    if ids.size and ids[-1] - ids[0] + 1 == ids.size:
        return f"{ids[0]}..{ids[-1]}"
    return f"({ids.size} raw ids)"


def check_label(label: np.ndarray, spec: DatasetSpec, path: Path | str) -> None:
    """Raise a DataError if ``label`` (train ids) holds a value outside [0, K) ∪ {ignore}."""
    counts = np.bincount(label.ravel(), minlength=256)
    valid = np.zeros(256, bool)
    valid[: spec.num_classes] = True
    valid[spec.ignore_index] = True
    bad = np.flatnonzero((counts > 0) & ~valid)
    if bad.size:
        reason = f"train ids [{_shown(bad)}] outside [0, {spec.num_classes}) and ignore {spec.ignore_index}"
        raise DataError(f"label {path} has {reason} (dataset '{spec.name}', after its id mapping)", path=path, reason=reason)


def check_sizes(label: np.ndarray, image: np.ndarray, label_path: Path, image_path: Path) -> None:
    """Raise a DataError unless label and image have the same H×W."""
    if label.shape != image.shape[:2]:
        size = f"is {label.shape[1]}×{label.shape[0]} (W×H) but image {image_path} is {image.shape[1]}×{image.shape[0]}"
        reason = f"label is {label.shape[1]}×{label.shape[0]} (W×H), its image {image.shape[1]}×{image.shape[0]}: expected the same size"
        raise DataError(f"label {label_path} {size}; expected the same size", path=label_path, reason=reason)


def read_checked_label(path: Path, spec: DatasetSpec) -> np.ndarray:
    """H×W uint8 train ids of the label file ``path``: read, id-checked, mapped by the spec."""
    raw = read_label(path)
    check_raw_label(raw, spec, path)
    return spec.encode(raw)


class SegDataset(torch.utils.data.Dataset):
    """Image/label pairs with joint augmentation. See ``docs/architecture.md`` for the sample dict.

    ``pairs`` hold absolute paths; ``name`` in a sample is the image path relative to ``root``.
    A label path of ``None`` (unlabelled images, e.g. a test split) gives an all-ignore mask.
    ``generated`` is True for datasets that read no files (``check-data`` skips them).
    """

    generated: bool = False

    def __init__(
        self,
        pairs: Sequence[Pair],
        spec: DatasetSpec,
        transform: Transform | None = None,
        root: str | Path = ".",
        seed: int = 0,
        description: str = "",
    ) -> None:
        self.pairs = [(Path(i), None if m is None else Path(m)) for i, m in pairs]
        self.spec = spec
        self.transform = transform
        self.root = Path(root)
        self.seed = seed
        if not self.pairs:
            what = description or f"dataset '{spec.name}' at {self.root}"
            raise DataError(f"{what} is empty: no image/label pairs were found")

    def __len__(self) -> int:
        return len(self.pairs)

    def name(self, i: int) -> str:
        path = self.pairs[i][0]
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return path.name

    def load_raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(H×W×3 uint8 image, H×W uint8 train ids), checked. Subclasses may override."""
        image_path, label_path = self.pairs[i]
        image = read_image(image_path)
        if label_path is None:
            return image, np.full(image.shape[:2], self.spec.ignore_index, np.uint8)
        label = read_checked_label(label_path, self.spec)
        check_sizes(label, image, label_path, image_path)
        return image, label

    def load_label(self, i: int) -> np.ndarray:
        """H×W uint8 train ids of image ``i``, checked, reading only the label file when there is one
        (class-uniform indexing needs labels only). Datasets that override ``load_raw`` without
        overriding this method fall back to ``load_raw(i)[1]``."""
        label_path = self.pairs[i][1]
        if type(self).load_raw is not SegDataset.load_raw or label_path is None:
            return self.load_raw(i)[1]
        return read_checked_label(label_path, self.spec)

    def __getitem__(self, index: int | tuple[int, int] | tuple[int, int, Point | None]) -> dict[str, Any]:
        """``index`` is ``i``, ``(epoch, i)`` or ``(epoch, i, point)``; ``point`` = (x, y) in image pixels
        (class-uniform sampling) is passed to the transform as ``point=`` so the crop contains it."""
        point: Point | None = None
        if isinstance(index, tuple):
            epoch, i = index[0], index[1]
            point = index[2] if len(index) > 2 else None
        else:
            epoch, i = None, index
        image, label = self.load_raw(i)
        image_t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        label_t = torch.from_numpy(np.ascontiguousarray(label))
        if self.transform is None:
            sample = {"image": image_t, "mask": label_t.long()}
        elif epoch is None:
            sample = self._transform(image_t, label_t, point)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, epoch, i, point))
                sample = self._transform(image_t, label_t, point)
        sample["name"] = self.name(i)
        sample["index"] = i
        return sample

    def _transform(self, image: torch.Tensor, label: torch.Tensor, point: Point | None) -> dict[str, torch.Tensor]:
        assert self.transform is not None
        if point is None:  # evaluation transforms take no point
            return self.transform(image, label)
        return self.transform(image, label, point=point)
