"""diffc::gated_residual and diffc::gated_residual_adaln against the models' math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import diffc.models.flux.blocks as flux_blocks
import diffc.models.wan.blocks as wan_blocks
from diffc.errors import InvalidArgumentError
from diffc.ops.gated_residual import gated_residual_adaln_ref, gated_residual_ref
from tests.ops.common import DTYPES, assert_kernel_ran, assert_matches, poisoned, randn

EPS = 1e-6

# (batch, seq, dim). Production: FLUX.1 dim 3072 over 4096 image / 512 text / 4608 joint tokens;
# Wan2.1 dim 1536 (1.3B) or 5120 (14B) over 32,760 tokens.
SHAPES = {
    "s7c33": (1, 7, 33),
    "b2s5c96": (2, 5, 96),
    "b3s1c1100": (3, 1, 1100),  # more than one 1024-wide column block
}


def gate_and_modulation(kind: str, batch: int, seq: int, dim: int, dtype: torch.dtype):
    """(gate, scale, shift) as each model makes them.

    flux: (B, 1, dim) in the activations' dtype; wan: float32 strided unbind of (B, T, 6, dim), T = 1 or S
    (wan_per_token); wan_ungated: no gate (``x + attn2`` before ``norm3``), float32 modulation.
    """
    if kind == "flux":
        mod = randn(batch, 3 * dim, dtype=dtype, seed=3)
        return tuple(m[:, None] for m in mod.chunk(3, dim=1))
    tokens = seq if kind == "wan_per_token" else 1
    shift, scale, gate = (randn(1, 6, dim, seed=4) + randn(batch, tokens, 6, dim, seed=5)).unbind(2)[:3]
    return (None if kind == "wan_ungated" else gate), scale, shift


KINDS = ("flux", "wan", "wan_per_token", "wan_ungated")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_gated_residual_matches_reference(counters, shape, dtype, kind):
    x, y = randn(*shape, dtype=dtype, seed=1), randn(*shape, dtype=dtype, seed=2)
    gate = gate_and_modulation(kind, *shape, dtype)[0]
    out = poisoned(*shape, dtype=dtype)
    torch.ops.diffc.gated_residual(x, y, gate, out)
    assert_kernel_ran()
    assert_matches(out, gated_residual_ref(x, y, gate))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_gated_residual_adaln_matches_reference(counters, shape, dtype, kind):
    x, y = randn(*shape, dtype=dtype, seed=1, scale=2.0), randn(*shape, dtype=dtype, seed=2)
    gate, scale, shift = gate_and_modulation(kind, *shape, dtype)
    residual, out = poisoned(*shape, dtype=dtype), poisoned(*shape, dtype=dtype)
    torch.ops.diffc.gated_residual_adaln(x, y, gate, scale, shift, EPS, residual, out)
    assert_kernel_ran()
    residual_ref, out_ref = gated_residual_adaln_ref(x, y, gate, scale, shift, EPS)
    assert_matches(residual, residual_ref)
    assert_matches(out, out_ref)


# (x, y, gate) dtypes beyond the two models' own: the kernels follow torch's promotion and rounding.
MIXED = {
    "x32_y16_g16": (torch.float32, torch.bfloat16, torch.bfloat16),  # y * gate rounded to bf16 first
    "x16_y32_nogate": (torch.bfloat16, torch.float32, None),
    "x16_y16_g32": (torch.bfloat16, torch.bfloat16, torch.float32),
}


@pytest.mark.parametrize("dtypes", MIXED.values(), ids=MIXED.keys())
def test_mixed_dtypes_follow_torch_promotion(counters, dtypes):
    x_dtype, y_dtype, gate_dtype = dtypes
    x, y = randn(2, 5, 33, dtype=x_dtype, seed=1), randn(2, 5, 33, dtype=y_dtype, seed=2)
    gate = None if gate_dtype is None else randn(2, 1, 33, dtype=gate_dtype, seed=3)
    scale, shift = randn(2, 1, 33, dtype=x_dtype, seed=4), randn(2, 1, 33, dtype=x_dtype, seed=5)
    out = poisoned(2, 5, 33, dtype=x_dtype)
    torch.ops.diffc.gated_residual(x, y, gate, out)
    assert_matches(out, gated_residual_ref(x, y, gate))
    residual, normed = poisoned(2, 5, 33, dtype=x_dtype), poisoned(2, 5, 33, dtype=x_dtype)
    torch.ops.diffc.gated_residual_adaln(x, y, gate, scale, shift, EPS, residual, normed)
    residual_ref, normed_ref = gated_residual_adaln_ref(x, y, gate, scale, shift, EPS)
    assert_matches(residual, residual_ref)
    assert_matches(normed, normed_ref)
    assert_kernel_ran(2)


def test_opcheck(counters):
    x, y = randn(2, 5, 33, seed=1), randn(2, 5, 33, seed=2)
    for kind in KINDS:
        gate, scale, shift = gate_and_modulation(kind, 2, 5, 33, torch.float32)
        torch.library.opcheck(torch.ops.diffc.gated_residual.default, (x, y, gate, torch.empty_like(x)))
        args = (x, y, gate, scale, shift, EPS, torch.empty_like(x), torch.empty_like(x))
        torch.library.opcheck(torch.ops.diffc.gated_residual_adaln.default, args)


def record(module: torch.nn.Module, seen: dict, name: str) -> None:
    """Record a submodule's first input under ``name + '_in'`` and its output under ``name + '_out'``."""
    module.register_forward_pre_hook(lambda m, args: seen.__setitem__(name + "_in", args[0]))
    module.register_forward_hook(lambda m, args, out: seen.__setitem__(name + "_out", out))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_references_are_flux_double_block(dtype):
    """Double-stream block, image stream: attention residual + MLP norm (fused pair), MLP residual."""
    torch.manual_seed(0)
    heads, head_dim = 2, 8
    dim = heads * head_dim
    block = flux_blocks.FluxTransformerBlock(dim, heads, head_dim).to(dtype).eval()
    hidden, context = randn(2, 6, dim, dtype=dtype, seed=1), randn(2, 3, dim, dtype=dtype, seed=2)
    temb = randn(2, dim, dtype=dtype, seed=3)
    ids = torch.randint(0, 9, (9, 3), generator=torch.Generator().manual_seed(4)).float()
    seen: dict = {}
    record(block.attn, seen, "attn")
    record(block.ff, seen, "ff")
    with torch.no_grad():
        _, out = block(hidden, context, temb, flux_blocks.rope_tables(ids, (2, 2, 4)))
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1.linear(F.silu(temb)).chunk(6, dim=1)
    residual, normed = gated_residual_adaln_ref(
        hidden, seen["attn_out"][0], gate_msa[:, None], scale_mlp[:, None], shift_mlp[:, None], EPS
    )
    torch.testing.assert_close(seen["ff_in"], normed, rtol=0, atol=0)
    torch.testing.assert_close(out, gated_residual_ref(residual, seen["ff_out"], gate_mlp[:, None]), rtol=0, atol=0)


@pytest.mark.parametrize("per_token", (False, True), ids=("per_sample", "per_token"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_references_are_wan_block(dtype, per_token):
    """Wan block: float32 gated residual after attn1, ungated ``x + attn2`` + norm3 (fused pair), FFN residual."""
    torch.manual_seed(0)
    heads, head_dim, seq = 2, 8, 6
    dim = heads * head_dim
    block = wan_blocks.WanTransformerBlock(dim, 24, heads, True, EPS).to(dtype).eval()
    block.scale_shift_table.data = block.scale_shift_table.data.float()
    block.norm2.float()  # Wan keeps norm1/2/3 in float32 (_keep_in_fp32_modules)
    x = randn(2, seq, dim, dtype=dtype, seed=1)
    temb = randn(2, seq if per_token else 1, 6, dim, seed=2)
    seen: dict = {}
    for name in ("attn1", "norm2", "attn2", "ffn"):
        record(getattr(block, name), seen, name)
    rope = wan_blocks.rope_frequencies(head_dim, (1, 2, 3), torch.device("cpu"))
    with torch.no_grad():
        out = block(x, randn(2, 4, dim, dtype=dtype, seed=3), temb, rope)
    _, _, gate, c_shift, c_scale, c_gate = (block.scale_shift_table + temb.float()).unbind(2)
    x1 = gated_residual_ref(x, seen["attn1_out"], gate)
    torch.testing.assert_close(seen["norm2_in"], x1.float(), rtol=0, atol=0)
    x2, h = gated_residual_adaln_ref(x1, seen["attn2_out"], None, c_scale, c_shift, EPS)
    torch.testing.assert_close(seen["ffn_in"], h, rtol=0, atol=0)
    torch.testing.assert_close(out, gated_residual_ref(x2, seen["ffn_out"].float(), c_gate), rtol=0, atol=0)


def test_bad_arguments_name_the_field():
    x, y = randn(2, 5, 8), randn(2, 5, 8)
    gate = randn(2, 1, 8)
    with pytest.raises(InvalidArgumentError, match=r"^y: expected x's shape \(2, 5, 8\)"):
        torch.ops.diffc.gated_residual(x, y[:, :4], gate, torch.empty_like(x))
    with pytest.raises(InvalidArgumentError, match=r"^gate: expected shape \(2, 1, 8\) or \(2, 5, 8\)"):
        torch.ops.diffc.gated_residual(x, y, randn(2, 8), torch.empty_like(x))
    with pytest.raises(InvalidArgumentError, match=r"^out: expected shape \(2, 5, 8\)"):
        torch.ops.diffc.gated_residual(x, y, gate, torch.empty(2, 5, 9))
    with pytest.raises(InvalidArgumentError, match=r"^residual_out: expected dtype torch.float32"):
        torch.ops.diffc.gated_residual_adaln(
            x, y, gate, gate, gate, EPS, torch.empty_like(x, dtype=torch.bfloat16), torch.empty_like(x)
        )
