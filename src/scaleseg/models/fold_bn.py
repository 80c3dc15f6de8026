"""Fold eval-mode BatchNorm into the convolution before it, for inference (``eval.fold_bn``).

In eval mode ``BN(conv(x)) = conv'(x)`` with per-output-channel scaled weights and a bias (the
folding is ``torch.nn.utils.fusion.fuse_conv_bn_eval``). The folded network computes the same
logits (to float rounding) with one pass over each activation less: on DeepLabV3+ R-50 that is
about 50 BN layers at inference (``benchmarks/vs_smp.py``).

Which conv feeds which BN is read from one forward of a probe input, not from module order: a BN
is folded only when its input is the output of a ``Conv2d`` and no other operation reads that
output (a conv whose output also goes to a residual sum or a concatenation is left alone). The
folded model is then checked against the original on the probe, and restored if any output moved.
Written here because neither timm nor torch fuses by dataflow on arbitrary eager models
(``torch.ao.quantization.fuse_modules`` needs the pairs by name, ``torch.fx`` a traceable model).
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

__all__ = ["fold_batchnorm", "probe_input"]

FOLDABLE_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)  # exact types: timm's BatchNormAct2d also acts


class _CountReads(TorchFunctionMode):
    """Counts, per tensor id, the tensor-producing torch calls that read it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[int] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, Tensor) for t in tree_leaves(out)):
            for t in {id(t): t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}:
                self.reads[t] += 1
        return out


def _pairs(model: nn.Module, probe: Tensor) -> list[tuple[str, str]]:
    """(conv name, BN name) pairs where, in every call, the BN reads an output of that conv that
    nothing else reads (a module may run several times: a multi-scale wrapper runs its base per scale)."""
    counter = _CountReads()
    outputs: dict[str, list[tuple[Tensor, int]]] = {}  # conv → its outputs (kept alive: ids stay unique), reads before
    inputs: dict[str, list[Tensor]] = {}  # BN → its inputs
    hooks = []

    def conv_hook(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            outputs.setdefault(name, []).append((out, counter.reads[id(out)]))
        return hook

    def bn_hook(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: Any) -> None:
            inputs.setdefault(name, []).append(args[0])
        return hook

    for name, module in model.named_modules():
        if type(module) is nn.Conv2d:
            hooks.append(module.register_forward_hook(conv_hook(name)))
        elif type(module) in FOLDABLE_NORMS:
            hooks.append(module.register_forward_pre_hook(bn_hook(name)))
    try:
        with torch.no_grad(), counter:
            model(probe)
    finally:
        for h in hooks:
            h.remove()
    producer = {id(t): conv for conv, outs in outputs.items() for t, _ in outs}
    pairs = []
    for bn, tensors in inputs.items():
        sources = {producer.get(id(t)) for t in tensors}
        conv = next(iter(sources)) if len(sources) == 1 else None
        if conv is None:
            continue
        fed = {id(t) for t in tensors}
        outs = outputs[conv]
        if len(outs) == len(tensors) and all(id(t) in fed and counter.reads[id(t)] - before == 1 for t, before in outs):
            pairs.append((conv, bn))
    return pairs


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _close(a: Any, b: Any, rtol: float) -> bool:
    la = [t for t in tree_leaves(a) if isinstance(t, Tensor)]
    lb = [t for t in tree_leaves(b) if isinstance(t, Tensor)]
    return len(la) == len(lb) and all(
        x.shape == y.shape and bool(((x.float() - y.float()).abs().max() <= rtol * (1 + y.float().abs().max())))
        for x, y in zip(la, lb))


def probe_input(model: nn.Module, seed: int = 0) -> Tensor:
    """A ``1×3×S×S`` random input on the model's device, S = 2 × its stride (at least 64)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    side = max(64, 2 * int(getattr(model, "stride", 32)))
    return torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(seed)).to(device)


def fold_batchnorm(model: nn.Module, probe: Tensor, rtol: float = 1e-4) -> list[str]:
    """Fold every foldable BN of the eval-mode ``model`` into its conv, in place (the BN becomes
    ``nn.Identity``). ``probe``: a ``1×3×H×W`` input on the model's device that the model takes.
    Returns the folded BN names; none (model unchanged) if the outputs on ``probe`` moved by more
    than ``rtol`` of their largest magnitude."""
    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model (BN statistics are frozen only then)")
    pairs = _pairs(model, probe)
    if not pairs:
        return []
    with torch.no_grad():
        before = model(probe)
        originals = {n: model.get_submodule(n) for pair in pairs for n in pair}
        for conv, bn in pairs:
            _set(model, conv, fuse_conv_bn_eval(copy.deepcopy(originals[conv]), originals[bn]))
            _set(model, bn, nn.Identity())
        if not _close(model(probe), before, rtol):
            for name, module in originals.items():
                _set(model, name, module)
            return []
    return [bn for _, bn in pairs]
