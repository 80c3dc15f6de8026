"""``scaleseg train``: Lightning fit with atomic checkpoints, exact resume, TensorBoard and CSV logs."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from ..config import Config, to_yaml
from ..errors import CheckpointError
from ..models.factory import create_model
from .checkpoint import AtomicCheckpointIO, load_model_weights, save_weights
from .datamodule import SegDataModule
from .ema import EMAWeights
from .task import SegTask
from .timing import EpochTimer


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def resolve_resume(resume: str | None, ckpt_dir: Path) -> str | None:
    """``None`` → fresh run (refusing to overwrite an existing run); ``"auto"`` → latest checkpoint in
    the run folder; anything else → that file."""
    candidates = [p for p in (ckpt_dir / "last.ckpt", ckpt_dir / "last_step.ckpt") if p.exists()]
    last = max(candidates, key=lambda p: p.stat().st_mtime) if candidates else ckpt_dir / "last.ckpt"
    if resume is None:
        if candidates:
            raise CheckpointError(
                f"run folder {ckpt_dir.parent} already holds {last}; pass --resume auto to continue it, "
                "or set output_dir to a new folder"
            )
        return None
    if resume == "auto":
        if not last.exists():
            raise CheckpointError(f"--resume auto: no checkpoint at {last} to continue from")
        return str(last)
    if not Path(resume).is_file():
        raise CheckpointError(f"--resume: checkpoint not found: {resume}")
    return resume


def build_trainer(cfg: Config, ckpt_dir: Path | None = None, **overrides: Any) -> L.Trainer:
    t = cfg.train
    out = Path(cfg.output_dir)
    callbacks: list[Any] = []
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
    if ckpt_dir is not None:  # training only
        callbacks.append(EpochTimer())
        if t.ema_decay is not None:
            callbacks.append(EMAWeights(t.ema_decay))
    if t.progress:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, t.log_every_n_steps // 2)))
    kwargs: dict[str, Any] = dict(
        max_epochs=t.epochs, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=t.strategy, precision=t.precision, sync_batchnorm=t.sync_bn, callbacks=callbacks,
        logger=[TensorBoardLogger(out, name="tensorboard"), CSVLogger(out, name="csv")],
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


def train(cfg: Config, resume: str | None = None) -> dict[str, Any]:
    """Train, validate every ``val_every_n_epochs``, and write ``model.safetensors`` + ``metrics.json``."""
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    resume_path = resolve_resume(resume, ckpt_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = SegDataModule(cfg)
    model = create_model(cfg, dm.spec.num_classes)
    if cfg.train.init_weights is not None and resume_path is None:
        load_model_weights(model, cfg.train.init_weights)
    dm.set_normalization(model.mean, model.std)
    task = SegTask(model, cfg, list(dm.spec.classes), scales=cfg.train.val_scales)
    trainer = build_trainer(cfg, ckpt_dir)
    dm.setup("fit")
    task.max_steps = cfg.train.epochs * steps_per_epoch(dm.train_length, cfg, trainer.world_size)
    if trainer.is_global_zero:
        write_text_atomic(out / "config.yaml", to_yaml(cfg))
    trainer.fit(task, datamodule=dm, ckpt_path=resume_path)
    result = dict(task.last_scores or {})
    if trainer.is_global_zero:
        save_weights(model, out / "model.safetensors")
        if task.last_confusion is not None:
            result["confusion_matrix"] = task.last_confusion.tolist()
        write_text_atomic(out / "metrics.json", json.dumps(result, indent=2))
    return result
