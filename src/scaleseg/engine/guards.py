"""Training faults that must not lose work: Ctrl-C, a full disk, a non-finite loss.

:class:`RunGuard` is a Lightning callback that

- writes ``last_step.ckpt`` when validation starts (after the epoch's last training batch): an
  interrupted or failed validation never costs the epoch, a resume from it runs the validation, and a
  full disk shows up before the validation time is spent;
- checks at the start of every epoch that the checkpoint folder has room for the
  checkpoints the epoch will write, and stops with a one-line :class:`DiskFullError` naming the
  folder *before* the epoch's work is done (the checkpoints already written stay intact);
- turns Ctrl-C into a clean stop: the first SIGINT finishes the current batch, writes a resumable
  ``last_step.ckpt`` and raises :class:`Interrupted`; a second one stops at once (the last checkpoint
  written is the resume point). The CLI prints how to resume and exits 130.

:func:`diverged` is called by the training step on a non-finite loss, and by :class:`RunGuard` on a
non-finite gradient: it writes ``last_finite.ckpt`` (the state before the failing step: parameters,
and the buffers as they were when the step started, if all are finite) and returns a
:class:`DivergedError` naming the step and the loss terms.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ..errors import DiskFullError, DivergedError, Interrupted
from ..files import format_bytes, free_space

LAST_STEP = "last_step.ckpt"
LAST_FINITE = "last_finite.ckpt"


def _finite_weights(module: torch.nn.Module) -> bool:
    tensors = [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def diverged(trainer: L.Trainer, module: torch.nn.Module, terms: Mapping[str, torch.Tensor], what: str,
             ckpt_dir: Path, lr: float | None = None, precision: str = "32") -> DivergedError:
    """Write the last finite state (if the weights are finite) and return the error to raise."""
    step, epoch = trainer.global_step, trainer.current_epoch
    guard = next((c for c in trainer.callbacks if isinstance(c, RunGuard)), None)
    if guard is not None:
        guard.restore_buffers(trainer.lightning_module)  # undo this step's BatchNorm statistics updates
    shown = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items()) or "no loss terms"
    lower = f"optim.lr={lr / 10:g}" if lr else "a lower optim.lr"
    if _finite_weights(module):
        path = ckpt_dir / LAST_FINITE
        trainer.save_checkpoint(path)
        saved = f"the weights before this step are in {path}; continue from them with --resume {path} {lower} --force"
    else:
        saved = f"the weights are already non-finite; resume from the last checkpoint in {ckpt_dir} with {lower} --force"
    other = "train.precision=32, " if precision != "32" else ""
    return DivergedError(f"non-finite {what} at step {step} (epoch {epoch}): {shown}; {saved} "
                         f"(or try {other}optim.warmup_steps, or check the data)")


def _state_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


class RunGuard(Callback):
    """Pre-validation checkpoint, free-space check and Ctrl-C handling (see the module docstring)."""

    def __init__(self, ckpt_dir: Path, check_gradients: bool = True) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.check_gradients = check_gradients
        self.interrupts = 0
        self._previous_handler: Any = None
        self._main_pid = os.getpid()
        self.last_saved: Path | None = None
        self._pending: Interrupted | None = None
        self._stop_at_epoch_end = False
        self._pre_validation = False
        self._buffers: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ Ctrl-C
    def _on_sigint(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._main_pid:  # a forked DataLoader worker: the main process handles it
            return
        self.interrupts += 1
        if self.interrupts == 1:
            print("\nscaleseg: Ctrl-C: stopping after this batch with a checkpoint (press Ctrl-C again to stop now)",
                  file=sys.stderr, flush=True)
            return
        raise Interrupted(f"interrupted; the last checkpoint written is the resume point ({self._newest()})")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def _interrupted(self, trainer: L.Trainer) -> bool:
        return bool(trainer.strategy.reduce_boolean_decision(self.interrupts > 0, all=False))

    def _newest(self) -> Path | None:
        found = [p for p in (self.ckpt_dir / "last.ckpt", self.ckpt_dir / LAST_STEP) if p.exists()]
        return max(found, key=lambda p: p.stat().st_mtime) if found else None

    # ------------------------------------------------------------------ checkpoints
    def _save(self, trainer: L.Trainer) -> Path:
        path = self.ckpt_dir / LAST_STEP
        trainer.save_checkpoint(path)
        self.last_saved = path
        return path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._pending is not None or self._stop_at_epoch_end or not self._interrupted(trainer):
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            # the epoch's last batch: its validation (or the epoch end) writes the resume point, so that
            # a resume runs that validation (a checkpoint from here would make Lightning skip it)
            self._stop_at_epoch_end = True
            return
        path = self._save(trainer)
        # raised at the next hook, once Lightning has logged this batch (its logging runs after us)
        self._pending = Interrupted(f"interrupted at step {trainer.global_step} (epoch {trainer.current_epoch}); "
                                    f"saved {path}")

    def _stop_here(self, trainer: L.Trainer, path: Path, where: str) -> None:
        if self._stop_at_epoch_end:
            raise Interrupted(f"interrupted at step {trainer.global_step} (epoch {trainer.current_epoch}) {where}; "
                              f"saved {path}")

    def _raise_pending(self) -> None:
        if self._pending is not None:
            raise self._pending

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._raise_pending()
        # the forward of a failing step already updates BatchNorm statistics (and method state such
        # as MCIBI's memory): keep them (small: per-channel vectors) to write the state before the step
        self._buffers = {name: b.detach().clone() for name, b in pl_module.named_buffers() if b.is_floating_point()}

    def restore_buffers(self, pl_module: torch.nn.Module) -> None:
        """Put back the floating-point buffers saved at the start of the current batch."""
        current = dict(pl_module.named_buffers())
        with torch.no_grad():
            for name, saved in self._buffers.items():
                if name in current:
                    current[name].copy_(saved)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._raise_pending()
        if self._stop_at_epoch_end:
            self._stop_here(trainer, self._save(trainer), "at the end of the epoch")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        self._raise_pending()
        self._pre_validation = True  # every rank calls this hook: the save's barrier is safe in DDP
        try:
            path = self._save(trainer)
        finally:
            self._pre_validation = False
        self._stop_here(trainer, path, "before its validation")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Mark the pre-validation checkpoint as written inside the first validation batch (one batch
        ready and started, none processed): Lightning resumes that state by running the whole
        validation again. Saved as it is (validation not begun), Lightning would take the epoch as
        validated and skip it on resume, and best.ckpt would miss that epoch. Deliberately depends on
        Lightning's loop-progress layout; if that changes, the checkpoint stays valid and only the
        resumed epoch's validation is skipped."""
        if not self._pre_validation:
            return
        try:
            progress = checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]
            for part in ("total", "current"):
                counts = progress[part]
                counts["ready"] = counts["started"] = counts["processed"] + 1
                counts["completed"] = counts["processed"]
        except (KeyError, TypeError):
            pass

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.state.fn == "fit" and self._interrupted(trainer):
            raise Interrupted(f"interrupted during validation of epoch {trainer.current_epoch}; "
                              f"the epoch's training is saved in {self._newest()}")

    # ------------------------------------------------------------------ disk space
    def needed_bytes(self, pl_module: L.LightningModule) -> int:
        """Room the coming epoch's checkpoints need: one file per checkpoint not written yet, plus one
        being written (each write goes to a temporary file first), plus the final weights."""
        existing = [p for p in self.ckpt_dir.glob("*.ckpt")] if self.ckpt_dir.is_dir() else []
        size = max((p.stat().st_size for p in existing), default=0) or 2 * _state_bytes(pl_module)
        names = {"best.ckpt", "last.ckpt", LAST_STEP}
        missing = len(names - {p.name for p in existing})
        weights = _state_bytes(pl_module) // 2 if not (self.ckpt_dir.parent / "model.safetensors").exists() else 0
        return size * (missing + 1) + weights

    def check_space(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        free = free_space(self.ckpt_dir) if trainer.is_global_zero else None
        need = self.needed_bytes(pl_module)
        short = free is not None and free < need
        if trainer.strategy.reduce_boolean_decision(short, all=False):  # every rank stops, none hangs
            if free is None:
                raise DiskFullError(f"not enough free space for {self.ckpt_dir} (see rank 0)")
            raise DiskFullError(
                f"only {format_bytes(free)} free for {self.ckpt_dir}; epoch {trainer.current_epoch}'s checkpoints need "
                f"about {format_bytes(need)}: stopped before training it (the checkpoints written so far are intact); "
                "free some space or set output_dir on another disk"
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check_space(trainer, pl_module)

    # ------------------------------------------------------------------ gradients
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not self.check_gradients:
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            terms = getattr(pl_module, "last_losses", None) or {}
            cfg = getattr(pl_module, "cfg", None)
            raise diverged(trainer, pl_module, terms, "gradient", self.ckpt_dir,
                           cfg.optim.lr if cfg else None, cfg.train.precision if cfg else "32")
