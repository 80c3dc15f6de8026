"""SegDataset: a list of (image, label) files, a DatasetSpec and a joint transform.

Every loader in ``scaleseg.data`` returns a ``SegDataset`` (or a subclass that overrides
``load_raw``). Labels are checked on every load: a value outside ``[0, K) ∪ {ignore}`` after the
spec's lookup table is a ``DataError`` naming the file and the bad values.
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


def read_image(path: Path) -> np.ndarray:
    """H×W×3 uint8 RGB. Corrupt or truncated files raise a DataError naming the file."""
    try:
        with Image.open(path) as img:
            img.load()
            return np.array(img.convert("RGB"))  # writable copy: torch.from_numpy warns on read-only arrays
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err} (expected a readable RGB image file)") from None


def read_label(path: Path) -> np.ndarray:
    """H×W uint8 raw label ids (palette PNGs are read as indices, never as colours)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P", "I;16", "I"):
                raise DataError(
                    f"label {path} has mode {img.mode}; expected a single-channel id image (mode L or P)"
                )
            arr = np.array(img)
    except FileNotFoundError:
        raise DataError(f"label file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read label {path}: {err} (expected a single-channel PNG of class ids)") from None
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DataError(f"label {path} has ids outside 0..255 (min {arr.min()}, max {arr.max()})")
        arr = arr.astype(np.uint8)
    return arr


def check_label(label: np.ndarray, spec: DatasetSpec, path: Path | str) -> None:
    """Raise a DataError if ``label`` (train ids) holds a value outside [0, K) ∪ {ignore}."""
    counts = np.bincount(label.ravel(), minlength=256)
    valid = np.zeros(256, bool)
    valid[: spec.num_classes] = True
    valid[spec.ignore_index] = True
    bad = np.flatnonzero((counts > 0) & ~valid)
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
        raise DataError(
            f"label {path} has ids [{shown}] outside [0, {spec.num_classes}) and ignore {spec.ignore_index}"
            f" (dataset '{spec.name}', after its id mapping)"
        )


class SegDataset(torch.utils.data.Dataset):
    """Image/label pairs with joint augmentation. See ``docs/architecture.md`` for the sample dict.

    ``pairs`` hold absolute paths; ``name`` in a sample is the image path relative to ``root``.
    A label path of ``None`` (unlabelled images, e.g. a test split) gives an all-ignore mask.
    """

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
        label = self.spec.encode(read_label(label_path))
        if label.shape != image.shape[:2]:
            raise DataError(
                f"label {label_path} is {label.shape[1]}×{label.shape[0]} (W×H) but image {image_path} is "
                f"{image.shape[1]}×{image.shape[0]}; expected the same size"
            )
        check_label(label, self.spec, label_path)
        return image, label

    def load_label(self, i: int) -> np.ndarray:
        """H×W uint8 train ids of image ``i``, checked, reading only the label file when there is one
        (class-uniform indexing needs labels only). Datasets that override ``load_raw`` without
        overriding this method fall back to ``load_raw(i)[1]``."""
        label_path = self.pairs[i][1]
        if type(self).load_raw is not SegDataset.load_raw or label_path is None:
            return self.load_raw(i)[1]
        label = self.spec.encode(read_label(label_path))
        check_label(label, self.spec, label_path)
        return label

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
