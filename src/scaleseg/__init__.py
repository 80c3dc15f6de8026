"""scaleseg: semantic segmentation with hierarchical multi-scale attention, MCIBI and DSRL.

Python API::

    cfg = scaleseg.load_config("configs/camvid/deeplabv3plus_r18_cpu.yaml", ["model.backbone=resnet50"])
    model = scaleseg.create_model(cfg)        # model(x) -> B×K×H×W logits; model.predict(image) -> labels
    model = scaleseg.from_pretrained("runs/camvid_deeplabv3plus_r18_cpu")   # config.yaml + model.safetensors
    model.save_pretrained("hub/camvid_r18")   # config, safetensors weights, metrics and a README.md model card
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
    """Build the model a config (object or YAML path) describes; ``model(x)`` gives B×K×H×W logits.
    The config is kept as ``model.scaleseg_config`` (``model.save_pretrained(dir)`` writes it)."""
    from .models.factory import create_model as _create

    cfg = config if isinstance(config, Config) else load_config(config)
    model = _create(cfg, num_classes if num_classes is not None else num_classes_for(cfg))
    model.scaleseg_config = cfg
    return model


def from_pretrained(path: str | Path, *, revision: str | None = None) -> Any:
    """Load a trained model, in eval mode, from a run or ``save_pretrained`` folder (``config.yaml`` +
    ``model.safetensors``), from a ``.ckpt`` / ``.safetensors`` file next to its run's ``config.yaml``,
    or from a Hugging Face Hub repo ``"org/name"`` (downloaded unless ``HF_HUB_OFFLINE=1``; local
    folders never touch the network). See :mod:`scaleseg.hub`."""
    from .hub import load_pretrained

    return load_pretrained(path, revision=revision)


__all__ = [
    "CheckpointError", "Config", "ConfigError", "DataError", "ScalesegError", "__version__",
    "create_model", "from_pretrained", "load_config", "num_classes_for",
]
