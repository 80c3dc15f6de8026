"""CamVid in the SegNet layout: 11 classes (0–10), raw id 11 ("unlabelled") → ignore.

Layout::

    <root>/{train,val,test}.txt      one "image annotation" pair per line
    <root>/train/*.png, <root>/trainannot/*.png, ...

Paths in the list files are relative to ``root``. Some copies prefix them with a directory (e.g.
``/SegNet/CamVid/train/x.png``); leading components are dropped until the path exists under ``root``.
Only the SegNet encoding (single-channel class ids) is supported, not the original 32-class RGB one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .base import SegDataset, Transform
from .folder import read_list_file
from .spec import IGNORE_INDEX, DatasetSpec

CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree", "signsymbol", "fence", "car",
    "pedestrian", "bicyclist",
)  # fmt: skip
PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip
VOID_ID = 11

LABEL_MAP = np.arange(256, dtype=np.uint8)  # ids 0..10 kept; ids 12..254 fail the label check
LABEL_MAP[VOID_ID] = IGNORE_INDEX

CAMVID = DatasetSpec("camvid", CLASSES, PALETTE, IGNORE_INDEX, LABEL_MAP)
SPLITS = ("train", "val", "test")


def make_dataset(
    root: str | Path,
    split: str,
    transform: Transform | None = None,
    *,
    seed: int = 0,
) -> SegDataset:
    """CamVid split from ``<root>/<split>.txt`` (train 367, val 101, test 233 images in SegNet's copy)."""
    if split not in SPLITS:
        raise ConfigError(f"camvid split '{split}' is unknown; expected one of {', '.join(SPLITS)}")
    root = Path(root)
    pairs = read_list_file(root / f"{split}.txt", root)
    return SegDataset(pairs, CAMVID, transform, root=root, seed=seed,
                      description=f"camvid split '{split}' at {root}")
