"""Shared numeric helpers and tolerance tables for the test suite."""

from __future__ import annotations

import math

import numpy as np
import torch

# Relative-error bounds ||out - ref|| / ||ref|| per dtype for single-module parity with diffusers.
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "output has non-finite values"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def psnr_uint8(a, b) -> float:
    """PSNR in dB between two uint8 images/videos (numpy arrays or PIL images)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


class ServeStopped(Exception):
    """Raised by the ``serve_engine_args`` fixture (tests/conftest.py) where ``diffc serve`` would build its app."""
