"""``scaleseg train``: Lightning fit with atomic checkpoints, exact resume, TensorBoard and CSV logs.

A run folder has one writer and an append-only record (see ``engine/runfolder.py``); the data are
checked before training (``data.check``, see ``data/check.py``); Ctrl-C, a full disk and a
non-finite loss stop with a resumable checkpoint and one line (see ``engine/guards.py``).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ..config import Config, from_dict
from ..errors import CheckpointError, ConfigError, DataError
from ..files import atomic_write_text, remove_stale_temp_files
from ..models.factory import create_model
from ..quiet import silence_lightning
from .checkpoint import AtomicCheckpointIO, load_model_weights, read_checkpoint, save_weights
from .datamodule import SegDataModule
from .guards import LAST_FINITE, LAST_STEP, RunGuard
from .logs import run_loggers
from .resume_sync import ResumeSync
from .runfolder import (
    check_resume_changes, clear_unfinished_records, ensure_folder, finished_metrics, hold_run_folder,
    is_launching_process, latest_config_path, read_run_config, refuse_fresh_start, write_run_config,
)
from .speed import compile_blocks, warn_emulated_bf16
from .stages import StageProgressBar, stage_weights_path
from .ema import EMAWeights
from .task import SegTask
from .timing import EpochTimer


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def resolve_resume(resume: str | None, ckpt_dir: Path) -> str | None:
    """``None`` → fresh run; ``"auto"`` → the newest of ``last.ckpt`` and ``last_step.ckpt`` in the
    run folder; anything else → that file."""
    if resume is None:
        return None
    candidates = [p for p in (ckpt_dir / "last.ckpt", ckpt_dir / LAST_STEP) if p.exists()]
    last = max(candidates, key=lambda p: p.stat().st_mtime) if candidates else ckpt_dir / "last.ckpt"
    if resume == "auto":
        if not last.exists():
            raise CheckpointError(f"--resume auto: no checkpoint at {last} to continue from")
        return str(last)
    if not Path(resume).is_file():
        raise CheckpointError(f"--resume: checkpoint not found: {resume}")
    return resume


def check_accelerator(accelerator: str) -> None:
    """``train.accelerator=gpu`` (or cuda / mps) without such a device is a one-line ConfigError."""
    a = accelerator.lower()
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    missing = (a == "gpu" and not (cuda or mps)) or (a == "cuda" and not cuda) or (a == "mps" and not mps)
    if missing:
        raise ConfigError(f"config key 'train.accelerator' = {accelerator!r} but no {a.upper() if a != 'gpu' else 'GPU'} "
                          "is available on this machine (torch.cuda.is_available() is False); use train.accelerator=cpu")


def build_trainer(cfg: Config, ckpt_dir: Path | None = None, extra_callbacks: list[Any] = (), **overrides: Any) -> L.Trainer:  # type: ignore[assignment]
    t = cfg.train
    out = Path(cfg.output_dir)
    callbacks: list[Any] = list(extra_callbacks)
    if ckpt_dir is not None:
        # best.ckpt (best val mIoU); last.ckpt after every epoch (its own callback: Lightning >= 2.5
        # refreshes save_last only when a top-k file is written); with train.checkpoint_every_n_steps
        # also last_step.ckpt mid-epoch. --resume auto takes the newest of last and last_step.
        callbacks.append(ModelCheckpoint(
            dirpath=ckpt_dir, filename="best", monitor="val/mIoU", mode="max", save_top_k=1,
            enable_version_counter=False, auto_insert_metric_name=False,
        ))
        callbacks.append(ModelCheckpoint(
            dirpath=ckpt_dir, filename="last", save_top_k=1, every_n_epochs=1,
            enable_version_counter=False, auto_insert_metric_name=False,
        ))
        if t.checkpoint_every_n_steps:
            callbacks.append(ModelCheckpoint(
                dirpath=ckpt_dir, filename="last_step", every_n_train_steps=t.checkpoint_every_n_steps,
                save_top_k=1, enable_version_counter=False, auto_insert_metric_name=False,
            ))
        # last_step.ckpt before each validation, free-space checks, Ctrl-C and non-finite gradients
        callbacks.append(RunGuard(ckpt_dir, check_gradients=t.precision != "16-mixed"))
        callbacks.append(EpochTimer())
        if t.ema_decay is not None:
            callbacks.append(EMAWeights(t.ema_decay))
    if t.progress:
        callbacks.append(StageProgressBar(refresh_rate=max(1, t.log_every_n_steps // 2)))
    check_accelerator(t.accelerator)
    silence_lightning()
    kwargs: dict[str, Any] = dict(
        max_epochs=t.epochs, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=t.strategy, precision=t.precision, sync_batchnorm=t.sync_bn, callbacks=callbacks,
        logger=run_loggers(out),
        plugins=[AtomicCheckpointIO()], use_distributed_sampler=False, num_sanity_val_steps=0,
        check_val_every_n_epoch=t.val_every_n_epochs, log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress, default_root_dir=out, benchmark=False,
    )
    if t.limit_train_batches is not None:
        kwargs["limit_train_batches"] = t.limit_train_batches
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def steps_per_epoch(num_images: int, cfg: Config, world_size: int) -> int:
    """Optimiser steps per epoch on each rank (the sampler pads to equal shards; full batches only)."""
    per_rank = -(-num_images // world_size)
    steps = per_rank // cfg.train.batch_size if per_rank >= cfg.train.batch_size else 1
    if cfg.train.limit_train_batches is not None:
        steps = min(steps, cfg.train.limit_train_batches)
    return max(steps, 1)


def checkpoint_position(resume_path: str | None) -> tuple[int | None, bool, int | None]:
    """(global step of the checkpoint, whether it was written before its epoch's validation, the
    stage index a staged run stored in it)."""
    if resume_path is None:
        return None, False, None
    try:
        ckpt = torch.load(resume_path, map_location="cpu", weights_only=True, mmap=True)
        step = int(ckpt["global_step"])
    except Exception:  # noqa: BLE001 - Lightning's own load reports a bad checkpoint properly
        return None, False, None
    stage = ckpt.get("scaleseg", {}).get("stage")
    return step, Path(resume_path).name in (LAST_STEP, LAST_FINITE), None if stage is None else int(stage)


def previous_config(out: Path, resume_path: str) -> Config | None:
    """The config the run was trained with: its latest record, else the one inside the checkpoint."""
    record = latest_config_path(out)
    data = read_run_config(record) if record is not None else read_checkpoint(resume_path).get("scaleseg", {}).get("config")
    if not isinstance(data, dict):
        return None
    data = dict(data, output_dir=str(out))
    try:
        return from_dict(data)
    except ConfigError:
        return None  # a record from an older schema: nothing to compare against


def prepare_run_folder(cfg: Config, out: Path, ckpt_dir: Path, resume_path: str | None,
                       force: bool) -> tuple[dict[str, Any] | None, Config | None]:
    """Refuse what would mix or lose runs (before anything is written). Returns the metrics of a run
    that is already finished (then there is nothing to do) and the config the run had so far."""
    if resume_path is None:
        refuse_fresh_start(out, ckpt_dir)
        return None, None
    previous = previous_config(out, resume_path)
    if previous is not None:
        check_resume_changes(previous, cfg, force)
    finished = finished_metrics(out, cfg)
    if finished is not None:
        best = finished.get("best_mIoU", finished.get("mIoU"))
        score = f", best val mIoU {best:.2f}" if isinstance(best, (int, float)) else ""
        epochs = finished.get("epochs", cfg.train.epochs)
        print(f"scaleseg: run {out} already finished ({epochs} epochs{score}); nothing to do, nothing "
              f"changed. To train longer: --resume auto train.epochs=N --force", file=sys.stderr)
    return finished, previous


def start_record(out: Path, cfg: Config, resumed: bool) -> None:
    """The first writes of a run, after every check passed: remove what killed processes left
    (temporary files; the logs of a new run's predecessor that never reached a checkpoint), then
    ``config.yaml`` or ``resumes/<N>.yaml``."""
    remove_stale_temp_files(out)
    if not resumed:
        removed = clear_unfinished_records(out)
        if removed:
            print(f"scaleseg: {out} held a run that stopped before its first checkpoint; starting over "
                  f"(removed {', '.join(p.name for p in removed)})", file=sys.stderr)
    write_run_config(out, cfg, resumed=resumed)


def check_training_data(cfg: Config, dm: SegDataModule) -> None:
    """``data.check``: every training and validation file, before the first step (see data/check.py)."""
    from ..data.check import check_splits, format_table, summary

    splits = {cfg.data.train_split: dm.train_set, cfg.data.val_split: dm.val_set}
    report = check_splits(splits, progress=cfg.train.progress)
    if report.problems:
        roots = [Path(cfg.data.root)] if cfg.data.root else []
        print(format_table(report, roots), file=sys.stderr)
        raise DataError(f"check-data: {summary(report, list(splits))}; fix or remove them, or set data.check=false")


def print_summary(out: Path, task: SegTask, trainer: L.Trainer, seconds: float) -> dict[str, Any]:
    """The closing lines of ``train``: where the model is, best and last validation mIoU."""
    best_ckpt = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None) == "val/mIoU"), None)
    best = best_ckpt.best_model_score if best_ckpt is not None else None
    best_value = float(best) if best is not None and torch.isfinite(best) else None
    last = (task.last_scores or {}).get("mIoU")
    minutes, secs = divmod(int(seconds), 60)
    lines = [f"trained {trainer.current_epoch} epochs ({trainer.global_step} steps) in {minutes}m{secs:02d}s",
             f"  model      {out / 'model.safetensors'} (weights after the last epoch)"]
    if best_value is not None:
        lines.append(f"  best mIoU  {best_value:.2f}  {best_ckpt.best_model_path}")
    lines.append(f"  last mIoU  {last:.2f}" if isinstance(last, (int, float)) else "  last mIoU  (not validated)")
    print("\n".join(lines), flush=True)
    return {"best_mIoU": best_value, "best_checkpoint": best_ckpt.best_model_path if best_ckpt else None}


def train(cfg: Config, resume: str | None = None, force: bool = False) -> dict[str, Any]:
    """Train, validate every ``val_every_n_epochs``, and write ``model.safetensors`` + ``metrics.json``.
    ``resume``: None (a new run), "auto" or a checkpoint path; ``force`` allows a resume that changes
    what is trained. Returns the final validation scores."""
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    launcher = is_launching_process()
    ensure_folder(out, "output_dir")
    with hold_run_folder(out, active=launcher):
        resume_path = resolve_resume(resume, ckpt_dir)
        previous = None
        if launcher:
            finished, previous = prepare_run_folder(cfg, out, ckpt_dir, resume_path, force)
            if finished is not None:
                return finished
        elif resume_path is not None and force:
            previous = previous_config(out, resume_path)
        return _fit(cfg, out, ckpt_dir, resume_path, launcher, previous)


def _fit(cfg: Config, out: Path, ckpt_dir: Path, resume_path: str | None, launcher: bool,
         previous: Config | None = None) -> dict[str, Any]:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = SegDataModule(cfg)
    model = create_model(cfg, dm.spec.num_classes)
    if cfg.train.init_weights is not None and resume_path is None:
        load_model_weights(model, cfg.train.init_weights)
    dm.set_normalization(model.mean, model.std)
    dm.setup("fit")
    if launcher and cfg.data.check:
        check_training_data(cfg, dm)
    task = SegTask(model, cfg, list(dm.spec.classes), scales=cfg.train.val_scales)
    resume_step, before_validation, stage = checkpoint_position(resume_path)
    if cfg.stages and stage:
        task.enter_stage(stage)  # that stage's optimiser, before Lightning restores its state
    if cfg.train.compile:
        compile_blocks(model)
    warn_emulated_bf16(cfg.train.precision, cfg.train.accelerator)
    extra = [ResumeSync(previous, cfg)] if resume_path is not None else []
    trainer = build_trainer(cfg, ckpt_dir, logger=run_loggers(out, resume_step, before_validation), extra_callbacks=extra)
    if cfg.stages and trainer.world_size > 1:
        raise ConfigError("config key 'stages' runs in one process (train.devices=1, train.num_nodes=1): DDP "
                          "registers the trainable parameters once, so a stage change would not reach it")
    task.steps_per_epoch = steps_per_epoch(dm.train_length, cfg, trainer.world_size)
    task.max_steps = cfg.train.epochs * task.steps_per_epoch
    if launcher:
        start_record(out, cfg, resumed=resume_path is not None)
    start = time.perf_counter()
    trainer.fit(task, datamodule=dm, ckpt_path=resume_path)
    result = dict(task.last_scores or {})
    if trainer.is_global_zero:
        save_weights(model, out / "model.safetensors")
        if cfg.stages and task.stage_plan is not None:
            save_weights(model, stage_weights_path(out, cfg.stages, task.stage_plan.index))
        if task.last_confusion is not None:
            result["confusion_matrix"] = task.last_confusion.tolist()
        result.update(print_summary(out, task, trainer, time.perf_counter() - start))
        result["epochs"] = cfg.train.epochs
        write_text_atomic(out / "metrics.json", json.dumps(result, indent=2))
    return result
