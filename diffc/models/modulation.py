"""Adaptive-norm projections a pipeline precomputes for many denoising steps at once.

A DiT whose blocks project one conditioning vector per sample (``linear(silu(temb))``: FLUX.1's and
Qwen-Image's adaLN modulation, a quarter to a third of their weights) offers ``modulation(...)``, every
projection of a batch of (step, sample) rows concatenated in block order, and ``forward(...,
modulation=...)``, which hands each block its columns instead of the conditioning. Each projection weight
is then read once for a window of steps instead of once a step (:class:`diffc.pipelines.denoise.StepTable`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidArgumentError


def precomputed(linear: nn.Linear, temb: torch.Tensor) -> torch.Tensor | None:
    """``temb``'s first ``linear.out_features`` columns where it is a precomputed modulation (wider than the
    conditioning ``linear`` projects), else None (``temb`` is the conditioning itself)."""
    width = temb.shape[-1]
    if width == linear.in_features:
        return None
    if width < linear.out_features:
        raise InvalidArgumentError("modulation", f"expected the {linear.in_features}-wide conditioning or a "
                                   f"precomputed modulation of at least {linear.out_features} columns, got {width}")
    return temb[:, :linear.out_features]


def check_modulation(modulation: torch.Tensor | None, batch: int, width: int, model: str) -> None:
    """A ``forward(modulation=...)`` argument must be (batch or 1, width)."""
    if modulation is not None and (modulation.ndim != 2 or modulation.shape[1] != width
                                   or modulation.shape[0] not in (1, batch)):
        raise InvalidArgumentError("modulation", f"expected shape ({batch}, {width}) ({model}.modulation), "
                                   f"got {tuple(modulation.shape)}")


__all__ = ["check_modulation", "precomputed"]
