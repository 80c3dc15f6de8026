"""Pixel-wise cross-entropy with an ignore label, class weights and optional OHEM."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleseg.errors import ConfigError, DataError

__all__ = ["CrossEntropyLoss"]


class CrossEntropyLoss(nn.Module):
    """Cross-entropy over valid pixels (``target != ignore_index``), computed in float32.

    Without OHEM it equals ``F.cross_entropy(logits, target, weight, ignore_index=...)``: the
    mean over valid pixels, or with ``class_weights`` the weighted mean
    ``Σ w[yᵢ]·ℓᵢ / Σ w[yᵢ]``. A batch without valid pixels gives 0 (with a graph) instead of NaN.

    OHEM (online hard example mining, mmseg ``OHEMPixelSampler`` / HRNet-OCR
    ``OhemCrossEntropy``): a valid pixel is kept when the softmax probability of its true class is
    below ``ohem_thresh``, and the ``ohem_min_kept`` hardest valid pixels of the batch are always
    kept; the loss is the (weighted) mean over kept pixels.

    Deliberate differences from upstream: ``min_kept`` counts pixels per batch (as OCR; mmseg
    multiplies by the batch size), and "the k hardest" is taken literally. Upstream compares with
    ``p < max(thresh, p_sorted[min_kept])``, which drops the easiest pixel whenever fewer than
    ``min_kept + 1`` valid pixels exist. Ties at the k-th probability are all kept.
    """

    def __init__(
        self,
        ignore_index: int = 255,
        class_weights: Sequence[float] | None = None,
        ohem_thresh: float | None = None,
        ohem_min_kept: int = 100_000,
    ) -> None:
        super().__init__()
        if ohem_thresh is not None and not 0.0 < ohem_thresh <= 1.0:
            raise ConfigError(f"ohem_thresh={ohem_thresh} is invalid; expected a probability in (0, 1]")
        if ohem_min_kept < 0:
            raise ConfigError(f"ohem_min_kept={ohem_min_kept} is invalid; expected >= 0")
        self.ignore_index = ignore_index
        self.ohem_thresh = ohem_thresh
        self.ohem_min_kept = ohem_min_kept
        weights = None
        if class_weights is not None:
            weights = torch.as_tensor(list(class_weights), dtype=torch.float32)
            if weights.ndim != 1 or bool((weights < 0).any()):
                raise ConfigError(f"class_weights={list(class_weights)} is invalid; expected K values >= 0")
        self.class_weights: Tensor | None
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """``B×K×H×W`` logits, ``B×H×W`` int64 target → scalar loss (float32)."""
        if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
            raise DataError(
                f"cross-entropy got logits {tuple(logits.shape)} and target {tuple(target.shape)}; "
                "expected B×K×H×W and B×H×W"
            )
        weights = self.class_weights
        if weights is not None and weights.numel() != logits.shape[1]:
            raise ConfigError(
                f"class_weights has {weights.numel()} values but the logits have {logits.shape[1]} classes"
            )
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self._loss(logits.float(), target.long())

    def _loss(self, logits: Tensor, target: Tensor) -> Tensor:
        valid = target != self.ignore_index
        if self.class_weights is None and self.ohem_thresh is None:
            # the plain case in one fused kernel: no B×H×W loss and weight maps are kept for backward
            total = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="sum")
            return total / valid.sum().clamp_min(1)
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        nll = F.cross_entropy(logits, safe_target, reduction="none")  # B×H×W, unweighted
        weight = valid.float()
        if self.class_weights is not None:
            weight = weight * self.class_weights.float()[safe_target]
        if self.ohem_thresh is not None:
            weight = weight * self._ohem_keep(nll.detach(), valid)
        # Σ w·ℓ / Σ w; the clamp turns the all-ignored case into 0 (Σ w·ℓ = 0) with a graph.
        return (weight * nll).sum() / weight.sum().clamp_min(1e-12)

    def _ohem_keep(self, nll: Tensor, valid: Tensor) -> Tensor:
        """``B×H×W`` float mask of kept pixels: p(true class) < thresh, or among the k hardest."""
        prob = torch.exp(-nll)
        keep = valid & (prob < self.ohem_thresh)
        k = min(self.ohem_min_kept, prob.numel())
        if k > 0:
            # Ignored pixels get a probability above 1 so they never rank among the hardest.
            ranked = torch.where(valid, prob, torch.full_like(prob, 2.0)).flatten()
            kth = ranked.kthvalue(k).values
            keep = keep | (valid & (prob <= kth))
        return keep.float()
