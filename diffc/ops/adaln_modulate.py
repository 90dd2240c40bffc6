"""Fused adaptive LayerNorm: ``layer_norm(x) * (1 + scale) + shift`` in one pass over each token.

Both models modulate an affine-free LayerNorm with per-sample (or per-token) scale and shift:

- FLUX (``AdaNormZero``, ``AdaNormContinuous``, the MLP half of the double-stream block) computes in the
  activations' dtype: bf16 LayerNorm output, then bf16 ``1 + scale``, product and sum;
- Wan (``norm1``/``norm3`` with the float32 ``scale_shift_table`` modulation) computes all of it in
  float32 and casts the result back to the activations' dtype.

One rule covers both: the computation dtype is ``promote(x, scale, shift)``. The kernel computes in
float32 and rounds where eager rounds (to bf16 after the LayerNorm, ``1 + scale``, the product and
the sum when that dtype is bf16), so it matches eager up to the reduction order. The row kernel
here also serves ``gated_residual_adaln`` through its residual prologue.

On a GPU the CUDA C++ twin of the row kernel (``csrc/adaln_rows.cu``, :mod:`.csrc`) runs where it measured
faster (``CSRC_MIN_VECTORS`` and the constants after it); both round each multiply and add on its own, as
eager's separate ops do (no FMA: the Triton launch passes ``enable_fp_fusion=False``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from . import csrc
from .fp8 import FP8, check_fp8_out, store_rows_ref
from .registry import (
    broadcast_stride,
    expect_dtype,
    expect_float,
    expect_same_device,
    expect_shape,
    expect_unit_last_stride,
    next_pow2,
    register_op,
    tl,
    triton_kernel,
)

LAYER_NORM_EPS = 1e-6  # FLUX's NORM_EPS and Wan's config.eps


def adaln_modulate_ref(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = LAYER_NORM_EPS):
    """The models' own math. x: (B, S, C); scale, shift: (B, 1, C) or (B, S, C) -> (B, S, C) in x's dtype."""
    compute = torch.promote_types(x.dtype, torch.promote_types(scale.dtype, shift.dtype))
    h = F.layer_norm(x.to(compute), x.shape[-1:], eps=eps)
    return (h * (1 + scale) + shift).to(x.dtype)


REDUCED = (torch.bfloat16, torch.float16)


def rounds_modulation(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> bool:
    """Eager modulates in x's reduced dtype when scale and shift share it (FLUX); Wan's fp32 ones do not."""
    return x.dtype in REDUCED and scale.dtype == shift.dtype == x.dtype


def rounds_product(y: torch.Tensor, gate: torch.Tensor | None) -> bool:
    """Eager rounds ``y * gate`` to y's dtype when both share a reduced dtype (FLUX); fp32 gates do not (Wan)."""
    return gate is not None and y.dtype in REDUCED and gate.dtype == y.dtype


@triton_kernel
def adaln_rows_kernel(
    x_ptr, y_ptr, gate_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, qs_ptr, scale_bias_ptr, shift_bias_ptr,
    gate_bias_ptr, S, C, eps,
    sx_b, sx_s, sy_b, sy_s, sg_b, sg_s, sc_b, sc_s, sh_b, sh_s, sr_b, sr_s, so_b, so_s,
    RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr, ROUND_PRODUCT: tl.constexpr, ROUND_MODULATE: tl.constexpr,
    QUANT: tl.constexpr, MOD_BIAS: tl.constexpr, GATE_BIAS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # one program per token row (b, s)
    # x, y, res, out: (B, S, C) with strides (s?_b, s?_s, 1); gate, scale, shift: (B, 1|S, C), stride 0 if 1
    # QUANT: out is float8_e4m3 and qs (B * S, 1) float32 gets the row's scale (diffc/ops/fp8.py)
    # MOD_BIAS: scale and shift each get a float32 (C,) row added (a modulation table's row, in float32);
    # GATE_BIAS: the gate likewise (then the product is float32)
    row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B * S * C can pass 2^31
    b = row // S
    s = row % S
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    act = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + b * sx_b + s * sx_s + cols, mask=mask, other=0.0)
    if RESIDUAL:
        # res = x + gate * y, stored in x's dtype (the residual stream)
        y = tl.load(y_ptr + b * sy_b + s * sy_s + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            g = tl.load(gate_ptr + b * sg_b + s * sg_s + cols, mask=mask, other=0.0).to(tl.float32)
            if GATE_BIAS:
                g = tl.load(gate_bias_ptr + cols, mask=mask, other=0.0) + g
            y = g * y
            if ROUND_PRODUCT:
                y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
        x = (x.to(tl.float32) + y).to(act)
        tl.store(res_ptr + b * sr_b + s * sr_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=0) / C
    xc = tl.where(mask, xf - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / C
    h = xc * tl.rsqrt(var + eps)  # (BLOCK_C,) fp32
    scale = tl.load(scale_ptr + b * sc_b + s * sc_s + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + b * sh_b + s * sh_s + cols, mask=mask, other=0.0).to(tl.float32)
    if MOD_BIAS:
        scale = tl.load(scale_bias_ptr + cols, mask=mask, other=0.0) + scale
        shift = tl.load(shift_bias_ptr + cols, mask=mask, other=0.0) + shift
    if ROUND_MODULATE:
        h = h.to(act).to(tl.float32)
        h = (h * (1.0 + scale).to(act).to(tl.float32)).to(act).to(tl.float32)
        out = h + shift
    else:
        out = h * (1.0 + scale) + shift
    if QUANT:
        v = tl.where(mask, out.to(act).to(tl.float32), 0.0)  # what the bf16 op would have stored
        qscale = tl.maximum(tl.max(tl.abs(v), axis=0), 1e-12) / 448.0
        q = tl.minimum(tl.maximum(v / qscale, -448.0), 448.0)
        tl.store(out_ptr + b * so_b + s * so_s + cols, q.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(qs_ptr + row, qscale)
    else:
        tl.store(out_ptr + b * so_b + s * so_s + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def check_modulation(field: str, t: torch.Tensor, x: torch.Tensor) -> None:
    """scale / shift / gate: (B or 1, 1 or S, C) floating point, last dimension dense."""
    batch, seq, dim = x.shape
    if not (t.ndim == 3 and t.shape[0] in (1, batch) and t.shape[1] in (1, seq) and t.shape[2] == dim):
        raise InvalidArgumentError(
            field, f"expected shape ({batch}, 1, {dim}) or ({batch}, {seq}, {dim}), got {tuple(t.shape)}"
        )
    expect_float(field, t)
    expect_unit_last_stride(field, t)


def check_rows(field: str, t: torch.Tensor, x: torch.Tensor) -> None:
    """A (B, S, C) activation with x's dtype."""
    expect_shape(field, t, tuple(x.shape))
    expect_dtype(field, t, x.dtype)
    expect_unit_last_stride(field, t)


def _check_inputs(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> None:
    if x.ndim != 3:
        raise InvalidArgumentError("x", f"expected shape (batch, seq, dim), got {tuple(x.shape)}")
    expect_float("x", x)
    expect_unit_last_stride("x", x)
    check_modulation("scale", scale, x)
    check_modulation("shift", shift, x)
    expect_dtype("shift", shift, scale.dtype)


def check_bias(field: str, bias: torch.Tensor | None, x: torch.Tensor) -> None:
    """A modulation table's row added to a modulation: float32 (C,), contiguous, or None."""
    if bias is None:
        return
    expect_shape(field, bias, (x.shape[-1],), f"({x.shape[-1]},): one float32 value per channel")
    expect_dtype(field, bias, torch.float32)
    if not bias.is_contiguous():
        raise InvalidArgumentError(field, "must be contiguous")


def check_biases(x, scale_bias, shift_bias) -> None:
    if (scale_bias is None) != (shift_bias is None):
        raise InvalidArgumentError("shift_bias" if shift_bias is None else "scale_bias",
                                   "give both scale_bias and shift_bias, or neither")
    check_bias("scale_bias", scale_bias, x)
    check_bias("shift_bias", shift_bias, x)


def biased(t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``bias + t`` in float32 (what eager's ``table + temb.float()`` gives), or ``t`` without a bias."""
    return t if bias is None else bias + t.float()


def _check(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float, out: torch.Tensor,
           scale_bias: torch.Tensor | None = None, shift_bias: torch.Tensor | None = None) -> None:
    _check_inputs(x, scale, shift)
    check_rows("out", out, x)
    check_biases(x, scale_bias, shift_bias)
    expect_same_device({"x": x, "scale": scale, "shift": shift, "out": out, "scale_bias": scale_bias,
                        "shift_bias": shift_bias})


def launch_rows(x, y, gate, scale, shift, eps, residual_out, out, out_scale=None, scale_bias=None,
                shift_bias=None, gate_bias=None) -> None:
    """Launch ``adaln_rows_kernel``; ``y is None`` skips the residual prologue; ``out_scale`` given: ``out``
    is float8_e4m3 and gets the rowwise-quantized result, ``out_scale`` its (B * S, 1) scales; ``scale_bias``
    and ``shift_bias`` (both or neither): float32 (C,) rows added to scale and shift (then float32 math);
    ``gate_bias``: one added to the gate (then the product is float32)."""
    batch, seq, dim = x.shape
    round_product = y is not None and gate_bias is None and rounds_product(y, gate)
    round_modulate = scale_bias is None and rounds_modulation(x, scale, shift)
    # tensors standing in for absent ones (the kernels read them only under their flags), then the (b, s) strides
    res = residual_out if residual_out is not None else out
    y_ = y if y is not None else x
    g = gate if gate is not None else scale
    strides = (x.stride(0), x.stride(1), y_.stride(0), y_.stride(1), broadcast_stride(g, 0), broadcast_stride(g, 1),
               broadcast_stride(scale, 0), broadcast_stride(scale, 1), broadcast_stride(shift, 0),
               broadcast_stride(shift, 1), res.stride(0), res.stride(1), out.stride(0), out.stride(1))
    if _cuda_rows(x, y, gate, scale, shift, eps, residual_out, out, out_scale, scale_bias, shift_bias, gate_bias,
                  round_product, round_modulate, strides):
        return
    block = next_pow2(dim)
    adaln_rows_kernel[(batch * seq,)](
        x, y_, g, scale, shift, res, out, out_scale if out_scale is not None else scale,
        scale_bias if scale_bias is not None else scale, shift_bias if shift_bias is not None else shift,
        gate_bias if gate_bias is not None else g, seq, dim, eps, *strides,
        RESIDUAL=y is not None,
        HAS_GATE=gate is not None,
        ROUND_PRODUCT=round_product,
        ROUND_MODULATE=round_modulate,
        QUANT=out_scale is not None,
        MOD_BIAS=scale_bias is not None,
        GATE_BIAS=gate_bias is not None,
        BLOCK_C=block,
        num_warps=max(1, min(16, block // 512)),
        enable_fp_fusion=False,  # each multiply and add rounded on its own as in eager (an FMA skipped the
    )                            # rounding of bf16 products on an H200: tests/runtime/test_csrc_gpu.py)


# csrc/adaln_rows.cu's flags (its F_* bits)
_RESIDUAL, _GATE, _ROUND_PRODUCT, _ROUND_MODULATE, _QUANT, _MOD_BIAS, _GATE_BIAS = (1 << i for i in range(7))
# Where the CUDA kernel runs, from python -m bench.ops.sweep_csrc_adaln on an H200
# (bench/results/ops/h200-2026-12-04-csrc-adaln.txt), each thread holding CSRC_VECTORS_PER_THREAD 16-byte
# vectors (the fastest there): rows of at least CSRC_MIN_VECTORS vectors (None: csrc.MIN_VECTORS, 4096 bfloat16
# values; Wan2.1-14B's 5120-wide rows: 245-456 us where Triton took 394-704), and the fp8 forms on rows of at
# least CSRC_FP8_MIN_VECTORS when a call has CSRC_FP8_MIN_ROWS rows or more (Wan2.1-1.3B's 32,760 x 1536: 94 / 144
# us where Triton took 126 / 170). Triton kept the rest: the bf16 forms at 1536, and every form on FLUX.1's,
# SD3.5's and Z-Image's 2432-3840-wide calls of 4096-4608 rows (csrc 5-45% slower there).
CSRC_MIN_VECTORS: int | None = None
CSRC_FP8_MIN_VECTORS = 192
CSRC_FP8_MIN_ROWS = 16384
CSRC_VECTORS_PER_THREAD = 4


def _cuda_rows(x, y, gate, scale, shift, eps, residual_out, out, out_scale, scale_bias, shift_bias, gate_bias,
               round_product: bool, round_modulate: bool, strides: tuple[int, ...]) -> bool:
    """Run csrc/adaln_rows.cu when it applies (see :mod:`.csrc`): bf16/fp16 activations, the gate in the
    modulation's dtype (the activations' or float32), rows of whole 16-byte vectors starting 16-byte aligned.
    ``strides``: the 14 (b, s) strides :func:`launch_rows` hands both kernels. False leaves the rows to Triton."""
    batch, seq, dim = x.shape
    if batch * seq == 0:  # no rows (an empty grid is not a valid launch); Triton launches nothing either
        return False
    if x.dtype not in (torch.bfloat16, torch.float16) or scale.dtype not in (x.dtype, torch.float32):
        return False
    if gate is not None and gate.dtype != scale.dtype:
        return False
    shape = csrc.row_launch(dim, x.dtype, min_vectors=CSRC_MIN_VECTORS, vectors_per_thread=CSRC_VECTORS_PER_THREAD)
    if shape is None and out_scale is not None and batch * seq >= CSRC_FP8_MIN_ROWS:
        shape = csrc.row_launch(dim, x.dtype, min_vectors=CSRC_FP8_MIN_VECTORS,
                                vectors_per_thread=CSRC_VECTORS_PER_THREAD)
    if shape is None:
        return False
    act_vec, mod_vec = 16 // x.dtype.itemsize, 16 // scale.dtype.itemsize
    rows = [t for t in (x, y, residual_out) if t is not None]
    mods = [t for t in (gate, scale, shift) if t is not None]
    out_vec = 8 if out_scale is not None else act_vec  # an fp8 row is stored 8 bytes at a time
    strides_ok = (all(t.stride(i) % act_vec == 0 for t in rows for i in (0, 1))
                  and all(broadcast_stride(t, i) % mod_vec == 0 for t in mods for i in (0, 1))
                  and all(out.stride(i) % out_vec == 0 for i in (0, 1)))
    if not strides_ok or not csrc.aligned(*rows, *mods, out, scale_bias, shift_bias, gate_bias):
        return False
    nv, threads = shape
    kern = csrc.kernel("adaln_rows", f"adaln_rows_{csrc.DTYPE_NAMES[x.dtype]}_{csrc.DTYPE_NAMES[scale.dtype]}_{nv}",
                       x.device)
    if kern is None:
        return False
    flags = ((_RESIDUAL if y is not None else 0) | (_GATE if gate is not None else 0)
             | (_ROUND_PRODUCT if round_product else 0) | (_ROUND_MODULATE if round_modulate else 0)
             | (_QUANT if out_scale is not None else 0) | (_MOD_BIAS if scale_bias is not None else 0)
             | (_GATE_BIAS if gate_bias is not None else 0))
    csrc.launch(kern, x.device, batch * seq, threads, x, y, gate, scale, shift, residual_out, out, out_scale,
                scale_bias, shift_bias, gate_bias, np.int32(seq), np.int32(dim), np.float32(eps),
                *(np.int64(st) for st in strides), np.int32(flags))
    return True


def _adaln_modulate_into_ref(x, scale, shift, eps, out, scale_bias=None, shift_bias=None) -> None:
    out.copy_(adaln_modulate_ref(x, biased(scale, scale_bias), biased(shift, shift_bias), eps))


@register_op("adaln_modulate", mutates_args=("out",), fake=_check, fallback=_adaln_modulate_into_ref)
def _adaln_modulate_launch(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float, out: torch.Tensor,
    scale_bias: torch.Tensor | None = None, shift_bias: torch.Tensor | None = None,
) -> None:
    """``scale_bias`` / ``shift_bias``: float32 (C,) rows added to scale / shift in the kernel (a modulation
    table's rows, which Wan adds to a per-token ``temb`` in float32: see passes/modulation_table.py)."""
    _check(x, scale, shift, eps, out, scale_bias, shift_bias)
    launch_rows(x, None, None, scale, shift, eps, None, out, scale_bias=scale_bias, shift_bias=shift_bias)


def _check_fp8(x, scale, shift, eps, out, out_scale, scale_bias=None, shift_bias=None) -> None:
    _check_inputs(x, scale, shift)
    check_fp8_out(out, out_scale, tuple(x.shape))
    check_biases(x, scale_bias, shift_bias)
    expect_same_device({"x": x, "scale": scale, "shift": shift, "out": out, "out_scale": out_scale,
                        "scale_bias": scale_bias, "shift_bias": shift_bias})


def _adaln_modulate_fp8_into_ref(x, scale, shift, eps, out, out_scale, scale_bias=None, shift_bias=None) -> None:
    store_rows_ref(adaln_modulate_ref(x, biased(scale, scale_bias), biased(shift, shift_bias), eps), out, out_scale)


@register_op("adaln_modulate_fp8", mutates_args=("out", "out_scale"), fake=_check_fp8,
             fallback=_adaln_modulate_fp8_into_ref)
def _adaln_modulate_fp8_launch(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float, out: torch.Tensor,
    out_scale: torch.Tensor, scale_bias: torch.Tensor | None = None, shift_bias: torch.Tensor | None = None,
) -> None:
    _check_fp8(x, scale, shift, eps, out, out_scale, scale_bias, shift_bias)
    launch_rows(x, None, None, scale, shift, eps, None, out, out_scale, scale_bias, shift_bias)


def adaln_modulate(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float = LAYER_NORM_EPS,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch.ops.diffc.adaln_modulate``: x (B, S, C); scale, shift (B, 1|S, C) -> out (B, S, C), x's dtype."""
    out = torch.empty_like(x) if out is None else out
    torch.ops.diffc.adaln_modulate(x, scale, shift, eps, out)
    return out


def adaln_modulate_fp8(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = LAYER_NORM_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.diffc.adaln_modulate_fp8``: the modulated norm quantized rowwise -> (fp8 (B, S, C), (B*S, 1))."""
    out = torch.empty(x.shape, dtype=FP8, device=x.device)
    out_scale = torch.empty(x.shape[0] * x.shape[1], 1, dtype=torch.float32, device=x.device)
    torch.ops.diffc.adaln_modulate_fp8(x, scale, shift, eps, out, out_scale)
    return out, out_scale
