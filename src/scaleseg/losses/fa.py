"""DSRL feature-affinity (FA) loss, computed in row blocks so memory stays within a budget.

Paper: Wang et al., "Dual Super-Resolution Learning for Semantic Segmentation", CVPR 2020, §3.2:

    S_ij = (F_i / ||F_i||_2)ᵀ (F_j / ||F_j||_2)
    L_fa = 1/N² Σ_i Σ_j |S_ij^(seg) − S_ij^(sr)|         (q = 1, N = H′W′ pixels after subsampling)

The pixel-pair affinity of an N-pixel map is an N×N matrix: 4 GiB in fp32 for a 1024×2048 output
subsampled by 8 (N = 32768), per branch. :func:`fa_loss` never builds it. With A (C1×N) and B (C2×N)
the normalised features of one image, the difference D = AᵀA − BᵀB equals ZᵀZ′ with Z = [A; B] and
Z′ = [A; −B] (both (C1+C2)×N), so a block of rows I of D is one matrix product Z[:, I]ᵀ Z′. The
forward sums |D_I| block by block. Because D is symmetric, the gradient is

    ∂(Σ|D|)/∂A = 2·A·sign(D),   ∂(Σ|D|)/∂B = −2·B·sign(D),   i.e.  ∂/∂Z[:, I] = 2·Z′·sign(D_I)ᵀ,

so the backward recomputes each row block, takes its sign and writes the matching columns of the
gradient: peak memory is one |I|×N block in the forward and in the backward.

Deliberate differences from the re-implementations (dsrl.md §5.4, §10): the loss is averaged over
the batch (Dootmaan's ``torch.norm(·, 1)`` sums over it), features are L2-normalised per pixel
(``F.normalize`` with ``eps``, so all-zero ReLU features are safe), and the subsampling is average
pooling by ``subsample`` per side.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleseg.errors import ConfigError

DEFAULT_MAX_BLOCK_BYTES = 64 * 2**20
"""Default budget for one row block of the affinity difference (64 MiB)."""


def _check_pair(f_seg: Tensor, f_sr: Tensor, subsample: int) -> None:
    if f_seg.dim() != 4 or f_sr.dim() != 4:
        raise ConfigError(
            f"fa_loss: expected B×C×H×W features, got f_seg {tuple(f_seg.shape)} and f_sr {tuple(f_sr.shape)}"
        )
    if f_seg.shape[0] != f_sr.shape[0] or f_seg.shape[2:] != f_sr.shape[2:]:
        raise ConfigError(
            "fa_loss: f_seg and f_sr must share batch size and H×W, got "
            f"{tuple(f_seg.shape)} and {tuple(f_sr.shape)}"
        )
    if not isinstance(subsample, int) or subsample < 1:
        raise ConfigError(f"fa_loss: subsample={subsample!r}, expected an integer ≥ 1")
    h, w = f_seg.shape[2:]
    if h < subsample or w < subsample:
        raise ConfigError(f"fa_loss: features {h}×{w} are smaller than subsample={subsample}")


def pooled_unit_features(f: Tensor, subsample: int, eps: float = 1e-6, dtype: torch.dtype | None = None) -> Tensor:
    """B×C×H×W features → B×C×N, average-pooled by ``subsample`` per side, cast to ``dtype`` (if
    given) and L2-normalised per pixel."""
    if subsample > 1:
        f = F.avg_pool2d(f, kernel_size=subsample, stride=subsample)
    if dtype is not None:
        f = f.to(dtype)
    return F.normalize(f.flatten(2), p=2.0, dim=1, eps=eps)


def rows_per_block(n: int, element_size: int, max_block_bytes: int) -> int:
    """How many rows of an N-column affinity block fit in ``max_block_bytes`` (≥ 1, ≤ N)."""
    row_bytes = n * element_size
    if max_block_bytes < row_bytes:
        raise ConfigError(
            f"fa_loss: max_block_bytes={max_block_bytes} is below one affinity row "
            f"({n} pixels × {element_size} B = {row_bytes} B); raise it or increase subsample"
        )
    return min(n, max_block_bytes // row_bytes)


class _BlockAffinityL1(torch.autograd.Function):
    """mean_b 1/N² Σ_ij |A_bᵀA_b − B_bᵀB_b|_ij for A: B×C1×N, B: B×C2×N, in blocks of ``rows`` rows."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, rows: int) -> Tensor:  # type: ignore[override]
        z, z_neg = _stack(a, b)
        n = a.shape[2]
        buffer = a.new_empty(min(rows, n), n)  # the one |I|×N block, reused for every block
        total = torch.zeros((), dtype=_accumulator_dtype(a), device=a.device)
        for i in range(a.shape[0]):
            for start in range(0, n, rows):
                block = _difference_rows(z[i], z_neg[i], start, rows, buffer)
                # sum in the block's dtype (a float64 sum would cast the whole block first)
                total += block.abs_().sum().to(total.dtype)
        ctx.save_for_backward(a, b)
        ctx.rows = rows
        return (total / (a.shape[0] * n * n)).to(a.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        a, b = ctx.saved_tensors
        rows = ctx.rows
        z, z_neg = _stack(a, b)
        batch, c1, n = a.shape
        buffer = a.new_empty(min(rows, n), n)
        grad_z = torch.empty_like(z)
        for i in range(batch):
            for start in range(0, n, rows):
                sign = _difference_rows(z[i], z_neg[i], start, rows, buffer).sign_()  # |I|×N
                # columns I of 2·Z′·sign(D) = 2·Z′·sign(D_I)ᵀ (D symmetric); the factor is applied below
                grad_z[i, :, start : start + rows] = z_neg[i] @ sign.transpose(0, 1)
        grad_z.mul_(grad_out * (2.0 / (batch * n * n)))
        # Z′ = [A; −B] gave ∂/∂A = 2A·sign(D) and ∂/∂B = −2B·sign(D) already; split the rows back.
        return grad_z[:, :c1], grad_z[:, c1:], None


def _difference_rows(z: Tensor, z_neg: Tensor, start: int, rows: int, buffer: Tensor) -> Tensor:
    """Rows ``start:start+rows`` of D = ZᵀZ′ (= AᵀA − BᵀB) for one image, written into ``buffer``."""
    lhs = z[:, start : start + rows].transpose(0, 1)  # |I|×(C1+C2)
    return torch.mm(lhs, z_neg, out=buffer[: lhs.shape[0]])


def _accumulator_dtype(x: Tensor) -> torch.dtype:
    """float64 for the running sum of block sums, except on devices without float64 (MPS)."""
    return torch.float32 if x.device.type == "mps" else torch.float64


def _stack(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Z = [A; B] and Z′ = [A; −B] along channels, so that ZᵀZ′ = AᵀA − BᵀB."""
    return torch.cat([a, b], dim=1), torch.cat([a, -b], dim=1)


def fa_loss(
    f_seg: Tensor,
    f_sr: Tensor,
    subsample: int = 8,
    *,
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
    eps: float = 1e-6,
) -> Tensor:
    """Feature-affinity loss between ``f_seg`` (B×C1×H×W) and ``f_sr`` (B×C2×H×W); returns a scalar.

    Features are average-pooled by ``subsample`` per side (N = ⌊H/s⌋·⌊W/s⌋ pixels), L2-normalised per
    pixel, and the mean over the batch of 1/N² Σ|S_seg − S_sr| is returned. Computed in float32 at
    least (fp16/bf16 features are upcast after pooling).
    Peak extra memory: one |I|×N block of the N×N affinity difference (``max_block_bytes``) plus a few
    (C1+C2)×N tensors, in the forward and in the backward.
    """
    _check_pair(f_seg, f_sr, subsample)
    dtype = torch.promote_types(torch.promote_types(f_seg.dtype, f_sr.dtype), torch.float32)
    a = pooled_unit_features(f_seg, subsample, eps, dtype)
    b = pooled_unit_features(f_sr, subsample, eps, dtype)
    rows = rows_per_block(a.shape[2], a.element_size(), max_block_bytes)
    return _BlockAffinityL1.apply(a, b, rows)


def dense_fa_loss(f_seg: Tensor, f_sr: Tensor, subsample: int = 8, eps: float = 1e-6) -> Tensor:
    """Reference FA loss that builds both B×N×N affinity matrices (tests and benchmark only)."""
    _check_pair(f_seg, f_sr, subsample)
    dtype = torch.promote_types(torch.promote_types(f_seg.dtype, f_sr.dtype), torch.float32)
    a = pooled_unit_features(f_seg, subsample, eps, dtype)
    b = pooled_unit_features(f_sr, subsample, eps, dtype)
    s_seg = a.transpose(1, 2) @ a
    s_sr = b.transpose(1, 2) @ b
    return (s_seg - s_sr).abs().mean()


class FALoss(nn.Module):
    """Module form of :func:`fa_loss`: ``FALoss(subsample, max_block_bytes, eps)(f_seg, f_sr) -> scalar``."""

    def __init__(
        self, subsample: int = 8, *, max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES, eps: float = 1e-6
    ) -> None:
        super().__init__()
        if not isinstance(subsample, int) or subsample < 1:
            raise ConfigError(f"FALoss: subsample={subsample!r}, expected an integer ≥ 1")
        if max_block_bytes <= 0:
            raise ConfigError(f"FALoss: max_block_bytes={max_block_bytes!r}, expected > 0")
        self.subsample = subsample
        self.max_block_bytes = max_block_bytes
        self.eps = eps

    def forward(self, f_seg: Tensor, f_sr: Tensor) -> Tensor:
        """B×C1×H×W and B×C2×H×W features → scalar loss."""
        return fa_loss(f_seg, f_sr, self.subsample, max_block_bytes=self.max_block_bytes, eps=self.eps)

    def extra_repr(self) -> str:
        return f"subsample={self.subsample}, max_block_bytes={self.max_block_bytes}, eps={self.eps}"
