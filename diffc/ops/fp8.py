"""float8_e4m3 quantization shared by the fp8 quality tier: rowwise activations, per-channel weights.

The fp8 tier (``diffc compile --quality fp8``) feeds ``torch._scaled_mm`` with

- activations quantized *inside the kernel that produces them* (``adaln_modulate_fp8``,
  ``gated_residual_adaln_fp8``, ``gelu_tanh_fp8``): fp8 data (the producer's shape) plus one float32
  scale per row (token), shaped (rows, 1);
- weights quantized once at load (:func:`quantize_weight`): fp8 data (out, in) plus one float32 scale
  per output channel, shaped (1, out), which is the layout ``_scaled_mm``'s rowwise mode takes on CUDA
  and on CPU.

Scales are ``amax / 448`` (448 is e4m3's largest finite value), so ``x ~= q * scale``. The kernels
round the producer's result to the activations' dtype first (what eager would store) and quantize
that, which makes :func:`quantize_rows_ref` of the bf16 reference the exact reference of the fused
kernels up to the bf16 kernels' own tolerance.
"""

from __future__ import annotations

import functools

import torch

from ..errors import InvalidArgumentError
from .registry import expect_dtype, expect_shape

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SCALE_FLOOR = 1e-12  # an all-zero row gets this scale instead of 0 (no division by zero)


def quantize_rows_ref(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y (..., K) -> (q: fp8 (..., K), scale: float32 (rows, 1)) with ``y ~= q * scale`` row by row."""
    rows = y.reshape(-1, y.shape[-1]).float()
    scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(SCALE_FLOOR) / FP8_MAX
    q = (rows / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(y.shape), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of :func:`quantize_rows_ref`: q (..., K) fp8, scale (rows, 1) -> (..., K) in ``dtype``."""
    rows = q.reshape(-1, q.shape[-1]).float() * scale
    return rows.reshape(q.shape).to(dtype)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear weight (out, in) -> (fp8 (out, in), float32 scale (1, out)), one scale per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(SCALE_FLOOR) / FP8_MAX
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.contiguous(), scale[None, :].contiguous()


def fp8_linear_ref(q: torch.Tensor, q_scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """What the rewritten linear computes, in float32: dequantized activations times dequantized weights."""
    a = dequantize_rows(q, q_scale).reshape(-1, q.shape[-1])
    w = w8.float() * w_scale.reshape(-1, 1)
    y = a @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*q.shape[:-1], w8.shape[0]).to(out_dtype)


def fp8_linear_ok(in_features: int, out_features: int) -> bool:
    """``torch._scaled_mm`` needs both GEMM dimensions of the weight to be multiples of 16."""
    return in_features % 16 == 0 and out_features % 16 == 0


def check_fp8_out(out: torch.Tensor, out_scale: torch.Tensor, shape: tuple[int, ...]) -> None:
    """The destinations of a producer's fp8 variant: fp8 data of ``shape`` and float32 (rows, 1) scales."""
    expect_shape("out", out, shape)
    expect_dtype("out", out, FP8)
    if not out.is_contiguous():
        raise InvalidArgumentError("out", "must be contiguous")
    rows = 1
    for n in shape[:-1]:
        rows *= n
    expect_shape("out_scale", out_scale, (rows, 1), f"({rows}, 1): one scale per row of out")
    expect_dtype("out_scale", out_scale, torch.float32)
    if not out_scale.is_contiguous():
        raise InvalidArgumentError("out_scale", "must be contiguous")


def store_rows_ref(y: torch.Tensor, out: torch.Tensor, out_scale: torch.Tensor) -> None:
    """Quantize ``y`` (a producer's reference result, in the activations' dtype) into the destinations."""
    q, scale = quantize_rows_ref(y)
    out.copy_(q)
    out_scale.copy_(scale)


@functools.lru_cache(maxsize=None)
def _scaled_mm_refusal(device: str) -> str | None:
    """What torch says when asked for one tiny rowwise-scaled fp8 GEMM on ``device`` (the fp8 tier's GEMM), with
    and without fast accumulation (``--disable fp8_fast_accum``), or None."""
    dev = torch.device(device)
    try:
        a = torch.zeros(16, 16, device=dev).to(FP8)
        b = torch.zeros(16, 16, device=dev).to(FP8)
        for fast in (False, True):
            torch._scaled_mm(a, b.t(), torch.ones(16, 1, device=dev), torch.ones(1, 16, device=dev), None, None,
                             torch.bfloat16, fast)
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return None


def fp8_gemm_unavailable(device: torch.device) -> str | None:
    """Why the fp8 tier's rowwise-scaled fp8 GEMMs (``torch._scaled_mm``) cannot run on ``device``, or None:
    CUDA GPUs need compute capability 8.9 or newer (Ada, Hopper, Blackwell); elsewhere torch must take the
    rowwise scales (its CPU kernel does from 2.12 on), which one tiny probe GEMM tells."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return f"fp8 GEMMs need a GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); this one is " \
                   f"sm{major}{minor}"
    why = _scaled_mm_refusal(str(device))
    return None if why is None else f"torch {torch.__version__} cannot run rowwise-scaled fp8 GEMMs on " \
                                    f"{device.type} ({why})"


__all__ = ["FP8", "FP8_MAX", "check_fp8_out", "dequantize_rows", "fp8_gemm_unavailable", "fp8_linear_ok",
           "fp8_linear_ref", "quantize_rows_ref", "quantize_weight", "store_rows_ref"]
