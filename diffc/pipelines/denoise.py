"""Generic pieces of the denoise loop: seeded noise that matches diffusers, and the step loop."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

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
