"""Exportable adaptive average pooling against torch's kernel, and the PPM / EESP modules that use it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scaleseg.models.pooling import AdaptiveAvgPool2d, adaptive_avg_pool2d, matrix_adaptive_avg_pool2d, pooling_matrix


def test_pooling_matrix_windows_by_hand() -> None:
    # 5 inputs into 3 bins: PyTorch windows [0, 2), [1, 4), [3, 5)
    expected = torch.tensor([[1 / 2, 1 / 2, 0, 0, 0], [0, 1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0, 1 / 2, 1 / 2]])
    torch.testing.assert_close(pooling_matrix(5, 3), expected)
    # more bins than inputs: every bin still averages at least one input
    assert torch.equal(pooling_matrix(2, 4), torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0]]))


@pytest.mark.parametrize("size", [(1, 1), (4, 6), (5, 7), (13, 9), (24, 32)])
@pytest.mark.parametrize("out", [1, 2, 3, 6, (5, 2), (17, 11)])
def test_matches_torch_adaptive_avg_pool(size: tuple[int, int], out: int | tuple[int, int]) -> None:
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    got = matrix_adaptive_avg_pool2d(x, out)
    torch.testing.assert_close(got, F.adaptive_avg_pool2d(x, out), atol=3e-7, rtol=1e-6)
    assert torch.equal(AdaptiveAvgPool2d(out)(x), F.adaptive_avg_pool2d(x, out))  # eager: torch's kernel
    assert torch.equal(adaptive_avg_pool2d(x, out), F.adaptive_avg_pool2d(x, out))


def test_traced_pooling_is_valid_for_every_size() -> None:
    """Exported once at one size, the pooling is right at sizes of other divisibility classes."""
    from torch.export import Dim

    program = torch.export.export(AdaptiveAvgPool2d(6), (torch.randn(1, 2, 13, 9),), strict=True,
                                  dynamic_shapes=({2: Dim.DYNAMIC(min=1, max=64), 3: Dim.DYNAMIC(min=1, max=64)},))
    for size in [(12, 18), (5, 7), (6, 6), (31, 2)]:
        x = torch.randn(1, 2, *size)
        torch.testing.assert_close(program.module()(x), F.adaptive_avg_pool2d(x, 6), atol=3e-7, rtol=1e-6)
