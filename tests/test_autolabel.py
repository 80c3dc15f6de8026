"""Auto-labelling: confidence thresholding at load time, human-coarse merging, dataset unions, and the
``autolabel`` teacher dump (files, resume, sharding, confidence = round(255 · max softmax))."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from scaleseg.config import load_config
from scaleseg.data import cityscapes
from scaleseg.data.autolabel import (
    DEFAULT_THRESHOLD,
    AutolabelDataset,
    UnionDataset,
    apply_confidence,
    autolabel_paths,
    mix_autolabelled,
    with_autolabels,
)
from scaleseg.data.base import SegDataset
from scaleseg.data.spec import DatasetSpec
from scaleseg.data.uniform import build_index, index_key
from scaleseg.engine import autolabel as engine
from scaleseg.engine.checkpoint import save_weights
from scaleseg.errors import ConfigError, DataError
from scaleseg.models.factory import create_model
from scaleseg.models.hmsa import HierarchicalAttention

SPEC = DatasetSpec("toy", ("a", "b", "c", "d"), ((0, 0, 0), (1, 1, 1), (2, 2, 2), (3, 3, 3)))
TINY = [
    "model.arch=deeplabv3plus", "model.backbone=test_resnet", "model.head_channels=16",
    "data.dataset=scalescenes", "data.num_images=4", "data.image_size=[32,64]",
    "eval.num_workers=0", "train.accelerator=cpu",
]


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


# ---------------------------------------------------------------- loading auto-labels


def _autolabelled(tmp_path: Path) -> tuple[SegDataset, np.ndarray, np.ndarray, Path]:
    """One 4×6 image under root/city/, a human label, and auto-label + confidence under labels/city/."""
    root, labels = tmp_path / "root", tmp_path / "labels"
    image = _save(root / "city" / "x_leftImg8bit.png", np.full((4, 6, 3), 90, np.uint8))
    human = np.full((4, 6), 255, np.uint8)
    human[0, :3] = 2
    human[3, 5] = 1
    human_path = _save(root / "coarse" / "x.png", human)
    auto = np.array([[0, 1, 2, 3, 0, 1]] * 4, np.uint8)
    conf = np.array([[255, 230, 229, 128, 127, 0],
                     [240, 231, 200, 140, 120, 250],
                     [229, 230, 230, 229, 255, 0],
                     [100, 100, 100, 100, 100, 100]], np.uint8)
    label_path, conf_path = autolabel_paths(labels, "city/x_leftImg8bit.png")
    assert label_path == labels / "city" / "x_leftImg8bit.png" and conf_path == labels / "city" / "x_leftImg8bit_conf.png"
    _save(label_path, auto)
    _save(conf_path, conf)
    return SegDataset([(image, human_path)], SPEC, root=root), auto, conf, labels


def test_threshold_turns_exactly_the_low_confidence_pixels_into_ignore(tmp_path):
    base, auto, conf, labels = _autolabelled(tmp_path)
    ds = with_autolabels(base, labels)
    assert DEFAULT_THRESHOLD == 0.9 and ds.threshold == 0.9  # the paper's value is the default
    expected = auto.copy()
    for r in range(4):  # plain-loop reference: conf/255 < 0.9 → ignore (229/255 = 0.898, 230/255 = 0.902)
        for c in range(6):
            if conf[r, c] / 255.0 < 0.9:
                expected[r, c] = 255
    got = ds.load_label(0)
    assert np.array_equal(got, expected)
    assert (got == 255).sum() == 16  # 4 + 3 + 3 + 6 by hand
    sample = ds[0]
    assert torch.equal(sample["mask"], torch.from_numpy(expected).long()) and sample["name"] == "city/x_leftImg8bit.png"
    half = with_autolabels(base, labels, 0.5).load_label(0)  # NVIDIA's released value
    assert np.array_equal(half, np.where(conf / 255.0 < 0.5, 255, auto))
    assert np.array_equal(apply_confidence(auto, conf, 0.0), auto)
    with pytest.raises(ConfigError, match="threshold"):
        with_autolabels(base, labels, 1.5)


def test_human_coarse_pixels_of_chosen_classes_are_merged(tmp_path):
    base, auto, conf, labels = _autolabelled(tmp_path)
    merged = AutolabelDataset(base, labels, 0.9, merge_classes=[2]).load_label(0)
    expected = np.where(conf / 255.0 < 0.9, 255, auto)
    expected[0, :3] = 2  # human class-2 pixels join the class-2 region, even where the teacher was unsure
    assert np.array_equal(merged, expected)
    assert merged[3, 5] == 255  # human class 1 is not in the merge list
    with pytest.raises(ConfigError, match="merge classes"):
        AutolabelDataset(base, labels, merge_classes=[9])


def test_labels_are_matched_with_leading_folders_dropped_and_missing_ones_fail(tmp_path):
    base, auto, _, labels = _autolabelled(tmp_path)
    nested = SegDataset([(base.pairs[0][0], base.pairs[0][1])], SPEC, root=tmp_path)  # name root/city/x...
    assert nested.name(0) == "root/city/x_leftImg8bit.png"
    assert AutolabelDataset(nested, labels).pairs[0][1] == labels / "city" / "x_leftImg8bit.png"
    other = _save(tmp_path / "root" / "city" / "y_leftImg8bit.png", np.zeros((4, 6, 3), np.uint8))
    with pytest.raises(DataError, match="has no auto-label: expected .*y_leftImg8bit.png"):
        with_autolabels(SegDataset([(other, None)], SPEC, root=tmp_path / "root"), labels)
    _, conf_path = autolabel_paths(labels, "city/x_leftImg8bit.png")
    conf_path.unlink()
    with pytest.raises(DataError, match="no confidence map"):
        with_autolabels(base, labels).load_label(0)


def test_cityscapes_autolabelled_train_extra_merges_gtcoarse(tmp_path):
    root, labels = tmp_path / "cs", tmp_path / "auto"
    _save(root / "leftImg8bit/train_extra/ulm/ulm_000001_000002_leftImg8bit.png", np.zeros((4, 6, 3), np.uint8))
    coarse = np.zeros((4, 6), np.uint8)  # labelId 0 → ignore
    coarse[1, 1:3] = 28  # labelId 28 = bus = train id 15
    coarse[2, 0] = 26  # car (13), not merged
    _save(root / "gtCoarse/train_extra/ulm/ulm_000001_000002_gtCoarse_labelIds.png", coarse)
    auto = np.full((4, 6), 0, np.uint8)
    # written for input <root>/leftImg8bit/train_extra → names relative to it
    _save(labels / "ulm/ulm_000001_000002_leftImg8bit.png", auto)
    _save(labels / "ulm/ulm_000001_000002_leftImg8bit_conf.png", np.full((4, 6), 250, np.uint8))
    ds = cityscapes.make_autolabelled(root, labels)
    got = ds.load_label(0)
    expected = np.zeros((4, 6), np.uint8)
    expected[1, 1:3] = 15
    assert np.array_equal(got, expected)
    assert cityscapes.COARSE_MERGE_CLASSES == (14, 15, 16) and len(cityscapes.COARSE_BOOST_CLASSES) == 13


def test_union_keeps_indices_seeds_and_the_index_key(tmp_path):
    base, auto, _, labels = _autolabelled(tmp_path)
    auto_ds = with_autolabels(base, labels)
    union, num_images = mix_autolabelled(base, auto_ds, "boost")
    assert len(union) == 2 and num_images == 1
    assert mix_autolabelled(base, auto_ds, "append")[1] == 2
    assert np.array_equal(union.load_label(1), auto_ds.load_label(0))
    assert np.array_equal(union.load_label(0), base.load_label(0))
    assert union.name(1) == "city/x_leftImg8bit.png"
    s = union[(3, 1, (2.0, 1.0))]
    assert s["index"] == 1 and torch.equal(s["mask"], torch.from_numpy(auto_ds.load_label(0)).long())
    index = build_index(union, 4, workers=0, progress=False)
    assert set(index.image.tolist()) == {0, 1}
    key = index_key(union, 4)
    _, conf_path = autolabel_paths(labels, "city/x_leftImg8bit.png")
    st = os.stat(conf_path)
    os.utime(conf_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new confidence map → new key
    assert index_key(union, 4) != key
    with pytest.raises(ConfigError, match="classes differ"):
        other = DatasetSpec("other", ("a",), ((0, 0, 0),))
        UnionDataset([base, SegDataset(base.pairs, other)])
    with pytest.raises(ConfigError, match="mix mode"):
        mix_autolabelled(base, auto_ds, "both")  # type: ignore[arg-type]


# ---------------------------------------------------------------- the teacher dump


def _images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    sizes = [(32, 48), (32, 48), (32, 48), (24, 40), (24, 40)]
    return [_save(folder / ("sub" if i % 2 else "") / f"im{i}.png", rng.integers(0, 255, (*s, 3), dtype=np.uint8))
            for i, s in enumerate(sizes)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = load_config(None, TINY + [f"output_dir={tmp}"])
    torch.manual_seed(0)
    model = create_model(cfg, 8)
    ckpt = tmp / "model.safetensors"
    save_weights(model, ckpt)
    return cfg, model.eval(), ckpt


def test_autolabel_writes_labels_and_confidences_and_resumes(tmp_path, monkeypatch, tiny):
    cfg, model, ckpt = tiny
    inputs = tmp_path / "in"
    images = _images(inputs)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = engine.teacher_logits

    def spy(teacher, x):
        logits = real(teacher, x)
        seen.append((x.clone(), logits.clone()))
        return logits

    monkeypatch.setattr(engine, "teacher_logits", spy)
    out = tmp_path / "out"
    written = engine.autolabel(cfg, ckpt, [inputs], out, batch_size=2)
    rels = [p.relative_to(inputs) for p in images]
    assert sorted(written) == sorted(autolabel_paths(out, r)[0] for r in rels)
    assert len(list(out.rglob("*_conf.png"))) == 5 and len(list(out.rglob("*.png"))) == 10
    assert sum(x.shape[0] for x, _ in seen) == 5
    # the teacher is the flip average of the model's logits; files hold argmax and round(255·max softmax)
    by_shape = {}
    for x, logits in seen:
        with torch.inference_mode():
            ref = 0.5 * (model(x) + model(x.flip(-1)).flip(-1))
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
        by_shape.setdefault(tuple(x.shape[-2:]), []).extend(zip(x, logits))
    for rel in rels:
        x_img = torch.from_numpy(np.array(Image.open(inputs / rel))).permute(2, 0, 1).float() / 255
        x_ref = (x_img - torch.tensor(model.mean).view(3, 1, 1)) / torch.tensor(model.std).view(3, 1, 1)
        (_, logits), = [(x, lg) for x, lg in by_shape[tuple(x_img.shape[-2:])] if torch.allclose(x, x_ref, atol=1e-5)]
        label_path, conf_path = autolabel_paths(out, rel)
        label, conf = np.array(Image.open(label_path)), np.array(Image.open(conf_path))
        prob = torch.softmax(logits.double(), 0)
        assert label.dtype == np.uint8 and conf.dtype == np.uint8 and label.shape == tuple(x_img.shape[-2:])
        assert np.array_equal(label, prob.argmax(0).numpy())
        exact = prob.max(0).values.numpy() * 255
        near_half = np.abs(exact - np.floor(exact) - 0.5) < 1e-3  # float32 vs float64 rounding ties
        assert np.array_equal(conf[~near_half], np.round(exact)[~near_half].astype(np.uint8))
        assert np.abs(conf.astype(int) - np.round(exact)).max() <= 1

    # resume: delete outputs of two images (one label only, one confidence only) → only they are redone
    autolabel_paths(out, rels[1])[1].unlink()
    autolabel_paths(out, rels[3])[0].unlink()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    seen.clear()
    again = engine.autolabel(cfg, ckpt, [inputs], out, batch_size=2)
    assert sorted(again) == sorted(autolabel_paths(out, rels[i])[0] for i in (1, 3))
    assert sum(x.shape[0] for x, _ in seen) == 2
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p.exists() and rels[1].stem not in p.name
               and rels[3].stem not in p.name)
    seen.clear()
    assert engine.autolabel(cfg, ckpt, [inputs], out) == [] and not seen  # all done: nothing to do
    inner = inputs / "auto"  # an output folder inside the input folder: its PNGs are not inputs
    assert len(engine.autolabel(cfg, ckpt, [inputs], inner, flip=False)) == 5
    assert len(engine.autolabel(cfg, ckpt, [inputs], inner, flip=False)) == 0


def test_autolabel_shards_by_rank_from_the_environment(tmp_path, monkeypatch, tiny):
    cfg, _, ckpt = tiny
    inputs = tmp_path / "in"
    _images(inputs)
    files = [rel for _, rel in engine.collect_images([inputs])]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    written = engine.autolabel(cfg, ckpt, [inputs], tmp_path / "out", flip=False)
    assert sorted(written) == sorted(autolabel_paths(tmp_path / "out", r)[0] for r in files[1::2])
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK"):
        engine.autolabel(cfg, ckpt, [inputs], tmp_path / "out")


def test_hierarchical_teacher_is_the_flip_averaged_attention_chain(tiny):
    cfg, model, _ = tiny
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 48)
    with torch.inference_mode():
        channels = model.forward_features(x)["feats"].shape[1]
        hmsa = HierarchicalAttention(model, channels).eval()
        teacher = engine.build_teacher(hmsa, cfg, scales=None, flip=True)
        got = engine.teacher_logits(teacher, x)
        chain = lambda t: hmsa.forward_features(t, scales=[0.5, 1.0, 2.0])["logits"]  # noqa: E731
        ref = 0.5 * (chain(x) + chain(x.flip(-1)).flip(-1))
        assert got.shape == (2, 8, 32, 48)
        torch.testing.assert_close(got, ref)
        one = engine.teacher_logits(engine.build_teacher(hmsa, cfg, scales=[1.0], flip=False), x)
        torch.testing.assert_close(one, model(x))  # single scale: the base model itself
    with pytest.raises(ConfigError, match="1.0"):
        engine.build_teacher(hmsa, cfg, scales=[0.5, 2.0])


def test_conf_is_round_255_max_softmax():
    logits = torch.tensor([[[[0.0]], [[0.0]]], [[[3.0]], [[-1.0]]]]).reshape(2, 2, 1, 1)
    label, conf = engine.labels_and_confidence(logits)
    assert label.ravel().tolist() == [0, 0]
    p = 1 / (1 + np.exp(-4.0))
    assert conf.ravel().tolist() == [round(0.5 * 255), round(p * 255)]
    assert F.softmax(logits, 1).amax(1).shape == conf.shape
