"""Datasets (one module per dataset, each with a spec constant and ``make_dataset``) and joint transforms.

``DATASETS`` maps a config's dataset name to ``make_dataset(root, split, transform=None, **options)``,
which returns a ``SegDataset``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import ade20k, camvid, cityscapes, folder, mapillary
from .base import SegDataset
from .spec import IGNORE_INDEX, DatasetSpec


def _scalescenes(*args: Any, **options: Any) -> SegDataset:
    """Lazy import: the synthetic generator is only loaded when a config asks for it."""
    from .scalescenes import make_dataset

    return make_dataset(*args, **options)


DATASETS: dict[str, Callable[..., SegDataset]] = {
    "cityscapes": cityscapes.make_dataset,
    "mapillary": mapillary.make_dataset,
    "camvid": camvid.make_dataset,
    "ade20k": ade20k.make_dataset,
    "folder": folder.make_dataset,
    "scalescenes": _scalescenes,
}

__all__ = ["DATASETS", "IGNORE_INDEX", "DatasetSpec", "SegDataset"]
