"""diffc::adaln_modulate against the models' math: FLUX in the activations' dtype, Wan in float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import diffc.models.flux.blocks as flux_blocks
import diffc.models.wan.blocks as wan_blocks
from diffc.errors import InvalidArgumentError
from diffc.ops.adaln_modulate import adaln_modulate_ref
from tests.ops.common import DTYPES, assert_kernel_ran, assert_matches, poisoned, randn

EPS = 1e-6

# (batch, seq, dim). Production: FLUX.1 dim 3072 over 4096 image (+512 text) tokens; Wan2.1 dim 1536
# (1.3B) or 5120 (14B) over 32,760 tokens.
SHAPES = {
    "s7c33": (1, 7, 33),
    "b2s5c96": (2, 5, 96),
    "b3s1c17": (3, 1, 17),
}


def modulation(kind: str, batch: int, seq: int, dim: int, dtype: torch.dtype):
    """(scale, shift) the way each model makes them.

    flux: (B, dim) chunks in the activations' dtype, broadcast as [:, None];
    wan / wan_per_token: float32 unbind of ``table + temb`` (B, T, 6, dim) with T = 1 or S (strided views).
    """
    if kind == "flux":
        mod = randn(batch, 2 * dim, dtype=dtype, seed=3)
        scale, shift = mod.chunk(2, dim=1)
        return scale[:, None], shift[:, None]
    tokens = seq if kind == "wan_per_token" else 1
    mod = randn(1, 6, dim, seed=4) + randn(batch, tokens, 6, dim, seed=5)  # float32, like Wan's
    shift, scale = mod.unbind(2)[:2]
    return scale, shift


MODULATIONS = ("flux", "wan", "wan_per_token")


@pytest.mark.parametrize("kind", MODULATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(counters, shape, dtype, kind):
    x = randn(*shape, dtype=dtype, seed=1, scale=2.0, offset=0.5)
    scale, shift = modulation(kind, *shape, dtype)
    out = poisoned(*shape, dtype=dtype)
    torch.ops.diffc.adaln_modulate(x, scale, shift, EPS, out)
    assert_kernel_ran()
    assert_matches(out, adaln_modulate_ref(x, scale, shift, EPS))


def test_opcheck(counters):
    x = randn(2, 5, 33)
    for kind in MODULATIONS:
        scale, shift = modulation(kind, 2, 5, 33, torch.float32)
        torch.library.opcheck(torch.ops.diffc.adaln_modulate.default, (x, scale, shift, EPS, torch.empty_like(x)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_is_flux_adanorm(dtype):
    """AdaNormZero (double- and single-stream) and the final AdaNormContinuous, bit for bit."""
    torch.manual_seed(0)
    dim = 24
    x, temb = randn(2, 7, dim, dtype=dtype, seed=1), randn(2, dim, dtype=dtype, seed=2)
    with torch.no_grad():
        for chunks in (6, 3):
            norm = flux_blocks.AdaNormZero(dim, chunks).to(dtype)
            shift, scale = norm.linear(F.silu(temb)).chunk(chunks, dim=1)[:2]
            out = norm(x, temb)[0]
            torch.testing.assert_close(out, adaln_modulate_ref(x, scale[:, None], shift[:, None]), rtol=0, atol=0)
        norm = flux_blocks.AdaNormContinuous(dim, dim).to(dtype)
        scale, shift = norm.linear(F.silu(temb)).chunk(2, dim=1)
        ref = adaln_modulate_ref(x, scale[:, None], shift[:, None])
        torch.testing.assert_close(norm(x, temb), ref, rtol=0, atol=0)


@pytest.mark.parametrize("per_token", (False, True), ids=("per_sample", "per_token"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_is_wan_block_norm1(dtype, per_token):
    """The input WanTransformerBlock hands its self-attention (float32 norm1 + modulation), bit for bit."""
    torch.manual_seed(0)
    heads, head_dim, seq = 2, 8, 6
    dim = heads * head_dim
    block = wan_blocks.WanTransformerBlock(dim, 24, heads, True, EPS).to(dtype).eval()
    block.scale_shift_table.data = block.scale_shift_table.data.float()  # kept in fp32, as the loader does
    x = randn(2, seq, dim, dtype=dtype, seed=1)
    temb = randn(2, seq if per_token else 1, 6, dim, seed=2)
    seen = {}
    block.attn1.register_forward_pre_hook(lambda m, args: seen.setdefault("h", args[0]))
    rope = wan_blocks.rope_frequencies(head_dim, (1, 2, 3), torch.device("cpu"))
    with torch.no_grad():
        block(x, randn(2, 4, dim, dtype=dtype, seed=3), temb, rope)
    shift, scale = (block.scale_shift_table + temb.float()).unbind(2)[:2]
    torch.testing.assert_close(seen["h"], adaln_modulate_ref(x, scale, shift, EPS), rtol=0, atol=0)


def test_bad_arguments_name_the_field():
    x = randn(2, 5, 8)
    scale, shift = randn(2, 1, 8), randn(2, 1, 8)
    op = torch.ops.diffc.adaln_modulate
    with pytest.raises(InvalidArgumentError, match=r"^scale: expected shape \(2, 1, 8\) or \(2, 5, 8\)"):
        op(x, randn(2, 3, 8), shift, EPS, torch.empty_like(x))
    with pytest.raises(InvalidArgumentError, match="^shift: expected dtype torch.float32"):
        op(x, scale, shift.bfloat16(), EPS, torch.empty_like(x))
    with pytest.raises(InvalidArgumentError, match="^out: expected dtype"):
        op(x, scale, shift, EPS, torch.empty_like(x, dtype=torch.bfloat16))
    with pytest.raises(InvalidArgumentError, match=r"^x: expected shape \(batch, seq, dim\)"):
        op(x[0], scale, shift, EPS, torch.empty_like(x[0]))
    with pytest.raises(InvalidArgumentError, match="^x: last dimension must be contiguous"):
        op(x.transpose(1, 2), randn(2, 1, 5), randn(2, 1, 5), EPS, torch.empty(2, 8, 5))
