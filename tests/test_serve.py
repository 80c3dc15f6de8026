"""`scaleseg serve`'s app through FastAPI's TestClient: REST answers, bad input, size limits."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import scaleseg
from scaleseg.config import load_config
from scaleseg.engine.evaluate import normalize
from scaleseg.engine.task import make_predictor

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from scaleseg.serve import ServeSettings, build_app  # noqa: E402

HMSA = ["model.backbone=test_resnet", "model.head_channels=16", "model.output_stride=8",
        "model.hmsa.mode=hierarchical", "model.hmsa.attn_channels=8", "eval.scales=[0.5,1.0,2.0]"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = scaleseg.create_model(load_config(None, HMSA))
    return model.save_pretrained(tmp_path_factory.mktemp("serve") / "hmsa")


@pytest.fixture(scope="module")
def client(run_dir: Path) -> TestClient:
    return TestClient(build_app(run_dir, settings=ServeSettings(max_side=96, max_upload_bytes=300_000)))


def _png(h: int, w: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _expected_labels(run_dir: Path, image: np.ndarray) -> np.ndarray:
    model = scaleseg.from_pretrained(run_dir)
    with torch.inference_mode():
        logits = make_predictor(model, model.scaleseg_config)(normalize(image[None], model.mean, model.std, torch.device("cpu")))
    return logits.argmax(1)[0].to(torch.uint8).numpy()


def test_health_and_info(client: TestClient) -> None:
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["num_classes"] == 8
    info = client.get("/info").json()
    assert [c["name"] for c in info["classes"]][:3] == ["sky", "building", "vegetation"]
    assert info["scales"] == [0.5, 1.0, 2.0] and info["fusion"] == "hierarchical"
    assert info["attention_scales"] == [1.0, 0.5]
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/predict", "/health"}
    page = client.get("/")
    assert page.status_code == 200 and 'id="legend"' in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/nope.js").status_code == 404


def test_predict_png_equals_the_predictor(client: TestClient, run_dir: Path) -> None:
    data = _png(70, 90)
    response = client.post("/predict", files={"file": ("a.png", data, "image/png")})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-resize"] == "none" and response.headers["x-image-size"] == "90x70"
    assert float(response.headers["x-inference-ms"]) > 0
    labels = np.array(Image.open(io.BytesIO(response.content)))
    image = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    assert labels.dtype == np.uint8 and labels.shape == (70, 90)
    assert np.array_equal(labels, _expected_labels(run_dir, image))


def test_predict_json_shares_and_attention(client: TestClient) -> None:
    response = client.post("/predict?format=json", files={"file": ("a.png", _png(70, 90, seed=1), "image/png")})
    assert response.status_code == 200
    body = response.json()
    labels = np.array(Image.open(io.BytesIO(_decode(body["label_png"]))))
    counts = np.bincount(labels.ravel(), minlength=8)
    assert [c["pixels"] for c in body["classes"]] == counts[:8].tolist()
    assert sum(c["share"] for c in body["classes"]) == pytest.approx(1.0)
    assert body["classes"][3] == {"id": 3, "name": "road", "color": [128, 64, 128], "pixels": int(counts[3]),
                                  "share": pytest.approx(counts[3] / labels.size)}
    assert [a["scale"] for a in body["attention"]] == [0.5, 1.0]
    attn = Image.open(io.BytesIO(_decode(body["attention"][0]["png"])))
    assert attn.size == (90, 70) and attn.mode == "RGB"
    overlay = Image.open(io.BytesIO(_decode(body["overlay_png"])))
    assert overlay.size == (90, 70)
    colour = Image.open(io.BytesIO(_decode(body["color_png"])))
    assert colour.mode == "P" and np.array_equal(np.array(colour), labels)
    assert body["resize"]["mode"] == "none" and body["inference_ms"] > 0


def _decode(url: str) -> bytes:
    import base64

    assert url.startswith("data:image/png;base64,")
    return base64.b64decode(url.split(",", 1)[1])


def test_large_image_is_downscaled_and_says_so(client: TestClient, run_dir: Path) -> None:
    data = _png(150, 200, fmt="JPEG")
    response = client.post("/predict?format=json", files={"file": ("b.jpg", data, "image/jpeg")})
    resize = response.json()["resize"]
    assert resize["mode"] == "downscaled" and resize["inferred_size"] == [72, 96]
    assert "downscaled to 96×72" in resize["message"]
    png = client.post("/predict", files={"file": ("b.jpg", data, "image/jpeg")})
    labels = np.array(Image.open(io.BytesIO(png.content)))
    assert png.headers["x-resize"] == "downscaled" and labels.shape == (150, 200)
    small = np.array(Image.open(io.BytesIO(data)).convert("RGB").resize((96, 72), Image.BILINEAR))
    expected = np.array(Image.fromarray(_expected_labels(run_dir, small)).resize((200, 150), Image.NEAREST))
    assert np.array_equal(labels, expected)


def test_large_image_tiled(run_dir: Path) -> None:
    client = TestClient(build_app(run_dir, settings=ServeSettings(max_side=64, tile=True)))
    response = client.post("/predict?format=json", files={"file": ("c.png", _png(80, 100), "image/png")})
    resize = response.json()["resize"]
    assert resize["mode"] == "tiled" and resize["inferred_size"] == [80, 100]
    assert resize["windows"] == 4 and "sliding-window" in resize["message"]  # 2 rows × 2 columns of 64² windows


@pytest.mark.parametrize(("files", "status", "start"), [
    ({"file": ("x.txt", b"hello, not an image", "text/plain")}, 415, "not an image"),
    ({"file": ("t.png", _png(70, 90)[:400], "image/png")}, 400, "truncated or corrupt PNG file"),
    ({"file": ("e.png", b"", "image/png")}, 400, "empty upload"),
    ({"file": ("big.png", b"\x89PNG" + bytes(400_000), "image/png")}, 413, "upload of 0.4 MiB exceeds the 0.3 MiB limit"),
    ({"image": ("a.png", _png(8, 8), "image/png")}, 400, "missing image"),
])
def test_bad_uploads_are_one_line_4xx(client: TestClient, files: dict, status: int, start: str) -> None:
    response = client.post("/predict", files=files)
    assert response.status_code == status
    detail = response.json()["detail"]
    assert detail.startswith(start) and "\n" not in detail and "Traceback" not in detail


def test_bad_requests(client: TestClient, run_dir: Path) -> None:
    raw = client.post("/predict", content=_png(8, 8), headers={"content-type": "image/png"})
    assert raw.status_code == 415 and "multipart/form-data" in raw.json()["detail"]
    bad_format = client.post("/predict?format=xml", files={"file": ("a.png", _png(8, 8), "image/png")})
    assert bad_format.status_code == 422 and bad_format.json()["detail"].startswith("query.format:")
    # a decompression bomb is refused from the header, before decoding
    small = TestClient(build_app(run_dir, settings=ServeSettings(max_pixels=100_000)))
    bomb = io.BytesIO()
    Image.new("RGB", (1000, 1000)).save(bomb, "PNG")  # compresses to a few KB
    response = small.post("/predict", files={"file": ("bomb.png", bomb.getvalue(), "image/png")})
    assert response.status_code == 413 and response.json()["detail"].startswith("image of 1000×1000 = 1.0 MP exceeds")


def test_serve_overrides_only_eval(run_dir: Path) -> None:
    from scaleseg.errors import ConfigError

    app = build_app(run_dir, ["eval.scales=[1.0]"])
    assert TestClient(app).get("/info").json()["attention_scales"] == []
    with pytest.raises(ConfigError, match="eval.\\* overrides only"):
        build_app(run_dir, ["model.backbone=resnet18"])
