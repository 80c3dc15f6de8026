"""`scaleseg serve` in a real browser: Debian's Chromium, headless, driven by Playwright.

The server runs on 127.0.0.1 in a thread (uvicorn); the test uploads a ScaleScenes image through the
page's file input and checks that the overlay appears, that the legend lists the classes with their
pixel shares and that the HMSA attention maps are shown; the label PNG from ``POST /predict`` must
equal ``scaleseg predict`` on the same file. A screenshot is saved in the test's tmp dir.

Needs ``/usr/bin/chromium`` (``apt-get install chromium``; ``.ci/run`` installs it) and the
``playwright`` package (no browser download: ``executable_path`` points at Debian's Chromium). Where
either is missing the test skips with the reason, except under ``CI=true``, where it fails.
"""
from __future__ import annotations

import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import scaleseg
from scaleseg.config import load_config

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("SCALESEG_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
IN_CI = os.environ.get("CI", "").lower() == "true"
TINY_HMSA = ["model.backbone=test_resnet", "model.head_channels=16", "model.output_stride=8",
             "model.hmsa.mode=hierarchical", "model.hmsa.attn_channels=8", "eval.scales=[0.5,1.0,2.0]",
             "data.dataset=scalescenes", "data.num_images=2", "data.image_size=[96,192]", "eval.num_workers=0"]


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the browser test must run; .ci/run installs chromium)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, run folder) of a live server bound to 127.0.0.1."""
    import uvicorn

    from scaleseg.serve import build_app

    torch.manual_seed(0)
    run = scaleseg.create_model(load_config(None, TINY_HMSA)).save_pretrained(tmp_path / "run")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(run), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the uvicorn server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", run
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _scalescenes_image(path: Path) -> Path:
    from scaleseg.data.scalescenes import generate

    image, _ = generate(0, "val", 0, size=(96, 192))  # H×W×3 uint8
    Image.fromarray(image).save(path)
    return path


def test_page_segments_an_upload_in_chromium(server: tuple[str, Path], tmp_path: Path) -> None:
    if not Path(CHROMIUM).is_file():
        _unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[test]')")
    url, run = server
    image = _scalescenes_image(tmp_path / "scene.png")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model-info').textContent.includes('classes')")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#result:not([hidden])", timeout=120_000)
            overlay = page.locator("#overlay-img")
            assert overlay.get_attribute("src").startswith("data:image/png;base64,")
            assert page.evaluate("document.getElementById('overlay-img').naturalWidth") == 192
            names = page.locator("#legend tbody .class-name").all_text_contents()
            assert names == ["sky", "building", "vegetation", "road", "sidewalk", "car", "pole", "wire"]
            shares = [float(s.split()[0]) for s in page.locator("#legend tbody .share").all_text_contents()]
            assert sum(shares) == pytest.approx(100.0, abs=0.05)
            assert page.locator("#attention .attention-map").count() == 2  # gates of the 1.0 and 0.5 runs
            assert "inference" in page.locator("#timing").text_content()
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
            # the REST label PNG, from the same browser context
            response = page.request.post(url + "/predict", multipart={
                "file": {"name": "scene.png", "mimeType": "image/png", "buffer": image.read_bytes()}})
            assert response.status == 200 and response.headers["content-type"] == "image/png"
            rest = np.array(Image.open(io.BytesIO(response.body())))
            bad = page.request.post(url + "/predict", multipart={
                "file": {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"}})
            assert bad.status == 415 and bad.json()["detail"].startswith("not an image")
        finally:
            browser.close()
    assert (tmp_path / "serve.png").stat().st_size > 10_000
    # `scaleseg predict` on the same file
    from scaleseg.cli import run as cli

    assert cli(["predict", str(run / "config.yaml"), "--checkpoint", str(run / "model.safetensors"), str(image),
                "--out", str(tmp_path / "pred"), "--quiet"]) == 0
    predicted = np.array(Image.open(tmp_path / "pred" / "scene_label.png"))
    assert rest.shape == predicted.shape == (96, 192)
    assert np.array_equal(rest, predicted)
