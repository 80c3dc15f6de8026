"""colorize / overlay / atomic PNG + HTML writing / attention images."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from scaleseg.errors import ConfigError, DataError
from scaleseg.visualize import (
    atomic_write,
    attention_to_color,
    attention_to_image,
    colorize,
    overlay,
    save_png,
    write_html,
)

PALETTE3 = [(128, 64, 128), (244, 35, 232), (70, 70, 70)]


def test_colorize_list_palette_ignore_and_unknown_are_black():
    labels = np.array([[0, 1, 2], [255, 7, -1]])
    out = colorize(labels, PALETTE3)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[0], np.array(PALETTE3, np.uint8))
    np.testing.assert_array_equal(out[1], np.zeros((3, 3), np.uint8))


def test_colorize_256_palette_tensor_input_blacks_out_ignore():
    pal = np.random.default_rng(0).integers(1, 256, (256, 3)).astype(np.uint8)
    labels = torch.tensor([[0, 17], [254, 255]])
    out = colorize(labels, pal)
    np.testing.assert_array_equal(out[0, 0], pal[0])
    np.testing.assert_array_equal(out[0, 1], pal[17])
    np.testing.assert_array_equal(out[1, 0], pal[254])
    np.testing.assert_array_equal(out[1, 1], [0, 0, 0])  # ignore stays black even though pal[255] is set
    np.testing.assert_array_equal(colorize(labels, pal, ignore_index=11)[1, 1], pal[255])


def test_colorize_rejects_bad_palette_and_float_labels():
    with pytest.raises(ConfigError, match="palette"):
        colorize(np.zeros((2, 2), int), [(1, 2)])
    with pytest.raises(ConfigError, match="palette"):
        colorize(np.zeros((2, 2), int), [(1, 2, 300)])
    with pytest.raises(DataError, match="dtype"):
        colorize(np.zeros((2, 2), np.float32), PALETTE3)


def test_overlay_arithmetic_and_masks():
    image = np.array([[[100, 100, 100], [10, 20, 30]]], np.uint8)
    color = np.array([[[200, 0, 51], [0, 0, 0]]], np.uint8)
    out = overlay(image, color, alpha=0.25)
    # 0.75*100 + 0.25*200 = 125; 0.75*100 = 75; 0.75*100 + 0.25*51 = 87.75 -> 88; black pixel shows the image
    np.testing.assert_array_equal(out, [[[125, 75, 88], [10, 20, 30]]])
    forced = overlay(image, color, alpha=0.5, mask=np.array([[False, True]]))
    np.testing.assert_array_equal(forced, [[[100, 100, 100], [5, 10, 15]]])
    np.testing.assert_array_equal(overlay(image, color, alpha=1.0, mask=np.ones((1, 2), bool)), color)
    with pytest.raises(ConfigError, match="alpha"):
        overlay(image, color, alpha=1.5)
    with pytest.raises(DataError, match="overlay"):
        overlay(image, color[:, :1])


def test_save_png_label_roundtrip_exact_and_atomic(tmp_path):
    labels = np.random.default_rng(1).integers(0, 19, (13, 17))
    labels[0, :4] = 255
    path = save_png(tmp_path / "a" / "b" / "labels.png", labels)  # int64 input, nested folders created
    assert path == tmp_path / "a" / "b" / "labels.png"
    with Image.open(path) as img:
        assert img.mode == "L"
        np.testing.assert_array_equal(np.array(img), labels)
    assert sorted(p.name for p in path.parent.iterdir()) == ["labels.png"]


def test_save_png_palette_mode(tmp_path):
    labels = torch.tensor([[0, 1], [2, 255]], dtype=torch.int64)
    path = save_png(tmp_path / "pal.png", labels, palette=PALETTE3)
    with Image.open(path) as img:
        assert img.mode == "P"
        np.testing.assert_array_equal(np.array(img), labels.numpy())  # indices, not colours
        pal = np.array(img.getpalette()[: 3 * 3]).reshape(3, 3)
        np.testing.assert_array_equal(pal, PALETTE3)
        rgb = np.array(img.convert("RGB"))
    np.testing.assert_array_equal(rgb[0, 1], PALETTE3[1])


def test_save_png_rgb_and_uint16_and_overwrite(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (5, 6, 3)).astype(np.uint8)
    path = tmp_path / "img.png"
    save_png(path, np.zeros((5, 6, 3), np.uint8))
    save_png(path, rgb)  # replaces the existing file
    with Image.open(path) as img:
        assert img.mode == "RGB"
        np.testing.assert_array_equal(np.array(img), rgb)
    big = np.array([[0, 1000], [26001, 33]])
    save_png(tmp_path / "inst.png", big)
    with Image.open(tmp_path / "inst.png") as img:
        np.testing.assert_array_equal(np.array(img), big)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png", "inst.png"]
    with pytest.raises(DataError, match="dtype"):
        save_png(tmp_path / "f.png", np.zeros((2, 2), np.float32))
    with pytest.raises(DataError, match="-1"):
        save_png(tmp_path / "neg.png", np.array([[0, -1]]))


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "page.html"
    path.write_text("old")

    def boom(fh):
        fh.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, boom)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["page.html"]


def test_attention_images():
    attn = np.array([[0.0, 0.5, 1.0], [1.2, -0.1, 0.25]])
    np.testing.assert_array_equal(attention_to_image(attn), [[0, 128, 255], [255, 0, 64]])
    assert attention_to_image(torch.tensor(attn)).dtype == np.uint8
    col = attention_to_color(np.array([[0.0, 0.5, 1.0]]))
    # jet: 0 -> dark blue, 0.5 -> (0.5, 1, 0.5), 1 -> dark red
    np.testing.assert_array_equal(col[0], [[0, 0, 128], [128, 255, 128], [128, 0, 0]])
    with pytest.raises(DataError, match="NaN"):
        attention_to_image(np.array([[np.nan]]))


def test_write_html_grid(tmp_path):
    rows = [
        {"image": "img/0.png", "prediction": "pred/0.png"},
        {"image": "img/1 b.png", "prediction": "pred/1.png"},
    ]
    path = write_html(
        tmp_path / "out" / "index.html", "CamVid <val>", rows, header="3 images",
        table_html="<pre>mIoU 50.00</pre>",
    )
    text = path.read_text(encoding="utf-8")
    assert text.count('<div class="row">') == 2
    for src in ["img/0.png", "pred/0.png", "img/1%20b.png", "pred/1.png"]:
        assert f'<img src="{src}"' in text
    assert "<figcaption>prediction</figcaption>" in text
    assert "<title>CamVid &lt;val&gt;</title>" in text
    assert "<pre>mIoU 50.00</pre>" in text and "<p>3 images</p>" in text
    assert text.index("img/0.png") < text.index("img/1%20b.png")
    assert [p.name for p in path.parent.iterdir()] == ["index.html"]
