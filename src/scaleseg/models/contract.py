"""The model contract every scaleseg model follows, plain or wrapped (``docs/architecture.md``).

A model's forward returns an *output dict*; the same dict is handed back to the model for its
losses and its state updates. A wrapper (HMSA, explicit attention, DSRL) runs its inner model one or
more times, keeps each run's output dict as a :class:`Run`, and passes the runs back to the inner
model, so a wrapper never needs to know what is inside it::

    out = model.forward_features(batch["image"])          # logits, aux?, feats, grid, runs?, …
    losses = model.losses(out, batch, step)                 # supervision + method terms
    model.update_state([Run(out)], batch, step)             # e.g. the MCIBI memory (training only)

:class:`ContractModel` implements ``losses``, ``training_losses``, ``forward`` and ``predict`` once
on top of four hooks a model provides: ``forward_features``, ``supervision_losses`` (terms on its
own ``logits``/``aux``), ``method_losses`` (terms of its method, given its runs) and
``update_state``. A wrapper's ``method_losses``/``update_state`` add its own terms and then call the
inner model's hooks on the runs it made; the inner model resizes its maps to the batch's mask (logits
are bilinearly upsampled to the label size, as every reference does), so the wrapper passes the
batch unchanged.

:class:`Grid` records how a map at the network's feature resolution covers the input: the input
size, the (padded) size the network actually saw and the output scale (2 for a DSRL model). Every
output dict carries its ``grid`` so wrappers and losses can bring feature-resolution maps to the
output resolution the same way the model did.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..types import StepInfo

__all__ = ["ContractModel", "Grid", "Run", "inner_runs", "merge_losses", "resize", "supervise"]

Outputs = dict[str, Any]
"""An output dict: ``logits`` (``B×K×H×W``), ``feats``, ``grid`` and model-specific entries."""


@dataclass(frozen=True)
class Grid:
    """How feature-resolution maps cover an input.

    ``input_size`` (h, w) is the input as given; ``padded_size`` the size the backbone saw (the
    input zero-padded at the bottom/right to a multiple of the stride, or the input itself when the
    model stretches instead of padding); ``scale`` the output resolution over the input resolution
    (1, or 1/lr_scale for DSRL). ``output_size`` = ``scale × input_size``.
    """

    input_size: tuple[int, int]
    padded_size: tuple[int, int]
    scale: int = 1

    @property
    def output_size(self) -> tuple[int, int]:
        return self.input_size[0] * self.scale, self.input_size[1] * self.scale

    @property
    def padded_output_size(self) -> tuple[int, int]:
        return self.padded_size[0] * self.scale, self.padded_size[1] * self.scale

    def to_output(self, t: Tensor, size: Sequence[int] | None = None) -> Tensor:
        """A map covering the padded input (any resolution) → the output grid: bilinear
        (``align_corners=False``) to ``scale × padded_size``, cropped to ``size`` (default
        ``output_size``; a DSRL label may be a pixel smaller than ``scale × input``)."""
        h, w = (int(size[0]), int(size[1])) if size is not None else self.output_size
        return resize(t, self.padded_output_size)[..., :h, :w]

    def pad_mask(self, mask: Tensor, ignore_index: int) -> Tensor:
        """``B×h×w`` labels of the output area → labels of the padded output area (pad = ignore)."""
        ph, pw = self.padded_output_size
        pad_h, pad_w = ph - mask.shape[-2], pw - mask.shape[-1]
        if pad_h <= 0 and pad_w <= 0:
            return mask[..., :ph, :pw]
        return F.pad(mask, (0, max(pad_w, 0), 0, max(pad_h, 0)), value=ignore_index)[..., :ph, :pw]


@dataclass(frozen=True)
class Run:
    """One run of an inner model inside a wrapper: its output dict and its input scale relative to
    the batch image (HMSA's low-scale run has ``scale=0.5``; the run on the batch image itself 1.0)."""

    out: Outputs
    scale: float = 1.0


def inner_runs(runs: Sequence[Run]) -> list[Run]:
    """The inner model's runs recorded in a wrapper's runs (``out["runs"]``), with scales composed:
    a DSRL run inside HMSA's 0.5 run is at scale 0.5 relative to the batch."""
    return [Run(inner.out, run.scale * inner.scale) for run in runs for inner in run.out["runs"]]


def merge_losses(own: dict[str, Tensor], inner: dict[str, Tensor]) -> dict[str, Tensor]:
    """A wrapper's terms plus its inner model's; a name used by both is a programming error."""
    clash = sorted(set(own) & set(inner))
    if clash:
        raise ValueError(f"loss terms {clash} are named by both a wrapper and its inner model")
    return {**own, **inner}


def resize(t: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear (``align_corners=False``) resize of ``B×C×h×w`` to ``size``; identity if equal."""
    size = (int(size[0]), int(size[1]))
    if tuple(t.shape[-2:]) == size:
        return t
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def supervise(criterion: nn.Module, logits: Tensor, mask: Tensor) -> Tensor:
    """``criterion(logits, mask)`` with ``B×K×h×w`` logits bilinearly upsampled to the ``B×H×W`` mask
    first when the sizes differ (a low-scale run, or an inner model of a DSRL wrapper)."""
    return criterion(resize(logits, mask.shape[-2:]), mask)


def padded_size(size: Sequence[int], stride: int) -> tuple[int, int]:
    """``size`` rounded up to a multiple of ``stride`` per axis."""
    return math.ceil(size[0] / stride) * stride, math.ceil(size[1] / stride) * stride


class ContractModel(nn.Module):
    """Base class of every scaleseg model: the shared half of the contract.

    Subclasses provide ``forward_features(x) -> Outputs`` and, as needed,
    ``supervision_losses``, ``method_losses`` and ``update_state``; they also expose
    ``num_classes``, ``mean``, ``std``, ``stride``, ``feat_channels`` (channels of ``feats``) and
    ``output_scale`` (output resolution ÷ input resolution).
    """

    output_scale: int = 1

    def forward_features(self, x: Tensor) -> Outputs:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """``B×3×H×W`` normalised image → ``B×K×(sH)×(sW)`` logits (s = ``output_scale``)."""
        return self.forward_features(x)["logits"]

    # ------------------------------------------------------------------ losses and state
    def supervision_losses(self, out: Outputs, batch: dict[str, Any], step: StepInfo) -> dict[str, Tensor]:
        """Terms supervising this model's own ``out["logits"]`` (and ``aux``) with ``batch["mask"]``."""
        return {}

    def method_losses(self, runs: Sequence[Run], batch: dict[str, Any], step: StepInfo) -> dict[str, Tensor]:
        """Terms of this model's method beyond the supervision of its final logits, given the runs a
        wrapper made of it (or the model's own single run). Plain models have none."""
        return {}

    def update_state(self, runs: Sequence[Run], batch: dict[str, Any], step: StepInfo) -> None:
        """Method state updates that need labels (the MCIBI memory), after the losses. Training only."""

    def losses(self, out: Outputs, batch: dict[str, Any], step: StepInfo) -> dict[str, Tensor]:
        """All named, already weighted loss terms of one forward (their sum is minimised)."""
        return {**self.supervision_losses(out, batch, step), **self.method_losses([Run(out)], batch, step)}

    def training_forward(self, batch: dict[str, Any]) -> Outputs:
        """The forward whose outputs :meth:`training_losses` scores: ``forward_features(image)``
        (HMSA: always its two-scale training fusion; DSRL: on the HR mask's grid)."""
        return self.forward_features(batch["image"])

    def training_losses(self, batch: dict[str, Any], step: StepInfo) -> dict[str, Tensor]:
        """:meth:`training_forward`, the loss terms, then (in training mode) the state updates."""
        out = self.training_forward(batch)
        losses = self.losses(out, batch, step)
        if self.training:
            self.update_state([Run(out)], batch, step)
        return losses

    def predict(self, image: Any, **kwargs: Any) -> Tensor:
        """Eval-mode labels of raw image(s): see :func:`scaleseg.models.segmentor.predict_labels`.
        ``kwargs`` go to ``forward_features`` (e.g. ``scales=`` for a hierarchical model)."""
        from .segmentor import predict_labels

        return predict_labels(self, image, **kwargs)
