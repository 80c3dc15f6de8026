"""``scaleseg serve RUN_DIR``: a web page and a REST API for a trained model (FastAPI + uvicorn).

See :mod:`scaleseg.serve.app` for the routes and :mod:`scaleseg.serve.segmenter` for the inference.
The server binds to 127.0.0.1 by default; pass ``--host 0.0.0.0`` deliberately to expose it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .segmenter import ServeSettings

__all__ = ["ServeSettings", "build_app", "serve"]


def build_app(run_dir: str | Path, overrides: list[str] | None = None, settings: ServeSettings | None = None) -> Any:
    """The FastAPI app for the model of ``run_dir`` (run folder, ``save_pretrained`` folder or Hub id);
    ``overrides`` are ``key=value`` config overrides applied before building (e.g. ``eval.scales``)."""
    import torch

    from ..config import apply_overrides, from_dict, to_dict
    from ..data.catalog import spec_for
    from ..errors import ConfigError
    from ..hub import load_pretrained
    from .app import create_app
    from .segmenter import Segmenter

    model = load_pretrained(run_dir)
    cfg = model.scaleseg_config
    if overrides:
        bad = [o for o in overrides if not o.split("=", 1)[0].startswith("eval.")]
        if bad:
            raise ConfigError(f"serve takes eval.* overrides only (the weights fix the model), got: {' '.join(bad)}")
        cfg = from_dict(apply_overrides(to_dict(cfg), overrides))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    segmenter = Segmenter(model.to(device), cfg, spec_for(cfg.data), settings or ServeSettings())
    return create_app(segmenter)


def serve(run_dir: str | Path, overrides: list[str] | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          max_side: int = 1024, max_upload_mb: float = 20.0, tile: bool = False, quiet: bool = False) -> None:
    """Load the model and run uvicorn until interrupted."""
    import uvicorn

    from ..errors import ConfigError

    if max_side < 32:
        raise ConfigError(f"--max-side {max_side}: expected at least 32 pixels")
    if max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb {max_upload_mb}: expected a positive size")
    settings = ServeSettings(max_side=max_side, max_upload_bytes=int(max_upload_mb * 2**20), tile=tile)
    app = build_app(run_dir, overrides, settings)
    if not quiet:
        print(f"scaleseg serve: http://{host}:{port}/  (API docs at /docs; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning" if quiet else "info")
