"""Validating what users pass to ``set_lora`` (Python, CLI, HTTP): nicknames, paths, strengths, targets.

Each argument is one value or a list with one entry per adapter; a single strength or target
applies to every adapter.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import numpy as np

from ..errors import InvalidArgumentError

TARGETS = ("all", "transformer", "transformer_2")
MAX_NICKNAME = 128
MAX_STRENGTH = 1000.0


@dataclasses.dataclass(frozen=True)
class Active:
    """One adapter to merge: its nickname, strength and target (``all`` or one DiT component)."""

    nickname: str
    strength: float = 1.0
    target: str = "all"


def check_nickname(value: Any, field: str = "lora_nickname") -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgumentError(field, f"must be a non-empty string, got {value!r}")
    if len(value) > MAX_NICKNAME or not value.isprintable():
        raise InvalidArgumentError(field, f"must be at most {MAX_NICKNAME} printable characters")
    return value


def check_strength(value: Any, field: str = "strength") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InvalidArgumentError(field, f"must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or abs(value) > MAX_STRENGTH:
        raise InvalidArgumentError(field, f"must be a finite number from -{MAX_STRENGTH:g} to {MAX_STRENGTH:g}, "
                                   f"got {value}")
    return value


def check_target(value: Any, available: Sequence[str], field: str = "target") -> str:
    if value not in TARGETS:
        raise InvalidArgumentError(field, f"must be one of {', '.join(TARGETS)}, got {value!r}")
    if value != "all" and value not in available:
        raise InvalidArgumentError(field, f"this pipeline has no '{value}' (it has {', '.join(available)}; "
                                   "transformer_2 is the second expert of Wan2.2 A14B)")
    return value


def targets_of(target: str, available: Sequence[str]) -> tuple[str, ...]:
    return tuple(available) if target == "all" else (target,)


def _listed(value: Any, n: int, field: str, default: Any) -> list:
    if value is None:
        return [default] * n
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return list(value) * n
        if len(value) != n:
            raise InvalidArgumentError(field, f"give one value for all adapters or one per adapter ({n}), "
                                       f"got {len(value)}")
        return list(value)
    return [value] * n


def lora_requests(nickname, path=None, strength=1.0, target="all", available: Sequence[str] = ("transformer",)):
    """``[(nickname, path or None, strength, target)]``, one per adapter, every value checked."""
    names = list(nickname) if isinstance(nickname, (list, tuple)) else [nickname]
    if not names:
        raise InvalidArgumentError("lora_nickname", "give at least one nickname")
    names = [check_nickname(n) for n in names]
    if len(set(names)) != len(names):
        raise InvalidArgumentError("lora_nickname", f"names an adapter twice: {names}")
    n = len(names)
    if isinstance(path, (list, tuple)) and len(path) != n:
        raise InvalidArgumentError("lora_path", f"give one path per nickname ({n}), got {len(path)}")
    paths = list(path) if isinstance(path, (list, tuple)) else [path] * n if n == 1 or path is None else None
    if paths is None:
        raise InvalidArgumentError("lora_path", f"one path for {n} nicknames: give a list of {n} paths")
    for p in paths:
        if p is not None and not isinstance(p, (str, os.PathLike)) or p == "":
            raise InvalidArgumentError("lora_path", f"must be a file or folder path, got {p!r}")
    strengths = [check_strength(s) for s in _listed(strength, n, "strength", 1.0)]
    targets = [check_target(t, available) for t in _listed(target, n, "target", "all")]
    return list(zip(names, paths, strengths, targets))
