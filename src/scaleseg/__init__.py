"""scaleseg: semantic segmentation with hierarchical multi-scale attention, MCIBI and DSRL.

Python API::

    cfg = scaleseg.load_config("configs/camvid/deeplabv3plus_r18_cpu.yaml", ["model.backbone=resnet50"])
    model = scaleseg.create_model(cfg)        # model(x) -> B×K×H×W logits; model.predict(image) -> labels
    model = scaleseg.from_pretrained("runs/camvid_deeplabv3plus_r18_cpu")   # config.yaml + model.safetensors
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import Config, load_config
from .errors import CheckpointError, ConfigError, DataError, ScalesegError

__version__ = "0.1.0"

# classes per dataset that need no files to know it (folder: data.classes; mapillary: per version)
_NUM_CLASSES = {"camvid": 11, "cityscapes": 19, "ade20k": 150, "scalescenes": 8}
_MAPILLARY_CLASSES = {"v1.2": 65, "v2.0": 123}


def num_classes_for(cfg: Config) -> int:
    """Number of classes of the configured dataset, without reading it."""
    data = cfg.data
    if data.dataset == "folder":
        if not data.classes:
            raise ConfigError("config key 'data.classes' must list the class names of a 'folder' dataset")
        return len(data.classes)
    if data.dataset == "mapillary":
        version = data.version or "v1.2"
        if version not in _MAPILLARY_CLASSES:
            raise ConfigError(f"config key 'data.version' = {version!r}: expected 'v1.2' or 'v2.0'")
        return _MAPILLARY_CLASSES[version]
    return _NUM_CLASSES[data.dataset]


def create_model(config: Config | str | Path, num_classes: int | None = None) -> Any:
    """Build the model a config (object or YAML path) describes; ``model(x)`` gives B×K×H×W logits."""
    from .models.factory import create_model as _create

    cfg = config if isinstance(config, Config) else load_config(config)
    return _create(cfg, num_classes if num_classes is not None else num_classes_for(cfg))


def from_pretrained(path: str | Path) -> Any:
    """Load a trained model from a run folder (``config.yaml`` + ``model.safetensors``) or from a
    ``.ckpt`` / ``.safetensors`` file next to its run's ``config.yaml``. Nothing is downloaded."""
    from .engine.checkpoint import load_model_weights

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = path / "model.safetensors" if path.is_dir() else path
    config = next((p for p in (folder / "config.yaml", folder.parent / "config.yaml") if p.is_file()), None)
    if config is None:
        raise CheckpointError(f"no config.yaml next to {path}; expected a scaleseg run folder")
    cfg = load_config(config)
    model = create_model(cfg)
    load_model_weights(model, weights)
    return model.eval()


__all__ = [
    "CheckpointError", "Config", "ConfigError", "DataError", "ScalesegError", "__version__",
    "create_model", "from_pretrained", "load_config", "num_classes_for",
]
