"""Exponential moving average of the weights as a Lightning callback (``train.ema_decay``).

The average is ``torch.optim.swa_utils.AveragedModel`` with ``use_buffers=True`` (BatchNorm running
statistics are averaged too), updated after every optimiser step with
``w_ema ← d_n · w_ema + (1 − d_n) · w`` (``torch._foreach_lerp_``, as ``get_ema_multi_avg_fn``), where
``d_n = min(decay, (1 + n) / (10 + n))`` and n is the number of updates so far (the first update
copies ``w``). The ramp is timm's EMA warm-up: without it, a from-scratch run's average keeps a
noticeable share of the first, wildly different weights for thousands of steps (measured on CamVid:
with decay 0.995 and no ramp, the EMA model at epoch 10 scored 15.5 mIoU where its training weights
scored 28.0).

What uses which weights:

* validation runs on the EMA weights (they are swapped into the model for the loop and swapped back
  after it), so ``val/mIoU``, ``best.ckpt``'s choice and ``metrics.json`` describe the EMA model;
* every checkpoint's ``state_dict`` holds the **EMA** weights, so ``scaleseg eval``/``predict``/
  ``autolabel`` and ``--checkpoint`` consumers get them with no special case; the training weights and
  the update count are stored next to it under ``checkpoint["scaleseg_ema"]`` for an exact resume;
* at the end of ``fit`` the EMA weights are copied into the model, so ``model.safetensors`` holds them.
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel

from ..errors import CheckpointError

CHECKPOINT_KEY = "scaleseg_ema"
MODEL_PREFIX = "model."  # SegTask keeps the network in ``self.model``


def warmup_decay(decay: float, num_averaged: int) -> float:
    """``min(decay, (1 + n) / (10 + n))`` for the n-th update (n = updates before this one)."""
    return min(decay, (1.0 + num_averaged) / (10.0 + num_averaged))


def ema_multi_avg_fn(decay: float) -> Any:
    """``multi_avg_fn`` for ``AveragedModel``: lerp towards the model by ``1 − warmup_decay``."""

    @torch.no_grad()
    def update(ema: list[Tensor], current: list[Tensor], num_averaged: Tensor | int) -> None:
        d = warmup_decay(decay, int(num_averaged))
        if torch.is_floating_point(ema[0]) or torch.is_complex(ema[0]):
            torch._foreach_lerp_(ema, current, 1.0 - d)
        else:  # integer buffers (BatchNorm's num_batches_tracked)
            for e, c in zip(ema, current, strict=True):
                e.copy_(e * d + c * (1.0 - d))

    return update


def _clone(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


class EMAWeights(L.Callback):
    """Keeps an EMA of ``pl_module.model`` (see the module docstring for where it is used)."""

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay {decay} is invalid; expected 0 < decay < 1")
        self.decay = float(decay)
        self.ema: AveragedModel | None = None
        self._train_weights: dict[str, Tensor] | None = None  # held while the EMA weights are swapped in
        self._restored: dict[str, Any] | None = None  # from a checkpoint, applied at on_train_start

    # ------------------------------------------------------------------ the average
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        # built here, after any checkpoint restore: on a resume the model then holds the EMA weights
        self.ema = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(self.decay), use_buffers=True)
        if self._restored is not None:
            self.ema.n_averaged.fill_(int(self._restored["n_averaged"]))
            model.load_state_dict(self._restored["train_weights"])
            self._restored = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        assert self.ema is not None
        self.ema.update_parameters(pl_module.model)

    def start_stage(self, pl_module: L.LightningModule) -> None:
        """Staged training: the next stage starts from this stage's EMA weights (its result), with a
        fresh average (so a frozen part's average is its frozen value)."""
        if self.ema is None:
            return
        pl_module.model.load_state_dict(self.ema.module.state_dict())
        self.ema = AveragedModel(pl_module.model, multi_avg_fn=ema_multi_avg_fn(self.decay), use_buffers=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ema is not None:
            pl_module.model.load_state_dict(self.ema.module.state_dict())

    # ------------------------------------------------------------------ validation on the EMA
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ema is None or self._train_weights is not None:
            return
        self._train_weights = _clone(pl_module.model.state_dict())
        pl_module.model.load_state_dict(self.ema.module.state_dict())

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._train_weights is not None:
            pl_module.model.load_state_dict(self._train_weights)
            self._train_weights = None

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.ema is None:  # before the first training step: nothing averaged yet
            return
        train_weights = self._train_weights if self._train_weights is not None else pl_module.model.state_dict()
        state = checkpoint["state_dict"]
        for key, value in self.ema.module.state_dict().items():
            state[MODEL_PREFIX + key] = value.detach().clone()
        checkpoint[CHECKPOINT_KEY] = {
            "decay": self.decay,
            "n_averaged": int(self.ema.n_averaged),
            "train_weights": _clone(train_weights),
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            raise CheckpointError("cannot resume with train.ema_decay set: the checkpoint was trained without EMA weights")
        self._restored = {"n_averaged": saved["n_averaged"], "train_weights": saved["train_weights"]}


def check_no_ema(checkpoint: dict[str, Any]) -> None:
    """A run without ``train.ema_decay`` must not resume from EMA weights as if they were its own."""
    if CHECKPOINT_KEY in checkpoint:
        raise CheckpointError("cannot resume: the checkpoint holds EMA weights (train.ema_decay "
                              f"{checkpoint[CHECKPOINT_KEY].get('decay')}) but the config sets no train.ema_decay")


__all__ = ["EMAWeights", "check_no_ema", "warmup_decay", "CHECKPOINT_KEY"]
