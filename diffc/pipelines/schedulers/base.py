"""What every native scheduler shares: config loading, validation helpers and the step counter.

A scheduler is built from its ``scheduler_config.json`` with ``from_config``, prepared for one
generation with ``set_timesteps`` (which also resets all per-generation state, so one instance can
serve many generations one after another) and advanced with ``step`` once per denoising step.

Schedules are built on the host with numpy in the same dtypes (float64 / float32) as diffusers, so
``timesteps`` and ``sigmas`` are bit-identical to diffusers'; the per-step math mirrors diffusers'
tensor ops and type promotion so ``step`` is too.
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from ...errors import CheckpointError, InvalidArgumentError
from ...models.config import ModelConfig

SOURCE = "scheduler_config.json"


def check_choice(field: str, value: Any, accepted: Sequence[Any], scheduler: str) -> None:
    """Raise ``CheckpointError`` naming ``field`` unless ``value`` is one of ``accepted``."""
    if value not in accepted:
        shown = ", ".join(repr(a) for a in accepted)
        raise CheckpointError(f"{SOURCE}: {field}={value!r} is not supported by diffc's {scheduler}; accepted: {shown}")


def check_off(config: ModelConfig, fields: Sequence[str], scheduler: str) -> None:
    """Raise ``CheckpointError`` for the first boolean option in ``fields`` that the config enables."""
    for field in fields:
        check_choice(field, bool(getattr(config, field)), (False,), scheduler)


def check_int(field: str, value: Any, minimum: int, scheduler: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CheckpointError(f"{SOURCE}: {field}={value!r} must be an integer >= {minimum} for {scheduler}")


# the largest ``mu`` whose e^mu float32 holds: above it diffusers' shift is inf / inf, every sigma NaN
MAX_SHIFT_MU = math.log(float(np.finfo(np.float32).max))


def exponential_time_shift(mu: float, sigmas: np.ndarray) -> np.ndarray:
    """Resolution-dependent shift of FLUX: ``e^mu / (e^mu + (1/sigma - 1))``."""
    if not mu <= MAX_SHIFT_MU:
        raise InvalidArgumentError("mu", f"is {mu:.4g}; e^mu overflows float32 above {MAX_SHIFT_MU:.2f} (every "
                                         "sigma would be NaN)")
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)


def linear_time_shift(mu: float, sigmas: np.ndarray) -> np.ndarray:
    return mu / (mu + (1 / sigmas - 1) ** 1.0)


def stretch_to_terminal(sigmas: np.ndarray, shift_terminal: float) -> np.ndarray:
    """Rescale ``1 - sigma`` so that the last sigma equals ``shift_terminal`` (LTX-Video's rule)."""
    one_minus = 1 - sigmas
    if one_minus[-1] == 0:  # a one-step schedule at sigma 1; diffusers divides 0 by 0 here
        raise InvalidArgumentError(
            "num_inference_steps", "a scheduler config with shift_terminal needs a schedule that ends below sigma 1"
        )
    scale = one_minus[-1] / (1 - shift_terminal)
    return 1 - (one_minus / scale)


class Scheduler(abc.ABC):
    """Base class: holds the config, the schedule and the index of the next step.

    Subclasses set ``config_class``, implement ``_validate`` (raising ``CheckpointError`` for
    options diffc does not implement), ``set_timesteps`` and ``step``.
    """

    config_class: ClassVar[type[ModelConfig]]
    order: ClassVar[int] = 1
    init_noise_sigma: ClassVar[float] = 1.0

    def __init__(self, config: ModelConfig):
        self.config = config
        self._validate()
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any] | ModelConfig) -> "Scheduler":
        """Build from the contents of ``scheduler_config.json``; unknown keys are ignored."""
        if not isinstance(config, ModelConfig):
            config = cls.config_class.from_dict(config, source=SOURCE)
        return cls(config)

    @abc.abstractmethod
    def _validate(self) -> None:
        """Raise ``CheckpointError`` for config values this scheduler does not implement."""

    @property
    def step_index(self) -> int | None:
        """Index of the next step in ``timesteps``; ``None`` before ``set_timesteps``."""
        return self._step_index

    @staticmethod
    def _resolve_steps(num_inference_steps: int | None, sigmas: Sequence[float] | None) -> int:
        """Validate the step count (taken from ``sigmas`` when only those are given)."""
        if sigmas is not None:
            if len(sigmas) < 1:
                raise InvalidArgumentError("sigmas", "must hold at least one value")
            if num_inference_steps is None:
                num_inference_steps = len(sigmas)
            elif num_inference_steps != len(sigmas):
                raise InvalidArgumentError(
                    "sigmas", f"has {len(sigmas)} values but num_inference_steps is {num_inference_steps}"
                )
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise InvalidArgumentError("num_inference_steps", f"must be an integer >= 1, got {num_inference_steps!r}")
        return num_inference_steps

    def _begin_step(self) -> int:
        """Return the index of the step about to be taken, checking the schedule is not exhausted."""
        if self.timesteps is None or self._step_index is None:
            raise RuntimeError(f"{type(self).__name__}.step() called before set_timesteps()")
        if self._step_index >= len(self.timesteps):
            raise RuntimeError(
                f"{type(self).__name__}.step() called {self._step_index + 1} times for "
                f"{len(self.timesteps)} timesteps; call set_timesteps() to start a new generation"
            )
        return self._step_index
