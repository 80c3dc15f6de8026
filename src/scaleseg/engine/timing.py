"""Wall time per training epoch, logged with the machine's load so timings on a shared CPU can be read.

Logs, once per epoch, to every logger: ``time/train_epoch_s`` (wall time of the epoch's training
batches: epoch start to epoch end minus any validation loop that Lightning runs inside the epoch),
``time/val_s`` (the validation loop, when one ran) and ``time/load1`` (``os.getloadavg()[0]`` at
the epoch's end).
"""
from __future__ import annotations

import os
import time

import lightning as L


def load_average() -> float:
    """1-minute load average (0.0 where the OS does not report one)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self._epoch_start = 0.0
        self._val_start = 0.0
        self._val_s = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._val_s = 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._val_s += time.perf_counter() - self._val_start
        pl_module.log("time/val_s", self._val_s, on_epoch=True, on_step=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        train_s = time.perf_counter() - self._epoch_start - self._val_s
        pl_module.log("time/train_epoch_s", train_s, on_epoch=True, on_step=False)
        pl_module.log("time/load1", load_average(), on_epoch=True, on_step=False)


__all__ = ["EpochTimer", "load_average"]
