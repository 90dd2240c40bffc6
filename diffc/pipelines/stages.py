"""The stage graph: a pipeline is a sequence of named stages with declared inputs and outputs.

A stage runs verify -> forward -> record timing. Nothing here knows about any model family; the
family's pipeline spec supplies the stage functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch

from ..runtime.perf import PerfRecorder

State = dict[str, Any]


@dataclasses.dataclass
class RunContext:
    """What every stage may use: the loaded components, device/dtype, and the perf recorder."""

    components: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    perf: PerfRecorder
    progress: bool = True
    warnings: list[str] = dataclasses.field(default_factory=list)
    sample_warnings: dict[int, list[str]] = dataclasses.field(default_factory=dict)  # sample -> its own warnings
    step_callback: Callable[[int, int], None] | None = None  # (step done, total steps)
    decode_callback: Callable[[int, int], None] | None = None  # (parts decoded, total) where a VAE reports them
    step_hooks: list[Callable[[int], None]] = dataclasses.field(default_factory=list)  # (step index) at its start
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # model_index.json settings (spec.index_keys)


@dataclasses.dataclass(frozen=True)
class Stage:
    """A named step of a pipeline. ``fn(ctx, state)`` returns a dict holding exactly ``outputs``.

    ``timed=False``: the graph does not time the stage as one block; it records its own phases
    through ``ctx.perf.begin`` / ``ctx.perf.end`` (a pipeline run as one call, timed inside).
    """

    name: str
    fn: Callable[[RunContext, State], State]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    timed: bool = True


class StageGraph:
    """An ordered list of stages whose data dependencies are checked once, when the graph is built."""

    def __init__(self, stages: Sequence[Stage], request_keys: Sequence[str]):
        self.stages = tuple(stages)
        available = set(request_keys)
        for stage in self.stages:
            missing = [k for k in stage.inputs if k not in available]
            if missing:
                raise ValueError(f"stage '{stage.name}' needs {missing}, which no earlier stage produces")
            available.update(stage.outputs)
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique: {names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def run(self, ctx: RunContext, state: State) -> State:
        for stage in self.stages:
            inputs = {k: state[k] for k in stage.inputs}
            if stage.timed:
                with ctx.perf.stage(stage.name):
                    produced = stage.fn(ctx, inputs)
            else:
                produced = stage.fn(ctx, inputs)
            if set(produced) != set(stage.outputs):
                raise RuntimeError(
                    f"stage '{stage.name}' produced {sorted(produced)}, declared {sorted(stage.outputs)}"
                )
            state.update(produced)
        return state


NON_FINITE = ("decoded to NaN or infinite pixels, written as black or white: the denoiser or the VAE made them "
              "(weights holding NaN, or a scheduler setting that divides by zero at the last step)")


def note_non_finite(ctx: RunContext, bad: Sequence[bool]) -> None:
    """Warn of each sample ``i`` with ``bad[i]``: "prompt i decoded to NaN ..." in ``ctx.warnings`` and the rest in
    ``ctx.sample_warnings[i]``, as the truncation warnings (a flat image is otherwise all the user sees)."""
    for i, flag in enumerate(bad):
        if flag:
            ctx.warnings.append(f"prompt {i} {NON_FINITE}")
            ctx.sample_warnings.setdefault(i, []).append(NON_FINITE)


def check_finite(ctx: RunContext, decoded: torch.Tensor) -> None:
    """:func:`note_non_finite` for a decoded batch (samples on dim 0), read with one small copy to the host."""
    note_non_finite(ctx, (~torch.isfinite(decoded)).flatten(1).any(1).tolist())


def to_uint8(pixels: torch.Tensor):
    """Pixels in [0, 1], channels at ``dim -3``, as a uint8 numpy array with channels last.

    ``round(x * 255)`` in float32 (half to even, numpy's and diffusers' rounding), computed where the pixels are
    (a GPU's decode output crosses to the host as uint8, a quarter of its float32 size) and then copied.
    """
    u8 = (pixels.float() * 255).round().to(torch.uint8)
    return u8.movedim(-3, -1).contiguous().cpu().numpy()

