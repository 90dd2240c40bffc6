"""cuBLASLt without a workspace, for the process that imports diffc (unless its environment says otherwise).

With its default workspace, cuBLASLt runs many of a DiT's GEMM shapes on Hopper with kernels that need the
workspace zeroed first: a ``cudaMemsetAsync`` before each GEMM with a bias (FLUX.1-dev bf16: 343 a forward,
from ``aten::addmm``, ``_addmm_activation`` and ``addmm_``; the fp8 tier's ``_scaled_mm`` likewise), which in a
CUDA graph is a node of its own, with the GPU idle around it. Without a workspace cuBLASLt picks kernels
that need none. Measured on an H100 (FLUX.1-dev, ``bench.compare``, two alternating rounds of processes,
``bench/results/h100-2026-12-05-flux-dev-cublaslt-workspace.md``): the fp8 tier's DiT forward 90.2 / 89.4 ->
86.7 / 87.1 ms, bf16 123.6 / 123.4 -> 122.9 / 122.9 ms; FLUX.1's GEMM shapes alone, 20 in a CUDA graph,
1.8-7% faster each.

torch reads ``CUBLASLT_WORKSPACE_SIZE`` (KiB) once, at its first cuBLASLt GEMM, so the setting holds where
diffc is imported before the process's first GEMM (the CLI and ``bench`` always do). A value already in the
environment is kept: ``CUBLASLT_WORKSPACE_SIZE=32768`` gives cuBLASLt a 32 MiB workspace back.
"""

from __future__ import annotations

import os

VARIABLE = "CUBLASLT_WORKSPACE_SIZE"
NO_WORKSPACE = "0"


def configure(environ: dict[str, str] | None = None) -> str:
    """Set :data:`VARIABLE` to :data:`NO_WORKSPACE` where ``environ`` (default ``os.environ``) has no value for
    it; returns the value in force."""
    env = os.environ if environ is None else environ
    return env.setdefault(VARIABLE, NO_WORKSPACE)
