"""Cityscapes: official ``*_labelIds.png`` read through a labelId → trainId lookup table.

Layout (as distributed, no conversion step)::

    <root>/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png        (label_type="fine")
    <root>/gtCoarse/<split>/<city>/<stem>_gtCoarse_labelIds.png    (label_type="coarse", split train_extra)

The 19 evaluated classes get train ids 0..18; every other labelId (void classes, license plate,
unknown values) becomes 255. ``TRAIN_ID_TO_LABEL_ID`` maps predictions back to labelIds for the
official cityscapesScripts evaluation.

Auto-labelled coarse data (HMSA §5.2): :func:`make_autolabelled` gives the ``train_extra`` images
with labels from ``scaleseg autolabel``, thresholded by confidence, with the human gtCoarse pixels of
``COARSE_MERGE_CLASSES`` merged in (NVIDIA's ``custom_coarse_dropout_classes``). NVIDIA's recipe uses
them only as class-uniform centroids of ``COARSE_BOOST_CLASSES`` (``mix_autolabelled(..., "boost")``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .autolabel import DEFAULT_THRESHOLD, with_autolabels
from .base import SegDataset, Transform
from .spec import IGNORE_INDEX, DatasetSpec

CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip
# labelId of train ids 0..18 (cityscapesScripts labels.py)
TRAIN_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)

LABEL_ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, np.uint8)
LABEL_ID_TO_TRAIN_ID[list(TRAIN_LABEL_IDS)] = np.arange(len(TRAIN_LABEL_IDS))

#: trainId → labelId (256 entries) for official evaluation; ids ≥ 19 (ignore included) → 0 "unlabeled".
TRAIN_ID_TO_LABEL_ID = np.zeros(256, np.uint8)
TRAIN_ID_TO_LABEL_ID[: len(TRAIN_LABEL_IDS)] = TRAIN_LABEL_IDS

CITYSCAPES = DatasetSpec("cityscapes", CLASSES, PALETTE, IGNORE_INDEX, LABEL_ID_TO_TRAIN_ID)

SPLITS = ("train", "val", "test", "train_extra")
_GT = {"fine": "gtFine", "coarse": "gtCoarse"}
_IMAGE_SUFFIX = "_leftImg8bit.png"


def _resolve_label_type(split: str, label_type: str | None) -> str:
    if split not in SPLITS:
        raise ConfigError(f"cityscapes split '{split}' is unknown; expected one of {', '.join(SPLITS)}")
    if label_type is None:
        return "coarse" if split == "train_extra" else "fine"
    if label_type not in _GT:
        raise ConfigError(f"cityscapes label_type '{label_type}' is unknown; expected 'fine' or 'coarse'")
    if split == "train_extra" and label_type != "coarse":
        raise ConfigError("cityscapes split 'train_extra' has only coarse labels; expected label_type='coarse'")
    return label_type


def list_pairs(root: str | Path, split: str, label_type: str | None = None) -> list[tuple[Path, Path]]:
    """Sorted (image, labelIds PNG) pairs of one split.

    ``label_type`` is "fine" (gtFine) or "coarse" (gtCoarse); ``None`` picks "fine", or "coarse" for
    ``train_extra``. An image without its label file, or a label without its image, is a DataError.
    """
    label_type = _resolve_label_type(split, label_type)
    root = Path(root)
    gt = _GT[label_type]
    image_dir, label_dir = root / "leftImg8bit" / split, root / gt / split
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            expected = f"<root>/{folder.relative_to(root)}/<city>/"
            raise DataError(f"cityscapes folder {folder} does not exist; expected {expected}")
    label_suffix = f"_{gt}_labelIds.png"
    images = sorted(image_dir.glob(f"*/*{_IMAGE_SUFFIX}"))
    labels = set(label_dir.glob(f"*/*{label_suffix}"))
    pairs = []
    for image in images:
        stem = image.name[: -len(_IMAGE_SUFFIX)]
        label = label_dir / image.parent.name / f"{stem}{label_suffix}"
        if label not in labels:
            raise DataError(f"cityscapes image {image} has no label: expected {label}")
        labels.discard(label)
        pairs.append((image, label))
    if labels:
        orphan = min(labels)
        stem = orphan.name[: -len(label_suffix)]
        image = image_dir / orphan.parent.name / (stem + _IMAGE_SUFFIX)
        raise DataError(f"cityscapes label {orphan} has no image: expected {image}")
    return pairs


def make_dataset(
    root: str | Path,
    split: str,
    transform: Transform | None = None,
    *,
    label_type: str | None = None,
    seed: int = 0,
) -> SegDataset:
    """Cityscapes split ("train", "val", "test", "train_extra") with 19 train ids, 255 = ignore."""
    pairs = list_pairs(root, split, label_type)
    return SegDataset(pairs, CITYSCAPES, transform, root=root, seed=seed,
                      description=f"cityscapes split '{split}' at {root}")


#: NVIDIA's SOTA recipe ``--coarse_boost_classes``: the classes whose class-uniform pools receive
#: centroids of auto-labelled coarse images (pass as ``extra_classes`` to ClassUniformSampler).
COARSE_BOOST_CLASSES = (3, 4, 6, 7, 9, 11, 12, 13, 14, 15, 16, 17, 18)
#: ``--custom_coarse_dropout_classes`` (truck, bus, train): gtCoarse pixels merged into the auto-labels.
COARSE_MERGE_CLASSES = (14, 15, 16)


def make_autolabelled(
    root: str | Path,
    label_dir: str | Path,
    transform: Transform | None = None,
    *,
    split: str = "train_extra",
    threshold: float = DEFAULT_THRESHOLD,
    merge_classes: tuple[int, ...] = COARSE_MERGE_CLASSES,
    seed: int = 0,
) -> SegDataset:
    """``split`` images (default ``train_extra``) labelled by ``scaleseg autolabel`` output in
    ``label_dir``: pixels below ``threshold`` confidence → ignore, then the human gtCoarse pixels of
    ``merge_classes`` are added. ``label_dir`` may mirror the dataset root or ``leftImg8bit/<split>``."""
    base = make_dataset(root, split, transform, label_type="coarse", seed=seed)
    return with_autolabels(base, label_dir, threshold, merge_classes=merge_classes)
