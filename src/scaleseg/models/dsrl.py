"""DSRL: dual super-resolution learning (Wang et al., CVPR 2020), as a wrapper around a segmentation model.

The network sees a low-resolution input (the high-resolution crop resized by ``lr_scale``, 0.5 by
default) and predicts at the **label resolution** = input / ``lr_scale``:

* **SSSR** (kept at inference): the base model's class logits → ``steps`` × [ConvTranspose2d(K, K, 3,
  stride 2) → BN → PReLU] up to the label resolution; cross-entropy against the HR mask.
* **SISR** (training only): the head's decoder feature → ESPCN (Conv5×5–Tanh–Conv3×3–Tanh–
  Conv3×3(3r²)–PixelShuffle(r)) → 3-channel image at the label resolution; ``sr_weight`` · MSE against
  the normalised HR image.
* **FA** (training only): ``fa_weight`` · feature-affinity loss (:mod:`scaleseg.losses.fa`) between
  FeatureTransform(SSSR output) and the SISR penultimate feature.

Loss: ``L = CE + 0.1·MSE + 1.0·FA`` (dsrl.md §6.1). ``export_inference_model()`` drops SISR and FA.

Contract deviation: ``forward_features(x)["logits"]`` is at the label resolution,
``round(H/lr_scale) × round(W/lr_scale)`` (``output_scale = 1/lr_scale`` times the input), not at
the input size. Evaluation must compare it with labels at that resolution.

Design choices where the paper and the reference code are silent or differ (dsrl.md §3–§5, §12):

* Where SSSR starts (``sssr_stride``): by default from the head logits when they are at stride ≤ 2
  (ESPNetv2, logits at 1/2 → 2 deconvs, exactly the official ESPNetv2-DSRL head); logits at a larger
  stride (DeepLabV3+, 1/4) are first bilinearly upsampled to the input size, then log2(1/lr_scale)
  deconvs follow (1 for lr_scale 0.5). This keeps the baseline's bilinear path to the input size and
  makes SSSR learn only the part beyond it; a stack of 3 deconvs from 1/4 (``sssr_stride=4``) is
  available but blockier (sanje2v's README) and 31 % more deconv work.
* SISR input: the head's ``feats`` (ESPNetv2: the 32-channel decoder feature at 1/2; DeepLabV3+: the
  304-channel decoder concat at 1/4) bilinearly resized to label / ``sisr_scale`` (default
  ``sisr_scale = 1/lr_scale``, i.e. the input size, as Dootmaan's ``subpixel`` branch).
* FA features: the SSSR output (K channels at the label resolution, the last map before the
  prediction, as the author describes) through FeatureTransform (1×1 conv + BN + ReLU, K → 32) vs the
  SISR penultimate map (32 channels, after the second Tanh, at label / ``sisr_scale``). Instead of
  upsampling the SISR map to the label resolution, the transformed SSSR map is average-pooled by
  ``sisr_scale`` and FA subsamples both by ``fa_subsample / sisr_scale``; for the SSSR side this equals
  pooling by ``fa_subsample`` (8) at the label resolution, and no label-resolution SISR copy is made.
  FA uses the padded (uncropped) maps; training crops that are multiples of the stride have no padding.
* The base's auxiliary head (if any) is trained against the HR mask after bilinear upsampling of its
  logits to the label resolution; the exported inference model drops it.
* FLOPs (:func:`count_flops`) count transposed convolutions; the paper's and EdgeNets' counters hook
  ``nn.Conv2d`` only, which is why the official README lists equal FLOPs with and without DSRL.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from scaleseg.errors import ConfigError, DataError
from scaleseg.losses.fa import DEFAULT_MAX_BLOCK_BYTES, FALoss
from scaleseg.models.contract import ContractModel, Grid, Run, inner_runs, merge_losses, supervise
from scaleseg.types import StepInfo

__all__ = [
    "DSRL",
    "DSRLInferenceModel",
    "FeatureTransform",
    "SISRBranch",
    "SSSRHead",
    "count_flops",
    "denormalize",
    "sr_metrics",
]

UPSAMPLE_MODES = ("sssr", "bilinear")


class SSSRHead(nn.Module):
    """``steps`` × [ConvTranspose2d(K, K, 3, stride 2, padding 1, output_padding 1, no bias) → BN → act].

    ``B×K×h×w`` logits → ``B×K×(h·2^steps)×(w·2^steps)`` logits. ``act``: ``"prelu"`` (official
    ESPNetv2-DSRL) or ``"relu"``.
    """

    def __init__(self, num_classes: int, steps: int, act: str = "prelu") -> None:
        super().__init__()
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"SSSRHead: steps={steps!r}, expected an integer ≥ 1")
        if act not in ("prelu", "relu"):
            raise ConfigError(f"SSSRHead: act={act!r}, expected 'prelu' or 'relu'")
        self.steps = steps
        self.blocks = nn.Sequential(*(_deconv_bn_act(num_classes, act) for _ in range(steps)))

    def forward(self, logits: Tensor) -> Tensor:
        return self.blocks(logits)


def _deconv_bn_act(channels: int, act: str) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(channels, channels, 3, stride=2, padding=1, output_padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.PReLU(channels) if act == "prelu" else nn.ReLU(inplace=True),
    )


class SISRBranch(nn.Module):
    """ESPCN super-resolution decoder on a shared decoder feature (training only).

    ``forward(feats B×in_ch×h×w, out_size (H, W))`` → ``(sr B×3×H×W, penultimate B×hidden[1]×H/r×W/r)``:
    ``feats`` bilinearly resized to ``(H/r, W/r)`` → Conv5×5 → Tanh → Conv3×3 → Tanh → Conv3×3(3·r²) →
    PixelShuffle(r), with r = ``scale``. ``out_size`` must be divisible by r.

    Wider inputs (``in_ch > hidden[0]``, e.g. DeepLabV3+'s 304-channel decoder) are first reduced by a
    1×1 conv at feature resolution, before the resize: the 5×5 conv then runs on ``hidden[0]``
    channels (5× fewer multiply-adds for DeepLabV3+ at 180×240; ESPCN's own input is 3 channels).
    """

    def __init__(self, in_ch: int, scale: int, hidden: tuple[int, int] = (64, 32)) -> None:
        super().__init__()
        if not isinstance(scale, int) or scale < 1:
            raise ConfigError(f"SISRBranch: scale={scale!r}, expected an integer ≥ 1")
        self.scale = scale
        self.feat_channels = hidden[1]
        self.reduce: nn.Module = nn.Conv2d(in_ch, hidden[0], 1) if in_ch > hidden[0] else nn.Identity()
        self.conv1 = nn.Conv2d(min(in_ch, hidden[0]), hidden[0], 5, padding=2)
        self.conv2 = nn.Conv2d(hidden[0], hidden[1], 3, padding=1)
        self.conv3 = nn.Conv2d(hidden[1], 3 * scale**2, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, feats: Tensor, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        h, w = out_size
        if h % self.scale or w % self.scale:
            raise DataError(f"SISRBranch: output size {h}×{w} is not divisible by scale {self.scale}")
        x = _resize(self.reduce(feats), (h // self.scale, w // self.scale))
        penultimate = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return self.shuffle(self.conv3(penultimate)), penultimate


class FeatureTransform(nn.Sequential):
    """1×1 conv → BN → ReLU: ``B×in_ch×H×W → B×out_ch×H×W`` (matches SSSR channels to the SISR feature)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class DSRLInferenceModel(ContractModel):
    """Base segmentation model + SSSR head (or bilinear upsampling): the DSRL network at inference.

    ``base`` is a ``SegmentationModel`` (plain, ESPNetv2, HRNet-OCR or an MCIBI host; ``backbone``,
    ``head`` with ``feature_index``, ``num_classes``, ``mean``, ``std``, ``stride``).
    ``forward_features(x)`` returns ``logits`` ``B×K×(H·s)×(W·s)`` with s = ``output_scale`` =
    1/lr_scale, ``feats`` (the head's feature), ``aux`` (the base's aux logits at the label size, if
    any), ``grid`` (input, padded input, scale s), ``sssr_full`` (the uncropped upsampled logits) and
    ``runs`` (the base's own output dict, on the label grid, as one :class:`Run`). State-dict keys:
    ``base.*`` and ``sssr.*``.
    """

    def __init__(
        self,
        base: nn.Module,
        sssr: SSSRHead | None,
        *,
        lr_scale: float = 0.5,
        sssr_stride: int = 1,
    ) -> None:
        super().__init__()
        _check_base(base)
        self.base = base
        self.sssr = sssr
        self.lr_scale = lr_scale
        self.output_scale = _output_scale(lr_scale)
        self.sssr_stride = sssr_stride
        self.num_classes: int = base.num_classes
        self.mean: tuple[float, ...] = tuple(base.mean)
        self.std: tuple[float, ...] = tuple(base.std)
        self.stride: int = base.stride

    @property
    def upsample(self) -> str:
        return "bilinear" if self.sssr is None else "sssr"

    @property
    def feat_channels(self) -> int:
        return self.base.feat_channels

    def forward_features(self, x: Tensor, out_size: tuple[int, int] | None = None) -> dict[str, Any]:
        """``B×3×H×W`` LR image → output dict (see the class docstring).

        ``out_size`` overrides the label size (e.g. the HR mask's size when rounding made it differ by
        less than s pixels).
        """
        return self._run(x, out_size, with_sr=False)

    def forward(self, x: Tensor) -> Tensor:
        """``B×3×H×W`` LR image → ``B×K×(H·s)×(W·s)`` logits."""
        return self._run(x, None, with_sr=False, with_aux=False)["logits"]

    # ------------------------------------------------------------------ internals
    def _run(
        self, x: Tensor, out_size: tuple[int, int] | None, *, with_sr: bool, with_aux: bool = True
    ) -> dict[str, Any]:
        """Shared forward: pad the LR input (to the stride, and to cover ``out_size``), run the base on
        the label grid, upsample its head logits (SSSR or bilinear), crop to the label size."""
        height, width = x.shape[-2:]
        s = self.output_scale
        out_h, out_w = out_size or (height * s, width * s)
        if abs(out_h - height * s) >= s or abs(out_w - width * s) >= s:
            raise DataError(
                f"DSRL: label size {out_h}×{out_w} does not match the {height}×{width} input at "
                f"lr_scale={self.lr_scale} (expected {height * s}×{width * s})"
            )
        padded = _pad(x, self.stride, (math.ceil(out_h / s), math.ceil(out_w / s)))
        inner = self.base.forward_features(padded, scale=s, size=(out_h, out_w), with_aux=with_aux, with_logits=False)
        full = self._upsample_logits(inner["head_logits"], padded.shape[-2:], (padded.shape[-2] * s, padded.shape[-1] * s))
        grid = Grid((int(height), int(width)), (int(padded.shape[-2]), int(padded.shape[-1])), s)
        out: dict[str, Any] = {"logits": full[..., :out_h, :out_w], "feats": inner["feats"], "grid": grid,
                               "sssr_full": full, "runs": [Run(inner)]}
        if "aux" in inner:
            out["aux"] = inner["aux"]
        if with_sr:
            sr, sisr_feat = self.sisr(inner["feats"], grid.padded_output_size)  # type: ignore[operator]
            out["sr"] = sr[..., :out_h, :out_w]
            out["sisr_feat"] = sisr_feat
        return out

    def _upsample_logits(self, logits: Tensor, input_size: torch.Size, label_size: tuple[int, int]) -> Tensor:
        if self.sssr is None:
            return _resize(logits, label_size)
        start = (input_size[0] // self.sssr_stride, input_size[1] // self.sssr_stride)
        return self.sssr(_resize(logits, start))


class DSRL(DSRLInferenceModel):
    """DSRL training wrapper: SSSR (or bilinear baseline) + optional SISR branch + FA loss.

    Args:
        base: ``SegmentationModel``-like model (e.g. ``espnetv2_seg`` or DeepLabV3+).
        lr_scale: input / label resolution (0.5: the output is 2× the input). 1/lr_scale must be a
            power of two.
        upsample: ``"sssr"`` (deconv head) or ``"bilinear"`` (baseline: logits bilinearly upsampled
            to the label resolution).
        sisr_in_channels: channels of ``base.head(...)["feats"]``; default ``base.head.feat_channels``.
        sr_weight, fa_weight: loss weights w1 = 0.1, w2 = 1.0. With both 0 there is no SISR module
            (SSSR-only variant); with ``fa_weight`` 0 no FeatureTransform.
        fa_subsample, fa_max_block_bytes: FA average-pool factor at the label resolution and memory
            budget per affinity block (see :func:`scaleseg.losses.fa.fa_loss`).
        sssr_stride: stride (w.r.t. the input) at which SSSR starts; default: the head's logit stride
            if ≤ 2, else 1 (bilinear to the input size first). See the module docstring.
        sisr_scale: PixelShuffle factor r; default 1/lr_scale. act: SSSR activation.

    State-dict keys: ``base.*``, ``sssr.*``, ``sisr.*``, ``fa_transform.*``.
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        lr_scale: float = 0.5,
        upsample: str = "sssr",
        sisr_in_channels: int | None = None,
        sr_weight: float = 0.1,
        fa_weight: float = 1.0,
        fa_subsample: int = 8,
        fa_max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
        sssr_stride: int | None = None,
        sisr_scale: int | None = None,
        act: str = "prelu",
    ) -> None:
        _check_base(base)
        if upsample not in UPSAMPLE_MODES:
            raise ConfigError(f"DSRL: upsample={upsample!r}, expected one of {UPSAMPLE_MODES}")
        if sr_weight < 0 or fa_weight < 0:
            raise ConfigError(f"DSRL: sr_weight={sr_weight}, fa_weight={fa_weight}; expected ≥ 0")
        out_scale = _output_scale(lr_scale)
        head_stride = base.backbone.strides[base.head.feature_index]
        if sssr_stride is None:
            sssr_stride = head_stride if head_stride <= 2 else 1
        if sssr_stride not in (1, 2, 4, 8, 16, 32) or base.stride % sssr_stride:
            raise ConfigError(
                f"DSRL: sssr_stride={sssr_stride}, expected a power of two dividing the model stride {base.stride}"
            )
        sssr = None
        if upsample == "sssr":
            sssr = SSSRHead(base.num_classes, int(math.log2(sssr_stride * out_scale)), act=act)
        super().__init__(base, sssr, lr_scale=lr_scale, sssr_stride=sssr_stride)
        self.sr_weight = float(sr_weight)
        self.fa_weight = float(fa_weight)
        self.sisr: SISRBranch | None = None
        self.fa_transform: FeatureTransform | None = None
        self.fa: FALoss | None = None
        if sr_weight > 0 or fa_weight > 0:
            r = out_scale if sisr_scale is None else sisr_scale
            if r < 1 or r & (r - 1) or (out_scale * base.stride) % r:
                raise ConfigError(
                    f"DSRL: sisr_scale={r}, expected a power of two dividing {out_scale * base.stride} "
                    "(label size of a stride multiple)"
                )
            in_ch = sisr_in_channels if sisr_in_channels is not None else getattr(base.head, "feat_channels", None)
            if in_ch is None:
                raise ConfigError("DSRL: sisr_in_channels is required (base.head has no feat_channels)")
            self.sisr = SISRBranch(in_ch, r)
        if fa_weight > 0:
            assert self.sisr is not None
            if fa_subsample % self.sisr.scale:
                raise ConfigError(
                    f"DSRL: fa_subsample={fa_subsample} must be a multiple of sisr_scale={self.sisr.scale}"
                )
            self.fa_transform = FeatureTransform(base.num_classes, self.sisr.feat_channels)
            self.fa = FALoss(fa_subsample // self.sisr.scale, max_block_bytes=fa_max_block_bytes)
        self.fa_subsample = fa_subsample

    def forward_features(
        self, x: Tensor, out_size: tuple[int, int] | None = None, *, return_sr: bool = False
    ) -> dict[str, Any]:
        """As :meth:`DSRLInferenceModel.forward_features`, plus ``sr`` (``B×3×(H·s)×(W·s)``, the
        normalised SISR image) and ``sisr_feat`` when ``return_sr`` or in training mode and the model
        has a SISR branch."""
        with_sr = self.sisr is not None and (return_sr or self.training)
        return self._run(x, out_size, with_sr=with_sr)

    def training_forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The forward of :meth:`training_losses`: on the HR mask's grid (it may be a pixel smaller
        than 2× the LR input after rounding)."""
        mask = batch["mask"]
        return self._run(batch["image"], (int(mask.shape[-2]), int(mask.shape[-1])), with_sr=self.sisr is not None)

    def supervision_losses(self, out: dict[str, Any], batch: dict[str, Any], step: StepInfo) -> dict[str, Tensor]:
        """``ce`` = base criterion on the label-resolution logits vs the HR mask; ``aux`` =
        ``aux_weight`` · side criterion on the base's aux logits (bilinearly upsampled to the label
        resolution), when the base has an aux head."""
        mask = batch["mask"]
        losses = {"ce": supervise(self.base.criterion, out["logits"], mask)}
        if "aux" in out:
            losses["aux"] = self.base.aux_weight * supervise(self.base.aux_criterion, out["aux"], mask)
        return losses

    def method_losses(self, runs: Sequence[Run], batch: dict[str, Any], step: StepInfo) -> dict[str, Tensor]:
        """``sr`` (``sr_weight`` · MSE to the normalised HR image) and ``fa`` (``fa_weight`` · FA), each
        the mean over ``runs``, then the base model's method terms for its runs (an MCIBI base: its
        memory and consistency terms against the HR mask). ``batch["image_hr"]`` (``B×3×H×W``) is
        needed when ``sr_weight > 0``; a run at another scale compares with it resized to its size."""
        losses: dict[str, Tensor] = {}
        if self.sr_weight > 0:
            losses["sr"] = self.sr_weight * torch.stack([self._sr_loss(run, batch) for run in runs]).mean()
        if self.fa is not None:
            losses["fa"] = self.fa_weight * torch.stack(
                [self._fa(run.out["sssr_full"], run.out["sisr_feat"]) for run in runs]
            ).mean()
        return merge_losses(losses, self.base.method_losses(inner_runs(runs), batch, step))

    def update_state(self, runs: Sequence[Run], batch: dict[str, Any], step: StepInfo) -> None:
        """The base model's state updates (the MCIBI memory) on its runs, with the HR mask."""
        self.base.update_state(inner_runs(runs), batch, step)

    def _sr_loss(self, run: Run, batch: dict[str, Any]) -> Tensor:
        """MSE of one run's SISR image to ``batch["image_hr"]`` (resized to the run's size for a run
        at another scale, e.g. HMSA's low-scale run)."""
        hr, sr = batch.get("image_hr"), run.out["sr"]
        if hr is not None and run.scale != 1.0 and hr.shape[-2:] != sr.shape[-2:]:
            hr = F.interpolate(hr, size=sr.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
        if hr is None or hr.shape != sr.shape:
            got = None if hr is None else tuple(hr.shape)
            raise DataError(f"DSRL: batch['image_hr'] is {got}; expected {tuple(sr.shape)} (normalised HR image)")
        return F.mse_loss(sr, hr)

    def _fa(self, sssr_full: Tensor, sisr_feat: Tensor) -> Tensor:
        """FA between FeatureTransform(SSSR output) pooled to the SISR feature grid and the SISR feature."""
        assert self.fa_transform is not None and self.fa is not None and self.sisr is not None
        seg = self.fa_transform(sssr_full)
        if self.sisr.scale > 1:
            seg = F.avg_pool2d(seg, self.sisr.scale)
        return self.fa(seg, sisr_feat)

    def val_metrics(self) -> dict[str, Any]:
        """Validation metrics the training loop logs: PSNR/SSIM of the SISR output (when the model has
        a SISR branch) and, as a reference, PSNR of the bilinearly upsampled input image."""
        metrics = {"psnr_upsampled_input": sr_metrics()["psnr"]}
        if self.sisr is not None:
            metrics.update({f"sisr_{k}": v for k, v in sr_metrics().items()})
        return metrics

    def update_val_metrics(self, metrics: Any, batch: dict[str, Any]) -> None:
        """Update :meth:`val_metrics` from a DSRL pair batch (``image`` LR, ``image_hr`` HR)."""
        hr = batch.get("image_hr")
        if hr is None:
            return
        target = denormalize(hr, self.mean, self.std)
        upsampled = F.interpolate(batch["image"], size=hr.shape[-2:], mode="bilinear", align_corners=False)
        metrics["psnr_upsampled_input"].update(denormalize(upsampled, self.mean, self.std), target)
        if self.sisr is not None:
            sr = self.forward_features(batch["image"], tuple(hr.shape[-2:]), return_sr=True)["sr"]
            sr = denormalize(sr, self.mean, self.std)
            metrics["sisr_psnr"].update(sr, target)
            metrics["sisr_ssim"].update(sr, target)

    def export_inference_model(self) -> DSRLInferenceModel:
        """Copy of base + SSSR (eval mode) without SISR, FeatureTransform, FA and the base's aux head."""
        base = copy.deepcopy(self.base)
        if getattr(base, "aux_head", None) is not None:
            base.aux_head = None
        sssr = copy.deepcopy(self.sssr)
        model = DSRLInferenceModel(base, sssr, lr_scale=self.lr_scale, sssr_stride=self.sssr_stride)
        return model.eval()


# ---------------------------------------------------------------------- metrics and FLOPs
def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one eval-mode ``model(x)`` for ``x`` of ``input_shape`` (``torch.utils.flop_counter``).

    Counts 2 FLOPs per multiply-add for every convolution, **including transposed ones**, and
    matmuls; element-wise ops, pooling and interpolation count 0. EdgeNets / DSRL publish
    ``nn.Conv2d`` multiply-adds only (≈ this value / 2 without the SSSR deconvs).
    """
    param = next(model.parameters())
    x = torch.zeros(input_shape, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def sr_metrics() -> Any:
    """``MetricCollection{"psnr": PeakSignalNoiseRatio, "ssim": StructuralSimilarityIndexMeasure}``,
    both with ``data_range=1.0``: update with :func:`denormalize`-d SISR output and HR image."""
    from torchmetrics import MetricCollection
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    return MetricCollection(
        {"psnr": PeakSignalNoiseRatio(data_range=1.0), "ssim": StructuralSimilarityIndexMeasure(data_range=1.0)}
    )


def denormalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """``B×3×H×W`` (or ``3×H×W``) normalised image → ``x·std + mean`` clamped to [0, 1]."""
    shape = (-1, 1, 1)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x * s + m).clamp(0.0, 1.0)


# ---------------------------------------------------------------------- helpers
def _check_base(base: nn.Module) -> None:
    missing = [a for a in ("backbone", "head", "num_classes", "mean", "std", "stride") if not hasattr(base, a)]
    if missing or not hasattr(base.head, "feature_index"):
        what = ", ".join(missing) if missing else "head.feature_index"
        raise ConfigError(f"DSRL: base model {type(base).__name__} lacks {what}; expected a SegmentationModel")


def _output_scale(lr_scale: float) -> int:
    """1/lr_scale as an integer power of two (ConfigError otherwise)."""
    scale = round(1.0 / lr_scale) if lr_scale > 0 else 0
    if lr_scale <= 0 or lr_scale > 1 or abs(scale * lr_scale - 1.0) > 1e-9 or scale & (scale - 1):
        raise ConfigError(f"DSRL: lr_scale={lr_scale!r}, expected 1/2^k (1, 0.5, 0.25, …)")
    return scale


def _pad(x: Tensor, stride: int, min_size: tuple[int, int]) -> Tensor:
    """Zero-pad bottom/right to at least ``min_size`` and to a multiple of ``stride``."""
    h = math.ceil(max(x.shape[-2], min_size[0]) / stride) * stride
    w = math.ceil(max(x.shape[-1], min_size[1]) / stride) * stride
    if (h, w) == tuple(x.shape[-2:]):
        return x
    return F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]))


def _resize(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear, ``align_corners=False``; no-op when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
