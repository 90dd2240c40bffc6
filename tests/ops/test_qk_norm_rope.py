"""diffc::qk_norm_rope_per_head (FLUX) and diffc::qk_norm_rope_across_heads (Wan) against the models' math."""

from __future__ import annotations

import pytest
import torch

import diffc.models.flux.blocks as flux_blocks
import diffc.models.wan.blocks as wan_blocks
from diffc.errors import InvalidArgumentError
from diffc.ops.fp8 import FP8, FP8_MAX
from diffc.ops.qk_norm_rope import (
    CONFIG_ENV,
    CONFIGS,
    KernelConfig,
    qk_norm_rope_across_heads_ref,
    qk_norm_rope_per_head_ref,
    tile_plan,
)
from diffc.ops.qk_norm_rope_fp8 import qk_fp8_scales, quantize_with_head_scales
from tests.fp8_interpreter import round_interpreter_fp8_to_nearest
from tests.ops.test_attention_fp8 import run_compiled
from tests.ops.common import (
    DTYPES,
    assert_kernel_ran,
    assert_matches,
    norm_weight,
    poisoned,
    randn,
)

FP8_ROUNDS_TO_NEAREST = round_interpreter_fp8_to_nearest()

EPS = 1e-6

# (batch, seq, heads, head_dim, rope axes). Production FLUX.1: 24 heads x 128, axes (16, 56, 56),
# 512 text + 4096 image tokens at 1024x1024.
FLUX_SHAPES = {
    "h3d16": (1, 7, 3, 16, (4, 6, 6)),
    "b2h2d32": (2, 5, 2, 32, (8, 12, 12)),
    "h5d8": (1, 3, 5, 8, (2, 2, 4)),
    "h24d32s37": (1, 37, 24, 32, (8, 12, 12)),  # FLUX's head count, odd token count
    "h24d128": (1, 13, 24, 128, (16, 56, 56)),  # FLUX's heads and head_dim
}
# (batch, latent grid (frames, height, width), heads, head_dim). Production Wan2.1: 12 (1.3B) or
# 40 (14B) heads x 128, grid (21, 30, 52) = 32,760 tokens at 832x480, 81 frames.
WAN_SHAPES = {
    "h3d16": (1, (1, 3, 5), 3, 16),
    "b2h2d12": (2, (1, 1, 7), 2, 12),
    "h5d24": (1, (3, 1, 1), 5, 24),
    "h40d128": (1, (1, 3, 7), 40, 128),  # Wan 14B's heads and head_dim, 21 tokens
    "b2h12d128": (2, (1, 1, 9), 12, 128),  # Wan 1.3B's
    "h40d24": (1, (3, 1, 5), 40, 24),
}


def flux_tables(seq: int, axes: tuple[int, ...], seed: int = 3):
    ids = torch.randint(0, 64, (seq, len(axes)), generator=torch.Generator().manual_seed(seed)).float()
    return flux_blocks.rope_tables(ids, axes)  # (seq, head_dim) each, fp32


def qk(batch, seq, heads, head_dim, dtype):
    shape = (batch, seq, heads, head_dim)
    return randn(*shape, dtype=dtype, seed=1), randn(*shape, dtype=dtype, seed=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FLUX_SHAPES.values(), ids=FLUX_SHAPES.keys())
def test_per_head_matches_reference(counters, shape, dtype):
    batch, seq, heads, head_dim, axes = shape
    q, k = qk(batch, seq, heads, head_dim, dtype)
    wq, wk = norm_weight(head_dim, dtype, seed=4), norm_weight(head_dim, dtype, seed=5)
    cos, sin = flux_tables(seq, axes)
    q_out, k_out = (poisoned(batch, heads, seq, head_dim, dtype=dtype) for _ in range(2))
    torch.ops.diffc.qk_norm_rope_per_head(q, k, wq, wk, cos, sin, EPS, 0, q_out, k_out)
    assert_kernel_ran()
    q_ref, k_ref = qk_norm_rope_per_head_ref(q, k, wq, wk, cos, sin, EPS)
    assert_matches(q_out, q_ref)
    assert_matches(k_out, k_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_head_fills_joint_buffer_at_offsets(counters, dtype):
    """The double-stream block: text rows (own weights) at 0, image rows at seq_txt, one (B, H, S, D) buffer."""
    batch, heads, head_dim, seq_txt, seq_img = 2, 3, 16, 3, 5
    cos, sin = flux_tables(seq_txt + seq_img, (4, 6, 6))
    q_txt, k_txt = qk(batch, seq_txt, heads, head_dim, dtype)
    q_img, k_img = randn(batch, seq_img, heads, head_dim, dtype=dtype, seed=8), randn(
        batch, seq_img, heads, head_dim, dtype=dtype, seed=9
    )
    w = [norm_weight(head_dim, dtype, seed=s) for s in range(10, 14)]
    q_out, k_out = (poisoned(batch, heads, seq_txt + seq_img, head_dim, dtype=dtype) for _ in range(2))

    torch.ops.diffc.qk_norm_rope_per_head(q_txt, k_txt, w[0], w[1], cos, sin, EPS, 0, q_out, k_out)
    assert q_out[:, :, seq_txt:].isnan().all() and k_out[:, :, seq_txt:].isnan().all(), "wrote outside its rows"
    torch.ops.diffc.qk_norm_rope_per_head(q_img, k_img, w[2], w[3], cos, sin, EPS, seq_txt, q_out, k_out)
    assert_kernel_ran(2)

    txt = qk_norm_rope_per_head_ref(q_txt, k_txt, w[0], w[1], cos, sin, EPS, 0)
    img = qk_norm_rope_per_head_ref(q_img, k_img, w[2], w[3], cos, sin, EPS, seq_txt)
    assert_matches(q_out, torch.cat([txt[0], img[0]], dim=2))
    assert_matches(k_out, torch.cat([txt[1], img[1]], dim=2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", WAN_SHAPES.values(), ids=WAN_SHAPES.keys())
def test_across_heads_matches_reference(counters, shape, dtype):
    batch, grid, heads, head_dim = shape
    seq = grid[0] * grid[1] * grid[2]
    q, k = qk(batch, seq, heads, head_dim, dtype)
    wq, wk = norm_weight(heads * head_dim, dtype, seed=4), norm_weight(heads * head_dim, dtype, seed=5)
    cos, sin = wan_blocks.rope_frequencies(head_dim, grid, torch.device("cpu"))  # (1, S, 1, D/2)
    q_out, k_out = poisoned(*q.shape, dtype=dtype), poisoned(*q.shape, dtype=dtype)
    torch.ops.diffc.qk_norm_rope_across_heads(q, k, wq, wk, cos, sin, EPS, q_out, k_out)
    assert_kernel_ran()
    q_ref, k_ref = qk_norm_rope_across_heads_ref(q, k, wq, wk, cos, sin, EPS)
    assert_matches(q_out, q_ref)
    assert_matches(k_out, k_ref)


def test_strided_inputs_from_a_fused_qkv_projection(counters):
    """q and k as column slices of one (B, S, 3 * H * D) projection: row strides of 3 * H * D."""
    batch, seq, heads, head_dim = 2, 5, 3, 8
    inner = heads * head_dim
    qkv = randn(batch, seq, 3 * inner, seed=20)
    q, k = (t.unflatten(-1, (heads, head_dim)) for t in (qkv[..., :inner], qkv[..., inner : 2 * inner]))
    cos, sin = flux_tables(seq, (2, 2, 4))
    w = norm_weight(head_dim, torch.float32)
    q_out, k_out = poisoned(batch, heads, seq, head_dim, dtype=torch.float32), poisoned(
        batch, heads, seq, head_dim, dtype=torch.float32
    )
    torch.ops.diffc.qk_norm_rope_per_head(q, k, w, w, cos, sin, EPS, 0, q_out, k_out)
    q_ref, k_ref = qk_norm_rope_per_head_ref(q, k, w, w, cos, sin, EPS)
    assert_matches(q_out, q_ref)
    assert_matches(k_out, k_ref)

    w = norm_weight(inner, torch.float32)
    cos, sin = wan_blocks.rope_frequencies(head_dim, (1, 1, seq), torch.device("cpu"))
    q_out, k_out = poisoned(*q.shape, dtype=torch.float32), poisoned(*q.shape, dtype=torch.float32)
    torch.ops.diffc.qk_norm_rope_across_heads(q, k, w, w, cos, sin, EPS, q_out, k_out)
    q_ref, k_ref = qk_norm_rope_across_heads_ref(q, k, w, w, cos, sin, EPS)
    assert_matches(q_out, q_ref)
    assert_matches(k_out, k_ref)
    assert_kernel_ran(2)


def test_opcheck(counters):
    q, k = qk(1, 5, 3, 8, torch.float32)
    cos, sin = flux_tables(7, (2, 2, 4))
    w = norm_weight(8, torch.float32)
    outs = [torch.empty(1, 3, 7, 8) for _ in range(2)]
    torch.library.opcheck(torch.ops.diffc.qk_norm_rope_per_head.default, (q, k, w, w, cos, sin, EPS, 2, *outs))
    cos, sin = wan_blocks.rope_frequencies(8, (1, 1, 5), torch.device("cpu"))
    w = norm_weight(24, torch.float32)
    outs = [torch.empty(1, 5, 3, 8) for _ in range(2)]
    torch.library.opcheck(torch.ops.diffc.qk_norm_rope_across_heads.default, (q, k, w, w, cos, sin, EPS, *outs))


def capture_attention(monkeypatch, module) -> dict:
    """Replace a blocks module's ``attention`` to record the q and k the model hands to it."""
    seen = {}

    def attention(q, k, v, cross=False):
        seen["q"], seen["k"] = q, k
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    monkeypatch.setattr(module, "attention", attention)
    return seen


def randomize_norms(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(norm_weight(p.numel(), p.dtype, seed=len(name)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_head_reference_is_flux_attention(monkeypatch, dtype):
    """The q/k FluxAttention gives to attention, joint text + image, equal the reference bit for bit."""
    torch.manual_seed(0)
    heads, head_dim, dim, seq_txt, seq_img = 3, 16, 20, 3, 5
    attn = flux_blocks.FluxAttention(dim, heads, head_dim, context=True).to(dtype).eval()
    randomize_norms(attn)
    x, c = randn(2, seq_img, dim, dtype=dtype, seed=1), randn(2, seq_txt, dim, dtype=dtype, seed=2)
    cos, sin = flux_tables(seq_txt + seq_img, (4, 6, 6))
    seen = capture_attention(monkeypatch, flux_blocks)
    with torch.no_grad():
        attn(x, (cos, sin), context=c)
        split = lambda t: t.unflatten(-1, (heads, head_dim))
        txt = qk_norm_rope_per_head_ref(split(attn.add_q_proj(c)), split(attn.add_k_proj(c)),
                                        attn.norm_added_q.weight, attn.norm_added_k.weight, cos, sin, EPS, 0)
        img = qk_norm_rope_per_head_ref(split(attn.to_q(x)), split(attn.to_k(x)),
                                        attn.norm_q.weight, attn.norm_k.weight, cos, sin, EPS, seq_txt)
    torch.testing.assert_close(seen["q"], torch.cat([txt[0], img[0]], dim=2), rtol=0, atol=0)
    torch.testing.assert_close(seen["k"], torch.cat([txt[1], img[1]], dim=2), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_across_heads_reference_is_wan_attention(monkeypatch, dtype):
    """The q/k WanAttention (self-attention with 3-D RoPE) gives to attention equal the reference bit for bit."""
    torch.manual_seed(0)
    heads, head_dim, grid = 3, 16, (1, 3, 5)
    attn = wan_blocks.WanAttention(heads * head_dim, heads, EPS).to(dtype).eval()
    randomize_norms(attn)
    x = randn(2, 15, heads * head_dim, dtype=dtype, seed=1)
    rope = wan_blocks.rope_frequencies(head_dim, grid, torch.device("cpu"))
    seen = capture_attention(monkeypatch, wan_blocks)
    with torch.no_grad():
        attn(x, None, rope)
        q = attn.to_q(x).unflatten(2, (heads, head_dim))
        k = attn.to_k(x).unflatten(2, (heads, head_dim))
        q_ref, k_ref = qk_norm_rope_across_heads_ref(q, k, attn.norm_q.weight, attn.norm_k.weight, *rope, EPS)
    torch.testing.assert_close(seen["q"], q_ref.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(seen["k"], k_ref.transpose(1, 2), rtol=0, atol=0)


def test_bad_arguments_name_the_field():
    q, k = qk(1, 5, 3, 8, torch.float32)
    w = norm_weight(8, torch.float32)
    cos, sin = flux_tables(5, (2, 2, 4))
    out = [torch.empty(1, 3, 5, 8) for _ in range(2)]
    per_head = torch.ops.diffc.qk_norm_rope_per_head
    with pytest.raises(InvalidArgumentError, match="^q_weight: expected shape"):
        per_head(q, k, norm_weight(24, torch.float32), w, cos, sin, EPS, 0, *out)
    with pytest.raises(InvalidArgumentError, match="^seq_offset: rows 1..6"):
        per_head(q, k, w, w, cos, sin, EPS, 1, *out)
    with pytest.raises(InvalidArgumentError, match="^k: expected dtype"):
        per_head(q, k.bfloat16(), w, w, cos, sin, EPS, 0, *out)
    with pytest.raises(InvalidArgumentError, match="^q_out: expected shape"):
        per_head(q, k, w, w, cos, sin, EPS, 0, torch.empty(1, 5, 3, 8), out[1])
    with pytest.raises(InvalidArgumentError, match="^q: expected shape .* even head_dim"):
        per_head(q[..., :7], k[..., :7], w[:7], w[:7], cos[:, :7], sin[:, :7], EPS, 0, *out)
    across = torch.ops.diffc.qk_norm_rope_across_heads
    wan_cos, wan_sin = wan_blocks.rope_frequencies(8, (1, 1, 5), torch.device("cpu"))
    with pytest.raises(InvalidArgumentError, match="^q_weight: expected shape \\(24,\\)"):
        across(q, k, w, w, wan_cos, wan_sin, EPS, torch.empty_like(q), torch.empty_like(k))
    w24 = norm_weight(24, torch.float32)
    with pytest.raises(InvalidArgumentError, match="^cos: expected shape"):
        across(q, k, w24, w24, cos, sin, EPS, torch.empty_like(q), torch.empty_like(k))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_kernel_config_matches_reference(counters, monkeypatch, name):
    """Each variant timed on the GPU: 24 and 40 heads (no padding), 5 heads (padded), odd token counts."""
    monkeypatch.setenv(CONFIG_ENV, name)
    for batch, seq, heads, head_dim, axes in ((2, 37, 24, 32, (8, 12, 12)), (1, 9, 5, 24, (8, 8, 8))):
        q, k = qk(batch, seq, heads, head_dim, torch.bfloat16)
        wq, wk = (norm_weight(head_dim, torch.bfloat16, seed=s) for s in (4, 5))
        cos, sin = flux_tables(seq + 3, axes)
        q_out, k_out = (poisoned(batch, heads, seq + 3, head_dim, dtype=torch.bfloat16) for _ in range(2))
        torch.ops.diffc.qk_norm_rope_per_head(q, k, wq, wk, cos, sin, EPS, 3, q_out, k_out)
        q_ref, k_ref = qk_norm_rope_per_head_ref(q, k, wq, wk, cos, sin, EPS, 3)
        assert_matches(q_out[:, :, 3:], q_ref)
        assert_matches(k_out[:, :, 3:], k_ref)
    for batch, grid, heads, head_dim in ((1, (1, 3, 7), 40, 32), (2, (1, 1, 9), 5, 24)):
        seq = grid[0] * grid[1] * grid[2]
        q, k = qk(batch, seq, heads, head_dim, torch.bfloat16)
        wq, wk = (norm_weight(heads * head_dim, torch.bfloat16, seed=s) for s in (4, 5))
        cos, sin = wan_blocks.rope_frequencies(head_dim, grid, torch.device("cpu"))
        q_out, k_out = poisoned(*q.shape, dtype=torch.bfloat16), poisoned(*q.shape, dtype=torch.bfloat16)
        torch.ops.diffc.qk_norm_rope_across_heads(q, k, wq, wk, cos, sin, EPS, q_out, k_out)
        q_ref, k_ref = qk_norm_rope_across_heads_ref(q, k, wq, wk, cos, sin, EPS)
        assert_matches(q_out, q_ref)
        assert_matches(k_out, k_ref)
    assert_kernel_ran(4)


# (tokens, heads, across_heads) -> (block_h, head_blocks, num_chunks) of the default config, head_dim 128
PRODUCTION_PLANS = {
    (4608, 24, False): (8, 3, 1),  # FLUX.1 per head
    (32760, 12, True): (4, 1, 3),  # Wan2.1 1.3B across heads
    (32760, 40, True): (8, 1, 5),  # Wan2.1 14B across heads
}


@pytest.mark.parametrize("shape", PRODUCTION_PLANS, ids=str)
def test_default_plan_pads_no_heads_at_production_sizes(shape):
    tokens, heads, across = shape
    plan = tile_plan(tokens, heads, 128, across, CONFIGS["default"])
    assert (plan.block_h, plan.head_blocks, plan.num_chunks) == PRODUCTION_PLANS[shape]
    assert plan.block_h * plan.head_blocks * plan.num_chunks == heads
    assert plan.block_t * plan.block_h * plan.block_d == CONFIGS["default"].tile
    assert plan.num_warps == 4 and plan.split


def test_plan_pads_heads_only_without_a_power_of_two_factor():
    assert tile_plan(7, 5, 24, True, KernelConfig()).block_h == 8  # 5 heads: one chunk of 8, 3 masked
    assert tile_plan(7, 6, 24, False, KernelConfig()).block_h == 8  # 2 x 3: padded, not 3 chunks of 2
    one = tile_plan(32760, 40, 128, True, CONFIGS["one-chunk"])
    assert (one.block_h, one.num_chunks, one.num_warps) == (64, 1, 16)
    wide = tile_plan(100, 24, 256, False, KernelConfig())  # a 2048-element tile holds 8 heads of 256
    assert (wide.block_t, wide.block_h, wide.block_d) == (1, 8, 256)


def test_bad_config_names_the_field(counters, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, "fastest")
    q, k = qk(1, 5, 3, 8, torch.float32)
    w = norm_weight(8, torch.float32)
    cos, sin = flux_tables(5, (2, 2, 4))
    out = [torch.empty(1, 3, 5, 8) for _ in range(2)]
    with pytest.raises(InvalidArgumentError, match="^DIFFC_QKROPE_CONFIG: expected one of .*'fastest'"):
        torch.ops.diffc.qk_norm_rope_per_head(q, k, w, w, cos, sin, EPS, 0, *out)
    with pytest.raises(InvalidArgumentError, match="^config.tile: expected a power of two, got 3000"):
        tile_plan(8, 4, 16, False, KernelConfig(tile=3000))
    with pytest.raises(InvalidArgumentError, match="^head_dim: expected an integer >= 2, got 0"):
        tile_plan(8, 4, 0, False, KernelConfig())


# ---- the fp8 variants: the same kernel quantizing with static per-head scales ----------------------------

FP8_FLUX_SHAPES = {name: FLUX_SHAPES[name] for name in ("h3d16", "h5d8", "h24d32s37")}  # H 3, 5; S 37
FP8_WAN_SHAPES = {name: WAN_SHAPES[name] for name in ("b2h2d12", "h5d24", "h40d24")}


def fp8_poisoned(*shape: int) -> torch.Tensor:
    """An fp8 output buffer full of NaN (e4m3fn's 0x7f)."""
    return torch.full(shape, float("nan")).to(FP8)


def distinct_scales(weight, heads, head_dim, across, flip=False):
    """The static scales times 1..2, different for every head (and for q and k), so a wrong head index shows."""
    ramp = 1.0 + torch.arange(heads, dtype=torch.float32) / heads
    return qk_fp8_scales(weight, heads, head_dim, across) * (ramp.flip(0) if flip else ramp)


def assert_fp8_matches(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, head_axis: int) -> None:
    """``out`` is ``ref`` (the bf16 op's result) quantized with the per-head scales: within one e4m3 ulp of
    the reference's quantization (mostly equal), and dequantized within e4m3's rounding of ``ref``."""
    assert out.dtype == FP8 and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
    got, want = out.float(), quantize_with_head_scales(ref, scale.to(ref.device), head_axis).float()
    assert not got.isnan().any(), f"{int(got.isnan().sum())} of {got.numel()} elements were not written"
    # one ulp: 2^-3 of the value's binade above e4m3's normal minimum (2^-6), 2^-9 below
    assert bool(((got - want).abs() <= 0.125 * want.abs() + 2.0 ** -9).all()), float((got - want).abs().max())
    assert float((got != want).float().mean()) <= 0.02
    shape = [1] * ref.ndim
    shape[head_axis] = -1
    scale = scale.to(ref.device).reshape(shape)
    err = (got * scale - ref.float()).abs()
    assert bool((err <= 0.07 * ref.float().abs() + 2.0 ** -9 * scale).all()), float(err.max())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FP8_FLUX_SHAPES.values(), ids=FP8_FLUX_SHAPES.keys())
def test_per_head_fp8_matches_reference(counters, shape, dtype):
    """Rows at seq_offset of a joint buffer, as the double-stream block fills it; the rows around stay untouched."""
    batch, seq, heads, head_dim, axes = shape
    offset, total = 2, seq + 3
    q, k = qk(batch, seq, heads, head_dim, dtype)
    wq, wk = norm_weight(head_dim, dtype, seed=4), norm_weight(head_dim, dtype, seed=5)
    q_scale, k_scale = distinct_scales(wq, heads, head_dim, False), distinct_scales(wk, heads, head_dim, False, True)
    cos, sin = flux_tables(total, axes)
    q_out, k_out = fp8_poisoned(batch, heads, total, head_dim), fp8_poisoned(batch, heads, total, head_dim)
    torch.ops.diffc.qk_norm_rope_per_head_fp8(q, k, wq, wk, cos, sin, EPS, offset, q_scale, k_scale, q_out, k_out)
    assert_kernel_ran()
    q_ref, k_ref = qk_norm_rope_per_head_ref(q, k, wq, wk, cos, sin, EPS, offset)
    assert_fp8_matches(q_out[:, :, offset : offset + seq], q_ref, q_scale, head_axis=1)
    assert_fp8_matches(k_out[:, :, offset : offset + seq], k_ref, k_scale, head_axis=1)
    for out in (q_out, k_out):
        assert out[:, :, :offset].float().isnan().all() and out[:, :, offset + seq :].float().isnan().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FP8_WAN_SHAPES.values(), ids=FP8_WAN_SHAPES.keys())
def test_across_heads_fp8_matches_reference(counters, shape, dtype):
    batch, grid, heads, head_dim = shape
    seq = grid[0] * grid[1] * grid[2]
    q, k = qk(batch, seq, heads, head_dim, dtype)
    wq, wk = norm_weight(heads * head_dim, dtype, seed=4), norm_weight(heads * head_dim, dtype, seed=5)
    q_scale, k_scale = distinct_scales(wq, heads, head_dim, True), distinct_scales(wk, heads, head_dim, True, True)
    cos, sin = wan_blocks.rope_frequencies(head_dim, grid, torch.device("cpu"))
    q_out, k_out = fp8_poisoned(*q.shape), fp8_poisoned(*q.shape)
    torch.ops.diffc.qk_norm_rope_across_heads_fp8(q, k, wq, wk, cos, sin, EPS, q_scale, k_scale, q_out, k_out)
    assert_kernel_ran()
    q_ref, k_ref = qk_norm_rope_across_heads_ref(q, k, wq, wk, cos, sin, EPS)
    assert_fp8_matches(q_out, q_ref, q_scale, head_axis=2)
    assert_fp8_matches(k_out, k_ref, k_scale, head_axis=2)


def test_fp8_clamps_to_the_fp8_range(counters):
    """Scales far under the bound: most values saturate at +-448, as the reference's clamp does."""
    batch, seq, heads, head_dim = 1, 6, 3, 16
    q, k = qk(batch, seq, heads, head_dim, torch.bfloat16)
    w = norm_weight(heads * head_dim, torch.bfloat16)
    scale = qk_fp8_scales(w, heads, head_dim, True) / 64
    cos, sin = wan_blocks.rope_frequencies(head_dim, (1, 2, 3), torch.device("cpu"))
    q_out, k_out = fp8_poisoned(*q.shape), fp8_poisoned(*q.shape)
    torch.ops.diffc.qk_norm_rope_across_heads_fp8(q, k, w, w, cos, sin, EPS, scale, scale, q_out, k_out)
    q_ref, _ = qk_norm_rope_across_heads_ref(q, k, w, w, cos, sin, EPS)
    want = quantize_with_head_scales(q_ref, scale, head_axis=2).float()
    assert float((want.abs() == FP8_MAX).float().mean()) > 0.3
    torch.testing.assert_close(q_out.float(), want, rtol=0.125, atol=0)


def adversarial_tokens(weight: torch.Tensor, heads: int, head_dim: int, across: bool) -> torch.Tensor:
    """Tokens whose norm output reaches the bound: all energy in the channel of a head's largest |weight|.

    Per head every head of one token peaks; across heads token t peaks in head t (its other heads are 0).
    Returns (1, H, H, D) across heads, (1, 1, H, D) per head.
    """
    peak = weight.float().abs().reshape(-1, head_dim).argmax(dim=1)  # (H,) across, (1,) per head
    x = torch.zeros(1, heads if across else 1, heads, head_dim)
    for h in range(heads):
        x[0, h if across else 0, h, peak[h if across else 0]] = 1000.0
    return x.to(weight.dtype)


@pytest.mark.parametrize("across", [False, True], ids=["per_head", "across_heads"])
def test_static_scales_bound_every_output(counters, across):
    """No input clips: random (heavy-tailed) tokens and adversarial ones; the latter reach the bound within 2%,
    so it is tight. Unrotated tables (cos 1) for the adversarial tokens keep their peak in one channel."""
    heads, head_dim, seq = 5, 16, 9
    weight = randn(heads * head_dim if across else head_dim, dtype=torch.bfloat16, seed=3, scale=0.8)
    scale = qk_fp8_scales(weight, heads, head_dim, across)
    assert scale.shape == (heads,) and scale.dtype == torch.float32 and scale.is_contiguous()
    heavy = randn(2, seq, heads, head_dim, seed=4) ** 3
    peaks = adversarial_tokens(weight, heads, head_dim, across)
    if across:
        tables = wan_blocks.rope_frequencies(head_dim, (1, 3, 3), torch.device("cpu"))
        flat = (torch.ones(heads, head_dim // 2), torch.zeros(heads, head_dim // 2))
        run, ref, axis = torch.ops.diffc.qk_norm_rope_across_heads_fp8, qk_norm_rope_across_heads_ref, 2
    else:
        tables = flux_tables(seq, (4, 6, 6))
        flat = (torch.ones(1, head_dim), torch.zeros(1, head_dim))
        run, ref, axis = torch.ops.diffc.qk_norm_rope_per_head_fp8, qk_norm_rope_per_head_ref, 1
    for x, (cos, sin) in ((heavy.bfloat16(), tables), (peaks, flat)):
        y, _ = ref(x, x, weight, weight, cos, sin, EPS)
        shape = [1, 1, 1, 1]
        shape[axis] = heads
        ratio = y.float().abs() / (FP8_MAX * scale.reshape(shape))
        assert float(ratio.max()) <= 1.0
        out = fp8_poisoned(*y.shape)
        run(x, x, weight, weight, cos, sin, EPS, *(() if across else (0,)), scale, scale, out, fp8_poisoned(*y.shape))
        assert_fp8_matches(out, y, scale, head_axis=axis)
    peak_ratio = ratio.amax(dim=tuple(d for d in range(4) if d != axis))
    assert bool((peak_ratio >= 0.98).all()), peak_ratio
    assert_kernel_ran(2)


def test_fp8_opcheck(counters):
    # the fake-tensor and autograd-registration checks (tests/ops/test_fp8_quant.py says why not the schema one)
    checks = ("test_faketensor", "test_autograd_registration")
    q, k = qk(1, 5, 3, 8, torch.bfloat16)
    cos, sin = flux_tables(7, (2, 2, 4))
    w = norm_weight(8, torch.bfloat16)
    scale = qk_fp8_scales(w, 3, 8, False)
    outs = [torch.zeros(1, 3, 7, 8, dtype=FP8) for _ in range(2)]
    torch.library.opcheck(torch.ops.diffc.qk_norm_rope_per_head_fp8.default,
                          (q, k, w, w, cos, sin, EPS, 2, scale, scale, *outs), test_utils=checks)
    cos, sin = wan_blocks.rope_frequencies(8, (1, 1, 5), torch.device("cpu"))
    w = norm_weight(24, torch.bfloat16)
    scale = qk_fp8_scales(w, 3, 8, True)
    outs = [torch.zeros(1, 5, 3, 8, dtype=FP8) for _ in range(2)]
    torch.library.opcheck(torch.ops.diffc.qk_norm_rope_across_heads_fp8.default,
                          (q, k, w, w, cos, sin, EPS, scale, scale, *outs), test_utils=checks)


FP8_BAD = {  # case -> (the argument it replaces, what the error says after the argument's name)
    "q_out dtype": ("q_out", "expected dtype torch.float8_e4m3fn"),
    "q_scale shape": ("q_scale", r"expected shape \(3,\): one scale per head"),
    "k_scale dtype": ("k_scale", "expected dtype torch.float32"),
    "k_scale strided": ("k_scale", "must be contiguous"),
}


@pytest.mark.parametrize("across", [False, True], ids=["per_head", "across_heads"])
@pytest.mark.parametrize("case", FP8_BAD, ids=FP8_BAD.keys())
def test_fp8_bad_arguments_name_the_field(case, across):
    field, message = FP8_BAD[case]
    q, k = qk(1, 5, 3, 8, torch.bfloat16)
    w = norm_weight(24 if across else 8, torch.bfloat16)
    args = {"q_scale": qk_fp8_scales(w, 3, 8, across), "k_scale": qk_fp8_scales(w, 3, 8, across),
            "q_out": torch.zeros(1, 5, 3, 8, dtype=FP8) if across else torch.zeros(1, 3, 5, 8, dtype=FP8)}
    args["k_out"] = args["q_out"].clone()
    args[field] = {"q_out dtype": args["q_out"].bfloat16(), "q_scale shape": args["q_scale"][:2],
                   "k_scale dtype": args["k_scale"].double(), "k_scale strided": torch.ones(6)[::2]}[case]
    with pytest.raises(InvalidArgumentError, match=f"^{field}: {message}"):
        if across:
            cos, sin = wan_blocks.rope_frequencies(8, (1, 1, 5), torch.device("cpu"))
            torch.ops.diffc.qk_norm_rope_across_heads_fp8(q, k, w, w, cos, sin, EPS, args["q_scale"],
                                                          args["k_scale"], args["q_out"], args["k_out"])
        else:
            cos, sin = flux_tables(5, (2, 2, 4))
            torch.ops.diffc.qk_norm_rope_per_head_fp8(q, k, w, w, cos, sin, EPS, 0, args["q_scale"],
                                                      args["k_scale"], args["q_out"], args["k_out"])


def test_fp8_scales_refuse_a_weight_of_the_wrong_size():
    with pytest.raises(InvalidArgumentError, match=r"^weight: expected shape \(24,\) \(heads \* head_dim\)"):
        qk_fp8_scales(norm_weight(8, torch.bfloat16), 3, 8, across_heads=True)
    with pytest.raises(InvalidArgumentError, match=r"^weight: expected shape \(8,\) \(head_dim\)"):
        qk_fp8_scales(norm_weight(24, torch.bfloat16), 3, 8, across_heads=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_kernels_on_the_gpu():
    run_compiled(__name__, "check_fp8_kernels_on_the_gpu")


def check_fp8_kernels_on_the_gpu():
    """The compiled kernels at production head sizes (FLUX 24 x 128 per head, Wan-14B 40 x 128 across heads)."""
    cuda = torch.device("cuda")
    q, k = (t.to(cuda) for t in qk(1, 300, 24, 128, torch.bfloat16))
    w = norm_weight(128, torch.bfloat16).to(cuda)
    scale = qk_fp8_scales(w, 24, 128, False)
    cos, sin = (t.to(cuda) for t in flux_tables(310, (16, 56, 56)))
    outs = [torch.empty(1, 24, 310, 128, dtype=FP8, device=cuda) for _ in range(2)]
    torch.ops.diffc.qk_norm_rope_per_head_fp8(q, k, w, w, cos, sin, EPS, 10, scale, scale, *outs)
    q_ref, k_ref = qk_norm_rope_per_head_ref(q, k, w, w, cos, sin, EPS, 10)
    assert_fp8_matches(outs[0][:, :, 10:], q_ref, scale, head_axis=1)
    assert_fp8_matches(outs[1][:, :, 10:], k_ref, scale, head_axis=1)

    q, k = (t.to(cuda) for t in qk(1, 300, 40, 128, torch.bfloat16))
    w = norm_weight(40 * 128, torch.bfloat16).to(cuda)
    scale = qk_fp8_scales(w, 40, 128, True)
    cos, sin = wan_blocks.rope_frequencies(128, (1, 10, 30), cuda)
    outs = [torch.empty(q.shape, dtype=FP8, device=cuda) for _ in range(2)]
    torch.ops.diffc.qk_norm_rope_across_heads_fp8(q, k, w, w, cos, sin, EPS, scale, scale, *outs)
    q_ref, k_ref = qk_norm_rope_across_heads_ref(q, k, w, w, cos, sin, EPS)
    assert_fp8_matches(outs[0], q_ref, scale, head_axis=2)
    # the graph's scale source, compiled: one launch for q and k, two norms' weights
    w2 = norm_weight(40 * 128, torch.bfloat16).to(cuda) * 3
    got = [torch.empty(40, device=cuda) for _ in range(2)]
    torch.ops.diffc.qk_fp8_head_scales(w, w2, w2, w, 40, 128, True, *got)
    want = torch.maximum(qk_fp8_scales(w, 40, 128, True), qk_fp8_scales(w2, 40, 128, True))
    assert torch.equal(got[0], want) and torch.equal(got[1], want)
    assert_fp8_matches(outs[1], k_ref, scale, head_axis=2)


@pytest.mark.parametrize("second", [False, True], ids=["one_norm", "two_norms"])
@pytest.mark.parametrize("across", [True, False], ids=["across_heads", "per_head"])
def test_qk_fp8_head_scales_op_matches_the_bound(counters, across, second):
    """``diffc.qk_fp8_head_scales``: :func:`qk_fp8_scales` of q's and k's weights in one launch, the larger of
    two norms' where two write one buffer; an all-zero weight gets the floor, never 0."""
    heads, head_dim = 3, 10
    size = heads * head_dim if across else head_dim
    weights = [randn(size, dtype=torch.bfloat16, seed=s, scale=2.0) for s in range(4)]
    weights[1][: size // 2] = 0
    q2, k2 = (weights[2], torch.zeros(size, dtype=torch.bfloat16)) if second else (None, None)
    q_scale, k_scale = torch.full((heads,), float("nan")), torch.full((heads,), float("nan"))
    torch.ops.diffc.qk_fp8_head_scales(weights[0], weights[1], q2, k2, heads, head_dim, across, q_scale, k_scale)
    assert_kernel_ran()
    want_q = qk_fp8_scales(weights[0], heads, head_dim, across)
    if second:
        want_q = torch.maximum(want_q, qk_fp8_scales(q2, heads, head_dim, across))
    assert torch.equal(q_scale, want_q)
    assert torch.equal(k_scale, qk_fp8_scales(weights[1], heads, head_dim, across))
    zero = torch.zeros(size, dtype=torch.bfloat16)
    torch.ops.diffc.qk_fp8_head_scales(zero, zero, None, None, heads, head_dim, across, q_scale, k_scale)
    assert bool((q_scale > 0).all()) and bool(q_scale.isfinite().all())


@pytest.mark.parametrize("field,kwargs,fragment", [
    ("q_weight", {"q_weight": torch.ones(7)}, "expected shape (8,)"),
    ("k_weight2", {"q_weight2": torch.ones(8)}, "give the second weights of both"),
    ("q_scale_out", {"q_scale_out": torch.zeros(2, dtype=torch.float64)}, "expected dtype torch.float32"),
    ("k_scale_out", {"k_scale_out": torch.zeros(3)}, "(2,): one scale per head"),
])
def test_qk_fp8_head_scales_op_refuses_bad_arguments(field, kwargs, fragment):
    args = {"q_weight": torch.ones(8), "k_weight": torch.ones(8), "q_weight2": None, "k_weight2": None,
            "heads": 2, "head_dim": 8, "across_heads": False, "q_scale_out": torch.zeros(2),
            "k_scale_out": torch.zeros(2)}
    args.update(kwargs)
    with pytest.raises(InvalidArgumentError) as exc:
        torch.ops.diffc.qk_fp8_head_scales(*args.values())
    assert exc.value.field == field and fragment in str(exc.value)


def test_qk_fp8_head_scales_opcheck(counters):
    w = [randn(8, dtype=torch.bfloat16, seed=s) for s in range(4)]
    torch.library.opcheck(torch.ops.diffc.qk_fp8_head_scales.default,
                          (w[0], w[1], w[2], w[3], 2, 8, False, torch.zeros(2), torch.zeros(2)))
