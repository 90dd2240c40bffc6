"""diffc's fused ops: ``torch.ops.diffc.*``, each with its torch reference, Triton kernel and fake.

Importing this package registers every op. One module per op holds ``<op>_ref`` (the models' own
math), the kernel, the launcher and a functional wrapper, e.g. ``diffc.ops.gelu_tanh.gelu_tanh``.
Compile passes swap the models' unfused sequences for these ops; eager models never call them, except
the VAEs' fused paths (:mod:`.channel_norm`, :mod:`.group_norm`), which a compiled pipeline switches on for its
decode.
:mod:`diffc.ops.registry` describes how an op is declared and dispatched (Triton on CUDA, Triton's
interpreter on CPU under ``TRITON_INTERPRET=1``, else the torch reference); a few ops run a CUDA C++
kernel of ``csrc/`` on the GPU where it measured faster (:mod:`.csrc`).
"""

from . import (adaln_modulate, attention_fa4, attention_flashinfer, attention_fp8,
               attention_key_padding, attention_sdpa_flash, channel_norm, csrc, csrc_sources, fp8, gated_residual,
               gelu_tanh, gemv, group_norm, linear_accumulate, linear_into, qk_norm_rope, qk_norm_rope_fp8,
               quantize_rows, rms_norm, silu_mul, timestep_embedding)
from .registry import COUNTERS, REGISTERED, OpCounters, kernel_runs_on, register_op

OPS = tuple(REGISTERED)  # names in the diffc namespace, e.g. "qk_norm_rope_per_head"

__all__ = [
    "COUNTERS",
    "OPS",
    "REGISTERED",
    "OpCounters",
    "adaln_modulate",
    "attention_fa4",
    "attention_flashinfer",
    "attention_fp8",
    "attention_key_padding",
    "attention_sdpa_flash",
    "channel_norm",
    "csrc",
    "csrc_sources",
    "fp8",
    "gated_residual",
    "gelu_tanh",
    "gemv",
    "group_norm",
    "kernel_runs_on",
    "linear_accumulate",
    "linear_into",
    "qk_norm_rope",
    "qk_norm_rope_fp8",
    "quantize_rows",
    "register_op",
    "rms_norm",
    "silu_mul",
    "timestep_embedding",
]
