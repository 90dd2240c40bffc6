"""Gated residual ``x + gate * y``, alone or fused with the adaptive LayerNorm that follows it.

Where the models use it:

- FLUX double-stream block: ``hidden + gate_msa[:, None] * attn`` then the MLP's modulated norm (fused
  pair), ``hidden + gate_mlp[:, None] * ff`` (alone); single-stream block: ``residual + gate * proj_out``.
  All in the activations' dtype, gate (B, 1, C).
- Wan block: ``(x.float() + attn1 * gate).type_as(x)`` and ``(x.float() + ffn * c_gate).type_as(x)``
  in float32 with gate (B, 1, C) or per token (B, S, C); the ungated ``x + attn2`` followed by the
  ``norm3`` modulation is the fused pair with ``gate=None``.

As in eager, ``y * gate`` is rounded to ``promote(y, gate)``, the sum to ``promote(x, y, gate)`` and the
result stored in x's dtype.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError
from .adaln_modulate import (
    LAYER_NORM_EPS,
    adaln_modulate_ref,
    biased,
    check_bias,
    check_biases,
    check_modulation,
    check_rows,
    launch_rows,
    rounds_product,
)
from .fp8 import check_fp8_out, store_rows_ref
from .registry import (
    broadcast_stride,
    cdiv,
    expect_float,
    expect_same_device,
    expect_unit_last_stride,
    register_op,
    tl,
    triton_kernel,
)

BLOCK_C = 1024


def gated_residual_ref(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """The models' own math. x, y: (B, S, C); gate: (B, 1|S, C) or None -> (B, S, C) in x's dtype."""
    return (x + y if gate is None else x + y * gate).to(x.dtype)


def gated_residual_adaln_ref(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float = LAYER_NORM_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual = x + gate * y`` then ``adaln_modulate(residual)`` -> (residual, modulated), both (B, S, C)."""
    residual = gated_residual_ref(x, y, gate)
    return residual, adaln_modulate_ref(residual, scale, shift, eps)


@triton_kernel
def gated_residual_kernel(
    x_ptr, y_ptr, gate_ptr, out_ptr, gate_bias_ptr,
    S, C,
    sx_b, sx_s, sy_b, sy_s, sg_b, sg_s, so_b, so_s,
    HAS_GATE: tl.constexpr, ROUND_PRODUCT: tl.constexpr, GATE_BIAS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid (B * S, cdiv(C, BLOCK_C)); x, y, out: (B, S, C); gate: (B, 1|S, C), stride 0 where 1;
    # GATE_BIAS: the gate gets a float32 (C,) row added (a modulation table's row)
    row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B * S * C can pass 2^31
    b = row // S
    s = row % S
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    act = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + b * sx_b + s * sx_s + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * sy_b + s * sy_s + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        g = tl.load(gate_ptr + b * sg_b + s * sg_s + cols, mask=mask, other=0.0).to(tl.float32)
        if GATE_BIAS:
            g = tl.load(gate_bias_ptr + cols, mask=mask, other=0.0) + g
        y = g * y
        if ROUND_PRODUCT:
            y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + b * so_b + s * so_s + cols, (x + y).to(act), mask=mask)


def _check_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> None:
    if x.ndim != 3:
        raise InvalidArgumentError("x", f"expected shape (batch, seq, dim), got {tuple(x.shape)}")
    expect_float("x", x)
    if y.shape != x.shape:
        raise InvalidArgumentError("y", f"expected x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    expect_float("y", y)
    expect_unit_last_stride("y", y)
    if gate is not None:
        check_modulation("gate", gate, x)


def _check(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, out: torch.Tensor,
           gate_bias: torch.Tensor | None = None) -> None:
    _check_residual(x, y, gate)
    check_rows("out", out, x)
    _check_gate_bias(x, gate, gate_bias)
    expect_same_device({"x": x, "y": y, "gate": gate, "out": out, "gate_bias": gate_bias})


def _gated_residual_into_ref(x, y, gate, out, gate_bias=None) -> None:
    out.copy_(gated_residual_ref(x, y, None if gate is None else biased(gate, gate_bias)))


@register_op("gated_residual", mutates_args=("out",), fake=_check, fallback=_gated_residual_into_ref)
def _gated_residual_launch(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, out: torch.Tensor,
                           gate_bias: torch.Tensor | None = None) -> None:
    """``gate_bias``: a float32 (C,) row added to the gate in the kernel (then the product is float32), as Wan
    adds its modulation table's row to a per-token ``temb`` (see passes/modulation_table.py)."""
    _check(x, y, gate, out, gate_bias)
    batch, seq, dim = x.shape
    g = gate if gate is not None else x
    round_product = gate_bias is None and rounds_product(y, gate)
    gated_residual_kernel[(batch * seq, cdiv(dim, BLOCK_C))](
        x, y, g, out, gate_bias if gate_bias is not None else g,
        seq, dim,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        broadcast_stride(g, 0), broadcast_stride(g, 1), out.stride(0), out.stride(1),
        HAS_GATE=gate is not None,
        ROUND_PRODUCT=round_product,
        GATE_BIAS=gate_bias is not None,
        BLOCK_C=BLOCK_C,
        num_warps=4,
        enable_fp_fusion=False,  # x + gate * y as two roundings, as eager's two ops (an FMA skipped the
    )                            # product's bf16 rounding on an H200: tests/runtime/test_csrc_gpu.py)


def _check_gate_bias(x, gate, gate_bias) -> None:
    if gate_bias is not None and gate is None:
        raise InvalidArgumentError("gate_bias", "is added to the gate; there is no gate")
    check_bias("gate_bias", gate_bias, x)


def _check_pair(x, y, gate, scale, shift, residual_out, out, out_scale, scale_bias, shift_bias, gate_bias) -> None:
    """The residual + adaLN pair's arguments; ``out_scale`` given, ``out`` is its float8_e4m3 destination."""
    _check_residual(x, y, gate)
    _check_gate_bias(x, gate, gate_bias)
    check_modulation("scale", scale, x)
    check_modulation("shift", shift, x)
    check_rows("residual_out", residual_out, x)
    if out_scale is None:
        check_rows("out", out, x)
    else:
        check_fp8_out(out, out_scale, tuple(x.shape))
    check_biases(x, scale_bias, shift_bias)
    expect_same_device({"x": x, "y": y, "gate": gate, "scale": scale, "shift": shift,
                        "residual_out": residual_out, "out": out, "out_scale": out_scale,
                        "scale_bias": scale_bias, "shift_bias": shift_bias, "gate_bias": gate_bias})


def _pair_ref(x, y, gate, scale, shift, eps, scale_bias, shift_bias, gate_bias):
    """The pair's reference (residual, modulated norm) with the modulation table's rows added."""
    gate = None if gate is None else biased(gate, gate_bias)
    return gated_residual_adaln_ref(x, y, gate, biased(scale, scale_bias), biased(shift, shift_bias), eps)


def _check_fused(x, y, gate, scale, shift, eps, residual_out, out, scale_bias=None, shift_bias=None,
                 gate_bias=None) -> None:
    _check_pair(x, y, gate, scale, shift, residual_out, out, None, scale_bias, shift_bias, gate_bias)


def _gated_residual_adaln_into_ref(x, y, gate, scale, shift, eps, residual_out, out, scale_bias=None,
                                   shift_bias=None, gate_bias=None) -> None:
    residual, modulated = _pair_ref(x, y, gate, scale, shift, eps, scale_bias, shift_bias, gate_bias)
    residual_out.copy_(residual)
    out.copy_(modulated)


@register_op(
    "gated_residual_adaln",
    mutates_args=("residual_out", "out"),
    fake=_check_fused,
    fallback=_gated_residual_adaln_into_ref,
)
def _gated_residual_adaln_launch(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    residual_out: torch.Tensor,
    out: torch.Tensor,
    scale_bias: torch.Tensor | None = None,
    shift_bias: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
) -> None:
    """``scale_bias`` / ``shift_bias`` / ``gate_bias``: float32 (C,) modulation-table rows added in the kernel
    (passes/modulation_table.py)."""
    _check_fused(x, y, gate, scale, shift, eps, residual_out, out, scale_bias, shift_bias, gate_bias)
    launch_rows(x, y, gate, scale, shift, eps, residual_out, out, scale_bias=scale_bias, shift_bias=shift_bias,
                gate_bias=gate_bias)


def _check_fused_fp8(x, y, gate, scale, shift, eps, residual_out, out, out_scale, scale_bias=None,
                     shift_bias=None, gate_bias=None) -> None:
    _check_pair(x, y, gate, scale, shift, residual_out, out, out_scale, scale_bias, shift_bias, gate_bias)


def _gated_residual_adaln_fp8_into_ref(x, y, gate, scale, shift, eps, residual_out, out, out_scale,
                                       scale_bias=None, shift_bias=None, gate_bias=None) -> None:
    residual, modulated = _pair_ref(x, y, gate, scale, shift, eps, scale_bias, shift_bias, gate_bias)
    residual_out.copy_(residual)
    store_rows_ref(modulated, out, out_scale)


@register_op(
    "gated_residual_adaln_fp8",
    mutates_args=("residual_out", "out", "out_scale"),
    fake=_check_fused_fp8,
    fallback=_gated_residual_adaln_fp8_into_ref,
)
def _gated_residual_adaln_fp8_launch(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    residual_out: torch.Tensor,
    out: torch.Tensor,
    out_scale: torch.Tensor,
    scale_bias: torch.Tensor | None = None,
    shift_bias: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
) -> None:
    """The fused pair with the modulated norm quantized rowwise to float8_e4m3 (``out``, ``out_scale``);
    the residual stays in x's dtype."""
    _check_fused_fp8(x, y, gate, scale, shift, eps, residual_out, out, out_scale, scale_bias, shift_bias, gate_bias)
    launch_rows(x, y, gate, scale, shift, eps, residual_out, out, out_scale, scale_bias, shift_bias, gate_bias)


def gated_residual(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``torch.ops.diffc.gated_residual``: x, y (B, S, C); gate (B, 1|S, C) or None -> (B, S, C), x's dtype."""
    out = torch.empty_like(x) if out is None else out
    torch.ops.diffc.gated_residual(x, y, gate, out)
    return out


def gated_residual_adaln(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float = LAYER_NORM_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.diffc.gated_residual_adaln`` -> (residual, modulated norm of the residual), both (B, S, C)."""
    residual, out = torch.empty_like(x), torch.empty_like(x)
    torch.ops.diffc.gated_residual_adaln(x, y, gate, scale, shift, eps, residual, out)
    return residual, out
