"""The DiTs' attention call, with one slot a sequence-parallel runtime fills (``diffc.parallel``).

Models call :func:`attention` for every softmax attention of their blocks. With the slot empty it is
torch's ``scaled_dot_product_attention`` (what the compiler lowers onto its fastest backend); a process
running one rank of a sequence-parallel pipeline installs its Ulysses / ring attention here, which
then sees each block's local shard of the sequence. ``cross=True`` marks cross-attention to replicated
text (Wan's ``attn2``): its keys and values are whole on every rank.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

_HOOK: list[Callable | None] = [None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cross: bool = False) -> torch.Tensor:
    """Softmax attention, no mask: q (B, H, Sq, D), k/v (B, H, Sk, D) -> (B, H, Sq, D)."""
    hook = _HOOK[0]
    if hook is None:
        return F.scaled_dot_product_attention(q, k, v)
    return hook(q, k, v, cross)


def install(hook: Callable | None) -> Callable | None:
    """Put ``hook(q, k, v, cross)`` in the slot (None empties it); returns the previous one."""
    previous, _HOOK[0] = _HOOK[0], hook
    return previous


def installed() -> Callable | None:
    return _HOOK[0]
