"""Native samplers matching diffusers' schedulers step for step."""

from .flow_match_euler import FlowMatchEulerDiscreteScheduler, calculate_shift
from .unipc import UniPCMultistepScheduler

__all__ = ["FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler", "calculate_shift"]
