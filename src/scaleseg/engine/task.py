"""The Lightning module: one training step = the model's own ``training_losses``; validation = the
configured inference (whole / slide / flip / scales) into a confusion matrix synced across ranks."""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, to_dict
from ..data.base import sample_seed
from ..errors import ConfigError, DivergedError
from ..inference import Inferencer
from ..tiling import TiledInference, chain_function
from ..metrics import ConfusionMatrix, scores
from ..types import StepInfo
from .speed import batch_to_channels_last, to_channels_last, use_channels_last
from .checkpoint import save_weights
from .stages import (
    StagePlan, announce, apply_stage, keep_frozen_in_eval, plan_stage, stage_at_epoch, stage_lr_factor, stage_weights_path,
)


def warmup_factor(step: int, warmup_steps: int, warmup_ratio: float) -> float:
    """Linear warm-up from ``warmup_ratio`` to 1 over ``warmup_steps``; 1 afterwards."""
    if step < warmup_steps:
        return warmup_ratio + (1.0 - warmup_ratio) * step / warmup_steps
    return 1.0


def poly_factor(step: int, max_steps: int, power: float, warmup_steps: int = 0, warmup_ratio: float = 0.1) -> float:
    """LR multiplier: linear warm-up from ``warmup_ratio`` over ``warmup_steps``, then (1 − t/T)^power."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps, warmup_ratio)
    return max(0.0, 1.0 - step / max(max_steps, 1)) ** power


def make_predictor(
    model: nn.Module, cfg: Config, scales: list[float] | None = None, labels: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x B×3×H×W → logits`` under the configured inference (``eval`` section); with ``labels``,
    ``x → B×H×W`` argmax labels (taken window by window when a plain image exceeds ``eval.max_pixels``,
    so ``scaleseg predict`` never holds image-sized logits).

    ``scales`` (default ``eval.scales``): for a hierarchical-attention model they are chained by its
    attention (scale_mode auto/hierarchical; without scales, the model's own ``infer_scales``,
    (0.5, 1.0, 2.0) unless the config set others) or pooled (avg/max over its single-scale outputs,
    the paper's baselines); for any other model they are pooled (auto = avg), and without scales
    inference is single-scale.
    """
    from ..models.hmsa import HierarchicalAttention

    e = cfg.eval
    scales = e.scales if scales is None else scales
    hierarchical = isinstance(model, HierarchicalAttention)
    if e.scale_mode == "hierarchical" and not hierarchical:
        raise ConfigError("config key 'eval.scale_mode' = 'hierarchical' needs model.hmsa.mode=hierarchical")
    chain = hierarchical and e.scale_mode in ("auto", "hierarchical")
    pool_scales = scales if scales and not chain else None
    tiling = TiledInference(model, e.max_pixels, e.tile_margin) if e.max_pixels is not None and e.mode == "whole" else None
    inferencer = Inferencer(
        mode=e.mode, crop_size=tuple(e.crop_size) if e.crop_size else None,
        stride=tuple(e.stride) if e.stride else None, flip=e.flip, scales=pool_scales,
        scale_mode="avg" if e.scale_mode in ("auto", "hierarchical") else e.scale_mode,
        tiling=None if chain else tiling,
        input_scale=e.infer_scale, output_scale=int(getattr(model, "output_scale", 1)),
    )
    if e.sparse and not chain:
        raise ConfigError("config key 'eval.sparse' = true needs model.hmsa.mode=hierarchical (chained eval.scales)")
    if chain:
        chain_scales = tuple(scales) if scales else tuple(model.infer_scales)
        fn: Callable[[torch.Tensor], torch.Tensor] = chain_function(model, chain_scales, e, tiling)
    elif hierarchical:
        fn = lambda x: model.forward_features(x, scales=[1.0])["logits"]
    else:
        fn = model
    if labels:
        return lambda x: inferencer.labels(fn, x)
    return lambda x: inferencer(fn, x)


def model_signature(cfg: Config, num_classes: int) -> str:
    """A short human-readable description of the architecture, stored in checkpoints."""
    m = cfg.model
    parts = [m.arch, m.backbone, f"K={num_classes}"]
    if m.hmsa.mode != "none":
        parts.append(f"hmsa={m.hmsa.mode}")
    if m.mcibi.enabled:
        parts.append("mcibi")
    if m.dsrl.enabled:
        parts.append(f"dsrl={m.dsrl.upsample}{'+sisr' if m.dsrl.sisr else ''}")
    return "/".join(parts)


class SegTask(L.LightningModule):
    """Wraps any scaleseg model (see docs/architecture.md) for Lightning training and evaluation."""

    def __init__(self, model: nn.Module, cfg: Config, class_names: list[str], scales: list[float] | None = None) -> None:
        """``scales`` overrides ``eval.scales`` for validation (training passes ``train.val_scales``)."""
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.channels_last = use_channels_last(cfg.train.channels_last, cfg.train.accelerator)
        if self.channels_last:
            to_channels_last(model)
        self.class_names = list(class_names)
        self.predictor = make_predictor(model, cfg, scales)
        self.val_cm = ConfusionMatrix(len(class_names))
        self.extra_metrics = nn.ModuleDict(getattr(model, "val_metrics", lambda: {})())
        self.max_steps = 1  # set by the caller from the data length (see engine.train.steps_per_epoch)
        self.steps_per_epoch = 1  # likewise
        self.last_scores: dict[str, Any] | None = None
        self.last_confusion: torch.Tensor | None = None
        self.last_losses: dict[str, torch.Tensor] = {}
        # staged training (engine/stages.py): the running stage; a resume calls enter_stage first
        self.stage_plan: StagePlan | None = None
        self._announced: int | None = None
        if cfg.stages:
            self.enter_stage(0)

    # ------------------------------------------------------------------ staged training
    def enter_stage(self, index: int) -> None:
        """Freeze and unfreeze for stage ``index`` (the optimiser is rebuilt by the caller)."""
        self.stage_plan = plan_stage(self.model, self.cfg.stages, index)
        apply_stage(self.model, self.stage_plan)
        self.train(self.training)

    def train(self, mode: bool = True) -> "SegTask":
        """``nn.Module.train``, keeping the running stage's frozen modules in eval mode."""
        super().train(mode)
        if mode:
            keep_frozen_in_eval(self.model, self.stage_plan)
        return self

    def on_train_epoch_start(self) -> None:
        stages = self.cfg.stages
        if not stages or self.stage_plan is None:
            return
        index = stage_at_epoch(stages, self.current_epoch)
        if index != self.stage_plan.index:
            from .ema import EMAWeights

            for callback in self.trainer.callbacks:
                if isinstance(callback, EMAWeights):
                    callback.start_stage(self)  # the model now holds the finished stage's EMA weights
            if self.trainer.is_global_zero:
                save_weights(self.model, stage_weights_path(Path(self.cfg.output_dir), stages, self.stage_plan.index))
            self.enter_stage(index)
            self.trainer.strategy.setup_optimizers(self.trainer)
        if self._announced != index and self.trainer.is_global_zero:
            announce(self.stage_plan.describe(self.model, len(stages)))
        self._announced = index

    # ------------------------------------------------------------------ training
    def prepare_batch(self, batch: Any) -> Any:
        """The batch as the model takes it: images channels-last with ``train.channels_last``."""
        return batch_to_channels_last(batch) if self.channels_last else batch

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Re-seed the global RNG (dropout, random choices inside methods) from (seed, step), so that a
        # resumed run replays exactly what the uninterrupted run did from the step it stopped at.
        torch.manual_seed(sample_seed(self.cfg.seed, -1, self.global_step))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        step = StepInfo(self.global_step, self.max_steps, self.current_epoch)
        batch = self.prepare_batch(batch)
        losses = self.model.training_losses(batch, step)
        loss = torch.stack([v.float() for v in losses.values()]).sum()
        self.last_losses = {k: v.detach() for k, v in losses.items()}
        self.check_finite(loss)
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), batch_size=bs)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=bs)
        if self.stage_plan is not None:
            self.log("stage", float(self.stage_plan.index + 1), batch_size=bs)  # the bar names it (StageProgressBar)
        return loss

    def check_finite(self, loss: torch.Tensor) -> None:
        """A non-finite loss (on any rank) stops training with a DivergedError naming the step and the
        terms, after writing the weights before this step to ``checkpoints/last_finite.ckpt``."""
        nonfinite = not bool(torch.isfinite(loss))
        trainer = self._trainer
        if trainer is None:
            if nonfinite:
                raise DivergedError(f"non-finite training loss at step {self.global_step}: "
                                    + ", ".join(f"{k}={v.item():.4g}" for k, v in self.last_losses.items()))
            return
        if trainer.strategy.reduce_boolean_decision(nonfinite, all=False):
            from .guards import diverged

            raise diverged(trainer, self.model, self.last_losses, "loss", Path(self.cfg.output_dir) / "checkpoints",
                           self.cfg.optim.lr, self.cfg.train.precision)

    def configure_optimizers(self) -> Any:
        o = self.cfg.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        plan = self.stage_plan
        lr = plan.stage.lr if plan is not None and plan.stage.lr is not None else o.lr
        if o.name == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)
        # not trainer.estimated_stepping_batches: it builds the train loader before a resume restores it
        max_steps, per_epoch = self.max_steps, self.steps_per_epoch
        if plan is not None:  # a stage: its own LR and schedule, counted from the stage's first step
            stage = plan.stage
            factor = lambda s: stage_lr_factor(stage, s, per_epoch, o.poly_power, o.warmup_ratio)  # noqa: E731
        else:
            factor = lambda s: poly_factor(s, max_steps, o.poly_power, o.warmup_steps, o.warmup_ratio)  # noqa: E731
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation
    def predict_logits(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits B×K×H×W at the label size ``size`` under the configured inference."""
        logits = self.predictor(image)
        if logits.shape[-2:] != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        batch = self.prepare_batch(batch)
        mask = batch["mask"]
        logits = self.predict_logits(batch["image"], mask.shape[-2:])
        self.val_cm.update(logits.argmax(1), mask)
        update = getattr(self.model, "update_val_metrics", None)
        if update is not None:
            update(self.extra_metrics, batch)

    def on_validation_epoch_end(self) -> None:
        mat = self.val_cm.compute()
        self.val_cm.reset()
        result = scores(mat.cpu(), self.class_names)
        self.last_scores = result
        self.last_confusion = mat.cpu()
        self.log("val/mIoU", result["mIoU"] if result["mIoU"] is not None else math.nan, prog_bar=True, sync_dist=False, rank_zero_only=False)
        self.log("val/aAcc", result["aAcc"], sync_dist=False)
        for name, metric in self.extra_metrics.items():
            self.log(f"val/{name}", metric.compute(), sync_dist=False)
            result[name] = float(metric.compute())
            metric.reset()

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["scaleseg"] = {
            "config": to_dict(self.cfg),
            "signature": model_signature(self.cfg, len(self.class_names)),
            "class_names": self.class_names,
        }
        if self.stage_plan is not None:
            checkpoint["scaleseg"]["stage"] = self.stage_plan.index

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from ..errors import CheckpointError

        if self.cfg.train.ema_decay is None:
            from .ema import check_no_ema

            check_no_ema(checkpoint)
        saved = checkpoint.get("scaleseg", {}).get("signature")
        mine = model_signature(self.cfg, len(self.class_names))
        if saved is not None and saved != mine:
            raise CheckpointError(f"cannot resume: the checkpoint is from model '{saved}' but the config builds '{mine}'")
