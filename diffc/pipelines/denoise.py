"""Generic pieces of the denoise loop: seeded noise that matches diffusers, and the step loop."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import InvalidArgumentError
from .stages import RunContext


def cpu_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def seeded_noise(
    shape: Sequence[int], generators: list[torch.Generator], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Initial noise drawn exactly as diffusers' ``randn_tensor`` draws it with CPU generators.

    One generator draws the whole batch at once; one generator per sample draws each sample on its own.
    """
    shape = tuple(shape)
    if len(generators) == 1:
        noise = torch.randn(shape, generator=generators[0], device="cpu", dtype=dtype)
    else:
        if len(generators) != shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
        noise = torch.cat(
            [torch.randn((1,) + shape[1:], generator=g, device="cpu", dtype=dtype) for g in generators]
        )
    return noise.to(device)


def check_terminal_steps(scheduler, steps: int | None) -> None:
    """A flow-match sampler with ``shift_terminal`` stretches its schedule to end there, which the one sigma (1) of a
    one-step schedule cannot be (diffusers divides 0 by 0: NaN pixels): refused naming ``num_inference_steps``
    before any work."""
    if steps is not None and steps < 2 and getattr(scheduler.config, "shift_terminal", None):
        raise InvalidArgumentError("num_inference_steps", "this checkpoint's sampler (shift_terminal) needs at least "
                                   f"2 steps, got {steps}")


def step_index(t: torch.Tensor, timesteps: torch.Tensor) -> int | None:
    """``t``'s index in ``timesteps`` where ``t`` is one of its elements as :func:`denoise_loop` hands them out (a
    view of the same storage: found without reading the device), else None."""
    if (t.ndim or timesteps.ndim != 1 or t.dtype != timesteps.dtype or t.device != timesteps.device
            or t.untyped_storage().data_ptr() != timesteps.untyped_storage().data_ptr()):
        return None
    offset, stride = t.storage_offset() - timesteps.storage_offset(), timesteps.stride(0)
    if stride <= 0 or offset % stride or not 0 <= offset // stride < timesteps.shape[0]:
        return None
    return offset // stride


class StepTable:
    """Per-step DiT inputs computed for many of a generation's steps at once (FLUX's adaLN modulation, whose
    weights are then read once for all of them instead of once a step).

    ``compute(first, stop)`` returns the inputs of steps ``first..stop-1`` stacked on a leading dimension;
    ``table(t)`` is the row of the step whose timestep ``t`` is (computing the window of ``window`` steps from
    it when that step is not in the last one), or None when ``t`` is not an element of ``timesteps`` (a
    scheduler that evaluates between its timesteps): the caller then computes the input itself.
    """

    def __init__(self, timesteps: torch.Tensor, compute: Callable[[int, int], torch.Tensor], window: int):
        self.timesteps, self.compute, self.window = timesteps, compute, max(1, int(window))
        self.first, self.rows = 0, None

    def __call__(self, t: torch.Tensor) -> torch.Tensor | None:
        i = step_index(t, self.timesteps)
        if i is None:
            return None
        if self.rows is None or not self.first <= i < self.first + self.rows.shape[0]:
            self.first, self.rows = i, None  # the previous window's memory goes before the next is computed
            self.rows = self.compute(i, min(i + self.window, self.timesteps.shape[0]))
        return self.rows[i - self.first]


MODULATION_TABLE_BYTES = 256 << 20  # the most a window of precomputed modulation rows holds


def modulation_table(transformer, timesteps: torch.Tensor, rows: int,
                     inputs: Callable[[torch.Tensor, int], dict[str, Any]], dtype: torch.dtype) -> StepTable | None:
    """The DiT's adaLN modulation for a generation's steps (``transformer.modulation``, :mod:`diffc.models.modulation`:
    the projection weights read once a window of steps instead of once a step), ``rows`` a step; None where the DiT
    takes no precomputed modulation (a diffusers module, offloaded weights, a compiled DiT without graphs for it:
    :meth:`~diffc.runtime.dit_stack.DiTStack.takes`). ``inputs(t, steps)`` makes ``modulation``'s keyword arguments
    from ``t``, the window's timesteps repeated ``rows`` times each ((steps * rows,), step-major), as the pipeline's
    DiT call makes its own from one step's."""
    takes = getattr(transformer, "takes", None)
    if not hasattr(transformer, "modulation") or (takes is not None and not takes("modulation")) \
            or not isinstance(timesteps, torch.Tensor) or timesteps.ndim != 1 or not timesteps.shape[0]:
        return None

    def compute(first: int, stop: int) -> torch.Tensor:
        steps = stop - first
        t = timesteps[first:stop, None].expand(steps, rows).reshape(-1)
        return transformer.modulation(**inputs(t, steps)).view(steps, rows, -1)

    step_bytes = rows * transformer.modulation_width * torch.finfo(dtype).bits // 8
    return StepTable(timesteps, compute, MODULATION_TABLE_BYTES // step_bytes)


def denoise_loop(
    ctx: RunContext,
    scheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Run ``latents = scheduler.step(predict(latents, t), t, latents)`` over ``timesteps``.

    ``predict`` holds all model-specific work (conditioning, guidance); the loop only times steps,
    tells ``ctx.step_hooks`` (the step cache) that a step starts, shows progress and reports it to
    ``ctx.step_callback``.
    """
    total = len(timesteps)
    with tqdm(total=total, desc="denoising", unit="step", disable=not ctx.progress, leave=False) as bar:
        for i, t in enumerate(timesteps):
            ctx.perf.step_begin()
            for hook in ctx.step_hooks:
                hook(i)
            noise_pred = predict(latents, t)
            latents = scheduler.step(noise_pred, t, latents)
            ctx.perf.step_end()
            bar.update(1)
            if ctx.step_callback is not None:
                ctx.step_callback(i + 1, total)
    return latents
