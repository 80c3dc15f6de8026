"""Hierarchical Multi-Scale Attention (Tao, Sapra, Catanzaro 2020) and its multi-scale baselines.

All three wrappers take any base model that follows the segmentation-model contract
(``forward_features(x) -> {"logits" at input size, "aux" (optional), "feats"}``) and fuse **logits**
over scales:

* :class:`HierarchicalAttention` — HMSA: a sigmoid attention head on the *lower* scale's features,
  trained on two scales, chained over any list of scales at inference;
* :class:`ScalePooling` — average / max pooling of logits over scales (inference-only baseline);
* :class:`ExplicitAttention` — Chen et al.'s "Attention to Scale": one softmax-normalised map per
  scale, trained on all scales at once.

Inputs are resized bilinearly (``align_corners=False``) to ``floor(H·s) × floor(W·s)``, as the
reference's ``ResizeX(..., recompute_scale_factor=True)`` does.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from fractions import Fraction
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from scaleseg.errors import ConfigError
from scaleseg.inference import scale_pooling
from scaleseg.models.backbone import Backbone
from scaleseg.models.heads import DeepLabV3PlusHead
from scaleseg.models.contract import ContractModel, Run, aux_outputs, inner_runs, merge_losses, resize, supervise
from scaleseg.models.segmentor import SegmentationModel, aux_criterion, side_criterion
from scaleseg.types import StepInfo

__all__ = [
    "AttentionHead",
    "HierarchicalAttention",
    "ScalePooling",
    "ExplicitAttention",
    "EXPLICIT_HEADS",
    "scale_key",
    "check_scales",
    "hierarchical_fusion",
    "deeplabv3plus_os8",
]


def scale_key(prefix: str, scale: float) -> str:
    """Per-scale output key, reference style: ``scale_key("pred", 0.5) == "pred_0.5x"``."""
    return f"{prefix}_{float(scale)}x"


def check_scales(scales: Sequence[float], key: str) -> tuple[float, ...]:
    """Validate a scale list for hierarchical/explicit fusion: positive numbers including 1.0.

    Raises ConfigError naming ``key`` and the list (the reference only asserts; NVIDIA issue #105).
    """
    values = list(scales) if isinstance(scales, Sequence) and not isinstance(scales, str) else [scales]
    if not values or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in values):
        raise ConfigError(f"{key}={values!r}: expected a non-empty list of positive scales containing 1.0")
    if 1.0 not in values:
        raise ConfigError(f"{key}={values!r}: must contain 1.0 (the target scale the output is fused at)")
    if len(set(values)) != len(values):
        raise ConfigError(f"{key}={values!r}: scales must be distinct")
    return tuple(float(s) for s in values)


_resize = resize


def _scaled_size(x: Tensor, scale: float) -> tuple[int, int]:
    """``max(1, floor(H·s)) × max(1, floor(W·s))``. For dyadic scales (0.5, 0.25, 1.5, 2, …: exact in
    float) in integer arithmetic, so a traced graph holds no float ``floor`` (torch.export cannot save one)."""
    h, w = x.shape[-2:]
    ratio = Fraction(scale)
    if ratio.denominator <= 1024 and ratio.denominator & (ratio.denominator - 1) == 0:
        p, q = ratio.numerator, ratio.denominator
        return torch.sym_max(1, h * p // q), torch.sym_max(1, w * p // q)
    return torch.sym_max(1, math.floor(h * scale)), torch.sym_max(1, math.floor(w * scale))


def _fuse_step(fused: Tensor, p: Tensor, a: Tensor, scale: float) -> Tensor:
    """One step of the hierarchical chain (highest scale first): blend the running fusion ``fused``
    with the next lower scale's logits ``p`` by that scale's attention ``a`` (``B×1×h×w`` at ``p``'s
    size). At or above 1.0 the result is at ``p``'s size (``fused`` is brought down to it); below
    1.0 at ``fused``'s size (``a·p`` and ``a`` are brought up), as in the reference."""
    if scale >= 1.0:
        return a * p + (1 - a) * _resize(fused, p.shape[-2:])
    size = fused.shape[-2:]
    return _resize(a * p, size) + (1 - _resize(a, size)) * fused


def hierarchical_fusion(scale_outputs: dict[str, Tensor], scales: Sequence[float]) -> Tensor:
    """The hierarchical chain over ``scales`` from the per-scale outputs of a run over a superset of
    them (``forward_features(x, scales=superset, return_scales=True)``: ``pred_<s>x`` logits and
    ``attn_<s>x`` attention). Each scale's logits and attention depend on its own base run only, so
    one run over the union of several scale sets gives every set's fusion, equal to running that set
    alone. → ``B×K×H×W`` logits at the 1.0 scale's size. Raises ConfigError for a missing scale."""
    order = sorted(check_scales(scales, "scales"), reverse=True)
    needed = [scale_key("pred", s) for s in order] + [scale_key("attn", s) for s in order[1:]]
    missing = [k for k in needed if k not in scale_outputs]
    if missing:
        raise ConfigError(f"scales={list(scales)!r}: the run has no {', '.join(missing)}; run over a superset of these scales")
    fused = scale_outputs[scale_key("pred", order[0])]
    for s in order[1:]:
        fused = _fuse_step(fused, scale_outputs[scale_key("pred", s)], scale_outputs[scale_key("attn", s)], s)
    return fused


class AttentionHead(nn.Sequential):
    """HMSA scale-attention head: ``B×in_ch×h×w`` features → ``B×out_ch×h×w`` gate in (0, 1).

    3×3 conv → ``bottleneck`` (no bias), BN, ReLU, 3×3 conv (no bias), BN, ReLU, 1×1 conv → ``out_ch``
    (no bias), sigmoid. Default PyTorch init, so the gate starts near 0.5 (an equal blend). Layer
    names (``conv0 … sig``) follow the reference ``make_attn_head``.
    """

    def __init__(self, in_ch: int, bottleneck: int = 256, out_ch: int = 1) -> None:
        super().__init__(OrderedDict([
            ("conv0", nn.Conv2d(in_ch, bottleneck, 3, padding=1, bias=False)),
            ("bn0", nn.BatchNorm2d(bottleneck)),
            ("re0", nn.ReLU(inplace=True)),
            ("conv1", nn.Conv2d(bottleneck, bottleneck, 3, padding=1, bias=False)),
            ("bn1", nn.BatchNorm2d(bottleneck)),
            ("re1", nn.ReLU(inplace=True)),
            ("conv2", nn.Conv2d(bottleneck, out_ch, 1, bias=False)),
            ("sig", nn.Sigmoid()),
        ]))


class _ScaleWrapper(ContractModel):
    """Shared plumbing of the multi-scale wrappers: contract attributes passed through from the base
    model, criteria, the base run at one scale, and the contract hooks.

    A wrapper's output dict holds ``runs``: one :class:`~scaleseg.models.contract.Run` per scale it
    ran the base at (the base's own output dict and the scale). :meth:`method_losses` adds the
    wrapper's per-scale terms and then the base model's method terms for those runs;
    :meth:`update_state` hands the runs to the base (an MCIBI base updates its memory from the
    scale-1.0 run only, see ``MCIBIModel``).
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        aux_weight: float,
        per_scale_weight: float,
        criterion: nn.Module | None,
        aux_criterion: nn.Module | None,
    ) -> None:
        super().__init__()
        self.base = base
        self.aux_weight = float(aux_weight)
        self.per_scale_weight = float(per_scale_weight)
        # Registered only when given, so the base's criterion is not duplicated in the state dict.
        self.criterion = criterion
        self.aux_criterion = aux_criterion

    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    @property
    def mean(self) -> tuple[float, ...]:
        return self.base.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.base.std

    @property
    def stride(self) -> int:
        return self.base.stride

    @property
    def feat_channels(self) -> int:
        return self.base.feat_channels

    @property
    def output_scale(self) -> int:  # type: ignore[override]
        return getattr(self.base, "output_scale", 1)

    def main_criterion(self) -> nn.Module:
        """The criterion for the fused logits: ``criterion=`` if given, else the base model's."""
        crit = self.criterion if self.criterion is not None else getattr(self.base, "criterion", None)
        if crit is None:
            crit = getattr(getattr(self.base, "base", None), "criterion", None)  # a DSRL base
        if crit is None:
            raise ConfigError(f"{type(self).__name__}: no criterion given and the base model has none")
        return crit

    def side_criterion(self) -> nn.Module:
        """Criterion for the aux term: ``aux_criterion=``, else :func:`~scaleseg.models.segmentor.aux_criterion`
        of the main one (RMI: BCE only, or BCE + RMI with ``aux_rmi``, NVIDIA ``--ocr_aux_loss_rmi``)."""
        if self.aux_criterion is not None:
            return self.aux_criterion
        return aux_criterion(self.main_criterion())

    def scale_criterion(self) -> nn.Module:
        """Criterion for the per-scale terms: BCE only under RMI whatever the aux criterion (NVIDIA
        hard-codes ``do_rmi=False`` there), else the main criterion."""
        return side_criterion(self.main_criterion())

    def _base_run(self, x: Tensor, scale: float) -> Run:
        """Resize ``x`` by ``scale`` (floor size) and run the base → its :class:`Run`."""
        xs = x if scale == 1.0 else _resize(x, _scaled_size(x, scale))
        return Run(self.base.forward_features(xs), scale)

    def supervision_losses(self, out: dict[str, Any], batch: dict[str, Any], step: StepInfo) -> dict[str, Tensor]:
        """``main`` (criterion on the fused logits) and ``aux`` (``aux_weight`` · side criterion on the
        fused aux logits, when the base has aux logits and the weight is > 0)."""
        mask = batch["mask"]
        losses = {"main": supervise(self.main_criterion(), out["logits"], mask)}
        if self.aux_weight > 0:
            for key, aux in aux_outputs(out).items():
                losses[key] = self.aux_weight * supervise(self.side_criterion(), aux, mask)
        return losses

    def method_losses(self, runs: Sequence[Run], batch: dict[str, Any], step: StepInfo) -> dict[str, Tensor]:
        """``pred_<s>x``: ``per_scale_weight`` · side criterion on each scale's unfused logits
        (upsampled to the label size; omitted at weight 0), then the base model's method terms for
        its runs."""
        mask = batch["mask"]
        losses: dict[str, Tensor] = {}
        if self.per_scale_weight > 0:
            crit = self.scale_criterion()
            for run in runs:
                for inner in run.out["runs"]:
                    logits = inner.out["logits"]
                    losses[scale_key("pred", inner.scale)] = self.per_scale_weight * supervise(crit, logits, mask)
        return merge_losses(losses, self.base.method_losses(inner_runs(runs), batch, step))

    def update_state(self, runs: Sequence[Run], batch: dict[str, Any], step: StepInfo) -> None:
        """The base model's state updates on its runs (the batch is passed unchanged)."""
        self.base.update_state(inner_runs(runs), batch, step)


def _attention_to_output(attn: Tensor, run: Run, size: Sequence[int]) -> Tensor:
    """A feature-resolution gate of one base run → that run's output grid (``size``), the way the
    base brought its own logits there (padding and output scale from the run's ``grid``)."""
    return run.out["grid"].to_output(attn, size)


class HierarchicalAttention(_ScaleWrapper):
    """HMSA wrapper around a base segmentation model (Tao et al. 2020, NVIDIA ``MscaleOCR``).

    The attention head :class:`AttentionHead` reads the base's ``feats`` of the **lower** scale; the
    gate is predicted at feature resolution and brought to that scale's output grid the way the base
    brought its logits there (``grid``: padding to the stride, a DSRL base's 2× output).

    * Training (``self.training`` and ``scales is None``): two scales ``train_scales = (lo, 1.0)``,
      ``P = Up(a_lo·P_lo) + (1 − Up(a_lo))·P_1`` with ``a_lo·P_lo`` formed at the low resolution
      before upsampling; aux logits fused the same way.
    * Inference (eval mode, or ``scales=`` given): ``scales`` or else ``infer_scales`` (the config's
      ``eval.scales``, default (0.5, 1.0, 2.0) like NVIDIA's model), sorted high → low; the first
      sets ``P = p_s``; ``s ≥ 1``: ``P = a_s·p_s + (1 − a_s)·Down(P)``; ``s < 1``:
      ``P = Up(a_s·p_s) + (1 − Up(a_s))·P``. Output at the 1.0 resolution. Lower scales act last,
      i.e. have priority. So ``model(x)`` and ``model.predict(image)`` use the attention;
      ``model.forward_features(x, scales=[1.0])`` is the single-scale base.

    ``forward_features(x, scales=None, return_scales=False)`` returns ``{"logits": B×K×H×W,
    "aux": B×K×H×W (if the base has aux), "feats" and "grid" of the 1.0-scale run}``, plus ``runs``
    (one :class:`~scaleseg.models.contract.Run` per scale, for the losses) in training mode or with
    ``return_scales``; with ``return_scales=True`` the same flat dict also holds ``"pred_<s>x"``
    (unfused ``B×K×h_s×w_s`` logits at that scale's output size) and ``"attn_<s>x"``
    (``B×1×h_s×w_s`` gates, for every scale whose gate is used, i.e. all but the highest).

    Losses (:meth:`training_losses`, always the two-scale path): ``main`` (criterion on the fused
    logits), ``aux`` (``aux_weight ×`` side criterion on the fused aux, if the base has aux),
    ``pred_<s>x`` (``per_scale_weight ×`` side criterion on each unfused scale, upsampled to the label
    size first; omitted at weight 0), then the base's method terms for both runs (an MCIBI base:
    its memory terms, averaged over the two scales). The criterion is ``criterion=`` or the base's;
    with an :class:`~scaleseg.losses.rmi.RMICriterion` the per-scale terms use its BCE part only and
    the aux term too unless ``aux_rmi`` (NVIDIA ``--ocr_aux_loss_rmi``), as in the reference recipe.
    State updates go to the base with both runs; an MCIBI base updates its memory from the 1.0 run.
    """

    def __init__(
        self,
        base: nn.Module,
        attn_in_channels: int,
        *,
        train_scales: Sequence[float] = (0.5, 1.0),
        infer_scales: Sequence[float] = (0.5, 1.0, 2.0),
        per_scale_weight: float = 0.05,
        aux_weight: float = 0.4,
        criterion: nn.Module | None = None,
        aux_criterion: nn.Module | None = None,
        attn_bottleneck: int = 256,
    ) -> None:
        super().__init__(
            base, aux_weight=aux_weight, per_scale_weight=per_scale_weight,
            criterion=criterion, aux_criterion=aux_criterion,
        )
        train = check_scales(train_scales, "train_scales")
        if len(train) != 2 or not min(train) < 1.0:
            raise ConfigError(
                f"train_scales={list(train_scales)!r}: expected two scales (lo, 1.0) with 0 < lo < 1"
            )
        self.lo_scale = min(train)
        self.infer_scales = check_scales(infer_scales, "infer_scales")
        self.scale_attn = AttentionHead(attn_in_channels, attn_bottleneck)
        # False: training trains the base at each scale on its own (staged training, stage 1)
        self.fuse_scales = True

    def attention(self, run: Run) -> Tensor:
        """The gate of one base run on its output grid: ``B×1×h_s×w_s``."""
        return _attention_to_output(self.scale_attn(run.out["feats"]), run, run.out["logits"].shape[-2:])

    def forward_features(
        self, x: Tensor, scales: Sequence[float] | None = None, return_scales: bool = False
    ) -> dict[str, Any]:
        """``B×3×H×W`` → fused logits (see class docstring for keys and the scale choice)."""
        if scales is None and self.training:
            return self.two_scale_forward(x, return_scales)
        scales = self.infer_scales if scales is None else check_scales(scales, "scales")
        return self.nscale_forward(x, scales, return_scales)

    def training_forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        """HMSA's loss is always that of the two-scale training fusion (also in eval mode)."""
        return self.two_scale_forward(batch["image"])

    def training_losses(self, batch: dict[str, Any], step: StepInfo) -> dict[str, Tensor]:
        """The two-scale fusion's losses; with ``fuse_scales`` False (stage 1 of staged training)
        :meth:`separate_scale_losses` instead."""
        if self.fuse_scales:
            return super().training_losses(batch, step)
        return self.separate_scale_losses(batch, step)

    def separate_scale_losses(self, batch: dict[str, Any], step: StepInfo) -> dict[str, Tensor]:
        """The base trained at each training scale without attention: every loss term of the base
        (its logits upsampled to the label size) averaged over the scales (lo, 1.0); the base's state
        updates get both runs (an MCIBI memory learns from the 1.0 run)."""
        runs = [self._base_run(batch["image"], s) for s in (self.lo_scale, 1.0)]
        per_scale = [{**self.base.supervision_losses(run.out, batch, step),
                      **self.base.method_losses([run], batch, step)} for run in runs]
        losses = {k: torch.stack([terms[k] for terms in per_scale]).mean() for k in per_scale[-1]}
        if self.training:
            self.base.update_state(runs, batch, step)
        return losses

    def two_scale_forward(self, x: Tensor, return_scales: bool = False) -> dict[str, Any]:
        """Training fusion of (lo, 1.0): ``P = Up(a_lo·P_lo) + (1 − Up(a_lo))·P_1``."""
        lo, hi = self._base_run(x, self.lo_scale), self._base_run(x, 1.0)
        size = hi.out["logits"].shape[-2:]
        attn = self.attention(lo)
        attn_up = _resize(attn, size)
        out: dict[str, Any] = {
            "logits": _resize(attn * lo.out["logits"], size) + (1 - attn_up) * hi.out["logits"],
            "feats": hi.out["feats"], "grid": hi.out["grid"], "runs": [lo, hi],
        }
        for key, aux in aux_outputs(hi.out).items():
            out[key] = _resize(attn * lo.out[key], size) + (1 - attn_up) * aux
        if return_scales:
            out[scale_key("pred", self.lo_scale)] = lo.out["logits"]
            out[scale_key("attn", self.lo_scale)] = attn
            out[scale_key("pred", 1.0)] = hi.out["logits"]
        return out

    def nscale_forward(self, x: Tensor, scales: Sequence[float], return_scales: bool = False) -> dict[str, Any]:
        """Hierarchical chain over ``scales`` (must contain 1.0), highest first; output at 1.0 size."""
        scales = sorted(check_scales(scales, "scales"), reverse=True)
        keep_runs = return_scales or self.training
        pred: Tensor | None = None
        aux: dict[str, Tensor] = {}
        out: dict[str, Any] = {}
        runs: list[Run] = []
        for s in scales:
            run = self._base_run(x, s)
            p, p_aux = run.out["logits"], aux_outputs(run.out)
            a_s = self.attention(run) if pred is not None else None
            if s == 1.0:
                out["feats"], out["grid"] = run.out["feats"], run.out["grid"]
            if keep_runs:
                runs.append(run)
            if return_scales:
                out[scale_key("pred", s)] = p
                if a_s is not None:
                    out[scale_key("attn", s)] = a_s
            if pred is None:
                pred, aux = p, p_aux
            else:
                pred = _fuse_step(pred, p, a_s, s)
                aux = {k: _fuse_step(v, p_aux[k], a_s, s) for k, v in aux.items()}
        out["logits"] = pred
        out.update(aux)
        if keep_runs:
            out["runs"] = runs[::-1]  # low → high, like the training fusion's (lo, 1.0)
        return out


class ScalePooling(_ScaleWrapper):
    """Average / max pooling of logits over ``scales`` — the multi-scale inference baseline.

    Inference-only: in training mode (and in :meth:`training_losses`) it is the base model. In eval
    mode ``logits`` = :func:`scaleseg.inference.scale_pooling` of the base's logits (``mode`` "avg",
    as NVIDIA's ``--multi_scale_inference``, or "max"); ``feats``/``aux`` come from the base run at
    the scale closest to 1.0 (no extra forward pass). Scaled sizes are ``round(H·s)`` as in
    ``scale_pooling`` (HMSA uses ``floor``; they differ only for odd sizes at fractional scales).
    """

    def __init__(self, base: nn.Module, scales: Sequence[float] = (0.5, 1.0, 2.0), mode: str = "avg") -> None:
        super().__init__(base, aux_weight=0.0, per_scale_weight=0.0, criterion=None, aux_criterion=None)
        if mode not in ("avg", "max"):
            raise ConfigError(f"scale_mode={mode!r}: expected 'avg' or 'max'")
        values = list(scales) if isinstance(scales, Sequence) else [scales]
        if not values or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in values):
            raise ConfigError(f"scales={values!r}: expected a non-empty list of positive scales")
        self.scales = tuple(float(s) for s in values)
        self.mode = mode

    def forward_features(self, x: Tensor) -> dict[str, Any]:
        """``B×3×H×W`` → ``{"logits": pooled B×K×H×W, "feats", "grid", "aux"?}`` (base outputs in training)."""
        if self.training:
            return self.base.forward_features(x)
        keep = min(range(len(self.scales)), key=lambda i: abs(self.scales[i] - 1.0))
        calls: list[int] = [0]
        kept: dict[str, Any] = {}

        def logits_fn(xs: Tensor) -> Tensor:
            index, calls[0] = calls[0], calls[0] + 1
            if index != keep:
                return self.base(xs)
            kept.update(self.base.forward_features(xs))
            return kept["logits"]

        logits = scale_pooling(logits_fn, x, self.scales, self.mode, self.output_scale)
        result = {"logits": logits, "feats": kept["feats"], "grid": kept["grid"]}
        result.update(aux_outputs(kept))
        return result

    def training_forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.base.training_forward(batch)

    def losses(self, out: dict[str, Any], batch: dict[str, Any], step: StepInfo) -> dict[str, Tensor]:
        """The base model's single-scale training losses."""
        return self.base.losses(out, batch, step)

    def update_state(self, runs: Sequence[Run], batch: dict[str, Any], step: StepInfo) -> None:
        self.base.update_state(runs, batch, step)


EXPLICIT_HEADS = ("published", "bn")


class ExplicitAttention(_ScaleWrapper):
    """Explicit scale attention (Chen et al. 2016, "Attention to Scale"), the HMSA paper's baseline.

    Runs the base at every scale in ``scales`` (training and inference alike), resizes each scale's
    ``feats`` to the 1.0 feature size, concatenates them and predicts one map per scale, **softmax over
    scales**; the maps are upsampled to the 1.0 input size and the output is ``Σ_s w_s · Resize(p_s)``
    on logits (aux fused with the same weights).

    Attention head (``head_layout``; ``attn_bottleneck`` defaults to 512 / 256):

    * ``"published"`` (default): 3×3 conv → 512 (no bias), ReLU, 1×1 conv → ``S`` (no bias) — Chen
      et al.'s head and NVIDIA's ``attnscale.ASDV3P`` default (``ATTNSCALE_BN_HEAD`` off);
    * ``"bn"``: 3×3 conv → 256 (no bias), BN, ReLU, 1×1 conv → ``S`` — scaleseg's earlier layout,
      kept for its checkpoints (it matches neither reference).

    Deliberately differs from NVIDIA's ``ASDV3P``, which is broken (hmsa.md §2.6): its final 1×1 conv
    has ``padding=1``, so the map grows by 2 px per side (h×w → (h+2)×(w+2)) and is then stretched back
    to the image, shifting every weight by about one feature pixel; it also multiplies the logits by the
    raw maps without normalising across scales, and ``forward`` returns a tuple. Here the 1×1 conv has
    no padding, the maps are softmax-normalised and ``forward`` returns logits.

    ``forward_features(x, return_scales=False)`` → ``{"logits", "aux"?, "feats" (1.0 scale)}``; with
    ``return_scales`` also ``"weights"`` (``B×S×H×W``, scales in the given order) and
    ``"pred_<s>x"`` (unfused logits at that scale's input size). Losses: ``main``, ``aux``
    (``aux_weight``), ``pred_<s>x`` (``per_scale_weight`` on each unfused scale resized to 1.0,
    Chen et al.'s extra supervision).
    """

    def __init__(
        self,
        base: nn.Module,
        attn_in_channels: int,
        scales: Sequence[float] = (0.5, 1.0, 2.0),
        *,
        per_scale_weight: float = 0.05,
        aux_weight: float = 0.4,
        criterion: nn.Module | None = None,
        aux_criterion: nn.Module | None = None,
        head_layout: str = "published",
        attn_bottleneck: int | None = None,
    ) -> None:
        super().__init__(
            base, aux_weight=aux_weight, per_scale_weight=per_scale_weight,
            criterion=criterion, aux_criterion=aux_criterion,
        )
        if head_layout not in EXPLICIT_HEADS:
            raise ConfigError(f"explicit attention head_layout={head_layout!r}: expected one of {', '.join(EXPLICIT_HEADS)}")
        self.scales = check_scales(scales, "scales")
        self.head_layout = head_layout
        n = len(self.scales)
        width = attn_bottleneck or (512 if head_layout == "published" else 256)
        layers: list[tuple[str, nn.Module]] = [
            ("conv0", nn.Conv2d(n * attn_in_channels, width, 3, padding=1, bias=False))
        ]
        if head_layout == "bn":
            layers.append(("bn0", nn.BatchNorm2d(width)))
        layers += [("re0", nn.ReLU(inplace=True)), ("conv1", nn.Conv2d(width, n, 1, bias=False))]
        self.scale_attn = nn.Sequential(OrderedDict(layers))

    def forward_features(self, x: Tensor, return_scales: bool = False) -> dict[str, Any]:
        """``B×3×H×W`` → softmax-over-scales fused logits ``B×K×H×W`` (see class docstring)."""
        runs = [self._base_run(x, s) for s in self.scales]
        ref = runs[self.scales.index(1.0)]
        feat_size, size = ref.out["feats"].shape[-2:], ref.out["logits"].shape[-2:]
        feats = torch.cat([_resize(r.out["feats"], feat_size) for r in runs], dim=1)
        weights = _attention_to_output(torch.softmax(self.scale_attn(feats), dim=1), ref, size)
        preds = [_resize(r.out["logits"], size) for r in runs]
        out: dict[str, Any] = {
            "logits": sum(weights[:, i : i + 1] * p for i, p in enumerate(preds)),
            "feats": ref.out["feats"], "grid": ref.out["grid"],
        }
        for key in aux_outputs(ref.out):
            out[key] = sum(weights[:, i : i + 1] * _resize(r.out[key], size) for i, r in enumerate(runs))
        if return_scales or self.training:
            out["runs"] = runs
        if return_scales:
            out["weights"] = weights
            out.update({scale_key("pred", s): r.out["logits"] for s, r in zip(self.scales, runs)})
        return out

    def training_forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        """All scales, with the runs kept for the per-scale terms (also in eval mode)."""
        return self.forward_features(batch["image"], return_scales=True)


def deeplabv3plus_os8(
    num_classes: int,
    backbone: str = "resnet50",
    *,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    criterion: nn.Module | None = None,
) -> SegmentationModel:
    """DeepLabV3+ at output stride 8, the HMSA paper's ablation trunk (NVIDIA ``mscale.DeepV3R50``).

    ``feats`` (what the attention head reads) is the decoder's 304-channel stride-4 concatenation,
    so wrap it as ``HierarchicalAttention(model, model.head.feat_channels)``.
    """
    trunk = Backbone(backbone, output_stride=8, pretrained=pretrained, pretrained_file=pretrained_file)
    head = DeepLabV3PlusHead(trunk.channels, num_classes, output_stride=8)
    return SegmentationModel(trunk, head, num_classes, criterion=criterion)
