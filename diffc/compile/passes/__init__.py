"""Fusion passes over export's ATen graph, one file per fusion; see :mod:`.base` for the anatomy.

:data:`FUSION_PASSES` lists them in the order the pass manager runs them, after
:class:`CanonicalizeCasts`: larger fusions first, so a smaller one cannot take part of a larger
one's sequence.
"""

from .adaln_modulate import AdaLNModulatePass
from .base import FusionPass, Pattern, graph_targets
from .canonicalize import CanonicalizeCasts
from .concat_linear import ConcatLinearPass
from .gated_residual import GatedResidualPass
from .gelu_tanh import GeluTanhPass
from .qk_norm_rope import QKNormRopePass

FUSION_PASSES: tuple[type[FusionPass], ...] = (
    QKNormRopePass, AdaLNModulatePass, GatedResidualPass, GeluTanhPass, ConcatLinearPass,
)

__all__ = [
    "FUSION_PASSES",
    "AdaLNModulatePass",
    "CanonicalizeCasts",
    "ConcatLinearPass",
    "FusionPass",
    "GatedResidualPass",
    "GeluTanhPass",
    "Pattern",
    "QKNormRopePass",
    "graph_targets",
]
