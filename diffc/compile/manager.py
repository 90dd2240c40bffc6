"""Run fusion passes over a traced graph for a quality tier and count what they did.

Tiers (DESIGN.md, Numerics): ``lossless`` runs only passes that declare ``bit_exact`` (today the
cast canonicalisation alone: every fused kernel reorders a reduction or contracts a multiply-add);
``fast`` (the default) runs all of them; ``fp8`` runs them as ``fast`` does, then the compiler lowers
linear layers to fp8 GEMMs (:mod:`.fp8`). :class:`CanonicalizeCasts` always runs first, since the
fusion patterns are written against its canonical form.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import fx

from .. import ops  # noqa: F401  (registers torch.ops.diffc.*, which the replacements call)
from ..errors import InvalidArgumentError
from .passes import FUSION_PASSES, CanonicalizeCasts, FusionPass

TIERS = ("lossless", "fast", "fp8")
DEFAULT_TIER = "fast"


@dataclasses.dataclass
class CompileCounters:
    """What the pass manager did; tests assert these exactly.

    ``matches`` maps each pass that ran to its replacements (for ``canonicalize_casts``: nodes removed
    or rewritten); passes the tier excluded are counted in ``passes_skipped`` and absent from ``matches``.
    """

    graphs_rewritten: int = 0
    passes_run: int = 0
    passes_skipped: int = 0
    matches: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, other: CompileCounters) -> None:
        self.graphs_rewritten += other.graphs_rewritten
        self.passes_run += other.passes_run
        self.passes_skipped += other.passes_skipped
        for name, n in other.matches.items():
            self.matches[name] = self.matches.get(name, 0) + n


def default_passes() -> list[FusionPass]:
    """The fusion passes on by default, in the order they run (after canonicalisation); opt-in ones
    (``default_enabled = False``) are left out."""
    return [cls() for cls in FUSION_PASSES if cls.default_enabled]


class PassManager:
    """Applies ``passes`` (default: :func:`default_passes`) allowed by ``tier`` to graph modules.

    ``counters`` accumulates over every :meth:`run`; each run also returns its own counters.
    """

    def __init__(self, passes: Sequence[FusionPass] | None = None, tier: str = DEFAULT_TIER):
        if tier not in TIERS:
            raise InvalidArgumentError("tier", f"expected one of {', '.join(TIERS)}, got {tier!r}")
        self.tier = tier
        self.passes = [CanonicalizeCasts(), *(default_passes() if passes is None else passes)]
        self.counters = CompileCounters()

    def enabled(self, fusion: FusionPass) -> bool:
        if self.tier == "fp8" and not fusion.fp8:
            return False
        return fusion.bit_exact or self.tier != "lossless"

    def run(self, gm: fx.GraphModule | torch.export.ExportedProgram) -> CompileCounters:
        """Rewrite ``gm`` (or an ExportedProgram's ``graph_module``) in place; returns this run's counters."""
        program = gm if isinstance(gm, torch.export.ExportedProgram) else None
        if program is not None:
            gm = program.graph_module
        counters = CompileCounters(graphs_rewritten=1)
        for fusion in self.passes:
            if not self.enabled(fusion):
                counters.passes_skipped += 1
                continue
            counters.matches[fusion.name] = fusion(gm)
            counters.passes_run += 1
        if program is not None:
            sync_output_signature(program)
        self.counters.add(counters)
        return counters


def sync_output_signature(program: torch.export.ExportedProgram) -> None:
    """Point the program's output specs at the graph's output nodes after a pass replaced one of them
    (a block whose last op was fused returns the fused op's result)."""
    outputs = program.graph.output_node().args[0]
    for spec, node in zip(program.graph_signature.output_specs, outputs):
        if isinstance(node, fx.Node) and hasattr(spec.arg, "name") and spec.arg.name != node.name:
            spec.arg.name = node.name
