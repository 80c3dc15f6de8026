"""Named parts of any scaleseg model, for freezing (``stages:``, see ``engine/stages.py``).

A part is found from the components of a parameter's (or module's) dotted name, so it holds for
every composition (``base.base.backbone…`` in HMSA∘DSRL is still the backbone). The first rule that
matches wins:

==============  ==========================================================================
``attention``   a component ``scale_attn`` (HMSA's attention head, explicit attention's head)
``aux``         a component starting with ``aux`` (``aux_head``, BiSeNet's ``aux16_head``)
``mcibi``       a component ``memory_context`` (MCIBI's memory, its attention and fusion)
``sisr``        a component ``sisr`` or ``fa_transform`` (DSRL's SR branch and FA transform)
``backbone``    a component ``backbone`` (the timm trunk, BiSeNet's spatial and context paths)
``head``        everything else (decoder, classifier, DSRL's SSSR upsampler)
==============  ==========================================================================
"""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn

PARTS: tuple[str, ...] = ("backbone", "head", "attention", "aux", "mcibi", "sisr")


def part_of(name: str) -> str:
    """The part of a dotted parameter or module name (rules in the module docstring)."""
    components = name.split(".")
    if "scale_attn" in components:
        return "attention"
    if any(c.startswith("aux") for c in components):
        return "aux"
    if "memory_context" in components:
        return "mcibi"
    if "sisr" in components or "fa_transform" in components:
        return "sisr"
    if "backbone" in components:
        return "backbone"
    return "head"


def matches(name: str, selector: str) -> bool:
    """Whether ``name`` belongs to ``selector``: a part name (:data:`PARTS`) or a name prefix."""
    if selector in PARTS:
        return part_of(name) == selector
    return name == selector or name.startswith(selector + ".")


def part_sizes(model: nn.Module) -> dict[str, int]:
    """Parameters per part (parts the model does not have are left out)."""
    sizes: dict[str, int] = {}
    for name, p in model.named_parameters():
        part = part_of(name)
        sizes[part] = sizes.get(part, 0) + p.numel()
    return sizes


def unmatched(model: nn.Module, selectors: Iterable[str]) -> list[str]:
    """The selectors that match no parameter of ``model`` (typos, parts the model lacks)."""
    names = [n for n, _ in model.named_parameters()]
    return [s for s in selectors if not any(matches(n, s) for n in names)]


__all__ = ["PARTS", "part_of", "matches", "part_sizes", "unmatched"]
