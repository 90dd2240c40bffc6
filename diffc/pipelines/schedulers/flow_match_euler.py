"""Euler sampler for rectified-flow models (FLUX.1, SD3, Wan with a FlowMatch config).

The model predicts a velocity ``v``; one step moves the sample along it:
``x_next = x + (sigma_next - sigma) * v``, with ``sigma`` going from ~1 (noise) to 0 (data).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
import torch

from ...errors import InvalidArgumentError
from ...models.config import ModelConfig
from .base import (
    MAX_SHIFT_MU,
    Scheduler,
    check_choice,
    check_int,
    check_off,
    exponential_time_shift,
    linear_time_shift,
    stretch_to_terminal,
)


@dataclasses.dataclass(frozen=True)
class FlowMatchEulerDiscreteSchedulerConfig(ModelConfig):
    """``scheduler_config.json`` fields of diffusers' FlowMatchEulerDiscreteScheduler, same defaults."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    time_shift_type: str = "exponential"
    stochastic_sampling: bool = False


# Published scheduler configs (the non-default fields of each checkpoint's scheduler_config.json).
SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "flux.1-dev": {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},
    "flux.1-schnell": {"shift": 1.0, "use_dynamic_shifting": False},
    "wan-tiny-test": {"shift": 7.0},  # what diffusers' Wan pipeline tests use
}


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's ``mu``: a line through (base_seq_len, base_shift) and (max_seq_len, max_shift)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    intercept = base_shift - slope * base_seq_len
    return image_seq_len * slope + intercept


def check_time_shift(scheduler, height: int, width: int, token_pixels: int) -> None:
    """Where the scheduler shifts its sigmas by image size (``use_dynamic_shifting``, exponential), a size whose
    ``mu`` (:func:`calculate_shift` of its latent tokens, ``token_pixels`` pixels each) overflows e^mu in float32 is
    refused when the request is read, naming height and width and the most pixels that work (diffusers runs the
    whole generation on NaN sigmas there: FLUX.1 from about 11,500 x 11,500 pixels)."""
    cfg = scheduler.config
    if not getattr(cfg, "use_dynamic_shifting", False) or getattr(cfg, "time_shift_type", "") != "exponential":
        return
    line = (cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    tokens = (height * width) // token_pixels
    mu = calculate_shift(tokens, *line)
    if mu <= MAX_SHIFT_MU:
        return
    at_zero = calculate_shift(0, *line)  # mu is a line in the token count: the most tokens where it still fits
    most = (MAX_SHIFT_MU - at_zero) / (calculate_shift(1, *line) - at_zero) * token_pixels
    raise InvalidArgumentError("height", f"{height}x{width} (height x width) is too large for the scheduler's "
                                         f"size-dependent time shift: {tokens} latent tokens give mu = {mu:.1f}, and "
                                         f"e^mu overflows float32 (above mu = {MAX_SHIFT_MU:.2f}); at most about "
                                         f"{most / 1e6:.0f} megapixels")


class FlowMatchEulerDiscreteScheduler(Scheduler):
    """Native equivalent of diffusers' ``FlowMatchEulerDiscreteScheduler`` (deterministic sampling).

    After ``set_timesteps(n, device, sigmas=None, mu=None)``: ``timesteps`` is float32 of shape
    ``(n,)`` on ``device`` (``sigma * num_train_timesteps``) and ``sigmas`` is float32 ``(n + 1,)``
    on ``device`` ending in 0. ``step`` takes the ``timesteps`` in order; the ``timestep`` argument
    is accepted for interface compatibility and not read (no host sync).
    """

    config_class = FlowMatchEulerDiscreteSchedulerConfig
    config: FlowMatchEulerDiscreteSchedulerConfig

    def _validate(self) -> None:
        c, name = self.config, type(self).__name__
        check_int("num_train_timesteps", c.num_train_timesteps, 1, name)
        check_choice("time_shift_type", c.time_shift_type, ("exponential", "linear"), name)
        # Beta sigmas need scipy; inverted sigmas (Mochi) and stochastic sampling are not implemented.
        check_off(c, ("use_beta_sigmas", "invert_sigmas", "stochastic_sampling"), name)
        if c.use_karras_sigmas and c.use_exponential_sigmas:
            check_choice("use_exponential_sigmas", True, (False,), name + " with use_karras_sigmas=True")
        self._sigma_max, self._sigma_min = self._training_sigma_range()

    def _training_sigma_range(self) -> tuple[float, float]:
        """First and last sigma of the training schedule, in float32 as diffusers computes them."""
        c = self.config
        n = c.num_train_timesteps
        ends = torch.tensor([float(n), 1.0], dtype=torch.float32) / n
        if not c.use_dynamic_shifting:
            ends = c.shift * ends / (1 + (c.shift - 1) * ends)
        return ends[0].item(), ends[1].item()

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Build the schedule for one generation and reset the step counter.

        ``sigmas`` replaces the default linear spacing (FLUX passes ``linspace(1, 1/n, n)``) before
        shifting; ``mu`` is required when the config uses dynamic shifting.
        """
        c = self.config
        num_inference_steps = self._resolve_steps(num_inference_steps, sigmas)
        if c.use_dynamic_shifting and mu is None:
            raise InvalidArgumentError("mu", "is required because the scheduler config sets use_dynamic_shifting")
        n_train = c.num_train_timesteps

        if sigmas is None:
            t = np.linspace(self._sigma_max * n_train, self._sigma_min * n_train, num_inference_steps)
            sig = t / n_train
        else:
            sig = np.array(sigmas).astype(np.float32)

        if c.use_dynamic_shifting:
            shift_fn = exponential_time_shift if c.time_shift_type == "exponential" else linear_time_shift
            sig = shift_fn(mu, sig)
        else:
            sig = c.shift * sig / (1 + (c.shift - 1) * sig)
        if c.shift_terminal:
            sig = stretch_to_terminal(sig, c.shift_terminal)
        if c.use_karras_sigmas:
            sig = _karras(sig.item(0), sig.item(-1), num_inference_steps)
        elif c.use_exponential_sigmas:
            sig = np.exp(np.linspace(math.log(sig.item(0)), math.log(sig.item(-1)), num_inference_steps))

        sig_t = torch.from_numpy(sig).to(dtype=torch.float32, device=device)
        self.timesteps = sig_t * n_train  # (n,)
        self.sigmas = torch.cat([sig_t, torch.zeros(1, device=sig_t.device)])  # (n + 1,)
        self.num_inference_steps = num_inference_steps
        self._step_index = 0

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor) -> torch.Tensor:
        """One Euler step; returns the next sample in ``model_output``'s dtype (math in float32)."""
        i = self._begin_step()
        sample = sample.to(torch.float32)
        dt = self.sigmas[i + 1] - self.sigmas[i]  # 0-dim, on the schedule's device
        prev_sample = sample + dt * model_output
        self._step_index = i + 1
        return prev_sample.to(model_output.dtype)


def _karras(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) spacing between the shifted schedule's ends."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho
