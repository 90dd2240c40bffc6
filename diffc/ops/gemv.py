"""A linear layer over a few rows: ``y = act(x) @ W^T (* scale) + b`` for x (M, K) with M <= ``MAX_ROWS``.

The adaptive norms of a DiT block project one conditioning vector per batch item (FLUX.1: ``norm1.linear``,
3072 -> 18432, in each of 57 blocks): a matrix-vector product that reads 6.4 GB of weights per FLUX.1
forward and does nothing else. cuBLAS runs these as thin GEMM tiles (192x8) and, for the narrower ones,
split-K with a memset and a reduction kernel; this kernel streams the weight once, accumulates in float32
and adds the bias in the same pass, with the ``silu`` of the conditioning (which the models apply first)
computed on the fly instead of by a separate launch. The weight may be the fp8 tier's float8_e4m3 copy
with one float32 scale per output channel (``weight ~= weight_fp8 * scale``): half the bytes to read.

Numerics as eager's: ``act(x)`` rounded to x's dtype, products summed in float32, ``* scale`` then ``+ bias``
in float32, one rounding to x's dtype (the summation order differs: within float32 rounding).

One row (what the fused pass lowers) with fp8 weights runs the CUDA C++ kernel of ``csrc/gemv.cu`` on the GPUs
it measured faster on (:data:`CSRC_GPUS`) where it can (:mod:`.csrc`): a warp per four output channels streaming
their weight rows in 16-byte vectors (FLUX.1's 3072 -> 18432 on an H200: 22.0 us, 2.6 TB/s, against Triton's
28.6 us; on an H100 it was 10% slower than Triton, which serves there). bf16 weights, more rows, a K past
``CSRC_MAX_K``, misaligned weight rows, other GPUs and machines without the csrc kernels run the Triton kernel.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from . import csrc
from .fp8 import FP8
from .registry import (
    cdiv,
    expect_dtype,
    expect_float,
    expect_same_device,
    expect_shape,
    next_pow2,
    register_op,
    tl,
    triton_kernel,
)

MAX_ROWS = 8  # the most rows the kernel takes (its accumulator holds every row); more go to a GEMM
ACTIVATIONS = ("none", "silu")
# Tiles from ``python -m bench.ops.bench_gemv`` on an H200 (bench/results/ops/h200-2026-12-04-gemv.txt): the
# fastest for the fp8 weights at both FLUX.1 widths, within 2% of the fastest bf16 tile
BLOCK_N = 8
BLOCK_K_ELEMS = 1024  # BLOCK_K * rows (padded): the accumulator tile per output channel stays this wide
NUM_WARPS = 4
# csrc/gemv.cu: output channels per warp, 16-byte vectors of each weight row in flight per lane, warps per block
# (from ``python -m bench.ops.bench_gemv`` on an H200), and the longest row it stages in shared memory
CSRC_ROWS_PER_WARP = 4
CSRC_VECTORS_IN_FLIGHT = 1
CSRC_WARPS = 8
CSRC_MAX_K = 8192
# The weights csrc/gemv.cu serves: the fp8 tier's, where it ran 1.30x / 1.24x the Triton kernel at FLUX.1's two
# widths on an H200; with bf16 weights it was within 5% of Triton and cuBLAS either way, so they stay on Triton
# (bench/results/ops/h200-2026-12-05-gemv-csrc.txt)
CSRC_WEIGHT_DTYPES = (FP8,)
# The GPUs (a part of torch's device name) it serves: those where it measured faster. On an H100 the same
# instance ran 0.90x / 0.82x Triton (bench/results/ops/h100-2026-12-05-gemv-csrc.txt), so H100s and GPUs not
# measured keep the Triton kernel.
CSRC_GPUS = ("H200",)


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None, bias: torch.Tensor | None,
             act: str = "none") -> torch.Tensor:
    """x (M, K), weight (N, K) (fp8 with weight_scale (N,) or (1, N)), bias (N,) -> (M, N) in x's dtype."""
    a = F.silu(x) if act == "silu" else x
    w = weight.float()
    y = a.float() @ w.t()
    if weight_scale is not None:
        y = y * weight_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@triton_kernel
def gemv_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
    N, K, sx_m, sw_n, so_m,
    M: tl.constexpr, M_PAD: tl.constexpr, SILU: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid (cdiv(N, BLOCK_N),): output channels [n0, n0 + BLOCK_N) of every row. x: (M, K) unit last stride;
    # w: (N, K) unit last stride; scale, bias: (N,) contiguous; out: (M, N) unit last stride.
    # The (M_PAD, BLOCK_N, BLOCK_K) float32 accumulator is summed over K once, after the loop.
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    m = tl.arange(0, M_PAD)  # (M_PAD,)
    kk = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    n_ok = n < N
    acc = tl.zeros((M_PAD, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        k_ok = k < K
        w = tl.load(w_ptr + n.to(tl.int64)[:, None] * sw_n + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_K)
        x = tl.load(x_ptr + m[:, None] * sx_m + k[None, :], mask=(m[:, None] < M) & k_ok[None, :], other=0.0)
        if SILU:  # eager rounds silu(x) to x's dtype before the GEMM
            xf = x.to(tl.float32)
            x = (xf / (1.0 + tl.exp(-xf))).to(x_ptr.dtype.element_ty)
        acc += x.to(tl.float32)[:, None, :] * w[None, :, :]
    y = tl.sum(acc, axis=2)  # (M_PAD, BLOCK_N)
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None] * so_m + n[None, :], y.to(out_ptr.dtype.element_ty),
             mask=(m[:, None] < M) & n_ok[None, :])


def _check(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None, bias: torch.Tensor | None,
           act: str, out: torch.Tensor) -> None:
    if act not in ACTIVATIONS:
        raise InvalidArgumentError("act", f"expected one of {', '.join(ACTIVATIONS)}, got {act!r}")
    expect_float("x", x)
    if x.ndim != 2 or x.dtype == FP8:
        raise InvalidArgumentError("x", f"expected a 2-D (rows, in_features) float tensor, got {tuple(x.shape)} "
                                        f"{str(x.dtype).removeprefix('torch.')}")
    rows, k = x.shape
    if weight.ndim != 2 or weight.shape[1] != k:
        raise InvalidArgumentError("weight", f"expected shape (out_features, {k}), got {tuple(weight.shape)}")
    n = weight.shape[0]
    if weight.dtype == FP8:
        if weight_scale is None:
            raise InvalidArgumentError("weight_scale", "a float8_e4m3fn weight needs its per-output-channel scales")
        if weight_scale.numel() != n or weight_scale.dtype != torch.float32 or not weight_scale.is_contiguous():
            raise InvalidArgumentError("weight_scale", f"expected {n} contiguous float32 scales ((N,) or (1, N)), "
                                                       f"got {tuple(weight_scale.shape)} {weight_scale.dtype}")
    else:
        expect_dtype("weight", weight, x.dtype)
        if weight_scale is not None:
            raise InvalidArgumentError("weight_scale", "is only for a float8_e4m3fn weight; pass None")
    for field, t in (("x", x), ("weight", weight)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise InvalidArgumentError(field, "needs a unit last stride")
    if bias is not None:
        expect_shape("bias", bias, (n,))
        if bias.dtype != x.dtype or not bias.is_contiguous():
            raise InvalidArgumentError("bias", f"expected a contiguous {str(x.dtype).removeprefix('torch.')} tensor")
    expect_shape("out", out, (rows, n))
    expect_dtype("out", out, x.dtype)
    if n > 1 and out.stride(-1) != 1:
        raise InvalidArgumentError("out", "needs a unit last stride")
    expect_same_device({"x": x, "weight": weight, "weight_scale": weight_scale, "bias": bias, "out": out})


def _gemv_into_ref(x, weight, weight_scale, bias, act, out) -> None:
    out.copy_(gemv_ref(x, weight, weight_scale, bias, act))


@register_op("gemv", mutates_args=("out",), fake=_check, fallback=_gemv_into_ref)
def _gemv_launch(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
                 bias: torch.Tensor | None, act: str, out: torch.Tensor) -> None:
    _check(x, weight, weight_scale, bias, act, out)
    rows, k = x.shape
    n = weight.shape[0]
    if out.numel() == 0:
        return
    if rows > MAX_ROWS or k == 0:  # a GEMM's shape (or nothing to sum): the reference
        _gemv_into_ref(x, weight, weight_scale, bias, act, out)
        return
    if _csrc_launch(x, weight, weight_scale, bias, act, out):
        return
    m_pad = next_pow2(rows)
    block_k = min(BLOCK_K_ELEMS // m_pad, next_pow2(k))
    gemv_kernel[(cdiv(n, BLOCK_N),)](
        x, weight, weight_scale if weight_scale is not None else x, bias if bias is not None else x, out,
        n, k, x.stride(0), weight.stride(0), out.stride(0),
        M=rows, M_PAD=m_pad, SILU=act == "silu", HAS_SCALE=weight_scale is not None, HAS_BIAS=bias is not None,
        BLOCK_N=BLOCK_N, BLOCK_K=block_k, num_warps=NUM_WARPS,
    )


def _measured_faster_on(device: torch.device) -> bool:
    """Whether ``device`` is a GPU the CUDA kernel measured faster on (:data:`CSRC_GPUS`)."""
    return device.type == "cuda" and any(name in _device_name(device.index) for name in CSRC_GPUS)


@functools.lru_cache(maxsize=None)
def _device_name(index: int | None) -> str:
    return torch.cuda.get_device_name(index)


def _csrc_launch(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None, bias: torch.Tensor | None,
                 act: str, out: torch.Tensor) -> bool:
    """Run csrc/gemv.cu where it serves (one row; see the module doc); False where the Triton kernel must."""
    rows, k = x.shape
    n = weight.shape[0]
    per_vector = 16 // weight.element_size()  # the kernel reads the weight rows in 16-byte vectors
    if (rows != 1 or weight.dtype not in CSRC_WEIGHT_DTYPES or not _measured_faster_on(x.device)
            or x.dtype not in csrc.DTYPE_NAMES or k > CSRC_MAX_K or k % per_vector
            or (n > 1 and weight.stride(0) % per_vector) or not x.is_contiguous()
            or not out.is_contiguous() or not csrc.aligned(x, weight)):
        return False
    rows_per_warp, in_flight = CSRC_ROWS_PER_WARP, CSRC_VECTORS_IN_FLIGHT
    wname = "fp8" if weight.dtype == FP8 else csrc.DTYPE_NAMES[weight.dtype]
    kern = csrc.kernel("gemv", f"gemv_{csrc.DTYPE_NAMES[x.dtype]}_{wname}_{rows_per_warp}_{in_flight}", x.device)
    if kern is None:
        return False
    csrc.launch(kern, x.device, cdiv(n, CSRC_WARPS * rows_per_warp), 32 * CSRC_WARPS, x, weight,
                np.int64(weight.stride(0)), weight_scale, bias, out, np.int32(n), np.int32(k), np.int32(act == "silu"))
    return True


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         weight_scale: torch.Tensor | None = None, act: str = "none") -> torch.Tensor:
    """``torch.ops.diffc.gemv`` into a new (M, N) tensor: ``act(x) @ weight.T (* weight_scale) + bias``."""
    out = x.new_empty(x.shape[0], weight.shape[0])
    torch.ops.diffc.gemv(x, weight, weight_scale, bias, act, out)
    return out


__all__ = ["ACTIVATIONS", "MAX_ROWS", "gemv", "gemv_ref"]
