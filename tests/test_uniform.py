"""Class-uniform sampling: tile centroids vs hand-computed centres of mass, the cache key, the epoch mix,
the one-warning rule for classes without centroids, and centroid-aware crops with the real transform."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scaleseg.data import uniform
from scaleseg.data.base import SegDataset
from scaleseg.data.camvid import CAMVID
from scaleseg.data.spec import DatasetSpec
from scaleseg.data.transforms import train_transform
from scaleseg.data.uniform import (
    CentroidIndex,
    ClassUniformSampler,
    build_index,
    class_uniform_sampler,
    index_key,
    load_or_build_index,
    tile_centroids,
)
from scaleseg.errors import ConfigError, DataError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SPEC = DatasetSpec("toy", ("a", "b", "c", "d", "e"), ((0, 0, 0), (1, 1, 1), (2, 2, 2), (3, 3, 3), (4, 4, 4)))


def _reference_centroids(label: np.ndarray, tile: int, k: int) -> list[tuple[int, float, float]]:
    """Plain loops over tiles and classes: mean (x, y) of the class pixels in each tile."""
    out = []
    h, w = label.shape
    for top in range(0, h, tile):
        for left in range(0, w, tile):
            block = label[top : top + tile, left : left + tile]
            for c in range(k):
                ys, xs = np.nonzero(block == c)
                if len(xs):
                    out.append((c, float(xs.mean() + left), float(ys.mean() + top)))
    return out


def test_centroids_equal_hand_computed_centres_of_mass():
    # 6×10 image, tile 4: tiles (rows 0-3 | 4-5) × (cols 0-3 | 4-7 | 8-9); the last row/column are partial
    label = np.full((6, 10), 255, np.uint8)
    label[0:2, 0:2] = 1  # tile (0,0): x = 0.5, y = 0.5
    label[1, 3] = 0  # tile (0,0): single pixel at (3, 1)
    label[2:6, 3:6] = 2  # spans tiles (0,0), (0,1), (1,0), (1,1)
    label[5, 9] = 4  # partial corner tile (1,2): (9, 5)
    cls, x, y = tile_centroids(label, 4, 5)
    got = list(zip(cls.tolist(), x.tolist(), y.tolist()))
    expected = [
        (0, 3.0, 1.0), (1, 0.5, 0.5), (2, 3.0, 2.5),  # tile (0,0): class 2 at x=3, rows 2-3
        (2, 4.5, 2.5),  # tile (0,1): class 2 at x=4,5 rows 2-3
        (2, 3.0, 4.5),  # tile (1,0): x=3, rows 4-5
        (2, 4.5, 4.5),  # tile (1,1)
        (4, 9.0, 5.0),  # partial tile (1,2) counts
    ]
    assert got == expected
    # random labels against the plain-loop reference, several tile sizes (including no partial tile)
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 6, (37, 53)).astype(np.uint8)
    lab[lab == 5] = 255
    for tile in (8, 16, 37, 64):
        cls, x, y = tile_centroids(lab, tile, 5)
        ref = _reference_centroids(lab, tile, 5)
        assert cls.tolist() == [r[0] for r in ref]
        np.testing.assert_allclose(x, [r[1] for r in ref], rtol=0, atol=1e-9)
        np.testing.assert_allclose(y, [r[2] for r in ref], rtol=0, atol=1e-9)


def test_nvidia_would_drop_partial_tiles_we_do_not():
    label = np.zeros((5, 5), np.uint8)
    label[4, 4] = 1
    cls, x, y = tile_centroids(label, 4, 2)
    assert 1 in cls.tolist() and (x[cls == 1] == 4).all() and (y[cls == 1] == 4).all()


# ---------------------------------------------------------------- datasets on disk


def _write_dataset(root: Path, labels: list[np.ndarray]) -> list[tuple[Path, Path]]:
    pairs = []
    for i, lab in enumerate(labels):
        image, mask = root / f"img{i}.png", root / f"lab{i}.png"
        root.mkdir(parents=True, exist_ok=True)
        rgb = np.stack([lab.astype(np.uint8) * 40] * 3, -1)
        Image.fromarray(rgb).save(image)
        Image.fromarray(lab.astype(np.uint8)).save(mask)
        pairs.append((image, mask))
    return pairs


def _labels(n: int = 4, h: int = 24, w: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        lab = np.zeros((h, w), np.uint8)
        for c in range(1, 4):
            top, left = rng.integers(0, h - 8), rng.integers(0, w - 8)
            lab[top : top + 8, left : left + 8] = c
        out.append(lab)
    return out


def test_index_rows_and_parallel_build_equal_serial(tmp_path):
    labels = _labels(5)
    ds = SegDataset(_write_dataset(tmp_path, labels), SPEC, root=tmp_path)
    serial = build_index(ds, 16, workers=0, progress=False)
    for i, lab in enumerate(labels):
        ref = _reference_centroids(lab, 16, 5)
        rows = serial.image == i
        assert serial.cls[rows].tolist() == [r[0] for r in ref]
        np.testing.assert_allclose(serial.x[rows], [r[1] for r in ref], atol=1e-4)
        np.testing.assert_allclose(serial.y[rows], [r[2] for r in ref], atol=1e-4)
    parallel = build_index(ds, 16, workers=2, progress=False)
    for name in ("image", "cls", "x", "y"):
        assert np.array_equal(getattr(serial, name), getattr(parallel, name)), name
    assert serial.counts().tolist() == np.bincount(serial.cls, minlength=5).tolist()
    assert serial.counts()[4] == 0 and serial.counts()[0] > 0


def test_cache_is_keyed_by_label_files_tile_and_mapping(tmp_path, monkeypatch):
    labels = _labels(3)
    pairs = _write_dataset(tmp_path / "data", labels)
    ds = SegDataset(pairs, SPEC, root=tmp_path / "data")
    calls = []
    real = uniform.tile_centroids
    monkeypatch.setattr(uniform, "tile_centroids", lambda *a: calls.append(1) or real(*a))
    cache = tmp_path / "cache"

    first = load_or_build_index(ds, tile=16, cache_dir=cache, workers=0, progress=False)
    assert len(calls) == 3 and len(list(cache.glob("*.npz"))) == 1
    again = load_or_build_index(ds, tile=16, cache_dir=cache, workers=0, progress=False)
    assert len(calls) == 3  # loaded, not recomputed
    assert np.array_equal(first.x, again.x) and np.array_equal(first.image, again.image)

    load_or_build_index(ds, tile=8, cache_dir=cache, workers=0, progress=False)  # other tile → rebuild
    assert len(calls) == 6

    changed = labels[1].copy()
    changed[:4, :4] = 4
    Image.fromarray(changed).save(pairs[1][1])
    st = os.stat(pairs[1][1])
    os.utime(pairs[1][1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rebuilt = load_or_build_index(ds, tile=16, cache_dir=cache, workers=0, progress=False)
    assert len(calls) == 9
    assert rebuilt.counts()[4] == 1 and first.counts()[4] == 0

    other_map = DatasetSpec("toy", SPEC.classes, SPEC.palette, label_map=np.roll(np.arange(256), 1).astype(np.uint8))
    assert index_key(SegDataset(pairs, other_map), 16) != index_key(ds, 16)


def test_waiting_rank_times_out_with_a_clear_error_and_loads_when_ready(tmp_path):
    ds = SegDataset(_write_dataset(tmp_path / "d", _labels(2)), SPEC, root=tmp_path / "d")
    with pytest.raises(DataError, match=r"rank 1: timed out .* waiting for rank 0"):
        load_or_build_index(ds, tile=16, cache_dir=tmp_path / "c", rank=1, timeout=0.3, poll=0.05, progress=False)
    built = load_or_build_index(ds, tile=16, cache_dir=tmp_path / "c", rank=0, workers=0, progress=False)
    waited = load_or_build_index(ds, tile=16, cache_dir=tmp_path / "c", rank=1, timeout=0.3, poll=0.05)
    assert np.array_equal(built.cls, waited.cls)


# ---------------------------------------------------------------- the sampler


def _toy_index(num_images: int = 40) -> CentroidIndex:
    """Classes 0..3 with 10, 3, 7, 1 centroids in images 0..39 and a few in extra images; class 4 none."""
    rng = np.random.default_rng(2)
    rows = []
    for c, n in ((0, 10), (1, 3), (2, 7), (3, 1)):
        for img in rng.choice(30, n, replace=False):
            rows.append((img, c))
    rows += [(30, 0), (31, 1), (32, 1), (33, 2)]  # extra images 30..33
    image = np.array([r[0] for r in rows], np.int32)
    cls = np.array([r[1] for r in rows], np.int16)
    x = np.arange(len(rows), dtype=np.float32) + 0.25  # unique x per row identifies the row
    return CentroidIndex(image, cls, x, x * 2, num_images, 5, 16)


def _plan_rows(plan):
    return plan["x"][plan["cls"] >= 0]


def test_epoch_mix_matches_the_configured_fraction_and_warns_once():
    index = _toy_index()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sampler = ClassUniformSampler(index, pct=0.5, seed=3, class_names=list(SPEC.classes))
        plans = []
        for epoch in range(3):
            sampler.set_epoch(epoch)
            samples = list(sampler)
            plans.append(sampler.epoch_plan())
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "4 (e)" in msgs[0] and "no centroid" in msgs[0]
    # K = 4 classes with centroids, N = 40 → int(40·0.5/4) = 5 per class, 20 centroid crops
    assert sampler.num_per_class == 5 and sampler.num_centroid_samples == 20 and len(sampler) == 40
    assert len(samples) == 40 and sum(p is not None for _, _, p in samples) == 20
    assert all(e == 2 for e, _, _ in samples)
    plan = plans[-1]
    assert np.bincount(plan["cls"][plan["cls"] >= 0], minlength=5).tolist() == [5, 5, 5, 5, 0]
    rand = plan["image"][plan["cls"] < 0]
    assert len(rand) == 20 and len(set(rand.tolist())) == 20 and rand.max() < 40  # distinct random images
    # each centroid sample is a real row of its class: (image, x, y) agree with the index
    for img, c, x, y in zip(plan["image"], plan["cls"], plan["x"], plan["y"]):
        if c >= 0:
            row = int(np.flatnonzero(np.isclose(index.x, x))[0])
            assert (index.image[row], index.cls[row], index.y[row]) == (img, c, np.float32(y))
    # pools (images 30..33 are ordinary here): class 0 has 11 rows, 1 has 5, 2 has 8, 3 has 1
    assert len(set(plan["x"][plan["cls"] == 0].tolist())) == 5
    assert len(set(plan["x"][plan["cls"] == 1].tolist())) == 5
    assert len(set(plan["x"][plan["cls"] == 3].tolist())) == 1
    # without replacement until a pool is used up, then wrap around (n = 10 per class at pct 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = ClassUniformSampler(index, pct=1.0, seed=3).epoch_plan(0)
    reps = {c: sorted(np.unique(dense["x"][dense["cls"] == c], return_counts=True)[1].tolist()) for c in range(4)}
    assert reps == {0: [1] * 10, 1: [2] * 5, 2: [1] * 6 + [2] * 2, 3: [10]}
    # deterministic per (seed, epoch), different between epochs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = ClassUniformSampler(index, pct=0.5, seed=3)
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(again.epoch_plan(2).values(), plan.values()))
    assert not np.array_equal(plans[0]["image"], plans[1]["image"])


def test_fraction_for_other_pcts_and_boost_classes():
    index = _toy_index()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = ClassUniformSampler(index, pct=1.0)
        none = ClassUniformSampler(index, pct=0.0)
    assert full.num_per_class == 10 and sum(p is not None for *_, p in full) == 40
    assert none.num_centroid_samples == 0 and all(p is None for *_, p in none)
    assert sorted(i for _, i, _ in none) == list(range(40))
    boosted = ClassUniformSampler(index, pct=0.5, boost_classes=[1, 2])  # no warning: both have centroids
    plan = boosted.epoch_plan(0)
    assert boosted.num_per_class == 10
    assert np.bincount(plan["cls"][plan["cls"] >= 0], minlength=5).tolist() == [0, 10, 10, 0, 0]
    with pytest.raises(ConfigError, match="boost_classes"):
        ClassUniformSampler(index, boost_classes=[7])
    with pytest.raises(ConfigError, match="class_uniform_pct"):
        ClassUniformSampler(index, pct=1.5)


def test_extra_sources_join_only_the_pools_of_chosen_classes():
    index = _toy_index(34)
    sampler = ClassUniformSampler(index, num_images=30, pct=1.0, extra_classes=[1, 2], boost_classes=[0, 1, 2])
    assert len(sampler) == 30
    seen_extra: dict[int, set] = {0: set(), 1: set(), 2: set()}
    for epoch in range(30):
        plan = sampler.epoch_plan(epoch)
        assert (plan["image"][plan["cls"] < 0] < 30).all()  # random images only from the first 30
        for img, c in zip(plan["image"], plan["cls"]):
            if c >= 0 and img >= 30:
                seen_extra[int(c)].add(int(img))
    assert seen_extra == {0: set(), 1: {31, 32}, 2: {33}}  # image 30 (class 0) is not an extra class


def test_shards_are_disjoint_padded_and_skip_resumes():
    index = _toy_index(34)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shards = [ClassUniformSampler(index, num_images=34, seed=1, rank=r, world_size=4) for r in range(4)]
        whole = ClassUniformSampler(index, num_images=34, seed=1)
    got = [list(s) for s in shards]
    assert [len(g) for g in got] == [9] * 4 == [len(s) for s in shards]
    full = list(whole)
    padded = (full * 2)[:36]
    for r in range(4):
        assert got[r] == padded[r::4]
    shards[0].skip = 5
    assert list(shards[0]) == got[0][5:]


# ---------------------------------------------------------------- crops contain the centroid


def test_centroid_stays_inside_the_crop_with_the_real_train_transform(tmp_path):
    h, w = 48, 64
    labels = []
    for i in range(3):
        lab = np.zeros((h, w), np.uint8)
        lab[2 + i : 8 + i, 50:58] = 3  # small blocks far from each other
        lab[36:44, 4 + 3 * i : 12 + 3 * i] = 4
        lab[30:34, 30:36] = 2
        labels.append(lab)
    transform = train_transform((10, 10), MEAN, STD, scale_range=(0.5, 2.0), color_jitter=0)
    ds = SegDataset(_write_dataset(tmp_path, labels), SPEC, transform, root=tmp_path, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # class 1 has no centroid
        sampler = class_uniform_sampler(ds, pct=1.0, tile=32, cache_dir=tmp_path / "cache", workers=0, progress=False,
                                        num_images=3, boost_classes=[2, 3, 4])
    missed_without_point = checked = 0
    for epoch in range(12):
        sampler.set_epoch(epoch)
        plan = sampler.epoch_plan()
        for (e, i, point), c in zip(sampler, plan["cls"]):
            assert point is not None and c in (2, 3, 4)
            mask = ds[(e, i, point)]["mask"]
            assert mask.shape == (10, 10)
            assert (mask == int(c)).any(), f"epoch {epoch} image {i} class {c} point {point}"
            missed_without_point += int(not (ds[(e, i)]["mask"] == int(c)).any())
            checked += 1
    assert checked == 36 and missed_without_point > 8  # plain random crops often miss the blocks
    # a DataLoader over the sampler batches the (epoch, i, point) indices
    loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=sampler)
    batch = next(iter(loader))
    assert batch["mask"].shape == (3, 10, 10)


def test_camvid_index_has_every_class(camvid_root):
    from scaleseg.data.camvid import make_dataset

    ds = make_dataset(camvid_root, "val")
    ds.pairs = ds.pairs[:6]
    index = load_or_build_index(ds, tile=256, workers=0, progress=False)
    assert index.num_classes == CAMVID.num_classes and index.num_images == 6
    lab = ds.load_label(2)
    ref = _reference_centroids(lab, 256, CAMVID.num_classes)
    rows = index.image == 2
    assert index.cls[rows].tolist() == [r[0] for r in ref]
    np.testing.assert_allclose(index.x[rows], [r[1] for r in ref], atol=1e-3)
