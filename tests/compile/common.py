"""Expected match counts (named data) and the three checks every pass test makes (STYLE item 5)."""

from __future__ import annotations

import inspect

import torch

from diffc.compile.passes import CanonicalizeCasts, FusionPass, Pattern, graph_targets
from diffc.ops import COUNTERS, OpCounters, kernel_runs_on
from tests.helpers import REL_TOL, rel_err

# Relative error of the rewritten graph against the unfused exported graph. float32: the kernels
# round once where ATen rounds once, differences are reduction order (~1e-7). bf16: the models'
# own parity bound (Triton's interpreter truncates float32 -> bf16 where GPUs round to nearest).
GRAPH_TOL = {torch.float32: 1e-5, torch.bfloat16: REL_TOL[torch.bfloat16]}

# Sites in the tiny models (tests/compile/conftest.py), by pass:
# FLUX, 1 double + 2 single blocks:
#   adaln_modulate: double 4 (norm1, norm1_context, img MLP norm, txt MLP norm) + single 1 each + norm_out = 7
#   gated_residual: double 4 (img/txt after attention and after MLP) + single 1 each = 6
#   gelu_tanh: double 2 (ff, ff_context) + single 1 each (proj_mlp) = 4
#   qk_norm_rope: double 1 (two op calls: text rows, image rows) + single 1 each = 3 matches, 4 calls
# Wan, 2 blocks:
#   adaln_modulate: norm1, norm2 (affine: scale w - 1, shift b) and norm3 per block + norm_out = 7
#   gated_residual: after attn1 and after ffn per block = 4 (the ungated ``x + attn2`` is not this op)
#   gelu_tanh: ffn per block + the text projection = 3
#   qk_norm_rope: self-attention per block = 2 (cross-attention normalises q/k without RoPE)
# concat_linear (after the others): FLUX double block image q/k/v and text q/k/v, single block q/k/v
#   (proj_mlp feeds diffc.gelu_tanh, which needs a contiguous input) = 4; Wan self q/k/v and cross k/v = 4
# timestep_embedding: FLUX timestep + guidance = 2, Wan 1; silu_mul: no SwiGLU in either = 0
# rms_norm: both call F.rms_norm (already aten.rms_norm), no hand-written RMSNorm = 0
# gated_residual_adaln (after gated_residual and adaln_modulate, each site takes one of each):
#   FLUX double block: image and text residual after attention feed the MLP norms = 2;
#   Wan: per block, the attn1 residual feeds norm2, the ungated ``x + attn2`` norm3 (as the op's gate=None
#   form), the feed-forward residual the next norm1 / norm_out = 6
# UNGATED_PAIRS (below): gated_residual_adaln sites whose residual was an ungated aten.add (Wan's x + attn2
# before norm3), which take no diffc.gated_residual of the gated-residual pass.
# Passes that rewrite with aten ops only (no diffc op enters the graph):
GRAPH_ONLY = ("concat_linear", "cat_transposed")  # passes that rewrite into aten ops, no diffc op
OPT_IN = ("concat_linear", "cat_linear_rows")  # not in default_passes()
FLUX_BLOCKS, FLUX_SINGLE, WAN_BLOCKS = 1, 2, 2
UNGATED_PAIRS = {"flux": 0, "wan": WAN_BLOCKS}
EXPECTED = {
    "flux": {
        "rms_norm": 0,
        "rms_norm_kernel": 0,
        "adaln_modulate": 4 * FLUX_BLOCKS + FLUX_SINGLE + 1,
        "gated_residual": 4 * FLUX_BLOCKS + FLUX_SINGLE,
        "gelu_tanh": 2 * FLUX_BLOCKS + FLUX_SINGLE,
        "qk_norm_rope": FLUX_BLOCKS + FLUX_SINGLE,
        "timestep_embedding": 2,
        "silu_mul": 0,
        "gated_residual_adaln": 2 * FLUX_BLOCKS,
        "modulation_table": 0,
        "key_padding_attention": 0,
        "gemv": 0,  # batch 2: the adaptive norms' projections keep their GEMM (one row only)
        "cat_transposed": FLUX_BLOCKS,  # the double block's joint value concatenation
        "concat_linear": 2 * FLUX_BLOCKS + FLUX_SINGLE,
        "split_cat_linear": FLUX_SINGLE,  # the single blocks' proj_out over [attention, MLP]
        "cat_linear_rows": FLUX_BLOCKS,  # the double block's value projections, written into their concatenation
    },
    "wan": {
        "rms_norm": 0,
        "rms_norm_kernel": 2 * WAN_BLOCKS,  # the tiny cross-attention q/k norms are narrow rows
        "adaln_modulate": 3 * WAN_BLOCKS + 1,
        "gated_residual": 2 * WAN_BLOCKS,
        "gelu_tanh": WAN_BLOCKS + 1,
        "qk_norm_rope": WAN_BLOCKS,
        "timestep_embedding": 1,
        "silu_mul": 0,
        "gated_residual_adaln": 3 * WAN_BLOCKS,
        "modulation_table": 0,  # one timestep per sample here; per token in test_fp8.py
        "key_padding_attention": 0,
        "gemv": 0,
        "cat_transposed": 0,
        "concat_linear": 2 * WAN_BLOCKS,
        "split_cat_linear": 0,
        "cat_linear_rows": 0,
    },
}


def count_delta(before: dict[str, int], after: dict[str, int], target: str) -> int:
    return after.get(target, 0) - before.get(target, 0)


def check_pass(traced, fusion: FusionPass, expected: int, dtype: torch.dtype, left: dict[str, int], entered: str,
               calls: int | None = None):
    """Canonicalise, apply ``fusion``; assert the match count, the op counts that changed, and numerics.

    ``left`` maps ATen targets to how many of each must leave the graph in all; ``entered`` is the diffc
    op, which must appear ``calls`` times (default: once per match).
    """
    calls = expected if calls is None else calls
    gm = traced.program.graph_module
    CanonicalizeCasts()(gm)
    before = graph_targets(gm)
    assert before.get(entered, 0) == 0

    assert fusion(gm) == expected

    after = graph_targets(gm)
    for target, n in left.items():
        assert count_delta(before, after, target) == -n, target
    assert after.get(entered, 0) == calls
    COUNTERS.reset()
    out = traced.run()
    if kernel_runs_on(torch.device("cpu")):  # each fused op call launched its (interpreted) Triton kernel
        assert COUNTERS == OpCounters(kernel_launches=calls, reference_fallbacks=0)
    assert out.shape == traced.unfused.shape and out.dtype == traced.unfused.dtype
    assert rel_err(out, traced.unfused) < GRAPH_TOL[dtype]
    return after


def check_variant(variant: Pattern) -> None:
    """The variant accepts its own example inputs, and its replacement computes what its pattern does."""
    args = variant.example_inputs()
    values = dict(zip(inspect.signature(variant.pattern).parameters, args))
    assert variant.accepts(**values)
    outs, refs = variant.build_replacement(**values)(*args), variant.pattern(*args)
    outs, refs = (outs, refs) if isinstance(refs, tuple) else ((outs,), (refs,))
    assert len(outs) == len(refs)
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert rel_err(out, ref) < (1e-6 if ref.dtype == torch.float32 else GRAPH_TOL[ref.dtype])


def save_and_load(program, tmp_path):
    """``program`` through diffc's artifact format (JSON + safetensors, no pickle) and back.

    Returns ``(loaded program, runnable module)``; the module gets ``program``'s weights assigned by
    name, as a run assigns the checkpoint's (the stored program holds none).
    """
    from diffc.compile import artifact as art

    art.save_program(program, tmp_path / "program.json")
    loaded = art.load_program(tmp_path / "program.json")
    assert all(t.is_meta for t in loaded.state_dict.values())
    module = loaded.module()
    module.load_state_dict(dict(program.state_dict), strict=False, assign=True)
    return loaded, module
