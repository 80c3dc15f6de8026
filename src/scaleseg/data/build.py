"""A configured dataset split from the ``data`` section (no Lightning import: ``check-data`` uses it)."""
from __future__ import annotations

import inspect
from typing import Any

from ..config import DataConfig
from ..errors import ConfigError
from . import DATASETS

# DataConfig fields that are dataset-specific options, passed only when set.
DATASET_OPTIONS = ("classes", "palette", "ignore_index", "list_file", "image_dir", "mask_dir",
                   "version", "label_type", "num_images", "image_size")


def build_dataset(data: DataConfig, split: str, transform: Any = None, seed: int = 0) -> Any:
    """The configured dataset's ``split``; options the dataset does not take are config errors."""
    make = DATASETS[data.dataset]
    accepted = inspect.signature(make).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    options = {}
    for key in DATASET_OPTIONS:
        value = getattr(data, key)
        if value is None:
            continue
        if key not in accepted and not takes_kwargs:
            raise ConfigError(f"config key 'data.{key}' is not used by dataset '{data.dataset}'; remove it")
        if key == "image_size":  # ScaleScenes generates images of this (H, W)
            key, value = "size", tuple(value)
        options[key] = value
    if data.root is None and data.dataset != "scalescenes":
        raise ConfigError(f"config key 'data.root' is not set; dataset '{data.dataset}' needs the folder that holds it")
    dataset = make(data.root, split, transform, **options)
    dataset.seed = seed
    return dataset
