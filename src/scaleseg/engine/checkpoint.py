"""Checkpoints: atomic writes, safe loads (``weights_only=True`` / safetensors), clear mismatch errors."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from ..files import atomic_write, atomic_write_path

MODEL_PREFIX = "model."


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a crash never leaves half a
    file. Written through a Python file object, so a full disk is an OSError (→ DiskFullError naming
    ``path``), not torch's "enforce fail at inline_container.cc"."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes atomically and loads with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path, map_location)


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a Lightning ``.ckpt`` safely (never as an arbitrary pickle)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is the same user error
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot load checkpoint {path}: {first} (expected a scaleseg .ckpt or .safetensors file)") from None


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, metadata) from a ``.ckpt`` (Lightning) or ``.safetensors`` file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        try:
            return load_file(str(path)), {}
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"cannot read safetensors file {path}: {err}") from None
    ckpt = read_checkpoint(path)
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} has no 'state_dict'; expected a scaleseg training checkpoint")
    model_state = {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    return model_state, ckpt.get("scaleseg", {})


def load_model_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> dict[str, Any]:
    """Load weights into ``model``; keys or shapes from another model raise a CheckpointError."""
    state, meta = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if strict and (missing or unexpected or wrong_shape):
        saved = meta.get("signature", "an unknown model")
        details = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                details.append(f"{len(keys)} {label} keys, e.g. {keys[0]}")
        raise CheckpointError(
            f"checkpoint {path} is from another model ({saved}); it does not fit the configured model: "
            + "; ".join(details)
        )
    model.load_state_dict(state, strict=strict)
    return meta


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Model weights as safetensors, written atomically (shared tensors are cloned)."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_path(path, lambda tmp: save_file(state, str(tmp)))
