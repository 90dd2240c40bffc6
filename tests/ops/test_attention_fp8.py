"""diffc::quantize_heads and diffc::attention_flashinfer_fp8 against their torch references; on a Hopper GPU
with flashinfer, its fp8 FA3 kernel against the float32 attention of the dequantized inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffc.errors import InvalidArgumentError
from diffc.ops import attention_fp8
from diffc.ops.attention_fp8 import (
    attention_fp8_ref,
    quantize_heads,
    quantize_heads_ref,
)
from diffc.ops.fp8 import FP8, FP8_MAX, SCALE_FLOOR
from diffc.ops.registry import COUNTERS, OpCounters
from tests.fp8_interpreter import round_interpreter_fp8_to_nearest
from tests.ops.common import assert_kernel_ran, randn

FP8_ROUNDS_TO_NEAREST = round_interpreter_fp8_to_nearest()
# (batch, seq, heads, head_dim); production: FLUX.1 (1, 4608, 24, 128), Wan2.1-14B (1, 32760, 40, 128)
SHAPES = {
    "b2s7h5d24": (2, 7, 5, 24),  # 5 heads: padded to a tile of 8
    "s37h24d32": (1, 37, 24, 32),  # FLUX's head count, odd token count
    "b2s3h3d16": (2, 3, 3, 16),
}
# Attention vs bf16 SDPA on N(0, 1) inputs: fp8 e4m3 q, k, v (3 mantissa bits) keep it within a few %
ATTENTION_REL_L2 = 0.05
FLASHINFER_REL_L2 = 8e-2  # the kernel also rounds the softmax probabilities to fp8 (GPU-NOTES.md: 5.4e-2)
OPCHECKS = ("test_faketensor", "test_autograd_registration")  # tests/ops/test_fp8_quant.py says why
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run_compiled(module: str, check: str) -> None:
    """Run ``module.check()`` in a fresh Python with ``TRITON_INTERPRET=0``: tests/ops/conftest.py put this
    process's Triton in interpreter mode, which it cannot leave to compile kernels for the GPU."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", f"import {module} as m; m.{check}()"], env=env,
                          cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def assert_quantized(out, out_scale, x, exact: bool = True) -> None:
    """``out``/``out_scale`` are :func:`quantize_heads_ref` of x: equal (interpreter), else within one e4m3 ulp."""
    want, want_scale = quantize_heads_ref(x)
    assert out.dtype == FP8 and out.shape == x.shape and out_scale.shape == want_scale.shape
    torch.testing.assert_close(out_scale, want_scale, rtol=0 if exact else 1e-6, atol=0)
    got, want = out.float(), want.float()
    if exact:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        assert bool(((got - want).abs() <= 0.125 * want.abs() + 2.0 ** -9).all())
        assert float((got != want).float().mean()) <= 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_quantize_heads_matches_reference(counters, shape, dtype):
    x = randn(*shape, dtype=dtype, seed=1) * torch.linspace(0.1, 3.0, shape[2])[:, None].to(dtype)  # heads apart
    out = torch.full(shape, float("nan")).to(FP8)
    out_scale = torch.full(shape[::2], 1e9)  # stale scales of a previous call: the launcher zeroes them
    torch.ops.diffc.quantize_heads(x, out, out_scale)
    assert_kernel_ran()
    assert_quantized(out, out_scale, x)
    deq = out.float() * out_scale[:, None, :, None]
    assert float((deq - x.float()).abs().max()) <= float(x.float().abs().max()) / 16  # half an ulp at the top


def test_quantize_heads_zero_head_gets_the_floor(counters):
    x = randn(2, 5, 3, 16, dtype=torch.bfloat16)
    x[1, :, 2] = 0
    out, out_scale = quantize_heads(x)
    assert_quantized(out, out_scale, x)
    assert float(out_scale[1, 2]) == pytest.approx(SCALE_FLOOR / FP8_MAX) and bool((out[1, :, 2].float() == 0).all())
    assert bool((out_scale[0] > 1e-3).all())


@pytest.mark.parametrize("view", ["qkv_slice", "transposed"])
def test_quantize_heads_reads_strided_views(counters, view):
    """v as a column slice of a fused (B, S, 3 * H * D) projection, or a (B, S, H, D) view of (B, H, S, D)."""
    batch, seq, heads, head_dim = 2, 5, 3, 8
    if view == "qkv_slice":
        qkv = randn(batch, seq, 3 * heads * head_dim, dtype=torch.bfloat16, seed=2)
        x = qkv[..., 2 * heads * head_dim :].unflatten(-1, (heads, head_dim))
    else:
        x = randn(batch, heads, seq, head_dim, dtype=torch.bfloat16, seed=3).transpose(1, 2)
    assert not x.is_contiguous()
    out, out_scale = quantize_heads(x)
    assert_kernel_ran()
    assert_quantized(out, out_scale, x)


def test_quantize_heads_opcheck(counters):
    x = randn(2, 5, 3, 8, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.diffc.quantize_heads.default,
                          (x, torch.zeros(2, 5, 3, 8, dtype=FP8), torch.zeros(2, 3)), test_utils=OPCHECKS)


QUANTIZE_BAD = {  # case -> (field, replacement for x / out / out_scale, what the error says after the field)
    "x fp8": ("x", torch.zeros(2, 5, 3, 8, dtype=FP8), "is already float8_e4m3fn"),
    "x strided": ("x", torch.zeros(2, 5, 3, 16, dtype=torch.bfloat16)[..., ::2], "last dimension must be contiguous"),
    "out dtype": ("out", torch.zeros(2, 5, 3, 8, dtype=torch.bfloat16), "expected dtype torch.float8_e4m3fn"),
    "out shape": ("out", torch.zeros(2, 5, 3, 4, dtype=FP8), r"expected shape \(2, 5, 3, 8\)"),
    "out strided": ("out", torch.zeros(2, 3, 5, 8, dtype=FP8).transpose(1, 2), "must be contiguous"),
    "out_scale shape": ("out_scale", torch.zeros(6), r"expected shape \(2, 3\): one scale per batch item and head"),
    "out_scale dtype": ("out_scale", torch.zeros(2, 3, dtype=torch.bfloat16), "expected dtype torch.float32"),
}


@pytest.mark.parametrize("case", QUANTIZE_BAD, ids=QUANTIZE_BAD.keys())
def test_quantize_heads_bad_arguments_name_the_field(case):
    field, bad, message = QUANTIZE_BAD[case]
    args = {"x": randn(2, 5, 3, 8, dtype=torch.bfloat16), "out": torch.zeros(2, 5, 3, 8, dtype=FP8),
            "out_scale": torch.zeros(2, 3)}
    args[field] = bad
    with pytest.raises(InvalidArgumentError, match=f"^{field}: {message}"):
        torch.ops.diffc.quantize_heads(args["x"], args["out"], args["out_scale"])


# ---- quantize_heads_cat ----------------------------------------------------------------------------------

# (batch, text rows, image rows, heads, head_dim): the boundary inside a tile, on a tile's edge, one side one row
CAT_SHAPES = {
    "b2a5b9h5d24": (2, 5, 9, 5, 24),
    "a16b16h3d16": (1, 16, 16, 3, 16),
    "a1b40h24d32": (1, 1, 40, 24, 32),
    "b2a37b3h3d16": (2, 37, 3, 3, 16),
}


@pytest.mark.parametrize("shape", CAT_SHAPES.values(), ids=CAT_SHAPES.keys())
def test_quantize_heads_cat_is_quantize_heads_of_the_concatenation(counters, shape):
    """The text and image values read where they are (as FLUX's joint attention holds them: (B, S, H, D) views
    of each projection's output), the bytes and scales of quantize_heads of their concatenation; a head whose
    largest value sits in the text part gets its scale from there."""
    batch, seq_a, seq_b, heads, head_dim = shape
    a = randn(batch, seq_a, heads * head_dim, dtype=torch.bfloat16, seed=7).unflatten(-1, (heads, head_dim))
    b = randn(batch, seq_b, 2 * heads * head_dim, dtype=torch.bfloat16, seed=8)[..., heads * head_dim:]
    b = b.unflatten(-1, (heads, head_dim))  # a column slice: strides unlike a's
    a[:, 0, 0, 0] = 40.0  # head 0's amax in the text rows
    out = torch.full((batch, seq_a + seq_b, heads, head_dim), float("nan")).to(FP8)
    out_scale = torch.full((batch, heads), 1e9)
    torch.ops.diffc.quantize_heads_cat(a, b, out, out_scale)
    assert_kernel_ran()
    joint = torch.cat([a, b], 1)
    assert_quantized(out, out_scale, joint)
    want, _ = quantize_heads_ref(joint)
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))  # signed zeros included
    assert float(out_scale[0, 0]) == pytest.approx(40.0 / FP8_MAX)


def test_quantize_heads_cat_with_an_empty_side(counters):
    a = randn(1, 0, 3, 16, dtype=torch.bfloat16)
    b = randn(1, 6, 3, 16, dtype=torch.bfloat16, seed=2)
    out, out_scale = torch.empty(1, 6, 3, 16, dtype=FP8), torch.empty(1, 3)
    torch.ops.diffc.quantize_heads_cat(a, b, out, out_scale)
    assert_quantized(out, out_scale, b)
    torch.ops.diffc.quantize_heads_cat(b, a, out, out_scale)
    assert_quantized(out, out_scale, b)


def test_quantize_heads_cat_opcheck(counters):
    a, b = randn(2, 3, 3, 8, dtype=torch.bfloat16), randn(2, 4, 3, 8, dtype=torch.bfloat16, seed=1)
    torch.library.opcheck(torch.ops.diffc.quantize_heads_cat.default,
                          (a, b, torch.zeros(2, 7, 3, 8, dtype=FP8), torch.zeros(2, 3)), test_utils=OPCHECKS)


CAT_BAD = {  # case -> (field, replacement for a / b / out / out_scale, what the error says after the field)
    "a 3-d": ("a", torch.zeros(2, 3, 24, dtype=torch.bfloat16), r"expected shape \(batch, seq, heads, head_dim\)"),
    "b dtype": ("b", torch.zeros(2, 4, 3, 8, dtype=torch.float16), "expected dtype torch.bfloat16"),
    "b heads": ("b", torch.zeros(2, 4, 2, 8, dtype=torch.bfloat16), r"expected shape \(2, seq, 3, 8\)"),
    "b fp8": ("b", torch.zeros(2, 4, 3, 8, dtype=FP8), "is already float8_e4m3fn"),
    "out rows": ("out", torch.zeros(2, 4, 3, 8, dtype=FP8), r"expected shape \(2, 7, 3, 8\)"),
    "out_scale shape": ("out_scale", torch.zeros(3), r"expected shape \(2, 3\)"),
}


@pytest.mark.parametrize("case", CAT_BAD, ids=CAT_BAD.keys())
def test_quantize_heads_cat_bad_arguments_name_the_field(case):
    field, bad, message = CAT_BAD[case]
    args = {"a": randn(2, 3, 3, 8, dtype=torch.bfloat16), "b": randn(2, 4, 3, 8, dtype=torch.bfloat16),
            "out": torch.zeros(2, 7, 3, 8, dtype=FP8), "out_scale": torch.zeros(2, 3)}
    args[field] = bad
    with pytest.raises(InvalidArgumentError, match=f"^{field}: {message}"):
        torch.ops.diffc.quantize_heads_cat(args["a"], args["b"], args["out"], args["out_scale"])


# ---- attention_flashinfer_fp8 ---------------------------------------------------------------------------


def fp8_qkv(batch=2, heads=3, seq_q=33, seq_kv=40, head_dim=32, device="cpu", seed=0):
    """bf16 q, k, v (B, H, S, D) as views of (B, S, H, D) and their fp8 forms: q with one (H,) scale for the
    batch (the static convention; here the batch's amax), k and v with (B, H) scales from quantize_heads."""
    bshd = [randn(batch, s, heads, head_dim, dtype=torch.bfloat16, seed=seed + i).to(device)
            for i, s in enumerate((seq_q, seq_kv, seq_kv))]
    (q8, q_scale), (k8, k_scale), (v8, v_scale) = (quantize_heads_ref(x) for x in bshd)
    q_scale = q_scale.amax(dim=0)  # (H,): a bound for every batch item
    q8 = (bshd[0].float() / q_scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    bf16 = [x.transpose(1, 2) for x in bshd]
    fp8 = [x.transpose(1, 2) for x in (q8, k8, v8)]
    return bf16, fp8, (q_scale, k_scale, v_scale)


@pytest.mark.parametrize("scale", [None, 0.1])
def test_attention_fp8_reference_path_is_close_to_bf16_sdpa(scale):
    (q, k, v), fp8, scales = fp8_qkv()
    COUNTERS.reset()
    out = torch.ops.diffc.attention_flashinfer_fp8(*fp8, *scales, scale)
    assert COUNTERS == OpCounters(kernel_launches=0, reference_fallbacks=1)  # no flashinfer on CPU
    assert out.dtype == torch.bfloat16 and out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, attention_fp8_ref(*fp8, *scales, scale), rtol=0, atol=0)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
    assert rel_l2(out, exact) < ATTENTION_REL_L2


def test_attention_fp8_scale_conventions_agree():
    """A (H,) scale is the (B, H) one with the same row for every batch item; flashinfer sees row b per item."""
    _, (q8, k8, v8), (q_scale, k_scale, v_scale) = fp8_qkv()
    per_item = q_scale.expand(2, -1).contiguous()
    torch.testing.assert_close(attention_fp8_ref(q8, k8, v8, per_item, k_scale, v_scale),
                               attention_fp8_ref(q8, k8, v8, q_scale, k_scale, v_scale), rtol=0, atol=0)
    one = attention_fp8_ref(q8[1:], k8[1:], v8[1:], q_scale, k_scale[1], v_scale[1])
    torch.testing.assert_close(attention_fp8_ref(q8, k8, v8, q_scale, k_scale, v_scale)[1:], one, rtol=0, atol=0)


def test_attention_fp8_opcheck():
    _, fp8, scales = fp8_qkv(batch=1, seq_q=5, seq_kv=6, head_dim=8)
    torch.library.opcheck(torch.ops.diffc.attention_flashinfer_fp8.default, (*fp8, *scales, None),
                          test_utils=OPCHECKS)


ATTENTION_BAD = {  # case -> (field, what replaces it given the good arguments, what the error says after the field)
    "q dtype": ("q", lambda a: a["q"].float().bfloat16(), "expected dtype torch.float8_e4m3fn"),
    "k heads": ("k", lambda a: a["k"][:, :2], r"expected shape \(2, 3, seq_kv, 32\)"),
    "v length": ("v", lambda a: a["v"][:, :, :7], r"expected shape k's shape"),
    "q_scale shape": ("q_scale", lambda a: torch.ones(6), r"expected shape \(3,\) or \(2, 3\)"),
    "k_scale dtype": ("k_scale", lambda a: a["k_scale"].double(), "expected dtype torch.float32"),
    "v_scale strided": ("v_scale", lambda a: torch.ones(3, 2).t(), "must be contiguous"),
}


@pytest.mark.parametrize("case", ATTENTION_BAD, ids=ATTENTION_BAD.keys())
def test_attention_fp8_bad_arguments_name_the_field(case):
    field, replace, message = ATTENTION_BAD[case]
    _, (q, k, v), (q_scale, k_scale, v_scale) = fp8_qkv()
    args = {"q": q, "k": k, "v": v, "q_scale": q_scale, "k_scale": k_scale, "v_scale": v_scale}
    args[field] = replace(args)
    with pytest.raises(InvalidArgumentError, match=f"^{field}: {message}"):
        torch.ops.diffc.attention_flashinfer_fp8(*args.values(), None)


# ---- on the GPU ------------------------------------------------------------------------------------------


@needs_cuda
def test_quantize_heads_on_the_gpu():
    run_compiled(__name__, "check_quantize_heads_on_the_gpu")


def check_quantize_heads_on_the_gpu():
    """The compiled kernels (float atomic max, fp8 cast) at FLUX's head layout; the joint form on FLUX.1's text and
    image values (512 + 4096 rows, the image part a column slice of a wider projection)."""
    x = randn(2, 1000, 24, 128, dtype=torch.bfloat16, seed=5).cuda() * torch.rand(24, 1, device="cuda").bfloat16()
    out, out_scale = quantize_heads(x[:, 3:])  # a view starting mid-buffer
    assert_quantized(out, out_scale, x[:, 3:], exact=False)
    a = randn(1, 512, 24, 128, dtype=torch.bfloat16, seed=6).cuda() * 3
    b = randn(1, 4096, 2 * 3072, dtype=torch.bfloat16, seed=7).cuda()[..., 3072:].unflatten(-1, (24, 128))
    out, out_scale = torch.empty(1, 4608, 24, 128, dtype=FP8, device="cuda"), torch.empty(1, 24, device="cuda")
    torch.ops.diffc.quantize_heads_cat(a, b, out, out_scale)
    joint = torch.cat([a, b], 1)
    assert_quantized(out, out_scale, joint, exact=False)
    single, single_scale = quantize_heads(joint)  # the same kernel's arithmetic on the concatenation: same bytes
    assert torch.equal(out.view(torch.uint8), single.view(torch.uint8)) and torch.equal(out_scale, single_scale)


@pytest.mark.skipif(not torch.cuda.is_available()
                    or attention_fp8.fp8_kernel_unavailable(torch.device("cuda")) is not None, reason="needs a Hopper GPU with flashinfer (pip install diffc[flashinfer])")
def test_flashinfer_fp8_matches_float32_reference():
    (q, k, v), fp8, scales = fp8_qkv(batch=2, heads=24, seq_q=1000, seq_kv=1100, head_dim=128, device="cuda")
    COUNTERS.reset()
    out = torch.ops.diffc.attention_flashinfer_fp8(*fp8, *scales, None)
    assert COUNTERS == OpCounters(kernel_launches=1, reference_fallbacks=0)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    qf, kf, vf = (x.float() * s.reshape(-1, s.shape[-1], 1, 1) for x, s in zip(fp8, scales))
    assert rel_l2(out, F.scaled_dot_product_attention(qf, kf, vf)) < FLASHINFER_REL_L2
    assert rel_l2(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float())) < FLASHINFER_REL_L2
