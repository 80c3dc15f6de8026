"""Feature-affinity loss: values against a plain float64 reference, chunking, gradients, memory bound."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scaleseg.errors import ConfigError
from scaleseg.losses.fa import FALoss, _BlockAffinityL1, dense_fa_loss, fa_loss


def _reference(f_seg: torch.Tensor, f_sr: torch.Tensor, sub: int, eps: float = 1e-6) -> float:
    """Plain float64 loops: block means, per-pixel unit vectors, Σ_ij |cos_seg − cos_sr| / N², batch mean."""
    f_seg, f_sr = f_seg.double(), f_sr.double()
    b, _, h, w = f_seg.shape
    hh, ww = h // sub, w // sub
    total = 0.0
    for n in range(b):
        vecs = []
        for f in (f_seg[n], f_sr[n]):
            pixels = []
            for y in range(hh):
                for x in range(ww):
                    v = f[:, y * sub : (y + 1) * sub, x * sub : (x + 1) * sub].mean(dim=(1, 2))
                    pixels.append(v / max(float(v.norm()), eps))
            vecs.append(torch.stack(pixels))  # N×C
        a, c = vecs
        s_seg, s_sr = a @ a.T, c @ c.T
        total += float((s_seg - s_sr).abs().sum()) / (hh * ww) ** 2
    return total / b


def _features(dtype: torch.dtype, b: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    f_seg = torch.randn(b, 5, 12, 20, generator=g, dtype=dtype)
    f_sr = torch.randn(b, 3, 12, 20, generator=g, dtype=dtype)
    return f_seg, f_sr


def test_matches_plain_reference_float64_and_float32() -> None:
    f_seg, f_sr = _features(torch.float64)
    ref = _reference(f_seg, f_sr, 2)
    assert ref > 0.1  # a meaningful, non-degenerate value
    assert abs(fa_loss(f_seg, f_sr, 2, max_block_bytes=7 * 60 * 8).item() - ref) < 1e-10
    assert abs(dense_fa_loss(f_seg, f_sr, 2).item() - ref) < 1e-10
    got32 = fa_loss(f_seg.float(), f_sr.float(), 2, max_block_bytes=7 * 60 * 4).item()
    assert abs(got32 - ref) < 1e-6


def test_zero_features_are_safe_and_identical_maps_give_zero() -> None:
    f_seg, _ = _features(torch.float64)
    f_seg[:, :, :4] = 0.0  # all-zero pixels (e.g. after ReLU): normalised with eps, no NaN
    loss = fa_loss(f_seg, f_seg * 3.0, 2)  # same directions, other scale → identical affinities
    assert torch.isfinite(loss) and abs(loss.item()) < 1e-12
    other = fa_loss(f_seg, torch.zeros_like(f_seg), 2)
    assert abs(other.item() - _reference(f_seg, torch.zeros_like(f_seg), 2)) < 1e-10


def test_batch_mean_does_not_grow_with_batch_size() -> None:
    f_seg, f_sr = _features(torch.float64, b=1)
    one = fa_loss(f_seg, f_sr, 2)
    four = fa_loss(f_seg.expand(4, -1, -1, -1), f_sr.expand(4, -1, -1, -1), 2, max_block_bytes=9 * 60 * 8)
    assert abs(one.item() - four.item()) < 1e-12
    assert abs(FALoss(2)(f_seg.repeat(3, 1, 1, 1), f_sr.repeat(3, 1, 1, 1)).item() - one.item()) < 1e-12


@pytest.mark.parametrize("rows", [1, 3, 7, 16, 60])
def test_chunked_equals_dense_value_and_gradient(rows: int) -> None:
    f_seg, f_sr = _features(torch.float64, b=3, seed=rows)
    f_seg.requires_grad_(True)
    f_sr.requires_grad_(True)
    n = 6 * 10  # pixels after subsample 2
    chunked = fa_loss(f_seg, f_sr, 2, max_block_bytes=rows * n * 8)
    dense = dense_fa_loss(f_seg, f_sr, 2)
    assert abs(chunked.item() - dense.item()) < 1e-12
    g_chunk = torch.autograd.grad(chunked, (f_seg, f_sr))
    g_dense = torch.autograd.grad(dense, (f_seg, f_sr))
    for a, b in zip(g_chunk, g_dense):
        assert a.abs().max() > 1e-6  # the gradient is not trivially zero
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)


def test_chunked_equals_dense_float32() -> None:
    f_seg, f_sr = _features(torch.float32, b=2, seed=5)
    f_seg.requires_grad_(True)
    chunked = fa_loss(f_seg, f_sr, 2, max_block_bytes=5 * 60 * 4)
    dense = dense_fa_loss(f_seg, f_sr, 2)
    assert abs(chunked.item() - dense.item()) < 1e-6
    torch.testing.assert_close(
        torch.autograd.grad(chunked, f_seg)[0], torch.autograd.grad(dense, f_seg)[0], atol=1e-7, rtol=1e-4
    )


def test_gradcheck_block_function_and_full_loss() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, 9, generator=g, dtype=torch.float64, requires_grad=True)
    # unnormalised inputs: the diagonal of D is far from 0, so |·| is differentiable everywhere
    assert torch.autograd.gradcheck(lambda p, q: _BlockAffinityL1.apply(p, q, 2), (a, b))
    f_seg = torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    f_sr = torch.randn(2, 2, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, q: fa_loss(p, q, 2, max_block_bytes=2 * 6 * 8), (f_seg, f_sr))


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (bytes) produced by any aten op while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_no_tensor_above_the_block_budget_in_forward_and_backward() -> None:
    n = 24 * 32  # subsample 1: N = 768, one dense affinity = 768² × 4 B = 2.25 MiB
    f_seg = torch.randn(1, 2, 24, 32, requires_grad=True)
    f_sr = torch.randn(1, 2, 24, 32, requires_grad=True)
    budget = 16 * n * 4  # 16 rows = 48 KiB
    with _LargestTensor() as probe:
        fa_loss(f_seg, f_sr, 1, max_block_bytes=budget).backward()
    assert 0 < probe.largest <= budget
    with _LargestTensor() as dense_probe:  # the probe does see N×N tensors when they exist
        dense_fa_loss(f_seg, f_sr, 1).backward()
    assert dense_probe.largest >= n * n * 4


def test_bad_inputs_raise_config_error() -> None:
    f = torch.randn(1, 2, 16, 16)
    with pytest.raises(ConfigError, match="max_block_bytes"):
        fa_loss(f, f, 2, max_block_bytes=10)  # below one row of 64 pixels
    with pytest.raises(ConfigError, match="H×W"):
        fa_loss(f, torch.randn(1, 2, 8, 16), 2)
    with pytest.raises(ConfigError, match="subsample"):
        fa_loss(f, f, 0)
    with pytest.raises(ConfigError, match="smaller than subsample"):
        fa_loss(f, f, 32)
