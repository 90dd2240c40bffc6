"""Shared data and checks for the fused-op tests: tolerances, random inputs, poisoned outputs."""

from __future__ import annotations

import numpy as np
import torch

from diffc.ops.registry import COUNTERS, OpCounters

DTYPES = (torch.float32, torch.bfloat16)

# Elementwise |out - ref| <= atol + rtol * |ref|. The kernels round where eager rounds, so bf16 results
# are mostly bit-identical; the bound allows one bf16 ulp (2^-7 relative) where float32 arithmetic
# order flips a rounding, or where an op documents a single rounding in place of eager's two.
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 8e-3, "atol": 8e-3},
}
# Without the interpreter fix below, Triton's interpreter truncates float32 -> bf16 (GPUs round to nearest).
TRUNCATING_BF16_TOL = {"rtol": 4e-2, "atol": 4e-2}
_BF16_RTNE = [False]


def round_interpreter_bf16_to_nearest() -> bool:
    """Make Triton's interpreter round float32 -> bf16 to nearest-even like GPU hardware does.

    Triton 3.x's interpreter truncates in this cast; the kernels' rounding points (matching eager's)
    can only be checked bit for bit with the GPU's rounding. Returns whether the fix is in place.
    """
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "cast_impl") or not hasattr(interpreter, "TensorHandle"):
        return False
    original = builder.cast_impl
    if getattr(original, "_diffc_rtne", False):
        _BF16_RTNE[0] = True
        return True

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.array(src.data, dtype=np.float32, copy=True)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original(self, src, dst_type)

    cast_impl._diffc_rtne = True
    builder.cast_impl = cast_impl
    _BF16_RTNE[0] = True
    return True


def tolerance(dtype: torch.dtype, **override) -> dict:
    tol = TOL[dtype] if dtype != torch.bfloat16 or _BF16_RTNE[0] else TRUNCATING_BF16_TOL
    return {**tol, **override}


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 1.0, offset: float = 0.0):
    """Random normal values (never all zero), generated in float32 then cast."""
    g = torch.Generator().manual_seed(seed)
    return (offset + scale * torch.randn(*shape, generator=g)).to(dtype)


def norm_weight(n: int, dtype: torch.dtype, seed: int = 7) -> torch.Tensor:
    """A norm weight near 1 but not 1, so a missing multiply shows."""
    return randn(n, dtype=dtype, seed=seed, scale=0.3, offset=1.0)


def poisoned(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """An output buffer full of NaN: any element the kernel fails to write stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, **override) -> None:
    """Every element written (no NaN left) and within the dtype's tolerance of the reference."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    assert not out.isnan().any(), f"{int(out.isnan().sum())} of {out.numel()} elements were not written"
    torch.testing.assert_close(out, ref, **tolerance(ref.dtype, **override))


def assert_kernel_ran(launches: int = 1) -> None:
    """The op really ran its Triton kernel (interpreted), not the torch fallback."""
    assert COUNTERS == OpCounters(kernel_launches=launches, reference_fallbacks=0), COUNTERS
