"""Make the optimiser follow the config after a resume restored it from a checkpoint."""
from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ..config import Config


class ResumeSync(Callback):
    """After a resume's restore, make the optimiser follow the config. Lightning restores optimiser and
    LR scheduler from the checkpoint, which keeps the old learning rate, momentum and weight decay
    (and the old schedule's current lr) when a forced resume changed ``optim.*`` or ``train.epochs``:

    - with ``optim.*`` changed, every param group's lr (keeping per-group ratios) and the scheduler's
      base lrs are rescaled by new/old, and momentum / weight decay / nesterov set;
    - every ``LambdaLR`` group's lr is recomputed from the (rebuilt) schedule at the restored step.
      Without changes this reproduces the restored values exactly."""

    def __init__(self, old: Config | None, new: Config) -> None:
        self.old, self.new = (old.optim if old is not None else new.optim), new.optim

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ratio = self.new.lr / self.old.lr
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                if ratio != 1.0:
                    group["lr"] *= ratio
                    if "initial_lr" in group:
                        group["initial_lr"] *= ratio
                for key in ("momentum", "weight_decay", "nesterov"):
                    if key in group and getattr(self.old, key) != getattr(self.new, key):
                        group[key] = getattr(self.new, key)
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if ratio != 1.0 and hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                    group["lr"] = base * factor(scheduler.last_epoch)
