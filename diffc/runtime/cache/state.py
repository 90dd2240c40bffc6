"""What a step cache remembers and counts, and its decision rules as plain functions.

The rules are pure (numbers in, a decision out) so that tests can replay them on a given sequence of
residual changes and compare, step by step, with what the cache did on a real DiT.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch


def rel_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """``mean(|current - previous|) / mean(|previous|)``, accumulated in float32 (one host sync)."""
    num = (current - previous).abs().mean(dtype=torch.float32)
    den = previous.abs().mean(dtype=torch.float32)
    num, den = torch.stack([num, den]).tolist()
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def block_cache_skips(step: int, diff: float | None, skips_in_a_row: int, *, threshold: float,
                      warmup_steps: int, max_skips_in_a_row: int | None) -> bool:
    """DBCache's rule: skip the middle blocks at ``step`` when, past the warm-up and under the limit of
    skips in a row, the first blocks' residual changed by ``diff`` < ``threshold`` since the last
    computed step (``diff`` None: nothing to compare with yet). A threshold of 0 never skips."""
    if step < warmup_steps or diff is None:
        return False
    if max_skips_in_a_row is not None and skips_in_a_row >= max_skips_in_a_row:
        return False
    return threshold > 0 and diff < threshold


def teacache_skips(step: int, total_steps: int | None, diff: float | None, accumulated: float,
                   skips_in_a_row: int, *, threshold: float, warmup_steps: int, final_steps: int,
                   max_skips_in_a_row: int | None, rescale: Callable[[float], float]) -> tuple[bool, float]:
    """TeaCache's rule: ``(skip, accumulated)`` after ``step``. The rescaled change of the modulated input
    since the previous step accumulates while under ``threshold`` (skip); reaching it computes and
    starts over. The first ``warmup_steps`` and last ``final_steps`` steps always compute."""
    if step < warmup_steps or diff is None or (total_steps is not None and step >= total_steps - final_steps):
        return False, 0.0
    if max_skips_in_a_row is not None and skips_in_a_row >= max_skips_in_a_row:
        return False, 0.0
    accumulated += rescale(diff)
    if threshold > 0 and accumulated < threshold:
        return True, accumulated
    return False, 0.0


def polynomial(coefficients: tuple[float, ...]) -> Callable[[float], float]:
    """The polynomial with ``coefficients``, highest power first (as ``numpy.poly1d``)."""
    def value(x: float) -> float:
        out = 0.0
        for c in coefficients:
            out = out * x + c
        return out
    return value


@dataclasses.dataclass
class BranchState:
    """One CFG branch's memory (the n-th DiT call of each step is branch n).

    ``previous``: DBCache's first-blocks residual at the last computed step, or TeaCache's signal at the
    previous step; ``residuals``: per region, its middle blocks' output minus input, one tensor per
    stream, at the last computed step; ``extrapolators``: per region, TaylorSeer's state.
    """

    previous: torch.Tensor | None = None
    input_shape: tuple[int, ...] | None = None
    accumulated: float = 0.0
    skips_in_a_row: int = 0
    residuals: dict[str, tuple[torch.Tensor, ...]] = dataclasses.field(default_factory=dict)
    extrapolators: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StepRecord:
    """One denoising step: DiT forwards computed and skipped, and each forward's measured change."""

    step: int
    computed: int = 0
    skipped: int = 0
    diffs: list[float | None] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "computed": self.computed, "skipped": self.skipped,
                "diffs": [None if d is None else round(d, 6) for d in self.diffs]}


@dataclasses.dataclass
class CacheCounters:
    """Totals of one generation: DiT forwards whose middle blocks ran or were replaced by the cached
    residual, and the middle-block runs computed and skipped (``middle_blocks`` per forward)."""

    forwards_computed: int = 0
    forwards_skipped: int = 0
    middle_blocks_computed: int = 0
    middle_blocks_skipped: int = 0
    steps: list[StepRecord] = dataclasses.field(default_factory=list)

    def record(self, step: int, skipped: bool, diff: float | None, middle_blocks: int) -> None:
        while len(self.steps) <= step:
            self.steps.append(StepRecord(len(self.steps)))
        entry = self.steps[step]
        entry.diffs.append(diff)
        if skipped:
            entry.skipped += 1
            self.forwards_skipped += 1
            self.middle_blocks_skipped += middle_blocks
        else:
            entry.computed += 1
            self.forwards_computed += 1
            self.middle_blocks_computed += middle_blocks

    def as_dict(self) -> dict[str, Any]:
        return {
            "forwards": {"computed": self.forwards_computed, "skipped": self.forwards_skipped},
            "middle_blocks": {"computed": self.middle_blocks_computed, "skipped": self.middle_blocks_skipped},
            "skipped_steps": [s.step for s in self.steps if s.skipped and not s.computed],
            "steps": [s.as_dict() for s in self.steps],
        }
