"""Start an ESPNetv2 from an official EdgeNets segmentation checkpoint (``model.pretrained_file`` with
``model.arch: espnetv2``): encoder and decoder are loaded, the classifier is new.

The EdgeNets checkpoints (``espnetv2_s_2.0_city_*.pth``) are plain state dicts of
``ESPNetv2Segmentation``; keys map onto :func:`scaleseg.models.espnetv2.espnetv2_seg` by
:func:`~scaleseg.models.espnetv2.edgenets_key_map`. Two things depend on the source dataset:

* the classifier, the last 1×1 conv of the last pyramid-pool block (``head.bu_dec_l4.merge_layer.3``,
  K outputs): dropped and left at the new model's initialisation;
* EdgeNets ties the decoder's projection width to the class count (``min(K // 2, 16)``: 10 for the
  20-output Cityscapes model). The new model is built with the checkpoint's width
  (:func:`checkpoint_proj_planes`), so every other tensor is reused as it is.

Every other key must be present in both with the same shape; anything else is a one-line
``CheckpointError``. Loading uses ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from .espnetv2 import edgenets_key_map

CLASSIFIER_PREFIX = "head.bu_dec_l4.merge_layer.3."
PROJ_KEY = "head.bu_dec_l1.projection_layer.cbr.0.weight"


def read_edgenets_state(path: str | Path) -> dict[str, Tensor]:
    """The checkpoint's tensors under scaleseg names (``module.`` / ``state_dict`` wrappers removed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model.pretrained_file '{path}' does not exist; expected an EdgeNets ESPNetv2 .pth")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is the same user error
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot load model.pretrained_file {path}: {first}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"model.pretrained_file {path} is not a state dict of tensors")
    return {edgenets_key_map(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def checkpoint_proj_planes(state: dict[str, Tensor], path: str | Path = "") -> int:
    """The decoder projection width the checkpoint was trained with."""
    if PROJ_KEY not in state:
        raise CheckpointError(f"model.pretrained_file {path} has no '{PROJ_KEY}': not an EdgeNets ESPNetv2 segmentation checkpoint")
    return int(state[PROJ_KEY].shape[0])


def load_edgenets_pretrained(model: nn.Module, state: dict[str, Tensor], path: str | Path = "") -> list[str]:
    """Copy every non-classifier tensor of ``state`` into ``model``; returns the keys left at init."""
    own = model.state_dict()
    load = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIX)}
    missing = sorted(k for k in own if k not in load and not k.startswith(CLASSIFIER_PREFIX))
    unexpected = sorted(k for k in load if k not in own)
    wrong = sorted(k for k in load if k in own and own[k].shape != load[k].shape)
    if missing or unexpected or wrong:
        details = [f"{len(keys)} {label} keys, e.g. {keys[0]}" + (f" {tuple(load[keys[0]].shape)} vs {tuple(own[keys[0]].shape)}" if label == "wrong-shape" else "")
                   for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong-shape", wrong)) if keys]
        raise CheckpointError(f"model.pretrained_file {path} does not fit the configured ESPNetv2 (check model.width): " + "; ".join(details))
    model.load_state_dict(load, strict=False)
    return sorted(k for k in own if k.startswith(CLASSIFIER_PREFIX))


__all__ = ["read_edgenets_state", "checkpoint_proj_planes", "load_edgenets_pretrained", "CLASSIFIER_PREFIX"]
