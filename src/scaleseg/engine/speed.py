"""Speed switches: ``train.channels_last``, ``train.compile``, ``eval.channels_last`` and ``eval.compile``.

``compile_blocks`` compiles a contract model's compute blocks **in place** (``nn.Module.compile``):
the backbone, the heads and attention heads. The Python-level contract code around them
(``training_losses``, padding, multi-scale fusion, sliding windows) stays eager, so every method,
wrapper and inference mode works unchanged, images of any size recompile at most a few times
(dynamic shapes after the first change), and parameter names, ``state_dict`` and checkpoints are
those of the eager model. ``bf16-mixed`` precision is Lightning's (``torch.autocast`` on CPU and
GPU); the losses run in float32 (see ``losses.ce``).
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn

from .bf16_grouped_conv import guard_grouped_dilated_convs

__all__ = ["compile_blocks", "to_channels_last", "batch_to_channels_last", "warn_emulated_bf16", "runs_on_cpu", "cpu_has_native_bf16", "use_channels_last", "reuse_freed_memory",
           "reusing_freed_memory", "release_freed_memory", "with_eval_memory", "glibc_mallopt"]

log = logging.getLogger("scaleseg.train")


def _is_model(module: nn.Module) -> bool:
    """A contract model or wrapper (its compute lives in its children, called through methods)."""
    return callable(getattr(module, "forward_features", None))


def compile_blocks(model: nn.Module, **options: Any) -> list[str]:
    """Compile in place every child block of the (possibly wrapped) contract ``model`` that holds
    parameters; wrappers are descended into, losses without parameters are left eager. Returns the
    qualified names of the compiled blocks. ``options`` go to ``torch.compile``."""
    compiled: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if _is_model(child):
                visit(child, path + ".")
            elif any(True for _ in child.parameters()):
                child.compile(**options)
                compiled.append(path)

    visit(model, "")
    return compiled


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc mallopt parameters
_GLIBC_MMAP_MAX = 65536  # glibc's default M_MMAP_MAX


def _glibc() -> Any:
    """glibc through ctypes, or None where the C library is another."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def glibc_mallopt(*settings: tuple[int, int]) -> bool:
    """``mallopt(param, value)`` for each pair; whether glibc took them all (False where there is
    no glibc, or it refused a value)."""
    libc = _glibc()
    return libc is not None and all([libc.mallopt(param, value) == 1 for param, value in settings])


def reuse_freed_memory(enable: bool = True, keep_bytes: int = 1 << 30) -> bool:
    """glibc only, process-wide (``eval.reuse_memory``): serve every allocation from the heap and keep
    up to ``keep_bytes`` of freed memory there, so a freed large tensor's pages serve the next one.

    PyTorch's CPU allocator is malloc. glibc maps blocks above its mmap threshold (at most 32 MiB)
    afresh and unmaps them on free, and the kernel zero-fills every page of the next one on first
    touch. On DeepLabV3+ R-50 OS8 at 512×1024, dense 3-scale inference then spends 16 of its 88 CPU
    seconds in those page faults; with reuse, 1 s. It is the effect of jemalloc / tcmalloc, which
    PyTorch's CPU tuning guide preloads. The memory of the peak stays resident instead of going
    back to the OS (tiled inference, too, keeps its freed windows for reuse). ``enable=False``
    restores glibc's defaults for new blocks. Returns False where there is no glibc."""
    return glibc_mallopt((M_MMAP_MAX, 0 if enable else _GLIBC_MMAP_MAX),
                         (M_TRIM_THRESHOLD, keep_bytes if enable else 128 << 10))


@contextmanager
def reusing_freed_memory(enable: bool = True) -> Iterator[bool]:
    """:func:`reuse_freed_memory` for the duration of the block; after it glibc's defaults again and
    the kept memory given back (:func:`release_freed_memory`), so a process that evaluates, then
    goes on, gets its memory back. Yields whether it is on."""
    on = enable and reuse_freed_memory(True)
    try:
        yield on
    finally:
        if on:
            reuse_freed_memory(False)
            release_freed_memory()


def release_freed_memory() -> bool:
    """``malloc_trim(0)``: glibc gives the free memory it keeps back to the OS (the heap's top and
    the free pages inside it). False where there is no glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    return libc is not None


Command = TypeVar("Command", bound=Callable[..., Any])


def with_eval_memory(fn: Command) -> Command:
    """Run ``fn(cfg, ...)`` (an inference command: eval, predict, autolabel) under
    :func:`reusing_freed_memory` as ``cfg.eval.reuse_memory`` says."""

    @functools.wraps(fn)
    def run(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        with reusing_freed_memory(cfg.eval.reuse_memory):
            return fn(cfg, *args, **kwargs)
    return run  # type: ignore[return-value]


def to_channels_last(model: nn.Module) -> nn.Module:
    """Parameters and buffers of 4-D shape in channels-last (NHWC) memory format, in place. Grouped
    dilated convs are guarded against oneDNN's wrong bf16 weight gradients in that layout
    (:mod:`scaleseg.engine.bf16_grouped_conv`)."""
    guard_grouped_dilated_convs(model)
    return model.to(memory_format=torch.channels_last)


def batch_to_channels_last(batch: Any) -> Any:
    """Images of a batch dict (every 4-D float tensor: ``image``, ``image_hr``) in channels-last."""
    if not isinstance(batch, dict):
        return batch
    return {k: v.contiguous(memory_format=torch.channels_last)
            if isinstance(v, torch.Tensor) and v.ndim == 4 and v.is_floating_point() else v
            for k, v in batch.items()}


def runs_on_cpu(accelerator: str) -> bool:
    """Whether ``train.accelerator`` trains on the CPU ("cpu", or "auto" without CUDA)."""
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def use_channels_last(setting: bool | str, accelerator: str) -> bool:
    """``train.channels_last`` / ``eval.channels_last`` resolved: ``auto`` is on for a CPU run on a CPU
    with AVX-512 (oneDNN's NHWC convolutions are faster there, README "Speed switches"), off otherwise."""
    if setting != "auto":
        return bool(setting)
    return runs_on_cpu(accelerator) and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def warn_emulated_bf16(precision: str, accelerator: str) -> bool:
    """Warn (and return True) when bf16 would run on a CPU without native bf16 (AVX512-BF16 or
    AMX): oneDNN then emulates it, many times slower than float32 (benchmarks/speed_switches.py)."""
    if precision.startswith("bf16") and runs_on_cpu(accelerator) and not cpu_has_native_bf16():
        log.warning("train.precision=%s on a CPU without native bf16 (%s): emulated, many times slower "
                    "than float32; use train.precision=32 here", precision, torch.backends.cpu.get_cpu_capability())
        return True
    return False
