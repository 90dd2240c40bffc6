"""Model structure declared as data: the repeated-block lists (regions) of a DiT.

A DiT declares its repeated blocks (``_repeated_blocks``): attribute names of ``nn.ModuleList``s in
diffc's native models, block class names in diffusers' models. Regional compilation, offload and the
step cache all read the blocks through :func:`dit_regions`, never by special-casing a model.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..errors import DiffcError


class RegionError(DiffcError):
    """A DiT's declared repeated blocks cannot be found or used."""


@dataclasses.dataclass(frozen=True)
class Region:
    """One repeated-block list: its name (the ``ModuleList``'s attribute path) and its blocks, in order."""

    name: str
    blocks: tuple[nn.Module, ...]


def dit_regions(dit: nn.Module) -> list[Region]:
    """The regions of ``dit`` in declaration order, from ``_repeated_blocks``.

    An entry names a ``ModuleList`` attribute (diffc's models) or a block class (diffusers' models,
    whose lists are then found by the class of their elements). Raises :class:`RegionError` when the
    model declares none or an entry matches nothing.
    """
    declared = tuple(getattr(dit, "_repeated_blocks", ()) or ())
    if not declared:
        raise RegionError(f"{type(dit).__name__} declares no repeated blocks (_repeated_blocks); "
                          "regional compilation needs them")
    regions, seen = [], set()
    for entry in declared:
        found = _lists_named(dit, entry) or _lists_of_class(dit, entry)
        if not found:
            raise RegionError(f"{type(dit).__name__}._repeated_blocks names {entry!r}, which is neither a "
                              "ModuleList attribute nor the class of a ModuleList's blocks")
        for name, blocks in found:
            if name not in seen and blocks:
                seen.add(name)
                regions.append(Region(name, tuple(blocks)))
    return regions


def _lists_named(dit: nn.Module, name: str) -> list[tuple[str, nn.ModuleList]]:
    try:
        module = dit.get_submodule(name)
    except AttributeError:
        return []
    return [(name, module)] if isinstance(module, nn.ModuleList) else []


def _lists_of_class(dit: nn.Module, class_name: str) -> list[tuple[str, nn.ModuleList]]:
    return [(name, m) for name, m in dit.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) and all(type(b).__name__ == class_name for b in m)]


def has_regions(dit: nn.Module) -> bool:
    """Whether ``dit`` declares repeated blocks that exist."""
    try:
        return bool(dit_regions(dit))
    except RegionError:
        return False
