"""Failures of collectives as one clear error: a dead or stuck peer, a timeout."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch.distributed as dist

from .mesh import ParallelError


@contextlib.contextmanager
def guarded(what: str) -> Iterator[None]:
    """Turn a collective's failure inside the block (timeout, closed connection, NCCL abort) into a
    :class:`ParallelError` that says a worker died or hangs, instead of a trace from inside torch."""
    try:
        yield
    except ParallelError:
        raise
    except (RuntimeError, dist.DistError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not _looks_distributed(exc, text):
            raise
        raise ParallelError(f"{what}: a collective with the other workers failed ({text[:300]}); a worker died, "
                            "hangs or ran past --parallel-timeout") from None


def _looks_distributed(exc: BaseException, text: str) -> bool:
    if isinstance(exc, dist.DistError):
        return True
    words = ("timed out", "timeout", "connection", "gloo", "nccl", "peer", "broken pipe", "closed")
    return any(w in text.lower() for w in words)
