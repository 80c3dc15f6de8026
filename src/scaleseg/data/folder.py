"""Users' own data: a list file of "image label" lines, or an image folder and a mask folder.

Masks are single-channel PNGs (mode L or P, read as indices) holding class ids ``0..K-1`` and the
raw ignore value ``ignore_index``, which the spec's lookup table maps to 255. Any other value fails
the label check with a DataError naming the file and the values.

- List mode (default): ``<root>/{split}.txt`` (or ``list_file``, ``{split}`` substituted), one
  ``image label`` pair per line, paths relative to ``root`` (absolute paths are accepted; leading
  components that do not exist under ``root`` are dropped, as in SegNet's CamVid lists).
- Folder mode (``image_dir`` and ``mask_dir`` given, ``{split}`` substituted, relative to ``root``):
  every image in ``image_dir`` is paired with ``mask_dir/<stem><mask_suffix>``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .base import SegDataset, Transform
from .spec import IGNORE_INDEX, DatasetSpec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def generated_palette(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """Deterministic, well-separated colours: the Pascal VOC bit-interleaving palette."""
    ids = np.arange(num_classes)
    colours = np.zeros((num_classes, 3), np.int64)
    for shift in range(8):  # 8 bit planes, vectorised over classes
        for channel in range(3):
            bit = (ids >> (3 * shift + channel)) & 1
            colours[:, channel] |= bit << (7 - shift)
    return tuple((int(r), int(g), int(b)) for r, g, b in colours)


def resolve_listed_path(root: Path, text: str, where: str) -> Path:
    """The file a list entry names: an existing absolute path, else ``root / text`` with leading
    components of ``text`` dropped until it exists. ``where`` ("file:line") names the entry in the
    DataError raised when nothing matches."""
    path = Path(text)
    if path.is_absolute() and path.is_file():
        return path
    parts = path.parts[1:] if path.is_absolute() else path.parts
    for start in range(len(parts)):
        candidate = root.joinpath(*parts[start:])
        if candidate.is_file():
            return candidate
    raise DataError(f"{where}: file '{text}' not found under {root} (expected a path relative to the dataset root)")


def read_list_file(list_file: Path, root: Path) -> list[tuple[Path, Path]]:
    """(image, label) pairs from a file of "image label" lines; blank lines are skipped."""
    if not list_file.is_file():
        raise DataError(f"list file {list_file} does not exist; expected lines 'image label'")
    pairs = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{list_file}:{number}"
        if len(fields) != 2:
            raise DataError(f"{where}: expected 'image label' (2 fields), got {len(fields)}: '{line.strip()}'")
        pairs.append((resolve_listed_path(root, fields[0], where), resolve_listed_path(root, fields[1], where)))
    return pairs


def pair_folders(image_dir: Path, mask_dir: Path, mask_suffix: str) -> list[tuple[Path, Path]]:
    """Images of ``image_dir`` paired with ``mask_dir/<stem><mask_suffix>``; orphans are DataErrors."""
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise DataError(f"folder {folder} does not exist")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    masks = {p.name[: -len(mask_suffix)]: p for p in mask_dir.iterdir() if p.name.endswith(mask_suffix)}
    pairs = []
    for image in images:
        mask = masks.pop(image.stem, None)
        if mask is None:
            raise DataError(f"image {image} has no mask: expected {mask_dir / (image.stem + mask_suffix)}")
        pairs.append((image, mask))
    if masks:
        orphan = masks[min(masks)]
        raise DataError(f"mask {orphan} has no image in {image_dir} (expected an image with the same stem)")
    return pairs


def make_spec(
    classes: Sequence[str],
    palette: Sequence[Sequence[int]] | None,
    ignore_index: int = IGNORE_INDEX,
    name: str = "folder",
) -> DatasetSpec:
    """Spec whose lookup table maps the raw ``ignore_index`` to 255 and keeps every other id."""
    classes = tuple(classes)
    if not 1 <= len(classes) <= 255:
        raise ConfigError(f"folder dataset: got {len(classes)} classes; expected 1..255")
    if not 0 <= ignore_index <= 255 or ignore_index < len(classes):
        raise ConfigError(
            f"folder dataset: ignore_index {ignore_index} must be in {len(classes)}..255 (outside the class ids)"
        )
    colours = generated_palette(len(classes)) if palette is None else tuple(tuple(int(v) for v in c) for c in palette)
    if len(colours) != len(classes) or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in colours):
        raise ConfigError(f"folder dataset: palette must hold {len(classes)} RGB triples in 0..255, got {palette}")
    lut = np.arange(256, dtype=np.uint8)
    lut[ignore_index] = IGNORE_INDEX
    return DatasetSpec(name, classes, colours, IGNORE_INDEX, lut)


def make_dataset(
    root: str | Path,
    split: str,
    transform: Transform | None = None,
    *,
    classes: Sequence[str],
    palette: Sequence[Sequence[int]] | None = None,
    ignore_index: int = IGNORE_INDEX,
    list_file: str | None = None,
    image_dir: str | None = None,
    mask_dir: str | None = None,
    mask_suffix: str = ".png",
    seed: int = 0,
) -> SegDataset:
    """A user dataset (see the module docstring); ``palette=None`` generates the colours."""
    root = Path(root)
    spec = make_spec(classes, palette, ignore_index)
    if (image_dir is None) != (mask_dir is None):
        raise ConfigError("folder dataset: give both image_dir and mask_dir, or neither (list-file mode)")
    if image_dir is not None and mask_dir is not None:
        if list_file is not None:
            raise ConfigError("folder dataset: give either list_file or image_dir/mask_dir, not both")
        pairs = pair_folders(root / image_dir.format(split=split), root / mask_dir.format(split=split), mask_suffix)
        where = f"folders {image_dir.format(split=split)} and {mask_dir.format(split=split)} under {root}"
    else:
        path = root / (list_file or "{split}.txt").format(split=split)
        pairs = read_list_file(path, root)
        where = f"list file {path}"
    return SegDataset(pairs, spec, transform, root=root, seed=seed, description=f"folder dataset ({where})")
