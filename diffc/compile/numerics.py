"""How far a compiled output is from its reference: the relative L2 error the compile reports carry."""

from __future__ import annotations

from typing import Any

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` in float32 (L2 norms; ``|b|`` at least 1e-12)."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def output_rel_err(out: Any, ref: Any) -> float:
    """The largest relative error over the tensors of two outputs of the same structure."""
    outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    refs = [t for t in torch.utils._pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
    return max((rel_err(o, r) for o, r in zip(outs, refs)), default=0.0)
