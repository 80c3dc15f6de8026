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
from typing import Any

from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = ["same_size", "ceil_to_multiple"]


def same_size(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """``tuple(a) == tuple(b)`` for int sizes; for symbolic sizes ``True`` only if provably equal."""
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def ceil_to_multiple(size: Any, stride: int) -> Any:
    """Smallest multiple of ``stride`` ≥ ``size`` (int or symbolic int), without float arithmetic."""
    return (size + stride - 1) // stride * stride
