"""Dataset loaders: id lookup tables, on-disk layouts built in tmp_path, label checks, real CamVid."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scaleseg.data import DATASETS, ade20k, camvid, cityscapes, folder, mapillary
from scaleseg.data.base import read_label
from scaleseg.data.transforms import train_transform
from scaleseg.errors import ConfigError, DataError


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _rgb(h: int = 4, w: int = 6, value: int = 100) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


# ---------------------------------------------------------------- lookup tables


def test_cityscapes_lut_matches_table():
    lut = cityscapes.LABEL_ID_TO_TRAIN_ID
    assert lut[7] == 0 and lut[8] == 1 and lut[26] == 13 and lut[33] == 18
    assert lut[0] == 255 and lut[6] == 255 and lut[29] == 255 and lut[30] == 255
    assert lut[34] == 255 and lut[200] == 255 and lut[255] == 255  # unknown ids → ignore
    train_ids = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    expected = [train_ids.index(i) if i in train_ids else 255 for i in range(256)]  # plain-loop reference
    assert lut.tolist() == expected
    # trainId → labelId round-trips the 19 classes
    assert cityscapes.TRAIN_ID_TO_LABEL_ID[:19].tolist() == train_ids
    assert (lut[cityscapes.TRAIN_ID_TO_LABEL_ID[:19]] == np.arange(19)).all()
    assert cityscapes.CITYSCAPES.num_classes == 19 and cityscapes.CITYSCAPES.palette[0] == (128, 64, 128)


def test_ade_camvid_mapillary_luts():
    ade = ade20k.ADE20K
    assert ade.num_classes == 150 and len(ade.palette) == 150
    assert ade.label_map[0] == 255 and ade.label_map[1] == 0 and ade.label_map[150] == 149
    assert ade.classes[0] == "wall" and ade.classes[149] == "flag"
    cam = camvid.CAMVID
    assert cam.num_classes == 11 and cam.label_map[11] == 255
    assert cam.label_map[:11].tolist() == list(range(11))
    v1, v2 = mapillary.MAPILLARY_V12, mapillary.MAPILLARY_V20
    assert (v1.num_classes, v2.num_classes) == (65, 123)
    assert v1.label_map[65] == 255 and v1.label_map[64] == 64 and v1.classes[64] == "Ego Vehicle"
    assert v2.label_map[123] == 255 and v2.label_map[122] == 122 and v2.classes[122] == "Static"
    assert v1.classes[0] == v2.classes[0] == "Bird" and v1.palette[0] == (165, 42, 42)
    assert v1.palette[13] == (128, 64, 128) and v1.classes[13] == "Road"
    assert set(DATASETS) == {"cityscapes", "mapillary", "camvid", "ade20k", "folder", "scalescenes"}


# ---------------------------------------------------------------- Cityscapes layout


def _cityscapes_tree(root: Path) -> None:
    raw = np.array([[7, 33, 0, 26], [8, 8, 34, 24], [11, 12, 13, 17]], np.uint8)
    for city, frame in (("aachen", "000019"), ("aachen", "000020"), ("bonn", "000001")):
        stem = f"{city}_000000_{frame}"
        _save(root / f"leftImg8bit/train/{city}/{stem}_leftImg8bit.png", _rgb(3, 4))
        _save(root / f"gtFine/train/{city}/{stem}_gtFine_labelIds.png", raw)
        _save(root / f"gtCoarse/train/{city}/{stem}_gtCoarse_labelIds.png", np.full((3, 4), 23, np.uint8))
    _save(root / "leftImg8bit/train_extra/erlangen/erlangen_000000_000005_leftImg8bit.png", _rgb(3, 4))
    _save(root / "gtCoarse/train_extra/erlangen/erlangen_000000_000005_gtCoarse_labelIds.png",
          np.full((3, 4), 24, np.uint8))


def test_cityscapes_fine_coarse_and_train_extra(tmp_path):
    _cityscapes_tree(tmp_path)
    ds = DATASETS["cityscapes"](tmp_path, "train")
    assert len(ds) == 3
    sample = ds[0]
    assert sample["name"] == "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    expected = torch.tensor([[0, 18, 255, 13], [1, 1, 255, 11], [2, 3, 4, 5]])
    assert sample["mask"].dtype == torch.int64 and torch.equal(sample["mask"], expected)
    assert sample["image"].shape == (3, 3, 4)
    coarse = cityscapes.make_dataset(tmp_path, "train", label_type="coarse")
    assert coarse.pairs[2][1].name == "bonn_000000_000001_gtCoarse_labelIds.png"
    assert (coarse[2]["mask"] == 10).all()  # labelId 23 (sky) → trainId 10
    extra = cityscapes.list_pairs(tmp_path, "train_extra")
    assert [p.name for p in extra[0]] == ["erlangen_000000_000005_leftImg8bit.png",
                                          "erlangen_000000_000005_gtCoarse_labelIds.png"]
    assert (cityscapes.make_dataset(tmp_path, "train_extra")[0]["mask"] == 11).all()  # 24 person → 11
    with pytest.raises(ConfigError, match="train_extra"):
        cityscapes.list_pairs(tmp_path, "train_extra", "fine")
    with pytest.raises(ConfigError, match="label_type 'medium'"):
        cityscapes.make_dataset(tmp_path, "train", label_type="medium")


def test_cityscapes_missing_counterparts(tmp_path):
    _cityscapes_tree(tmp_path)
    label = tmp_path / "gtFine/train/bonn/bonn_000000_000001_gtFine_labelIds.png"
    label.unlink()
    with pytest.raises(DataError, match="bonn_000000_000001_leftImg8bit.png has no label"):
        cityscapes.make_dataset(tmp_path, "train")
    _save(label, np.zeros((3, 4), np.uint8))
    (tmp_path / "leftImg8bit/train/aachen/aachen_000000_000020_leftImg8bit.png").unlink()
    with pytest.raises(DataError, match="aachen_000000_000020_gtFine_labelIds.png has no image"):
        cityscapes.make_dataset(tmp_path, "train")
    with pytest.raises(DataError, match="leftImg8bit/val does not exist"):
        cityscapes.make_dataset(tmp_path, "val")


# ---------------------------------------------------------------- Mapillary and ADE20K layouts


def _jpg(path: Path, h: int = 4, w: int = 6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_rgb(h, w)).save(path, quality=95)
    return path


@pytest.mark.parametrize("version,unlabeled", [("v1.2", 65), ("v2.0", 123)])
def test_mapillary_layout_and_unlabeled(tmp_path, version, unlabeled):
    for stem in ("b", "a"):
        _jpg(tmp_path / f"training/images/{stem}.jpg")
        _save(tmp_path / f"training/{version}/labels/{stem}.png",
              np.array([[0, 3, unlabeled, unlabeled - 1, 1, 2]] * 4, np.uint8))
    ds = mapillary.make_dataset(tmp_path, "train", version=version)
    assert len(ds) == 2 and ds.spec.num_classes == unlabeled
    assert ds[0]["name"] == "training/images/a.jpg"
    assert ds[0]["mask"][0].tolist() == [0, 3, 255, unlabeled - 1, 1, 2]
    # a raw id above Unlabeled is not silently ignored
    _save(tmp_path / f"training/{version}/labels/a.png", np.full((4, 6), unlabeled + 1, np.uint8))
    with pytest.raises(DataError, match=rf"a\.png has ids \[{unlabeled + 1}\]"):
        ds[0]
    _jpg(tmp_path / "training/images/c.jpg")
    with pytest.raises(DataError, match=r"c\.jpg has no label"):
        mapillary.make_dataset(tmp_path, "training", version=version)
    with pytest.raises(ConfigError, match="version 'v3'"):
        mapillary.make_dataset(tmp_path, "train", version="v3")


def test_ade20k_reduce_zero_label(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    _jpg(base / "images/validation/ADE_val_00000001.jpg", 2, 3)
    _save(base / "annotations/validation/ADE_val_00000001.png", np.array([[0, 1, 150], [2, 0, 75]], np.uint8))
    ds = ade20k.make_dataset(tmp_path, "val")  # the parent of ADEChallengeData2016 is accepted
    assert ds[0]["mask"].tolist() == [[255, 0, 149], [1, 255, 74]]
    assert ds[0]["name"] == "ADEChallengeData2016/images/validation/ADE_val_00000001.jpg"
    _save(base / "annotations/validation/ADE_val_00000001.png", np.array([[151, 1, 1], [1, 1, 1]], np.uint8))
    with pytest.raises(DataError, match=r"ADE_val_00000001\.png has ids \[151\] outside the classes 1\.\.150 and the ignore id 0"):
        ade20k.make_dataset(base, "validation")[0]
    _save(base / "annotations/validation/ADE_val_00000002.png", np.zeros((2, 3), np.uint8))
    with pytest.raises(DataError, match=r"ADE_val_00000002\.png has no image"):
        ade20k.make_dataset(base, "val")


# ---------------------------------------------------------------- CamVid (list files) and folder datasets


def test_camvid_list_with_path_prefix(tmp_path):
    _save(tmp_path / "train/x.png", _rgb(2, 3))
    _save(tmp_path / "trainannot/x.png", np.array([[0, 11, 10], [3, 11, 5]], np.uint8))
    (tmp_path / "train.txt").write_text("/SegNet/CamVid/train/x.png /SegNet/CamVid/trainannot/x.png\n\n")
    ds = camvid.make_dataset(tmp_path, "train")
    assert len(ds) == 1 and ds[0]["mask"].tolist() == [[0, 255, 10], [3, 255, 5]]
    assert ds[0]["name"] == "train/x.png"
    (tmp_path / "val.txt").write_text("train/x.png trainannot/x.png\ntrain/x.png trainannot/y.png\n")
    with pytest.raises(DataError, match=r"val\.txt:2: file 'trainannot/y\.png' not found"):
        camvid.make_dataset(tmp_path, "val")
    (tmp_path / "val.txt").write_text("train/x.png trainannot/x.png extra\n")
    with pytest.raises(DataError, match=r"val\.txt:1: expected 'image label' \(2 fields\), got 3"):
        camvid.make_dataset(tmp_path, "val")


def _folder_data(root: Path, mask: np.ndarray) -> None:
    _save(root / "img/train/a.png", _rgb(*mask.shape))
    _save(root / "ann/train/a.png", mask)
    (root / "train.txt").write_text("img/train/a.png ann/train/a.png\n")


def test_folder_list_and_folder_modes(tmp_path):
    _folder_data(tmp_path, np.array([[0, 1, 2], [200, 2, 1]], np.uint8))
    ds = folder.make_dataset(tmp_path, "train", classes=["a", "b", "c"], ignore_index=200)
    assert ds[0]["mask"].tolist() == [[0, 1, 2], [255, 2, 1]]
    assert ds.spec.palette == ((0, 0, 0), (128, 0, 0), (0, 128, 0))  # generated (VOC) palette
    _save(tmp_path / "img/train/b.jpg", _rgb(2, 3))
    _save(tmp_path / "ann/train/b_mask.png", np.array([[2, 2, 2], [0, 0, 0]], np.uint8))
    _save(tmp_path / "ann/train/a_mask.png", np.array([[1, 1, 1], [1, 1, 200]], np.uint8))
    ds = DATASETS["folder"](tmp_path, "train", classes=["a", "b", "c"], palette=[(1, 2, 3), (4, 5, 6), (7, 8, 9)],
                            ignore_index=200, image_dir="img/{split}", mask_dir="ann/{split}", mask_suffix="_mask.png")
    assert [p[0].name for p in ds.pairs] == ["a.png", "b.jpg"]
    assert ds[0]["mask"].tolist() == [[1, 1, 1], [1, 1, 255]]
    assert ds[1]["mask"].tolist() == [[2, 2, 2], [0, 0, 0]]
    assert ds.spec.palette[2] == (7, 8, 9)
    (tmp_path / "ann/train/b_mask.png").unlink()
    with pytest.raises(DataError, match=r"b\.jpg has no mask"):
        folder.make_dataset(tmp_path, "train", classes=["a", "b", "c"], image_dir="img/{split}", mask_dir="ann/{split}",
                            mask_suffix="_mask.png")
    with pytest.raises(ConfigError, match="ignore_index 1 must be in 3..255"):
        folder.make_dataset(tmp_path, "train", classes=["a", "b", "c"], ignore_index=1)
    with pytest.raises(ConfigError, match="palette must hold 3 RGB triples"):
        folder.make_dataset(tmp_path, "train", classes=["a", "b", "c"], palette=[(0, 0, 0)])


# ---------------------------------------------------------------- label checks and broken files


def test_out_of_range_label_names_file_and_values(tmp_path):
    _folder_data(tmp_path, np.array([[0, 1, 5], [7, 2, 255]], np.uint8))
    ds = folder.make_dataset(tmp_path, "train", classes=["a", "b", "c"])
    with pytest.raises(DataError) as err:
        ds[0]
    message = str(err.value)
    assert "ann/train/a.png" in message and "[5, 7]" in message and "outside the classes 0..2 and the ignore id 255" in message
    assert "\n" not in message


def test_corrupt_or_truncated_image(tmp_path):
    _folder_data(tmp_path, np.zeros((8, 8), np.uint8))
    image = tmp_path / "img/train/a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(image)
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])  # truncated PNG
    ds = folder.make_dataset(tmp_path, "train", classes=["a"])
    with pytest.raises(DataError, match=r"cannot read image .*img/train/a\.png"):
        ds[0]
    image.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"cannot read image .*img/train/a\.png"):
        ds[0]


def test_size_mismatch_and_rgb_label(tmp_path):
    _folder_data(tmp_path, np.zeros((2, 3), np.uint8))
    _save(tmp_path / "img/train/a.png", _rgb(3, 3))
    ds = folder.make_dataset(tmp_path, "train", classes=["a"])
    with pytest.raises(DataError, match=r"label .*ann/train/a\.png is 3×2 \(W×H\) but image .*a\.png is 3×3"):
        ds[0]
    _save(tmp_path / "ann/train/a.png", _rgb(3, 3))
    with pytest.raises(DataError, match="has mode RGB"):
        ds[0]


def test_empty_dataset(tmp_path):
    (tmp_path / "train.txt").write_text("\n")
    with pytest.raises(DataError, match="is empty"):
        folder.make_dataset(tmp_path, "train", classes=["a"])
    (tmp_path / "training/images").mkdir(parents=True)
    (tmp_path / "training/v1.2/labels").mkdir(parents=True)
    with pytest.raises(DataError, match="mapillary v1.2 split 'train' .* is empty"):
        mapillary.make_dataset(tmp_path, "train")


def test_augmentation_is_a_function_of_seed_epoch_index(tmp_path):
    rng = np.random.default_rng(1)
    _save(tmp_path / "img/train/a.png", rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    _save(tmp_path / "ann/train/a.png", rng.integers(0, 3, (12, 16), dtype=np.uint8))
    (tmp_path / "train.txt").write_text("img/train/a.png ann/train/a.png\n" * 2)
    transform = train_transform((6, 6), (0.5,) * 3, (0.25,) * 3)
    ds = folder.make_dataset(tmp_path, "train", transform, classes=["a", "b", "c"], seed=3)
    state = torch.get_rng_state()
    first, again = ds[(2, 1)], ds[(2, 1)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left untouched
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["mask"], again["mask"])
    others = [ds[(epoch, 1)]["image"] for epoch in range(3, 6)]
    assert any(not torch.equal(first["image"], other) for other in others)


# ---------------------------------------------------------------- real CamVid


def test_camvid_real_data(camvid_root):
    train = camvid.make_dataset(camvid_root, "train")
    val = camvid.make_dataset(camvid_root, "val")
    assert (len(train), len(val)) == (367, 101)
    sample = val[0]
    assert sample["image"].shape == (3, 360, 480) and sample["mask"].shape == (360, 480)
    values = set(sample["mask"].unique().tolist())
    assert values <= set(range(11)) | {255}
    raw = torch.from_numpy(read_label(val.pairs[0][1])).long()
    assert torch.equal(sample["mask"], torch.where(raw == 11, 255, raw))
