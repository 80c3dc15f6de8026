"""CLI behaviour: eval/predict outputs checked against hand computation, single-line errors, from_pretrained."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import scaleseg
from scaleseg.cli import main
from scaleseg.config import load_config, to_yaml
from scaleseg.data.scalescenes import ScaleScenes, export
from scaleseg.engine.checkpoint import save_weights

TINY = ["model.backbone=test_resnet", "model.head_channels=16", "data.dataset=scalescenes",
        "data.num_images=6", "data.image_size=[64,128]", "eval.num_workers=0", "eval.batch_size=2",
        "train.accelerator=cpu", "train.progress=false"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture
def trained(tmp_path):
    """A randomly initialised tiny model saved like a finished run: config.yaml + model.safetensors."""
    torch.manual_seed(0)
    cfg = load_config(None, TINY + [f"output_dir={tmp_path / 'run'}"])
    model = scaleseg.create_model(cfg)
    run = Path(cfg.output_dir)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    save_weights(model, run / "model.safetensors")
    (tmp_path / "tiny.yaml").write_text(to_yaml(cfg))
    return cfg, model.eval(), run


def normalise(image: np.ndarray, model) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    return (x - torch.tensor(model.mean).view(1, 3, 1, 1)) / torch.tensor(model.std).view(1, 3, 1, 1)


def test_eval_metrics_json_equals_hand_computed_confusion(tmp_path, trained, capsys):
    cfg, model, run = trained
    code, out, _ = run_cli(capsys, "eval", str(tmp_path / "tiny.yaml"), "--checkpoint", str(run / "model.safetensors"),
                           "--out", str(tmp_path / "ev"), "--quiet")
    assert code == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    k = 8
    mat = np.zeros((k, k), np.int64)
    val = ScaleScenes("val", num_images=6, size=(64, 128))
    with torch.no_grad():
        for i in range(len(val)):
            image, label = val.load_raw(i)
            pred = model(normalise(image, model)).argmax(1)[0].numpy()
            keep = label != 255
            np.add.at(mat, (label[keep], pred[keep]), 1)
    assert metrics["confusion_matrix"] == mat.tolist()
    inter = np.diag(mat).astype(float)
    union = mat.sum(0) + mat.sum(1) - inter
    present = union > 0
    assert metrics["mIoU"] == pytest.approx(100 * np.mean(inter[present] / union[present]))
    assert metrics["aAcc"] == pytest.approx(100 * inter.sum() / mat.sum())
    assert set(metrics) >= {"mIoU", "aAcc", "mAcc", "fwIoU", "per_class"}
    assert set(metrics["per_class"]) == set(val.spec.classes)
    assert "mIoU" in out  # the table is printed


def test_predict_writes_label_colour_overlay_matching_the_model(tmp_path, trained, capsys):
    cfg, model, run = trained
    export(tmp_path / "exp", "val", num_images=3, size=(64, 128))
    code, out, _ = run_cli(capsys, "predict", str(tmp_path / "tiny.yaml"), "--checkpoint", str(run / "model.safetensors"),
                           str(tmp_path / "exp" / "val"), "--out", str(tmp_path / "pred"), "--quiet", "--batch-size", "2")
    assert code == 0 and "3 images" in out, _
    images = sorted((tmp_path / "exp" / "val").glob("*.png"))
    for path in images:
        stem = tmp_path / "pred" / path.stem
        label = np.array(Image.open(f"{stem}_label.png"))
        with torch.no_grad():
            expected = model(normalise(np.array(Image.open(path).convert("RGB")), model)).argmax(1)[0].numpy()
        np.testing.assert_array_equal(label, expected)
        assert Image.open(f"{stem}_color.png").mode == "P"
        np.testing.assert_array_equal(np.array(Image.open(f"{stem}_color.png")), label)
        colour = np.array(Image.open(f"{stem}_color.png").convert("RGB"))
        palette = np.array(val_palette())
        np.testing.assert_array_equal(colour, palette[label])
        assert Image.open(f"{stem}_overlay.png").size == (128, 64)


def test_autolabel_command_writes_labels_and_confidences(tmp_path, trained, capsys):
    cfg, model, run = trained
    export(tmp_path / "exp", "val", num_images=3, size=(64, 128))
    code, out, err = run_cli(capsys, "autolabel", str(tmp_path / "tiny.yaml"), "--checkpoint", str(run / "model.safetensors"),
                             str(tmp_path / "exp" / "val"), "--out", str(tmp_path / "auto"), "--quiet")
    assert code == 0, err
    assert "3 images" in out
    assert len(list((tmp_path / "auto").glob("*_conf.png"))) == 3
    assert len([p for p in (tmp_path / "auto").glob("*.png") if not p.stem.endswith("_conf")]) == 3


def val_palette():
    from scaleseg.data.scalescenes import SCALESCENES

    return SCALESCENES.palette_array()


def test_from_pretrained_round_trip(trained):
    cfg, model, run = trained
    loaded = scaleseg.from_pretrained(run)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def single_line_error(capsys, *args: str) -> str:
    code, _, err = run_cli(capsys, *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_unknown_config_key_and_unknown_backbone(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  datset: camvid\n")
    assert "data.datset" in single_line_error(capsys, "train", str(cfg), "--quiet")
    cfg.write_text("model:\n  backbone: resnet5O\ndata:\n  dataset: scalescenes\n")
    msg = single_line_error(capsys, "train", str(cfg), f"output_dir={tmp_path / 'r'}", "--quiet")
    assert "resnet5O" in msg and "resnet50" in msg


def test_checkpoint_from_another_model(tmp_path, trained, capsys):
    _, _, run = trained
    msg = single_line_error(capsys, "eval", str(tmp_path / "tiny.yaml"), "model.arch=pspnet",
                            "--checkpoint", str(run / "model.safetensors"), "--out", str(tmp_path / "ev"), "--quiet")
    assert "model.safetensors" in msg and "another model" in msg
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    msg = single_line_error(capsys, "eval", str(tmp_path / "tiny.yaml"), "--checkpoint", str(bogus), "--out", str(tmp_path / "ev"), "--quiet")
    assert "bogus.ckpt" in msg


def folder_dataset(tmp_path: Path, label_value: int = 1, label_size=(16, 16), n: int = 2, corrupt: bool = False) -> Path:
    root = tmp_path / "mine"
    for split in ("train", "val"):
        (root / "img" / split).mkdir(parents=True, exist_ok=True)
        (root / "lab" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "img" / split / f"{i}.png")
            Image.fromarray(np.full(label_size, label_value, np.uint8)).save(root / "lab" / split / f"{i}.png")
    if corrupt:
        (root / "img" / "val" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def folder_args(root: Path) -> list[str]:
    return ["data.dataset=folder", f"data.root={root}", "data.image_dir=img/{split}", "data.mask_dir=lab/{split}",
            "data.classes=[a,b]", "data.num_images=null", "data.image_size=null"]


@pytest.mark.parametrize("case, expected", [
    ("label", "[7]"), ("size", "same size"), ("empty", "empty"), ("corrupt", "0.png"),
])
@pytest.mark.parametrize("workers", [0, 1])
def test_bad_data_gives_single_line_errors(tmp_path, trained, capsys, case, expected, workers):
    kwargs = {"label": dict(label_value=7), "size": dict(label_size=(8, 16)), "empty": dict(n=0), "corrupt": dict(corrupt=True)}[case]
    root = folder_dataset(tmp_path, **kwargs)
    args = [*folder_args(root), f"eval.num_workers={workers}"]
    weights = tmp_path / "two_class.safetensors"
    save_weights(scaleseg.create_model(load_config(tmp_path / "tiny.yaml", args)), weights)
    msg = single_line_error(capsys, "eval", str(tmp_path / "tiny.yaml"), *args, "--checkpoint", str(weights),
                            "--out", str(tmp_path / "ev"), "--quiet")
    assert expected in msg
    if case != "empty":
        assert str(root) in msg  # names the file


def test_eval_dump_scales_writes_per_scale_pictures(tmp_path, capsys):
    cfg = load_config(None, TINY + ["model.hmsa.mode=hierarchical", "model.hmsa.attn_channels=8",
                                    f"output_dir={tmp_path / 'run'}"])
    (tmp_path / "hmsa.yaml").write_text(to_yaml(cfg))
    save_weights(scaleseg.create_model(cfg), tmp_path / "hmsa.safetensors")
    code, out, err = run_cli(capsys, "eval", str(tmp_path / "hmsa.yaml"), "--checkpoint", str(tmp_path / "hmsa.safetensors"),
                             "--out", str(tmp_path / "ev"), "--scales", "0.5,1.0,2.0", "--dump-scales", "2", "--quiet")
    assert code == 0, err
    pictures = tmp_path / "ev" / "scales"
    assert len(list(pictures.glob("*_attn_0.5x.png"))) == 2 and len(list(pictures.glob("*_pred_2x.png"))) == 2
    assert "attn_1x" in (pictures / "index.html").read_text()
