"""Class-uniform sampling (HMSA, Tao et al. 2020; NVIDIA ``datasets/uniform.py``): half of an epoch's
crops are centred on a class chosen uniformly at random, so rare classes are seen as often as common ones.

1. **Centroid index** (:func:`tile_centroids`, :func:`build_index`): every label map is cut into
   ``tile × tile`` tiles; for every class present in a tile the centre of mass (mean pixel position,
   ``(x, y)`` in image pixels) of its pixels is stored. The index holds flat arrays
   ``image, cls, x, y`` (one row per (image, tile, class)).
2. **Cache** (:func:`load_or_build_index`): built by a process pool, written atomically to
   ``<cache_dir>/centroids_<dataset>_tile<T>_<key>.npz`` where ``key`` hashes the label files (path,
   size, mtime), the tile size and the dataset's label mapping, so any change rebuilds it. Under DDP
   only local rank 0 builds; the other ranks poll for the file with a timeout (no collective call, so
   a dead rank gives an error, never a hang).
3. **Sampler** (:class:`ClassUniformSampler`): per epoch, ``int(N·pct/K)`` centroid crops per class
   plus random images up to the epoch length ``N``, shuffled from ``(seed, epoch)``, yielding
   ``(epoch, i, (x, y))`` (crop must contain the point) or ``(epoch, i, None)``.

Deliberate differences from NVIDIA's code: partial edge tiles count (NVIDIA drops them, so e.g. the
bottom 352 rows of a 1376-row image are never indexed); a class with no centroid is skipped with one
warning instead of a ``KeyError`` (issues #95, #106, #131), and ``K`` in ``int(N·pct/K)`` counts only
the classes that have centroids, so the configured fraction is kept; the build needs no
``barrier()`` (issue #127); the epoch length stays ``N``. As in NVIDIA's code, the centroid of a
non-convex region may fall outside the region.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..errors import ConfigError, DataError
from ..visualize import atomic_write
from .base import Point, SegDataset

INDEX_VERSION = 1
DEFAULT_TILE = 1024
DEFAULT_WAIT_S = 7200.0  # how long non-building ranks wait for the index file


# --------------------------------------------------------------------------------------------------
# centroids of one label map


def tile_centroids(label: np.ndarray, tile: int, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres of mass of every class in every ``tile × tile`` tile of an ``H×W`` train-id map.

    Tiles start at multiples of ``tile``; partial tiles at the right/bottom edges count. Pixels with
    ids ``>= num_classes`` (ignore) are skipped. Returns ``(cls int16, x float64, y float64)``, one
    entry per (tile, class present), ordered by tile row, tile column, class; ``x``/``y`` are the mean
    column/row of the class's pixels in that tile, in image coordinates (``scipy.ndimage.center_of_mass``
    of ``tile == class``, shifted by the tile's origin).
    """
    if label.ndim != 2:
        raise DataError(f"label map of shape {label.shape}: expected H×W train ids")
    if tile < 1:
        raise ConfigError(f"class-uniform tile size {tile} is invalid; expected a positive number of pixels")
    h, w = label.shape
    cols = np.arange(w)
    bins = -(-w // tile) * num_classes  # (tile column, class) bins of one tile row
    out_c, out_x, out_y = [], [], []
    for top in range(0, h, tile):  # one tile row at a time bounds memory; everything inside is vectorised
        block = label[top : top + tile]
        valid = block < num_classes
        key = ((cols // tile) * num_classes)[None, :] + block.astype(np.int64)
        key = key[valid]
        rows = np.broadcast_to(np.arange(top, top + block.shape[0])[:, None], block.shape)[valid]
        xs = np.broadcast_to(cols[None, :], block.shape)[valid]
        count = np.bincount(key, minlength=bins)
        present = np.flatnonzero(count)
        n = count[present]
        out_c.append((present % num_classes).astype(np.int16))
        out_x.append(np.bincount(key, weights=xs, minlength=bins)[present] / n)
        out_y.append(np.bincount(key, weights=rows, minlength=bins)[present] / n)
    if not out_c:
        return np.zeros(0, np.int16), np.zeros(0), np.zeros(0)
    return np.concatenate(out_c), np.concatenate(out_x), np.concatenate(out_y)


# --------------------------------------------------------------------------------------------------
# the index


@dataclass(frozen=True)
class CentroidIndex:
    """Class centroids of a dataset: row ``r`` says class ``cls[r]`` has a centroid at
    ``(x[r], y[r])`` (image pixels) in image ``image[r]`` (the dataset's index)."""

    image: np.ndarray  # (M,) int32
    cls: np.ndarray  # (M,) int16
    x: np.ndarray  # (M,) float32
    y: np.ndarray  # (M,) float32
    num_images: int
    num_classes: int
    tile: int
    key: str = ""

    def __post_init__(self) -> None:
        m = len(self.image)
        if not len(self.cls) == len(self.x) == len(self.y) == m:
            raise DataError(f"centroid index arrays have different lengths {[len(a) for a in (self.image, self.cls, self.x, self.y)]}")
        if m and (self.image.min() < 0 or self.image.max() >= self.num_images):
            raise DataError(f"centroid index has image ids outside [0, {self.num_images})")
        if m and (self.cls.min() < 0 or self.cls.max() >= self.num_classes):
            raise DataError(f"centroid index has class ids outside [0, {self.num_classes})")

    def __len__(self) -> int:
        return len(self.image)

    def counts(self) -> np.ndarray:
        """``(K,)`` number of centroids per class."""
        return np.bincount(self.cls, minlength=self.num_classes)

    def save(self, path: str | Path) -> Path:
        """Atomic ``.npz`` write (a crash never leaves half a file)."""
        meta = json.dumps({"version": INDEX_VERSION, "num_images": self.num_images,
                           "num_classes": self.num_classes, "tile": self.tile, "key": self.key})
        return atomic_write(path, lambda fh: np.savez(fh, image=self.image, cls=self.cls, x=self.x, y=self.y,
                                                      meta=np.array(meta)))

    @classmethod
    def load(cls, path: str | Path) -> CentroidIndex:
        """Read an index written by :meth:`save`; unreadable files are a DataError naming the file."""
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if meta.get("version") != INDEX_VERSION:
                    raise DataError(f"centroid index {path} has version {meta.get('version')}; expected {INDEX_VERSION}")
                return cls(data["image"], data["cls"], data["x"], data["y"], int(meta["num_images"]),
                           int(meta["num_classes"]), int(meta["tile"]), str(meta["key"]))
        except DataError:
            raise
        except FileNotFoundError:
            raise DataError(f"centroid index not found: {path}") from None
        except Exception as err:  # noqa: BLE001 - any parse failure is the same user-facing error
            raise DataError(f"cannot read centroid index {path}: {err} (delete it to rebuild)") from None


def _load_label(dataset: Any, i: int) -> np.ndarray:
    load = getattr(dataset, "load_label", None)
    return load(i) if load is not None else dataset.load_raw(i)[1]


_WORKER: tuple[Any, int] | None = None  # (dataset, tile) of a pool worker


def _init_worker(dataset: Any, tile: int) -> None:
    global _WORKER
    _WORKER = (dataset, tile)
    torch.set_num_threads(1)


def _image_centroids(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    assert _WORKER is not None
    dataset, tile = _WORKER
    return tile_centroids(_load_label(dataset, i), tile, dataset.spec.num_classes)


def default_workers() -> int:
    """Processes for the index build: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def build_index(dataset: Any, tile: int = DEFAULT_TILE, *, workers: int | None = None, progress: bool = True,
                key: str = "") -> CentroidIndex:
    """Centroids of every image of ``dataset`` (a SegDataset, or anything with ``spec``, ``__len__`` and
    ``load_label(i)``/``load_raw(i)``). ``workers`` > 1 uses a process pool; 0 or 1 runs in-process."""
    global _WORKER
    if tile < 1:
        raise ConfigError(f"class-uniform tile size {tile} is invalid; expected a positive number of pixels")
    n = len(dataset)
    workers = default_workers() if workers is None else workers
    bar = tqdm(total=n, desc=f"class centroids (tile {tile})", unit="img", disable=not progress)
    results: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    with bar:
        if workers <= 1 or n < 2:
            saved, _WORKER = _WORKER, (dataset, tile)
            try:
                for i in range(n):
                    results.append(_image_centroids(i))
                    bar.update()
            finally:
                _WORKER = saved
        else:
            chunk = max(1, min(16, n // (4 * workers)))
            with ProcessPoolExecutor(min(workers, n), initializer=_init_worker, initargs=(dataset, tile)) as pool:
                for res in pool.map(_image_centroids, range(n), chunksize=chunk):
                    results.append(res)
                    bar.update()
    image = np.repeat(np.arange(n, dtype=np.int32), [len(r[0]) for r in results])

    def column(j: int, dtype: type) -> np.ndarray:
        return np.concatenate([r[j] for r in results]).astype(dtype) if results else np.zeros(0, dtype)

    return CentroidIndex(image, column(0, np.int16), column(1, np.float32), column(2, np.float32), n,
                         dataset.spec.num_classes, tile, key)


# --------------------------------------------------------------------------------------------------
# cache key and cache


def file_token(path: str | Path) -> str:
    """``path:size:mtime_ns`` (or ``path:missing``): changes whenever the file is rewritten."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path}:missing"
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def label_fingerprint(dataset: Any) -> Iterator[str]:
    """Strings that change whenever the dataset's labels may change. A dataset can define its own
    ``label_fingerprint()``; for a SegDataset it is every label file's token, plus the simple
    attributes of subclasses that generate labels in ``load_raw`` (e.g. ScaleScenes' seed and size)."""
    own = getattr(dataset, "label_fingerprint", None)
    if callable(own):
        yield from own()
        return
    pairs = getattr(dataset, "pairs", None)
    if pairs is None:
        raise ConfigError(f"{type(dataset).__name__} has neither 'pairs' nor 'label_fingerprint()'; cannot key the centroid cache")
    yield type(dataset).__qualname__
    if isinstance(dataset, SegDataset) and type(dataset).load_raw is not SegDataset.load_raw:
        simple = {k: v for k, v in vars(dataset).items()
                  if k not in ("seed", "transform", "pairs") and isinstance(v, (bool, int, float, str, tuple))}
        yield repr(sorted(simple.items()))
    for image, label in pairs:
        yield str(image) if label is None else file_token(label)


def index_key(dataset: Any, tile: int) -> str:
    """Hash of the label files (paths, sizes, mtimes), the tile size and the label mapping."""
    spec = dataset.spec
    lut = b"" if spec.label_map is None else np.asarray(spec.label_map, np.uint8).tobytes()
    head = json.dumps({"version": INDEX_VERSION, "tile": tile, "dataset": spec.name, "classes": list(spec.classes),
                       "ignore": spec.ignore_index, "lut": hashlib.blake2b(lut, digest_size=8).hexdigest(),
                       "num_images": len(dataset)})
    digest = hashlib.blake2b(head.encode(), digest_size=16)
    for token in label_fingerprint(dataset):
        digest.update(token.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def cache_path(cache_dir: str | Path, dataset: Any, tile: int, key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset.spec.name)
    return Path(cache_dir) / f"centroids_{safe}_tile{tile}_{key[:20]}.npz"


def builder_rank() -> int:
    """Which process builds the index: ``LOCAL_RANK`` (one builder per node, so a node-local cache
    folder works too), else the process group's rank, else ``RANK``, else 0."""
    local = os.environ.get("LOCAL_RANK", "").strip()
    if local.isdigit():
        return int(local)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    value = os.environ.get("RANK", "").strip()
    return int(value) if value.isdigit() else 0


def _wait_for(path: Path, key: str, rank: int, timeout: float, poll: float) -> CentroidIndex:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise DataError(
                f"rank {rank}: timed out after {timeout:.0f} s waiting for rank 0 to write the centroid index {path};"
                " check rank 0's log, or build it once with a single process"
            )
        time.sleep(poll)
    index = CentroidIndex.load(path)
    if index.key != key:
        raise DataError(f"centroid index {path} was built for other label files (key {index.key[:20]}, expected {key[:20]})")
    return index


def load_or_build_index(
    dataset: Any,
    *,
    tile: int = DEFAULT_TILE,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    rank: int | None = None,
    progress: bool = True,
    timeout: float = DEFAULT_WAIT_S,
    poll: float = 0.5,
) -> CentroidIndex:
    """The dataset's centroid index, from ``cache_dir`` if a file with the same key exists.

    ``rank`` (default :func:`builder_rank`) 0 builds and writes the cache; other ranks wait up to
    ``timeout`` seconds for the file (polling every ``poll`` s) and then load it. Without ``cache_dir``
    every process just builds. Use e.g. ``cache_dir=<output_dir>/cache``.
    """
    if tile < 1:
        raise ConfigError(f"class-uniform tile size {tile} is invalid; expected a positive number of pixels")
    key = index_key(dataset, tile)
    if cache_dir is None:
        return build_index(dataset, tile, workers=workers, progress=progress, key=key)
    path = cache_path(cache_dir, dataset, tile, key)
    rank = builder_rank() if rank is None else rank
    if rank != 0:
        return _wait_for(path, key, rank, timeout, poll)
    if path.exists():
        try:
            index = CentroidIndex.load(path)
            if index.key == key:
                return index
        except DataError as err:
            warnings.warn(f"{err}; rebuilding it", stacklevel=2)
    index = build_index(dataset, tile, workers=workers, progress=progress, key=key)
    index.save(path)
    return index


# --------------------------------------------------------------------------------------------------
# the sampler


def _class_mask(classes: Sequence[int] | None, num_classes: int, key: str) -> np.ndarray:
    mask = np.zeros(num_classes, bool)
    if classes is None:
        mask[:] = True
        return mask
    ids = [int(c) for c in classes]
    bad = [c for c in ids if not 0 <= c < num_classes]
    if bad or not ids:
        raise ConfigError(f"{key}={list(classes)!r}: expected a non-empty list of class ids in [0, {num_classes})")
    mask[ids] = True
    return mask


class ClassUniformSampler(torch.utils.data.Sampler):
    """Epoch sampler mixing class-centred crops and random images (same interface as EpochSampler).

    Per epoch of length ``N = num_images``: for each of the ``K`` classes that have centroids (among
    ``boost_classes``, default all), ``n = int(N·pct/K)`` centroid rows are drawn — a per-epoch
    permutation of the class's rows, wrapping around when ``n`` exceeds them (NVIDIA's
    ``random_sampling``); the remaining ``N − n·K`` samples are distinct random images from
    ``[0, num_images)``. The epoch is shuffled from ``(seed, epoch)``, padded by wrapping to a multiple
    of ``world_size`` (``pad=True``) and rank ``r`` takes every ``world_size``-th sample from ``r``.

    Images with ids ``>= num_images`` in the index are *extra* sources (e.g. auto-labelled coarse
    images appended to the dataset): never drawn as random images, their centroids join only the pools
    of ``extra_classes`` (default: all). NVIDIA's Cityscapes recipe (``--coarse_boost_classes``) is
    ``boost_classes=None, extra_classes=COARSE_BOOST_CLASSES``.

    Yields ``(epoch, i, (x, y))`` for centroid samples and ``(epoch, i, None)`` for random ones.
    """

    def __init__(
        self,
        index: CentroidIndex,
        *,
        num_images: int | None = None,
        pct: float = 0.5,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
        boost_classes: Sequence[int] | None = None,
        extra_classes: Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        num_images = index.num_images if num_images is None else int(num_images)
        if not 1 <= num_images <= index.num_images:
            raise ConfigError(f"class-uniform num_images={num_images}: expected 1..{index.num_images} (images in the index)")
        if not 0.0 <= pct <= 1.0:
            raise ConfigError(f"class_uniform_pct={pct}: expected a fraction in [0, 1]")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} / world_size {world_size}: expected 0 <= rank < world_size")
        self.index, self.length, self.pct = index, num_images, float(pct)
        self.seed, self.rank, self.world_size, self.pad = seed, rank, world_size, pad
        self.epoch = 0
        self.skip = 0  # samples of this rank's shard to skip once (mid-epoch resume)
        k = index.num_classes
        selected = _class_mask(boost_classes, k, "boost_classes")
        extra_ok = _class_mask(extra_classes, k, "extra_classes")
        cls = index.cls.astype(np.int64)
        eligible = selected[cls] & ((index.image < num_images) | extra_ok[cls])
        rows = np.flatnonzero(eligible)
        self._rows = rows[np.argsort(cls[rows], kind="stable")]  # grouped by class
        self._counts = np.bincount(cls[rows], minlength=k)
        self._starts = np.cumsum(self._counts) - self._counts
        self.classes = np.flatnonzero(selected & (self._counts > 0))
        missing = np.flatnonzero(selected & (self._counts == 0))
        if missing.size and self.pct > 0:
            names = [class_names[c] if class_names is not None and c < len(class_names) else str(c) for c in missing]
            warnings.warn(
                f"class-uniform sampling: {len(missing)} class(es) have no centroid and are skipped: "
                + ", ".join(f"{c} ({n})" if n != str(c) else str(c) for c, n in zip(missing, names)),
                stacklevel=2,
            )
        self.num_per_class = int(num_images * self.pct / len(self.classes)) if len(self.classes) else 0

    @property
    def num_centroid_samples(self) -> int:
        """Centroid crops per epoch: ``num_per_class × (classes with centroids)``."""
        return self.num_per_class * len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def epoch_plan(self, epoch: int | None = None) -> dict[str, np.ndarray]:
        """The whole epoch before sharding, in order: ``image`` (N,) int64, ``cls`` (N,) (-1 for random
        images), ``x``, ``y`` (N,) float64 (NaN for random images). A pure function of (seed, epoch)."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed % (1 << 63), epoch, 0xC1A55])
        n, index = self.num_per_class, self.index
        picked = np.zeros(0, np.int64)
        if n and len(self.classes):
            # a fresh random order inside each class: sort the rows by (class, random key)
            perm = self._rows[np.lexsort((rng.random(self._rows.size), index.cls[self._rows]))]
            c = self.classes
            pos = self._starts[c][:, None] + np.arange(n)[None, :] % self._counts[c][:, None]
            picked = perm[pos.ravel()]
        num_rand = self.length - picked.size
        rand = rng.permutation(self.length)[:num_rand]
        image = np.concatenate([index.image[picked].astype(np.int64), rand])
        cls = np.concatenate([index.cls[picked].astype(np.int64), np.full(num_rand, -1)])
        x = np.concatenate([index.x[picked].astype(np.float64), np.full(num_rand, np.nan)])
        y = np.concatenate([index.y[picked].astype(np.float64), np.full(num_rand, np.nan)])
        order = rng.permutation(self.length)
        return {"image": image[order], "cls": cls[order], "x": x[order], "y": y[order]}

    def __iter__(self) -> Iterator[tuple[int, int, Point | None]]:
        plan = self.epoch_plan()
        order = np.arange(self.length)
        if self.pad and self.world_size > 1:
            total = -(-self.length // self.world_size) * self.world_size
            order = np.resize(order, total)  # wraps around
        for j in order[self.rank :: self.world_size][self.skip :]:
            point = None if plan["cls"][j] < 0 else (float(plan["x"][j]), float(plan["y"][j]))
            yield (self.epoch, int(plan["image"][j]), point)

    def __len__(self) -> int:
        if self.pad:
            return -(-self.length // self.world_size)
        return len(range(self.rank, self.length, self.world_size))


def class_uniform_sampler(
    dataset: Any,
    *,
    pct: float = 0.5,
    tile: int = DEFAULT_TILE,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_images: int | None = None,
    boost_classes: Sequence[int] | None = None,
    extra_classes: Sequence[int] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> ClassUniformSampler:
    """Index ``dataset`` (cached, see :func:`load_or_build_index`) and return a training sampler for
    this ``rank``. ``num_images`` < ``len(dataset)`` marks the images after it as extra centroid
    sources for ``extra_classes`` (see :class:`ClassUniformSampler`)."""
    index = load_or_build_index(dataset, tile=tile, cache_dir=cache_dir, workers=workers, progress=progress)
    return ClassUniformSampler(
        index, num_images=num_images, pct=pct, seed=seed, rank=rank, world_size=world_size, pad=True,
        boost_classes=boost_classes, extra_classes=extra_classes, class_names=list(dataset.spec.classes),
    )
