"""Class frequencies of a labelled split and the loss weights derived from them.

ENet (Paszke et al. 2016, §5.2) weighs class ``k`` by ``w_k = 1 / ln(c + p_k)`` with ``c = 1.02``,
``p_k`` the share of class ``k`` among the labelled (non-ignored) pixels: a class of share → 0 weighs
``1 / ln 1.02 ≈ 50.5``, one covering every pixel ``1 / ln 2.02 ≈ 1.42``. Written here because no
library we use provides it (torchmetrics and timm have none; mmseg only reads fixed lists).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from tqdm import tqdm

from ..errors import ConfigError, DataError
from .uniform import _load_label

__all__ = ["class_pixel_counts", "enet_class_weights"]


def class_pixel_counts(dataset: Any, *, progress: bool = True) -> np.ndarray:
    """``K`` int64 pixel counts of every class over the labels of ``dataset`` (ignored pixels and
    ids ≥ K are not counted; labels are read as ``load_label`` gives them, already checked)."""
    k = dataset.spec.num_classes
    counts = np.zeros(k, np.int64)
    for i in tqdm(range(len(dataset)), desc="class pixel counts", unit="img", disable=not progress):
        label = np.asarray(_load_label(dataset, i))
        counts += np.bincount(label.ravel(), minlength=256)[:k]
    return counts


def enet_class_weights(counts: np.ndarray, c: float = 1.02) -> np.ndarray:
    """``K`` float64 weights ``1 / ln(c + p_k)`` from ``K`` pixel counts, ``p_k = counts_k / Σ counts``."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or bool((counts < 0).any()):
        raise DataError(f"class pixel counts {counts.tolist()} are invalid; expected K counts >= 0")
    if counts.sum() <= 0:
        raise DataError("the split has no labelled pixel: class weights cannot be derived from it")
    if not c > 1.0:
        raise ConfigError(f"ENet weighting constant c={c} is invalid; expected c > 1 (the paper's 1.02)")
    return 1.0 / np.log(c + counts / counts.sum())
