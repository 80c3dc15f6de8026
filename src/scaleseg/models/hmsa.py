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
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleseg.errors import ConfigError
from scaleseg.inference import scale_pooling
from scaleseg.losses.rmi import side_criteria
from scaleseg.models.backbone import Backbone
from scaleseg.models.heads import DeepLabV3PlusHead
from scaleseg.models.segmentor import SegmentationModel, predict_labels
from scaleseg.types import StepInfo

__all__ = [
    "AttentionHead",
    "HierarchicalAttention",
    "ScalePooling",
    "ExplicitAttention",
    "EXPLICIT_HEADS",
    "scale_key",
    "check_scales",
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


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear, ``align_corners=False`` resize of ``B×C×h×w`` to ``size``; identity if equal."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _scaled_size(x: Tensor, scale: float) -> tuple[int, int]:
    h, w = x.shape[-2:]
    return max(1, math.floor(h * scale)), max(1, math.floor(w * scale))


def _feature_map_to_input(t: Tensor, size: Sequence[int], stride: int) -> Tensor:
    """Upsample a feature-resolution map ``B×C×h×w`` to the input ``size``.

    The base model pads its input up to a multiple of ``stride`` (bottom/right) and crops its
    logits back, so a feature map covers the padded image: resize to the padded size, then crop.
    Without padding this is a plain bilinear resize, exactly the reference's ``Upsample(attn, x_size)``.
    """
    h, w = int(size[0]), int(size[1])
    ph, pw = math.ceil(h / stride) * stride, math.ceil(w / stride) * stride
    return _resize(t, (ph, pw))[..., :h, :w]


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


class _ScaleWrapper(nn.Module):
    """Shared plumbing: contract attributes passed through from the base model, criteria, predict."""

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

    def main_criterion(self) -> nn.Module:
        """The criterion for the fused logits: ``criterion=`` if given, else the base model's."""
        crit = self.criterion if self.criterion is not None else getattr(self.base, "criterion", None)
        if crit is None:
            raise ConfigError(f"{type(self).__name__}: no criterion given and the base model has none")
        return crit

    def side_criterion(self) -> nn.Module:
        """Criterion for the aux term: ``aux_criterion=``, else :func:`~scaleseg.losses.rmi.side_criteria`
        of the main one (RMI: BCE only unless ``aux_rmi``, NVIDIA ``--ocr_aux_loss_rmi``)."""
        if self.aux_criterion is not None:
            return self.aux_criterion
        return side_criteria(self.main_criterion())[0]

    def scale_criterion(self) -> nn.Module:
        """Criterion for the per-scale terms: BCE only under RMI (NVIDIA hard-codes ``do_rmi=False``
        there, whatever the aux criterion), else the main criterion."""
        return side_criteria(self.main_criterion())[1]

    def _base_run(self, x: Tensor, scale: float) -> tuple[Tensor, dict[str, Tensor]]:
        """Resize ``x`` by ``scale`` (floor size) and run the base → (resized input, base outputs)."""
        xs = x if scale == 1.0 else _resize(x, _scaled_size(x, scale))
        return xs, self.base.forward_features(xs)

    def _fused_losses(self, out: dict[str, Tensor], target: Tensor, scales: Sequence[float]) -> dict[str, Tensor]:
        """``main`` on the fused logits, then aux and per-scale terms on each unfused ``pred_<s>x``
        resized to the fused size (see ``_weighted_side_losses``)."""
        size = out["logits"].shape[-2:]
        losses = {"main": self.main_criterion()(out["logits"], target)}
        per_scale = {scale_key("pred", s): _resize(out[scale_key("pred", s)], size) for s in scales}
        return _weighted_side_losses(
            losses, self.side_criterion(), target, out.get("aux"), self.aux_weight, per_scale, self.per_scale_weight,
            scale_crit=self.scale_criterion(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``B×3×H×W`` → fused ``B×K×H×W`` logits."""
        return self.forward_features(x)["logits"]

    def predict(self, image: Any) -> Tensor:
        """Eval-mode labels (``H×W``/``B×H×W`` int64) for a ``3×H×W``/``B×3×H×W`` uint8 or [0, 1]
        float tensor, an ``H×W×3`` array or a PIL image: see ``segmentor.predict_labels``."""
        return predict_labels(self, image)


def _weighted_side_losses(
    losses: dict[str, Tensor],
    crit: nn.Module,
    target: Tensor,
    aux: Tensor | None,
    aux_weight: float,
    per_scale: dict[str, Tensor],
    per_scale_weight: float,
    scale_crit: nn.Module | None = None,
) -> dict[str, Tensor]:
    """Add ``aux_weight·crit(aux)`` and ``per_scale_weight·scale_crit(p_s)`` terms (skipped at weight 0;
    ``scale_crit`` defaults to ``crit``)."""
    scale_crit = crit if scale_crit is None else scale_crit
    if aux is not None and aux_weight > 0:
        losses["aux"] = aux_weight * crit(aux, target)
    if per_scale_weight > 0:
        for key, logits in per_scale.items():
            losses[key] = per_scale_weight * scale_crit(logits, target)
    return losses


class HierarchicalAttention(_ScaleWrapper):
    """HMSA wrapper around a base segmentation model (Tao et al. 2020, NVIDIA ``MscaleOCR``).

    The attention head :class:`AttentionHead` reads the base's ``feats`` of the **lower** scale; the
    gate is predicted at feature resolution and upsampled to that scale's input size.

    * Training (``self.training`` and ``scales is None``): two scales ``train_scales = (lo, 1.0)``,
      ``P = Up(a_lo·P_lo) + (1 − Up(a_lo))·P_1`` with ``a_lo·P_lo`` formed at the low resolution
      before upsampling; aux logits fused the same way.
    * Inference: ``infer_scales`` (or ``scales=``), sorted high → low; the first sets ``P = p_s``;
      ``s ≥ 1``: ``P = a_s·p_s + (1 − a_s)·Down(P)``; ``s < 1``: ``P = Up(a_s·p_s) + (1 − Up(a_s))·P``.
      Output at the 1.0 resolution. Lower scales act last, i.e. have priority.

    ``forward_features(x, scales=None, return_scales=False)`` returns ``{"logits": B×K×H×W,
    "aux": B×K×H×W (if the base has aux), "feats": the 1.0-scale base features}``; with
    ``return_scales=True`` the same flat dict also holds ``"pred_<s>x"`` (unfused ``B×K×h_s×w_s``
    logits at that scale's input size) and ``"attn_<s>x"`` (``B×1×h_s×w_s`` gates, for every scale
    whose gate is used, i.e. all but the highest), e.g. ``"pred_0.5x"``, ``"attn_0.5x"``.

    Losses (:meth:`training_losses`, always the two-scale path): ``main`` (criterion on the fused
    logits), ``aux`` (``aux_weight ×`` side criterion on the fused aux, if the base has aux), and
    ``pred_<s>x`` (``per_scale_weight ×`` side criterion on each unfused scale, the low scale
    upsampled to 1.0 first; omitted at weight 0). The criterion is ``criterion=`` or the base's; with an
    :class:`~scaleseg.losses.rmi.RMICriterion` the per-scale terms use its BCE part only and the aux
    term too unless ``aux_rmi`` (NVIDIA ``--ocr_aux_loss_rmi``), as in the reference recipe.
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

    def _run(self, x: Tensor, scale: float, with_attn: bool) -> dict[str, Tensor]:
        xs, out = self._base_run(x, scale)
        res = dict(out)
        if with_attn:
            res["attn"] = _feature_map_to_input(self.scale_attn(out["feats"]), xs.shape[-2:], self.stride)
        return res

    def forward_features(
        self, x: Tensor, scales: Sequence[float] | None = None, return_scales: bool = False
    ) -> dict[str, Tensor]:
        """``B×3×H×W`` → fused logits (see class docstring for keys and the scale choice)."""
        if scales is None and self.training:
            return self.two_scale_forward(x, return_scales)
        scales = self.infer_scales if scales is None else check_scales(scales, "scales")
        return self.nscale_forward(x, scales, return_scales)

    def two_scale_forward(self, x: Tensor, return_scales: bool = False) -> dict[str, Tensor]:
        """Training fusion of (lo, 1.0): ``P = Up(a_lo·P_lo) + (1 − Up(a_lo))·P_1``."""
        lo = self._run(x, self.lo_scale, with_attn=True)
        hi = self._run(x, 1.0, with_attn=False)
        size = hi["logits"].shape[-2:]
        attn, attn_up = lo["attn"], _resize(lo["attn"], size)
        out = {"logits": _resize(attn * lo["logits"], size) + (1 - attn_up) * hi["logits"], "feats": hi["feats"]}
        if hi.get("aux") is not None:
            out["aux"] = _resize(attn * lo["aux"], size) + (1 - attn_up) * hi["aux"]
        if return_scales:
            out[scale_key("pred", self.lo_scale)] = lo["logits"]
            out[scale_key("attn", self.lo_scale)] = attn
            out[scale_key("pred", 1.0)] = hi["logits"]
        return out

    def nscale_forward(self, x: Tensor, scales: Sequence[float], return_scales: bool = False) -> dict[str, Tensor]:
        """Hierarchical chain over ``scales`` (must contain 1.0), highest first; output at 1.0 size."""
        scales = sorted(check_scales(scales, "scales"), reverse=True)
        pred: Tensor | None = None
        aux: Tensor | None = None
        out: dict[str, Tensor] = {}
        for s in scales:
            res = self._run(x, s, with_attn=pred is not None)
            p, a_s = res["logits"], res.get("attn")
            p_aux = res.get("aux")
            if s == 1.0:
                out["feats"] = res["feats"]
            if return_scales:
                out[scale_key("pred", s)] = p
                if a_s is not None:
                    out[scale_key("attn", s)] = a_s
            if pred is None:
                pred, aux = p, p_aux
            elif s >= 1.0:
                pred = a_s * p + (1 - a_s) * _resize(pred, p.shape[-2:])
                if aux is not None:
                    aux = a_s * p_aux + (1 - a_s) * _resize(aux, p.shape[-2:])
            else:
                size = pred.shape[-2:]
                a_up = _resize(a_s, size)
                pred = _resize(a_s * p, size) + (1 - a_up) * pred
                if aux is not None:
                    aux = _resize(a_s * p_aux, size) + (1 - a_up) * aux
        out["logits"] = pred
        if aux is not None:
            out["aux"] = aux
        return out

    def training_losses(self, batch: dict, step: StepInfo) -> dict[str, Tensor]:
        """Two-scale training losses for ``batch["image"]`` (B×3×H×W) and ``batch["mask"]`` (B×H×W)."""
        out = self.two_scale_forward(batch["image"], return_scales=True)
        return self._fused_losses(out, batch["mask"], (self.lo_scale, 1.0))


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

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """``B×3×H×W`` → ``{"logits": pooled B×K×H×W, "feats", "aux"?}`` (base outputs in training)."""
        if self.training:
            return self.base.forward_features(x)
        keep = min(range(len(self.scales)), key=lambda i: abs(self.scales[i] - 1.0))
        calls: list[int] = [0]
        kept: dict[str, Tensor] = {}

        def logits_fn(xs: Tensor) -> Tensor:
            index, calls[0] = calls[0], calls[0] + 1
            if index != keep:
                return self.base(xs)
            kept.update(self.base.forward_features(xs))
            return kept["logits"]

        logits = scale_pooling(logits_fn, x, self.scales, self.mode)
        result = {"logits": logits, "feats": kept["feats"]}
        if kept.get("aux") is not None:
            result["aux"] = kept["aux"]
        return result

    def training_losses(self, batch: dict, step: StepInfo) -> dict[str, Tensor]:
        """The base model's single-scale training losses."""
        return self.base.training_losses(batch, step)


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

    def forward_features(self, x: Tensor, return_scales: bool = False) -> dict[str, Tensor]:
        """``B×3×H×W`` → softmax-over-scales fused logits ``B×K×H×W`` (see class docstring)."""
        runs = [self._base_run(x, s)[1] for s in self.scales]
        ref = runs[self.scales.index(1.0)]
        feat_size, size = ref["feats"].shape[-2:], x.shape[-2:]
        feats = torch.cat([_resize(r["feats"], feat_size) for r in runs], dim=1)
        weights = _feature_map_to_input(torch.softmax(self.scale_attn(feats), dim=1), size, self.stride)
        preds = [_resize(r["logits"], size) for r in runs]
        out = {"logits": sum(weights[:, i : i + 1] * p for i, p in enumerate(preds)), "feats": ref["feats"]}
        if ref.get("aux") is not None:
            out["aux"] = sum(weights[:, i : i + 1] * _resize(r["aux"], size) for i, r in enumerate(runs))
        if return_scales:
            out["weights"] = weights
            out.update({scale_key("pred", s): r["logits"] for s, r in zip(self.scales, runs)})
        return out

    def training_losses(self, batch: dict, step: StepInfo) -> dict[str, Tensor]:
        """All-scale training losses for ``batch["image"]`` and ``batch["mask"]``."""
        out = self.forward_features(batch["image"], return_scales=True)
        return self._fused_losses(out, batch["mask"], self.scales)


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
