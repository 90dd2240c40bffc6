"""Fusion passes over export's ATen graph, one file per fusion; see :mod:`.base` for the anatomy.

:data:`FUSION_PASSES` lists them in the order the pass manager runs them, after
:class:`CanonicalizeCasts`: :class:`RMSNormPass` first (it gives hand-written norms the one spelling
the fusions match), then larger fusions first, so a smaller one cannot take part of a larger one's
sequence. :class:`CatTransposedPass` runs last but one: the QK-norm fusion matches q's and k's concatenations in
the transposed form it rewrites; :class:`CatLinearRowsPass` (opt-in) then lets the value projections write the
concatenation it leaves.
"""

from .adaln_modulate import AdaLNModulatePass
from .base import FusionPass, Pattern, graph_targets
from .canonicalize import CanonicalizeCasts
from .cat_linear_rows import CatLinearRowsPass
from .cat_transposed import CatTransposedPass
from .concat_linear import ConcatLinearPass
from .gated_residual import GatedResidualPass
from .gated_residual_adaln import GatedResidualAdaLNPass
from .gelu_tanh import GeluTanhPass
from .gemv import GemvPass
from .key_padding import KeyPaddingAttentionPass
from .modulation_table import ModulationTablePass
from .qk_norm_rope import QKNormRopePass
from .rms_norm import RMSNormKernelPass, RMSNormPass
from .silu_mul import SiluMulPass
from .split_cat_linear import SplitCatLinearPass
from .timestep_embedding import TimestepEmbeddingPass

FUSION_PASSES: tuple[type[FusionPass], ...] = (
    RMSNormPass, QKNormRopePass, RMSNormKernelPass, AdaLNModulatePass, GatedResidualPass, GeluTanhPass,
    TimestepEmbeddingPass, SiluMulPass, GatedResidualAdaLNPass, ModulationTablePass, GemvPass, ConcatLinearPass,
    SplitCatLinearPass, KeyPaddingAttentionPass, CatTransposedPass, CatLinearRowsPass,
)

__all__ = [
    "FUSION_PASSES",
    "AdaLNModulatePass",
    "CanonicalizeCasts",
    "CatLinearRowsPass",
    "CatTransposedPass",
    "ConcatLinearPass",
    "FusionPass",
    "GatedResidualAdaLNPass",
    "GatedResidualPass",
    "GeluTanhPass",
    "GemvPass",
    "KeyPaddingAttentionPass",
    "ModulationTablePass",
    "Pattern",
    "QKNormRopePass",
    "RMSNormKernelPass",
    "RMSNormPass",
    "SiluMulPass",
    "SplitCatLinearPass",
    "TimestepEmbeddingPass",
    "graph_targets",
]
