"""Choosing a sampler other than the checkpoint's own (``diffc.load(..., scheduler=...)``)."""

from __future__ import annotations

from ...errors import InvalidArgumentError
from .flow_match_euler import FlowMatchEulerDiscreteScheduler
from .unipc import UniPCMultistepScheduler

SCHEDULER_NAMES = {"unipc": UniPCMultistepScheduler, "euler": FlowMatchEulerDiscreteScheduler}


def choose_scheduler(current, name: str | None):
    """Return ``current`` or a scheduler of kind ``name`` built from its config.

    The flow-prediction UniPC of Wan converts to flow-match Euler with ``shift = flow_shift``, as
    diffusers' Wan examples do; asking for the kind a checkpoint already has returns it unchanged.
    """
    if name is None:
        return current
    if name not in SCHEDULER_NAMES:
        raise InvalidArgumentError("scheduler", f"'{name}' is not a scheduler; accepted: {', '.join(SCHEDULER_NAMES)}")
    wanted = SCHEDULER_NAMES[name]
    if isinstance(current, wanted):
        return current
    cfg = current.config
    if wanted is FlowMatchEulerDiscreteScheduler and isinstance(current, UniPCMultistepScheduler) \
            and cfg.prediction_type == "flow_prediction":
        return FlowMatchEulerDiscreteScheduler.from_config(
            {"num_train_timesteps": cfg.num_train_timesteps, "shift": cfg.flow_shift})
    raise InvalidArgumentError(
        "scheduler", f"'{name}' cannot replace this checkpoint's {type(current).__name__}; "
        f"accepted here: {', '.join(k for k, v in SCHEDULER_NAMES.items() if isinstance(current, v))}"
        + (", euler" if isinstance(current, UniPCMultistepScheduler) and cfg.prediction_type == "flow_prediction" else ""))
