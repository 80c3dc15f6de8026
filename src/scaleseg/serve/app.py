"""``scaleseg serve``'s web app: a static page and a REST API on FastAPI.

FastAPI (on Starlette, served by uvicorn) was chosen because it is well kept and small, validates
uploads and query parameters, documents the API itself (OpenAPI at ``/docs`` and ``/openapi.json``),
and is tested in-process with its ``TestClient``; the page is plain HTML + JavaScript served by the
app, with no build step. Gradio would bring its own front end and a much larger dependency; LitServe
targets batching model servers rather than a page with custom views.

Routes:

* ``GET /`` — the page (upload or drop an image; overlay, legend with class names and pixel shares,
  each scale's attention map for a hierarchical model, inference time);
* ``GET /health`` — ``{"status": "ok", ...}``;
* ``GET /info`` — classes, palette, scales, limits;
* ``POST /predict`` (multipart field ``file``) — the label-id PNG (``image/png``, mode L, pixel = train
  id), with headers ``X-Inference-Ms``, ``X-Resize`` and ``X-Image-Size``;
  ``POST /predict?format=json`` — class shares, timings, the resize decision and the label, colour,
  overlay and attention pictures as data URLs (what the page shows).

Bad input is a 4xx JSON ``{"detail": "<one line>"}``: 400 (empty or truncated image, missing field),
413 (upload or decoded image over the limits), 415 (not an image), 422 (bad query parameter).
"""
from __future__ import annotations

import base64
import io
from importlib import resources
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.spec import DatasetSpec
from .segmenter import BadImage, ImageTooLarge, Segmentation, Segmenter

__all__ = ["create_app"]

STATIC = ("index.html", "app.js", "style.css")
_FORM_OVERHEAD = 64 * 1024  # multipart boundaries and part headers around the file
_MEDIA = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8"}


def _png(array: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    img = Image.fromarray(array)
    if palette is not None:
        img = img.convert("P") if img.mode != "P" else img
        img.putpalette(palette.reshape(-1).tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def class_shares(result: Segmentation, spec: DatasetSpec) -> list[dict[str, Any]]:
    """Per class: id, name, colour, pixel count and share of all pixels (0–1)."""
    total = max(1, int(result.labels.size))
    return [{"id": i, "name": name, "color": list(colour), "pixels": int(n), "share": int(n) / total}
            for i, (name, colour, n) in enumerate(zip(spec.classes, spec.palette, result.counts))]


def create_app(segmenter: Segmenter, *, title: str = "scaleseg") -> Any:
    """The FastAPI application around ``segmenter``."""
    from ..engine.task import model_signature
    from ..hub import version_string
    from ..visualize import attention_to_color, colorize, overlay

    spec = segmenter.spec
    settings = segmenter.settings
    palette = spec.palette_array()
    signature = model_signature(segmenter.cfg, spec.num_classes)
    app = FastAPI(title=f"{title}: {signature}", version=version_string(),
                  description="Semantic segmentation of uploaded images. POST an image to /predict.")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        status = 400 if first.get("type") == "missing" else 422
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=status)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:  # no traceback to clients
        line = next((s for s in str(exc).splitlines() if s.strip()), type(exc).__name__)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {line[:200]}"}, status_code=500)

    def _static(name: str) -> Response:
        text = resources.files("scaleseg.serve").joinpath("static", name).read_bytes()
        return Response(text, media_type=_MEDIA[name.rsplit(".", 1)[1]])

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return _static("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC:
            raise HTTPException(404, f"no static file {name!r}")
        return _static(name)

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness: the model is loaded."""
        return {"status": "ok", "model": signature, "num_classes": spec.num_classes, "version": version_string()}

    @app.get("/info")
    def info() -> dict[str, Any]:
        """Classes, colours, inference scales and the server's limits."""
        return {
            "model": signature, "dataset": spec.name,
            "classes": [{"id": i, "name": n, "color": list(c)} for i, (n, c) in enumerate(zip(spec.classes, spec.palette))],
            "ignore_index": spec.ignore_index, "scales": list(segmenter.scales),
            "fusion": "hierarchical" if segmenter.hierarchical and len(segmenter.scales) > 1 else
                      ("avg" if len(segmenter.scales) > 1 else "single"),
            "attention_scales": list(segmenter.attention_scales), "flip": segmenter.cfg.eval.flip,
            "max_side": settings.max_side, "tile": settings.tile,
            "max_upload_bytes": settings.max_upload_bytes, "max_pixels": settings.max_pixels,
        }

    async def _read_upload(request: Request) -> bytes:
        """The multipart field ``file``; the body is read in chunks and refused past the upload limit
        (413) before it is parsed, whether or not the client sent a Content-Length."""
        limit = settings.max_upload_bytes
        too_big = f"upload exceeds the {limit / 2**20:.1f} MiB limit"
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit + _FORM_OVERHEAD:
            raise HTTPException(413, f"upload of {int(length) / 2**20:.1f} MiB exceeds the {limit / 2**20:.1f} MiB limit")
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise HTTPException(415, "expected a multipart/form-data upload with the image in field 'file' "
                                     f"(curl -F file=@image.png), got Content-Type {content_type or 'none'!r}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit + _FORM_OVERHEAD:
                raise HTTPException(413, too_big)

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
        except Exception as err:  # noqa: BLE001 - malformed multipart bodies are client errors
            first = next((s for s in str(err).splitlines() if s.strip()), type(err).__name__)
            raise HTTPException(400, f"cannot parse the multipart upload: {first}") from None
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise HTTPException(400, "missing image: send it as multipart field 'file' (curl -F file=@image.png)")
            data = await upload.read()
        finally:
            await form.close()
        if len(data) > limit:
            raise HTTPException(413, too_big)
        return data

    @app.post("/predict", responses={200: {"content": {"image/png": {}, "application/json": {}}}})
    async def predict(request: Request, format: Literal["png", "json"] = Query("png"),
                      attention: bool = Query(True, description="JSON only: include HMSA attention maps")) -> Response:
        """Segment the uploaded image (multipart field ``file``). ``format=png``: the label-id PNG;
        ``format=json``: shares, timings and pictures."""
        data = await _read_upload(request)
        try:
            image = decode_image_checked(data)
            result = await run_in_threadpool(segmenter.segment, image, attention=format == "json" and attention)
        except BadImage as err:
            raise HTTPException(err.status, str(err)) from None
        except ImageTooLarge as err:
            raise HTTPException(413, str(err)) from None
        headers = {"X-Inference-Ms": f"{result.inference_ms:.1f}", "X-Resize": result.resize["mode"],
                   "X-Image-Size": f"{image.shape[1]}x{image.shape[0]}"}
        if format == "png":
            return Response(_png(result.labels), media_type="image/png", headers=headers)
        color = colorize(result.labels, palette)
        body = {
            "width": int(image.shape[1]), "height": int(image.shape[0]),
            "inference_ms": round(result.inference_ms, 2), "attention_ms": round(result.attention_ms, 2),
            "resize": result.resize, "scales": list(segmenter.scales),
            "classes": class_shares(result, spec),
            "label_png": _data_url(_png(result.labels)),
            "color_png": _data_url(_png(result.labels, palette)),
            "overlay_png": _data_url(_png(overlay(image, color, 0.5))),
            "attention": [{"scale": s, "png": _data_url(_png(attention_to_color(a)))} for s, a in sorted(result.attention.items())],
        }
        return JSONResponse(body, headers=headers)

    def decode_image_checked(data: bytes) -> np.ndarray:
        from .segmenter import decode_image

        return decode_image(data, settings.max_pixels)

    return app
