"""Shape tests that keep models exportable with dynamic height and width.

Eager code skips a resize or a pad when sizes already match. Under ``torch.export`` /
``torch.compile(dynamic=True)`` / the ONNX exporter the sizes are symbolic, and such a test would add
a guard (e.g. ``H % 16 == 0``) that pins the graph to the example input's size. :func:`same_size`
answers ``True`` only when the sizes are *provably* equal: eager ints behave exactly as ``==``; a
symbolic size that is not provably equal takes the general branch (resize to the same size is the
identity, a zero pad is a copy), so the traced graph is valid for every input size.
"""
from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = ["ceil_to_multiple", "round_scaled", "same_size"]


def same_size(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """``tuple(a) == tuple(b)`` for int sizes; for symbolic sizes ``True`` only if provably equal."""
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def ceil_to_multiple(size: Any, stride: int) -> Any:
    """Smallest multiple of ``stride`` ≥ ``size`` (int or symbolic int), without float arithmetic."""
    return (size + stride - 1) // stride * stride


def round_scaled(size: Any, scale: float) -> Any:
    """``round(size · scale)`` (Python's round half to even, as ``scale_pooling`` computes it).

    For dyadic scales (``p/2^k``: 0.5, 0.75, 1.25, 2, …; their float products are exact) this is
    integer arithmetic, so a traced graph holds no float ``round`` (the ONNX exporter has none);
    other scales fall back to the float expression.
    """
    ratio = Fraction(scale)
    p, q = ratio.numerator, ratio.denominator
    if q > 1024 or q & (q - 1):
        return round(size * scale)
    if q == 1:
        return size * p
    t = size * p + q // 2  # half up: (t // q); a tie (t % q == 0) goes down when that is odd
    up = t // q
    tie = 1 - (t % q + q - 1) // q  # 1 iff t % q == 0, in integer arithmetic (no Python branch)
    return up - (up % 2) * tie
