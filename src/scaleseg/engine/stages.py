"""Staged training (``stages:``): the stages run one after the other inside one Lightning fit.

Each stage names what trains (``train:``) or what is frozen (``freeze:``) by part or parameter-name
prefix (``models/parts.py``), its epochs, LR and schedule, and for hierarchical attention its
training pair and whether the scales are fused (stage 1 of the single-GPU recipe trains the base at
each scale without attention).

Entering a stage (at the first epoch of the stage; see ``SegTask.on_train_epoch_start``):

* a frozen parameter gets ``requires_grad=False``: no gradient is computed, the new optimiser does
  not hold it (so it has no momentum or weight decay, and is bit-identical after the stage);
* a frozen module is kept in eval mode: BatchNorm running statistics stay fixed, dropout is off,
  and a frozen MCIBI memory is not updated;
* a new optimiser and LR schedule are built for the trainable parameters; the stage's step count
  starts at 0;
* with EMA weights, the stage starts from the previous stage's EMA weights (its result) and a fresh
  average.

The stage index is stored in every checkpoint (``checkpoint["scaleseg"]["stage"]``). A resume
rebuilds that stage's optimiser before Lightning restores its state, so a resume inside a stage and
across a stage boundary continues exactly. Multi-process training (DDP) re-wraps the model after a
stage change, because DDP registers the trainable parameters when it wraps the model.
"""
from __future__ import annotations

import sys
from pathlib import Path
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from torch import nn

from ..config import StageConfig
from ..errors import ConfigError
from ..models.parts import PARTS, matches, part_sizes, unmatched


def stage_bounds(stages: Sequence[StageConfig]) -> list[tuple[int, int]]:
    """``[first epoch, end epoch)`` of every stage, in global epochs."""
    bounds, start = [], 0
    for st in stages:
        bounds.append((start, start + st.epochs))
        start += st.epochs
    return bounds


def stage_at_epoch(stages: Sequence[StageConfig], epoch: int) -> int:
    """The index of the stage that runs global epoch ``epoch`` (the last one past the end)."""
    for i, (_, end) in enumerate(stage_bounds(stages)):
        if epoch < end:
            return i
    return len(stages) - 1


@dataclass
class StagePlan:
    """What one stage trains and freezes in a given model."""

    index: int
    stage: StageConfig
    trainable: list[str]  # parameter names
    frozen: list[str]  # parameter names
    frozen_modules: list[str]  # module names kept in eval mode

    def describe(self, model: nn.Module, total: int) -> str:
        """One line: ``stage 2/3 'attention' (epochs 5-6): trains attention (0.59 M); frozen: …``."""
        st = self.stage
        params = dict(model.named_parameters())
        count = sum(params[n].numel() for n in self.trainable)
        trained = f"{count / 1e6:.2f} M" if count >= 10_000 else f"{count:,}"
        what_trains = ", ".join(st.train) if st.train is not None else ("all but " + ", ".join(st.freeze) if st.freeze else "everything")
        frozen = ", ".join(sorted({p for p in PARTS if any(matches(n, p) for n in self.frozen)})) or "nothing"
        extra = "" if st.fuse_scales else ", scales trained separately (no attention)"
        if st.train_scales is not None:
            extra += f", train scales {st.train_scales}"
        return (f"stage {self.index + 1}/{total} '{st.name}': trains {what_trains} ({trained} params); "
                f"frozen: {frozen}; {st.epochs} epochs, lr {st.lr if st.lr is not None else 'optim.lr'} {st.schedule}{extra}")


def _trains(name: str, stage: StageConfig) -> bool:
    if stage.train is not None:
        return any(matches(name, s) for s in stage.train)
    return not any(matches(name, s) for s in stage.freeze)


def plan_stage(model: nn.Module, stages: Sequence[StageConfig], index: int) -> StagePlan:
    """Resolve stage ``index`` against ``model``; a part or prefix that matches nothing, or a stage
    that would train nothing, is a ConfigError naming the key."""
    st = stages[index]
    key = f"stages[{index}]"
    for field_name, selectors in (("train", st.train or []), ("freeze", st.freeze)):
        missing = unmatched(model, selectors)
        if missing:
            have = ", ".join(sorted(part_sizes(model)))
            raise ConfigError(f"config key '{key}.{field_name}': {', '.join(repr(m) for m in missing)} matches no "
                              f"parameter of this model (its parts: {have}; or give a parameter-name prefix)")
    names = [n for n, _ in model.named_parameters()]
    trainable = [n for n in names if _trains(n, st)]
    if not trainable:
        raise ConfigError(f"config key '{key}': stage '{st.name}' freezes every parameter; nothing would train")
    frozen = [n for n in names if n not in set(trainable)]
    frozen_modules = [n for n, m in model.named_modules() if n and not _module_trains(n, m, st)]
    return StagePlan(index, st, trainable, frozen, frozen_modules)


def _module_trains(name: str, module: nn.Module, stage: StageConfig) -> bool:
    """A module with parameters trains if any of them does; a parameter-free one (dropout, an
    activation) follows its own name."""
    own = [f"{name}.{p}" for p, _ in module.named_parameters()]
    return any(_trains(n, stage) for n in own) if own else _trains(name, stage)


def apply_stage(model: nn.Module, plan: StagePlan) -> None:
    """``requires_grad`` per the plan, frozen modules to eval mode, and the stage's HMSA settings."""
    frozen = set(plan.frozen)
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    keep_frozen_in_eval(model, plan)
    st = plan.stage
    if hasattr(model, "fuse_scales"):  # hierarchical attention
        model.fuse_scales = st.fuse_scales
        if st.train_scales is not None:
            model.lo_scale = float(min(st.train_scales))


def keep_frozen_in_eval(model: nn.Module, plan: StagePlan | None) -> None:
    """Set the plan's frozen modules to eval mode (non-recursively: a trainable child keeps its mode)."""
    if plan is None:
        return
    modules = dict(model.named_modules())
    for name in plan.frozen_modules:
        modules[name].training = False


def stage_lr_factor(stage: StageConfig, step: int, steps_per_epoch: int, poly_power: float,
                    warmup_ratio: float) -> float:
    """LR multiplier at ``step`` steps into the stage."""
    from .task import poly_factor, warmup_factor  # task imports this module

    if stage.schedule == "poly":
        return poly_factor(step, stage.epochs * steps_per_epoch, poly_power, stage.warmup_steps, warmup_ratio)
    base = warmup_factor(step, stage.warmup_steps, warmup_ratio)
    if stage.schedule == "exponential":
        return base * stage.gamma ** (step // max(steps_per_epoch, 1))
    return base


def stage_weights_path(out: Path, stages: Sequence[StageConfig], index: int) -> Path:
    """Where a stage's result (its final weights, EMA weights with EMA) is kept in the run folder."""
    return Path(out) / "stages" / f"{index + 1}-{stages[index].name}.safetensors"


class StageProgressBar(TQDMProgressBar):
    """Lightning's progress bar; in a staged run its description names the running stage."""

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        stages = getattr(getattr(pl_module, "cfg", None), "stages", None)
        if stages:
            i = stage_at_epoch(stages, trainer.current_epoch)
            self.train_progress_bar.set_description(
                f"Epoch {trainer.current_epoch} · stage {i + 1}/{len(stages)} {stages[i].name}")


def announce(line: str) -> None:
    print(f"scaleseg: {line}", file=sys.stderr, flush=True)


__all__ = ["StagePlan", "stage_bounds", "stage_at_epoch", "plan_stage", "apply_stage", "keep_frozen_in_eval",
           "stage_lr_factor", "stage_weights_path", "announce", "StageProgressBar"]
