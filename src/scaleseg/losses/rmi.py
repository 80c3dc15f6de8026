"""Region Mutual Information loss (Zhao et al. 2019) and HMSA's combined BCE + RMI criterion.

Follows NVIDIA/semantic-segmentation ``loss/rmi.py`` (defaults of every HMSA recipe: radius 3,
4×4 average pooling with stride 4 and padding 2, jitter 5e-4, ``loss_weight_lambda=0.5``,
``lambda_way=1``). ``loss_weight_lambda`` and ``lambda_way`` mean what they mean in NVIDIA's code,
so a reference config value can be copied: ``lambda_way=1`` gives ``λ·BCE + (1 − λ)·RMI``,
``lambda_way=0`` gives ``BCE + λ·RMI``. Deliberate differences from the reference code:

* ``ignore_index`` is honoured: a pixel is valid iff ``0 <= label < num_classes`` **and**
  ``label != ignore_index`` (the reference only tests ``label < num_classes``, so an ignore value
  inside ``[0, C)`` would be treated as a class);
* device-agnostic (no ``torch.cuda.DoubleTensor``), ``torch.linalg.cholesky`` instead of the
  deprecated ``torch.cholesky``, and a Cholesky solve instead of an explicit matrix inverse;
* under autocast the loss runs with autocast disabled, in float32 (BCE, pooling) and float64
  (covariances, Cholesky); float64 logits stay float64 (used by ``gradcheck``).

The RMI term is a log-determinant, so the loss is **often negative**; that is expected (NVIDIA
issues #85, #181) and does not indicate a bug.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleseg.errors import ConfigError, DataError

__all__ = ["RMICriterion", "sigmoid_bce", "rmi_lower_bound", "valid_onehot"]

_CLIP_MIN = 1e-6  # added to the masked probabilities, as in the reference
_POS_ALPHA = 5e-4  # diagonal jitter keeping the 9×9 covariances positive definite
_LOG_EPS = 1e-8  # added to the Cholesky diagonal before the log, as in the reference


def _check_shapes(logits: Tensor, target: Tensor, num_classes: int) -> None:
    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0] \
            or logits.shape[-2:] != target.shape[-2:] or logits.shape[1] != num_classes:
        raise DataError(
            f"RMI/BCE loss: logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match; "
            f"expected B×{num_classes}×H×W logits and B×H×W int64 labels"
        )


def valid_onehot(target: Tensor, num_classes: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``B×H×W`` labels → (``B×K×H×W`` one-hot float with invalid pixels all-zero, ``B×1×H×W`` valid mask).

    A pixel is valid iff ``0 <= label < num_classes`` and ``label != ignore_index``.
    """
    valid = (target >= 0) & (target < num_classes) & (target != ignore_index)
    onehot = F.one_hot(torch.where(valid, target, 0).long(), num_classes).permute(0, 3, 1, 2)
    mask = valid.unsqueeze(1)
    return (onehot * mask).float(), mask.float()


def sigmoid_bce(logits: Tensor, onehot: Tensor, mask: Tensor) -> Tensor:
    """Per-class sigmoid BCE over one-hot targets, summed over classes and valid pixels, / (valid + 1).

    ``logits``/``onehot``: ``B×K×H×W``; ``mask``: ``B×1×H×W`` (1 = valid). Returns a scalar.
    """
    total = F.binary_cross_entropy_with_logits(
        logits, onehot.to(logits.dtype), weight=mask.to(logits.dtype).expand_as(logits), reduction="sum"
    )
    return total / (mask.sum() + 1.0)


def _log_det_by_cholesky(matrix: Tensor) -> Tensor:
    """``…×D×D`` symmetric positive definite → ``…`` log-determinants (reference: +1e-8 in the log)."""
    chol = torch.linalg.cholesky(matrix)
    return 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1) + _LOG_EPS).sum(-1)


def rmi_lower_bound(
    onehot: Tensor, probs: Tensor, radius: int = 3, pool_size: int = 4, pool_stride: int = 4
) -> Tensor:
    """RMI term: sum over classes of the mean over images of ``0.5·logdet(Σ_{Y|P}) / radius²``.

    ``onehot``, ``probs``: ``B×K×H×W`` (probs already masked). Both are average-pooled
    (``pool_size``, ``pool_stride``, padding ``pool_size // 2``, zeros counted as in the reference),
    every ``radius×radius`` neighbourhood (no padding) becomes a ``radius²``-vector per class and
    image, and the posterior covariance ``Σ_Y − Σ_YP (Σ_P + αI)⁻¹ Σ_YPᵀ`` is formed in float64.
    Returns a float64 scalar.
    """
    if pool_stride > 1:
        pad = pool_size // 2
        onehot = F.avg_pool2d(onehot, pool_size, pool_stride, padding=pad)
        probs = F.avg_pool2d(probs, pool_size, pool_stride, padding=pad)
    b, k, h, w = probs.shape
    if h < radius or w < radius:
        raise DataError(
            f"RMI loss: pooled map {h}×{w} is smaller than radius {radius}; "
            f"expected inputs of at least {(radius - 1) * pool_stride + 1} px per side"
        )
    d = radius * radius
    # unfold orders each patch (y, x) row-major, matching the reference's map_get_pairs
    la = F.unfold(onehot.reshape(b * k, 1, h, w).double(), radius).view(b, k, d, -1)
    pr = F.unfold(probs.reshape(b * k, 1, h, w).double(), radius).view(b, k, d, -1)
    la = la - la.mean(dim=3, keepdim=True)
    pr = pr - pr.mean(dim=3, keepdim=True)
    eye = torch.eye(d, dtype=torch.float64, device=probs.device)
    la_cov = la @ la.transpose(2, 3)
    pr_cov = pr @ pr.transpose(2, 3)
    la_pr_cov = la @ pr.transpose(2, 3)
    pr_chol = torch.linalg.cholesky(pr_cov + _POS_ALPHA * eye)
    appro_var = la_cov - la_pr_cov @ torch.cholesky_solve(la_pr_cov.transpose(2, 3), pr_chol)
    rmi_now = 0.5 * _log_det_by_cholesky(appro_var + _POS_ALPHA * eye)  # B×K
    return (rmi_now.mean(dim=0) / d).sum()


class RMICriterion(nn.Module):
    """HMSA's criterion: BCE + RMI (``do_rmi=True``) or BCE only (``do_rmi=False``).

    ``forward(logits B×K×H×W, target B×H×W int64, do_rmi=None) -> scalar``; ``do_rmi=None`` uses the
    instance default. BCE is the per-class sigmoid BCE of :func:`sigmoid_bce`; RMI is
    :func:`rmi_lower_bound` on ``sigmoid(logits)·valid + 1e-6``. They are combined as NVIDIA's
    ``RMILoss``: ``lambda_way=1`` → ``λ·BCE + (1 − λ)·RMI`` (default, λ = 0.5), ``lambda_way=0`` →
    ``BCE + λ·RMI``, with λ = ``loss_weight_lambda``.

    Side terms (NVIDIA ``MscaleOCR``): per-scale terms are always BCE only (:meth:`bce_only`); the aux
    term is BCE only unless ``aux_rmi`` (NVIDIA ``--ocr_aux_loss_rmi``), see :meth:`aux_part` and
    :func:`scaleseg.models.segmentor.aux_criterion`.

    Differences from the reference (see module docstring): ``ignore_index`` honoured; CPU and CUDA;
    autocast disabled inside. **Negative values are expected** (the RMI term is a log-determinant).
    The returned scalar has the dtype of the logits promoted to at least float32.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        *,
        do_rmi: bool = True,
        radius: int = 3,
        pool_size: int = 4,
        pool_stride: int = 4,
        loss_weight_lambda: float = 0.5,
        lambda_way: int = 1,
        aux_rmi: bool = False,
    ) -> None:
        super().__init__()
        if lambda_way not in (0, 1):
            raise ConfigError(f"RMI lambda_way={lambda_way!r}: expected 0 (BCE + λ·RMI) or 1 (λ·BCE + (1 − λ)·RMI)")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.do_rmi = do_rmi
        self.radius = radius
        self.pool_size = pool_size
        self.pool_stride = pool_stride
        self.loss_weight_lambda = float(loss_weight_lambda)
        self.lambda_way = int(lambda_way)
        self.aux_rmi = bool(aux_rmi)

    def _copy(self, do_rmi: bool) -> RMICriterion:
        return RMICriterion(
            self.num_classes, self.ignore_index, do_rmi=do_rmi, radius=self.radius,
            pool_size=self.pool_size, pool_stride=self.pool_stride,
            loss_weight_lambda=self.loss_weight_lambda, lambda_way=self.lambda_way, aux_rmi=self.aux_rmi,
        )

    def bce_only(self) -> RMICriterion:
        """A copy of this criterion with ``do_rmi=False`` (the per-scale terms; aux unless ``aux_rmi``)."""
        return self._copy(do_rmi=False)

    def aux_part(self) -> RMICriterion:
        """The criterion for aux logits: BCE + RMI with ``aux_rmi`` (NVIDIA ``--ocr_aux_loss_rmi``),
        else BCE only (NVIDIA's default)."""
        return self._copy(do_rmi=self.aux_rmi)

    def combine(self, bce: Tensor, rmi: Tensor) -> Tensor:
        """NVIDIA's weighting of the two terms (see the class docstring)."""
        lam = self.loss_weight_lambda
        if self.lambda_way:
            return lam * bce + (1.0 - lam) * rmi
        return bce + lam * rmi

    def forward(self, logits: Tensor, target: Tensor, do_rmi: bool | None = None) -> Tensor:
        _check_shapes(logits, target, self.num_classes)
        do_rmi = self.do_rmi if do_rmi is None else do_rmi
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits if logits.dtype == torch.float64 else logits.float()
            onehot, mask = valid_onehot(target, self.num_classes, self.ignore_index)
            onehot, mask = onehot.to(logits.dtype), mask.to(logits.dtype)
            bce = sigmoid_bce(logits, onehot, mask)
            if not do_rmi:
                return bce
            probs = torch.sigmoid(logits) * mask + _CLIP_MIN
            rmi = rmi_lower_bound(onehot, probs, self.radius, self.pool_size, self.pool_stride)
            return self.combine(bce, rmi.to(logits.dtype))

