"""Training on auto-labels (HMSA §5): a teacher's labels, thresholded by its confidence at load time.

``scaleseg autolabel`` (:mod:`scaleseg.engine.autolabel`) writes, for an image whose name relative to
its input folder is ``a/b.png``, ``<dir>/a/b.png`` (uint8 train ids) and ``<dir>/a/b_conf.png``
(uint8 ``round(255 · max softmax)``). :class:`AutolabelDataset` replaces a dataset's labels with
them: every pixel whose confidence ``conf/255`` is below ``threshold`` becomes ignore (255).

Threshold: the paper uses **0.9** (our default). NVIDIA's code release uses 0.5 (``CUSTOM_COARSE_PROB``;
the maintainers report ≈ +0.05 IoU, issue #62), and applies it only when the label path contains the
substring ``'refinement'``, so with the directory name their own docs suggest (``autolabelled``) the
threshold is silently skipped. Here the threshold is always applied when auto-labels are used.

Mixing with human labels (:func:`mix_autolabelled`): the auto-labelled images are either appended to
the image list (``"append"``) or, as in NVIDIA's Cityscapes recipe, used only through class-uniform
sampling of chosen classes (``"boost"``; see :class:`scaleseg.data.uniform.ClassUniformSampler`).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import ConfigError, DataError
from .base import SegDataset, check_label, read_image, read_label
from .uniform import file_token, label_fingerprint

DEFAULT_THRESHOLD = 0.9
CONF_SUFFIX = "_conf.png"


def autolabel_paths(out_dir: str | Path, name: str | Path) -> tuple[Path, Path]:
    """(label PNG, confidence PNG) for an image called ``name`` (relative path) under ``out_dir``."""
    stem = Path(out_dir) / Path(name).with_suffix("")
    return stem.with_name(stem.name + ".png"), stem.with_name(stem.name + CONF_SUFFIX)


def check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"config key 'data.autolabel.threshold' = {threshold!r}: expected a confidence in [0, 1]")
    return float(threshold)


def apply_confidence(label: np.ndarray, conf: np.ndarray, threshold: float, ignore_index: int = 255) -> np.ndarray:
    """``H×W`` train ids with every pixel whose confidence ``conf/255`` (``H×W`` uint8) is below
    ``threshold`` set to ``ignore_index``."""
    keep = np.arange(256) / 255.0 >= threshold  # per-value lookup: one comparison per possible byte
    return np.where(keep[conf], label, np.uint8(ignore_index)).astype(np.uint8)


def merge_classes(label: np.ndarray, human: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """For each class ``k`` in ``classes``, pixels where the human (coarse) label is ``k`` become ``k``:
    the class region is the union of the auto-label's and the human label's pixels of ``k``."""
    if not len(classes):
        return label
    lut = np.zeros(256, bool)
    lut[list(classes)] = True
    return np.where(lut[human], human, label).astype(np.uint8)


def _find_label(label_dir: Path, name: str) -> tuple[Path, Path] | None:
    """Auto-label files for ``name``, dropping its leading folders until they exist (so labels written
    for ``<root>/leftImg8bit/train_extra`` match names ``leftImg8bit/train_extra/...``)."""
    parts = Path(name).parts
    for start in range(len(parts)):
        label, conf = autolabel_paths(label_dir, Path(*parts[start:]))
        if label.is_file():
            return label, conf
    return None


class AutolabelDataset(SegDataset):
    """The images of ``base`` with labels from the auto-label folder ``label_dir``.

    Labels are read as train ids (no id mapping), checked, and pixels with confidence below
    ``threshold`` become ignore. With ``merge_classes``, the base dataset's own labels (e.g. Cityscapes
    gtCoarse) are then merged in for those classes (:func:`merge_classes`).

    Deliberate differences from NVIDIA's ``custom_coarse_dropout_classes``: human pixels are merged
    after thresholding (the teacher's confidence never removes a human label), and for every listed
    class, not only when the teacher predicted that class somewhere in the image.
    """

    def __init__(self, base: SegDataset, label_dir: str | Path, threshold: float = DEFAULT_THRESHOLD,
                 *, merge_classes: Sequence[int] = ()) -> None:
        self.base = base
        self.label_dir = Path(label_dir)
        self.threshold = check_threshold(threshold)
        self.merge = tuple(int(k) for k in merge_classes)
        bad = [k for k in self.merge if not 0 <= k < base.spec.num_classes]
        if bad:
            raise ConfigError(f"auto-label merge classes {bad} are not class ids of dataset '{base.spec.name}' (0..{base.spec.num_classes - 1})")
        if not self.label_dir.is_dir():
            raise DataError(f"auto-label folder {self.label_dir} does not exist; write it with 'scaleseg autolabel'")
        pairs, self.conf_paths = [], []
        for i in range(len(base)):
            found = _find_label(self.label_dir, base.name(i))
            if found is None:
                expected = autolabel_paths(self.label_dir, base.name(i))[0]
                raise DataError(f"image {base.pairs[i][0]} has no auto-label: expected {expected} (run 'scaleseg autolabel')")
            pairs.append((base.pairs[i][0], found[0]))
            self.conf_paths.append(found[1])
        super().__init__(pairs, base.spec, base.transform, root=base.root, seed=base.seed,
                         description=f"auto-labels in {self.label_dir}")

    def name(self, i: int) -> str:
        return self.base.name(i)

    def load_label(self, i: int) -> np.ndarray:
        """``H×W`` uint8 train ids: thresholded auto-label, merged with the human classes."""
        label_path, conf_path = self.pairs[i][1], self.conf_paths[i]
        assert label_path is not None
        label = read_label(label_path)
        check_label(label, self.spec, label_path)
        if not conf_path.is_file():
            raise DataError(f"auto-label {label_path} has no confidence map: expected {conf_path}")
        conf = read_label(conf_path)
        if conf.shape != label.shape:
            raise DataError(f"confidence map {conf_path} is {conf.shape[1]}×{conf.shape[0]} but {label_path} is "
                            f"{label.shape[1]}×{label.shape[0]} (W×H); expected the same size")
        label = apply_confidence(label, conf, self.threshold, self.spec.ignore_index)
        if self.merge:
            human = self.base.load_label(i)
            if human.shape != label.shape:
                raise DataError(f"label of {self.base.pairs[i][0]} is {human.shape[1]}×{human.shape[0]} but its auto-label "
                                f"{label_path} is {label.shape[1]}×{label.shape[0]} (W×H); expected the same size")
            label = merge_classes(label, human, self.merge)
        return label

    def load_raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        image_path = self.pairs[i][0]
        reads_files = type(self.base).load_raw is SegDataset.load_raw
        image = read_image(image_path) if reads_files else self.base.load_raw(i)[0]
        label = self.load_label(i)
        if label.shape != image.shape[:2]:
            raise DataError(f"auto-label {self.pairs[i][1]} is {label.shape[1]}×{label.shape[0]} (W×H) but image "
                            f"{image_path} is {image.shape[1]}×{image.shape[0]}; expected the same size")
        return image, label

    def label_fingerprint(self) -> Iterator[str]:
        """Cache key material for the class-uniform index (see ``scaleseg.data.uniform``)."""
        yield f"autolabel:{self.threshold!r}:{self.merge}"
        for (_, label), conf in zip(self.pairs, self.conf_paths):
            yield file_token(label)  # type: ignore[arg-type]
            yield file_token(conf)
        if self.merge:
            yield from label_fingerprint(self.base)


def with_autolabels(dataset: SegDataset, label_dir: str | Path, threshold: float = DEFAULT_THRESHOLD,
                    *, merge_classes: Sequence[int] = ()) -> AutolabelDataset:
    """``dataset`` with its labels replaced by the auto-labels in ``label_dir`` (the ``data.autolabel``
    option ``{dir, threshold}``)."""
    return AutolabelDataset(dataset, label_dir, threshold, merge_classes=merge_classes)


class UnionDataset(SegDataset):
    """Several datasets with the same classes as one list (a ConcatDataset that keeps SegDataset's
    ``(epoch, i[, point])`` indices, per-sample seeds over the union's index, and ``load_label``)."""

    def __init__(self, parts: Sequence[SegDataset], transform: object = None) -> None:
        if not parts:
            raise ConfigError("UnionDataset needs at least one dataset")
        spec = parts[0].spec
        for part in parts[1:]:
            if part.spec != spec:
                raise ConfigError(f"cannot join dataset '{part.spec.name}' with '{spec.name}': the classes differ")
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        pairs = [pair for part in parts for pair in part.pairs]
        super().__init__(pairs, spec, transform if transform is not None else parts[0].transform,  # type: ignore[arg-type]
                         root=parts[0].root, seed=parts[0].seed)

    def _locate(self, i: int) -> tuple[SegDataset, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        p = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[p], i - int(self.offsets[p])

    def name(self, i: int) -> str:
        part, j = self._locate(i)
        return part.name(j)

    def load_raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        part, j = self._locate(i)
        return part.load_raw(j)

    def load_label(self, i: int) -> np.ndarray:
        part, j = self._locate(i)
        return part.load_label(j)

    def label_fingerprint(self) -> Iterator[str]:
        for part in self.parts:
            yield f"part:{len(part)}"
            yield from label_fingerprint(part)


MixMode = Literal["append", "boost"]


def mix_autolabelled(dataset: SegDataset, auto: SegDataset, mode: MixMode = "boost") -> tuple[UnionDataset, int]:
    """Join human-labelled ``dataset`` and auto-labelled ``auto`` → ``(union, num_images)``.

    ``num_images`` is the epoch length and random-image pool for
    :class:`~scaleseg.data.uniform.ClassUniformSampler`: ``len(union)`` for ``"append"`` (the
    auto-labelled images are ordinary training images), ``len(dataset)`` for ``"boost"`` (they enter
    only as centroid crops of the sampler's ``extra_classes``; needs class-uniform sampling).
    """
    if mode not in ("append", "boost"):
        raise ConfigError(f"auto-label mix mode {mode!r}: expected 'append' or 'boost'")
    union = UnionDataset([dataset, auto])
    return union, len(union) if mode == "append" else len(dataset)
