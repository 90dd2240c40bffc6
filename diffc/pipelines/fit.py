"""Checks that a checkpoint's components belong together: the widths and channels one hands the next.

A text encoder, VAE or image encoder from another model of the family loads on its own and then fails deep inside
a forward (a matmul of the wrong width, or a DiT shape check naming an argument no request has), some only at the
decode after the whole denoising; these checks name both components before any work.
"""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError


def setting(component: Any, *names: str) -> Any:
    """The first of ``names`` (dotted for nested configs, "text_config.hidden_size") in ``component.config``, or
    None where the component has no such setting (then nothing is compared)."""
    for name in names:
        value = getattr(component, "config", None)
        for part in name.split("."):
            value = getattr(value, part, None)
        if value is not None:
            return value
    return None


def check_fit(pipeline_class: str, pairs: list[tuple[str, Any, str, Any]]) -> None:
    """Raise ``CheckpointError`` for the first ``(what, value, other, expected)`` whose two values differ."""
    for what, value, other, expected in pairs:
        if value is not None and expected is not None and value != expected:
            raise CheckpointError(f"{pipeline_class}: {what} is {value} but {other} is {expected}; the checkpoint's "
                                  "components do not belong together")
