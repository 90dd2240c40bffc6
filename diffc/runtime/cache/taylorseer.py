"""TaylorSeer-style extrapolation of a cached residual (Liu et al., "From Reusing to Forecasting", 2025).

At each computed step the residual and its finite differences over the computed steps are kept (up to
``order``); at a skipped step ``s`` the residual is forecast as ``sum_i d_i * (s - k)^i / i!`` from the
last computed step ``k``. With one computed step so far this is the cached residual itself.
"""

from __future__ import annotations

import math

import torch


class TaylorSeer:
    """The derivative ladder of one region's residual streams (a tuple of tensors; None for a stream the
    region's last block does not return, e.g. the text of SD3's last joint block)."""

    def __init__(self, order: int = 1):
        self.order = order
        self.step: int | None = None  # last computed step
        self.ladder: list[tuple[torch.Tensor, ...]] = []  # ladder[i]: i-th finite difference per stream

    def update(self, step: int, values: tuple[torch.Tensor, ...]) -> None:
        """Record the residual computed at ``step``."""
        ladder = [values]
        if self.step is not None and step > self.step and self.ladder \
                and all(_alike(a, b) for a, b in zip(values, self.ladder[0])):
            window = step - self.step
            for i in range(min(self.order, len(self.ladder))):
                ladder.append(tuple(None if a is None else (a - b) / window for a, b in zip(ladder[i], self.ladder[i])))
        self.step, self.ladder = step, ladder

    def forecast(self, step: int) -> tuple[torch.Tensor, ...]:
        """The residual forecast at ``step`` (after the last computed one)."""
        elapsed = step - self.step
        out = list(self.ladder[0])
        for i in range(1, len(self.ladder)):
            scale = elapsed**i / math.factorial(i)
            out = [None if o is None else o + d * scale for o, d in zip(out, self.ladder[i])]
        return tuple(out)


def _alike(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape)
