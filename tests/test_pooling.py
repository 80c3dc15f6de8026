"""Exportable adaptive average pooling against torch's kernel, and the PPM / EESP modules that use it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scaleseg.models.pooling import AdaptiveAvgPool2d, adaptive_avg_pool2d, pooling_matrix


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
    got = adaptive_avg_pool2d(x, out)
    torch.testing.assert_close(got, F.adaptive_avg_pool2d(x, out), atol=1e-6, rtol=1e-6)
    assert torch.equal(AdaptiveAvgPool2d(out)(x), got)
