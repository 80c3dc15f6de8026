"""ScaleScenes: determinism, split disjointness, label range, the thin-structure and layout-ambiguity
properties the data exist for, the SegDataset integration and the CamVid-layout export."""
from __future__ import annotations

import hashlib
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from scaleseg.data.base import read_image, read_label, sample_seed
from scaleseg.data.scalescenes import (
    CLASSES, POLE, ROAD, SCALESCENES, SIDEWALK, THIN_CLASSES, WIRE, ScaleScenes, export, generate, make_dataset,
)  # fmt: skip
from scaleseg.errors import ConfigError, DataError

K = len(CLASSES)
SIZE = (256, 512)


@pytest.fixture(scope="module")
def sample() -> tuple[np.ndarray, np.ndarray]:
    """16 train scenes: N×H×W×3 uint8 images and N×H×W uint8 labels."""
    scenes = [generate(0, "train", i, SIZE) for i in range(16)]
    return np.stack([s[0] for s in scenes]), np.stack([s[1] for s in scenes])


def test_spec() -> None:
    assert SCALESCENES.name == "scalescenes"
    assert SCALESCENES.num_classes == K == 8
    assert SCALESCENES.ignore_index == 255
    assert len(set(SCALESCENES.palette)) == K  # distinct label colours


def test_deterministic_per_seed() -> None:
    a_img, a_lab = ScaleScenes("train", num_images=4, seed=3).load_raw(2)
    b_img, b_lab = ScaleScenes("train", num_images=4, seed=3).load_raw(2)
    assert a_img.shape == (256, 512, 3) and a_img.dtype == np.uint8
    assert a_lab.shape == (256, 512) and a_lab.dtype == np.uint8
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    c_img, c_lab = ScaleScenes("train", num_images=4, seed=4).load_raw(2)
    assert not np.array_equal(a_img, c_img) and not np.array_equal(a_lab, c_lab)
    d_img, _ = ScaleScenes("train", num_images=4, seed=3).load_raw(1)
    assert not np.array_equal(a_img, d_img)


def test_splits_disjoint() -> None:
    digest = lambda im: hashlib.sha1(im.tobytes()).hexdigest()  # noqa: E731
    train = {digest(generate(0, "train", i, (64, 128))[0]) for i in range(20)}
    val = {digest(generate(0, "val", i, (64, 128))[0]) for i in range(20)}
    assert len(train) == 20 and len(val) == 20
    assert not train & val


def test_labels_in_range_and_every_class_appears(sample) -> None:
    _, labels = sample
    present = np.unique(labels)
    assert set(present.tolist()) <= set(range(K)) | {255}
    assert set(range(K)) <= set(present.tolist()), f"missing classes in 16 scenes: {set(range(K)) - set(present.tolist())}"
    # A few ignore pixels: the bonnet band at the bottom rows, 255 nowhere else.
    ignore = labels == 255
    assert 0 < ignore.mean() < 0.05
    for lab in labels:
        rows = np.flatnonzero(np.any(lab == 255, axis=1))
        assert rows.size and rows[-1] == lab.shape[0] - 1
        assert np.all(lab[rows[0]:] == 255), "ignore must be a full bottom band"


def test_thin_classes_are_at_most_two_pixels_wide(sample) -> None:
    _, labels = sample
    box = np.ones((3, 3), bool)
    for cls in THIN_CLASSES:
        mask = labels == cls
        assert mask.sum() > 500, f"{CLASSES[cls]} too rare"
        # No pixel of a ≤2 px wide structure has its whole 3×3 neighbourhood inside the class.
        eroded = np.stack([ndimage.binary_erosion(m, box) for m in mask])
        assert not eroded.any(), f"{CLASSES[cls]} has parts ≥ 3 px wide"
    # Poles are vertical: in every row, a horizontal run of pole pixels is 1-2 px long, except the
    # 1 px high lamp arms; check that no run is ≥ 3 px in two consecutive rows.
    pole = labels == POLE
    wide = pole[..., 2:] & pole[..., 1:-1] & pole[..., :-2]  # run of ≥ 3 px ending here
    assert not (wide[:, 1:] & wide[:, :-1]).any()
    # Wires are 1 px: in any column, a vertical run is at most 2 px where the wire is near-flat.
    wire = labels == WIRE
    assert (wire[:, 2:] & wire[:, 1:-1] & wire[:, :-2]).mean() < 0.02 * wire.mean()
    # Big classes, by contrast, survive a 3×3 erosion almost everywhere.
    road = labels == ROAD
    assert np.stack([ndimage.binary_erosion(m, box) for m in road]).sum() > 0.9 * road.sum()


def round_trip_survival(labels: np.ndarray) -> np.ndarray:
    """Per class: fraction of its pixels whose class still holds a strict majority (> 1/2) of the
    2×2 cell after a 0.5× area downsample of the one-hot labels and a nearest upsample back."""
    lab = torch.from_numpy(labels).long()
    valid = (lab != 255).float()
    onehot = F.one_hot(lab.clamp(max=K - 1), K).permute(0, 3, 1, 2).float() * valid[:, None]
    low = F.interpolate(onehot, scale_factor=0.5, mode="area")
    back = F.interpolate(low, scale_factor=2.0, mode="nearest")
    survived = (back > 0.5) & (onehot > 0)
    return (survived.sum((0, 2, 3)) / onehot.sum((0, 2, 3))).numpy()


def test_round_trip_survival_reference() -> None:
    # Hand-computed: a 1 px line never holds > 1/2 of a 2×2 cell; a 2 px aligned line does; a
    # 2 px line straddling cells does not; an 8×8 block always does.
    labels = np.zeros((1, 8, 8), np.uint8)
    labels[0, :, 0] = POLE  # 1 px: 0 survive
    labels[0, :, 4:6] = WIRE  # 2 px aligned to the 2×2 grid: all survive
    assert np.allclose(round_trip_survival(labels)[[POLE, WIRE]], [0.0, 1.0])
    labels[0, :, 4:6] = 0
    labels[0, :, 3:5] = WIRE  # 2 px straddling two cells: 1/2 + 1/2 → 0 survive
    out = round_trip_survival(labels)
    assert out[WIRE] == 0.0 and out[POLE] == 0.0
    assert out[0] == pytest.approx(16 / 40)  # sky (5 columns) survives only in the last, all-sky cell column pair


def test_thin_structures_vanish_at_half_resolution(sample) -> None:
    _, labels = sample
    survival = round_trip_survival(labels)
    big = [c for c in range(K) if c not in THIN_CLASSES]
    print("0.5x round-trip survival:", {CLASSES[c]: round(float(survival[c]), 3) for c in range(K)})
    # Big classes lose only their boundary pixels. A 1 px line never survives; a 2 px pole survives
    # only when aligned with the 2×2 grid (half the time), and a quarter of the poles are 2 px wide.
    assert min(survival[big]) > 0.9
    assert max(survival[list(THIN_CLASSES)]) < 0.4 * min(survival[big])


def test_road_and_sidewalk_differ_only_by_layout(sample) -> None:
    images, labels = sample
    road = images[labels == ROAD].astype(np.float64)
    walk = images[labels == SIDEWALK].astype(np.float64)
    sigma = np.sqrt((road.var(0) + walk.var(0)) / 2)
    d_prime = np.abs(road.mean(0) - walk.mean(0)) / sigma
    # d' < 0.15 per channel: the best threshold on any one channel separates the two classes (at equal
    # priors) with accuracy Φ(d'/2) < 53 %, i.e. colour alone is at chance level. The spreads match too.
    assert np.all(d_prime < 0.15), d_prime
    assert np.all(np.abs(road.std(0) / walk.std(0) - 1) < 0.1)
    # The same statistic does separate real colour differences (e.g. road vs sky, road vs pole).
    for other in (0, POLE):
        px = images[labels == other].astype(np.float64)
        assert np.max(np.abs(road.mean(0) - px.mean(0)) / np.sqrt((road.var(0) + px.var(0)) / 2)) > 1.0
    # Layout differs: road is the central wedge, sidewalks lie towards the sides.
    n, h, w = labels.shape
    off_centre = np.broadcast_to(np.abs(np.arange(w) + 0.5 - w / 2) / w, (n, h, w))
    assert off_centre[labels == ROAD].mean() + 0.08 < off_centre[labels == SIDEWALK].mean()


def test_thin_classes_have_distinct_colours(sample) -> None:
    images, labels = sample
    means = {c: images[labels == c].reshape(-1, 3).mean(0) for c in range(K)}
    for thin in THIN_CLASSES:
        for other in range(K):
            if other != thin and other not in THIN_CLASSES:
                assert np.linalg.norm(means[thin] - means[other]) > 60, (CLASSES[thin], CLASSES[other])


def test_dataset_api_and_errors() -> None:
    train = make_dataset(None, "train")
    assert isinstance(train, ScaleScenes) and len(train) == 300
    assert len(make_dataset("ignored/root", "val")) == 60
    small = make_dataset(split="val", num_images=3, size=(64, 96), seed=5)
    image, label = small.load_raw(-1)
    assert image.shape == (64, 96, 3) and label.shape == (64, 96)
    np.testing.assert_array_equal(image, generate(5, "val", 2, (64, 96))[0])
    item = small[1]
    assert item["name"] == "scalescenes/val/000001.png" and item["index"] == 1
    assert item["image"].shape == (3, 64, 96) and item["image"].dtype == torch.uint8
    assert item["mask"].dtype == torch.int64
    np.testing.assert_array_equal(item["mask"].numpy(), generate(5, "val", 1, (64, 96))[1])
    with pytest.raises(IndexError):
        small.load_raw(3)
    with pytest.raises(DataError, match="split 'test'"):
        ScaleScenes("test")
    with pytest.raises(DataError, match="num_images=0"):
        ScaleScenes(num_images=0)
    with pytest.raises(DataError, match="size"):
        ScaleScenes(size=(16, 512))
    with pytest.raises(DataError, match="seed=-1"):
        ScaleScenes(seed=-1)
    with pytest.raises(ConfigError, match="'colour'"):
        make_dataset(split="train", colour=1)


@pytest.mark.parametrize("size", [(32, 32), (37, 61), (128, 256), (360, 480)])
def test_other_sizes(size) -> None:
    for i in range(3):
        image, label = generate(1, "train", i, size)
        assert image.shape == (*size, 3) and label.shape == size
        assert set(np.unique(label).tolist()) <= set(range(K)) | {255}
        assert np.any(label == ROAD) and np.any(label == 0)


def random_crop_flip(image: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Test transform that draws from torch's global generator: a 32×48 crop and a random flip."""
    top = int(torch.randint(0, image.shape[1] - 32 + 1, ()))
    left = int(torch.randint(0, image.shape[2] - 48 + 1, ()))
    image, mask = image[:, top:top + 32, left:left + 48], mask[top:top + 32, left:left + 48]
    if torch.rand(()) < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    return {"image": image.float() / 255, "mask": mask.long()}


def test_per_sample_seeding() -> None:
    data = ScaleScenes("train", random_crop_flip, num_images=4, size=(64, 128), seed=7)
    torch.manual_seed(0)
    first = data[(2, 3)]
    torch.manual_seed(123)  # the global RNG state must not matter, and must not be consumed
    state = torch.random.get_rng_state()
    second = data[(2, 3)]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first["image"], second["image"]) and torch.equal(first["mask"], second["mask"])
    # Reference: the transform applied to the raw scene under torch.manual_seed(sample_seed(seed, epoch, i)).
    image, mask = generate(7, "train", 3, (64, 128))
    torch.manual_seed(sample_seed(7, 2, 3))
    expected = random_crop_flip(torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask))
    assert torch.equal(first["image"], expected["image"]) and torch.equal(first["mask"], expected["mask"])
    # Other epochs draw other augmentations.
    crops = {data[(epoch, 3)]["image"].numpy().tobytes() for epoch in range(6)}
    assert len(crops) > 1
    # The data module re-seeds the augmentation (dataset.seed = run seed): the scenes stay the same.
    data.seed = 99
    np.testing.assert_array_equal(data.load_raw(3)[0], image)
    torch.manual_seed(sample_seed(99, 2, 3))
    expected = random_crop_flip(torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask))
    assert torch.equal(data[(2, 3)]["image"], expected["image"])


def test_export_camvid_layout(tmp_path) -> None:
    list_file = export(tmp_path, "val", 3, size=(48, 80), seed=2)
    assert list_file == tmp_path / "val.txt"
    lines = list_file.read_text().splitlines()
    assert lines == [f"val/{i:06d}.png valannot/{i:06d}.png" for i in range(3)]
    for i, line in enumerate(lines):
        image_rel, label_rel = line.split()
        image, label = generate(2, "val", i, (48, 80))
        np.testing.assert_array_equal(read_image(tmp_path / image_rel), image)
        np.testing.assert_array_equal(read_label(tmp_path / label_rel), label)


def test_generation_time_300_images() -> None:
    """Generates the default train split (300 × 256×512) and prints the time; checks every label."""
    data = ScaleScenes("train")
    start = time.perf_counter()
    cpu = time.process_time()
    digests = set()
    counts = np.zeros(256, np.int64)
    for i in range(len(data)):
        image, label = data.load_raw(i)
        digests.add(hashlib.sha1(image.tobytes()).hexdigest())
        counts += np.bincount(label.ravel(), minlength=256)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"ScaleScenes: 300 images 256×512 in {wall:.2f} s wall, {cpu:.2f} s CPU")
    assert len(digests) == 300
    assert np.flatnonzero(counts).tolist() == [*range(K), 255]
