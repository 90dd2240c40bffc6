"""The process groups of one parallel layout, on torch.distributed (NCCL on GPU, gloo on CPU).

:func:`init_mesh` joins the default group (from ``torchrun``'s environment or the launcher's) with the
layout's collective timeout and builds, for this rank, its CFG group, its sequence group (Ulysses x
ring, ordered by position in the sequence), its Ulysses group and its ring group. With ``replicas`` D
(``diffc serve --num-gpus N --data-parallel D``) the world is D groups of N consecutive ranks, each
with its own copy of those groups; ranks in one group never take part in another's collectives.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from ..errors import DiffcError
from .config import ParallelConfig


class ParallelError(DiffcError):
    """A parallel run failed: a worker died, a collective timed out, the process group could not start."""


@dataclasses.dataclass
class Mesh:
    """This rank's place in the layout and its groups (None where the degree is 1)."""

    config: ParallelConfig
    rank: int
    device: torch.device
    cfg_index: int
    ulysses_index: int
    ring_index: int
    cfg_group: object | None
    seq_group: object | None
    ulysses_group: object | None
    ring_group: object | None
    ring_ranks: list[int]
    replica: int = 0  # which group of ``config.world`` ranks this rank belongs to (serve --data-parallel)

    @property
    def seq_index(self) -> int:
        """Which shard of the sequence this rank holds (``ring_index * U + ulysses_index``)."""
        return self.ring_index * self.config.ulysses + self.ulysses_index

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        return {**self.config.describe(), "rank": self.rank, "backend": dist.get_backend(),
                "cfg_index": self.cfg_index, "ulysses_index": self.ulysses_index, "ring_index": self.ring_index}


def backend_for(device: torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_mesh(config: ParallelConfig, device: torch.device, replicas: int = 1) -> Mesh:
    """Join (or reuse) the default process group and build this rank's groups for ``config``; with ``replicas``
    D, the world is D groups of ``config.world`` consecutive ranks, each laid out as ``config``."""
    device = torch.device(device)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "RANK" not in os.environ:
            raise ParallelError("no process group: start the workers with `diffc run --num-gpus N` or torchrun")
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        try:
            dist.init_process_group(backend_for(device), timeout=config.timeout, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the rendezvous error is the user's to read
            raise ParallelError(f"the process group did not start ({type(exc).__name__}: {exc})") from None
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != config.world * replicas:
        needs = config.text() if replicas == 1 else f"{replicas} groups of {config.text()}"
        raise ParallelError(f"{world} processes joined, but the layout needs {config.world * replicas} ({needs})")
    u, r = config.ulysses, config.ring
    seq = u * r
    replica, local = divmod(rank, config.world)
    cfg_index, within = divmod(local, seq)
    ring_index, ulysses_index = divmod(within, u)
    groups = {}
    # Every rank must create every group, in the same order (torch.distributed's rule).
    for g in range(replicas):
        for kind, members in _all_groups(config):
            for ranks in members:
                ranks = [g * config.world + x for x in ranks]
                group = dist.new_group(ranks, timeout=config.timeout) if len(ranks) > 1 else None
                if rank in ranks:
                    groups[kind] = (group, ranks)
    return Mesh(config, rank, device, cfg_index, ulysses_index, ring_index,
                cfg_group=groups["cfg"][0], seq_group=groups["seq"][0], ulysses_group=groups["ulysses"][0],
                ring_group=groups["ring"][0], ring_ranks=groups["ring"][1], replica=replica)


def _all_groups(config: ParallelConfig):
    u, r, c = config.ulysses, config.ring, config.cfg
    seq = u * r
    yield "cfg", [[ci * seq + s for ci in range(c)] for s in range(seq)]
    yield "seq", [[ci * seq + s for s in range(seq)] for ci in range(c)]
    yield "ulysses", [[ci * seq + ri * u + ui for ui in range(u)] for ci in range(c) for ri in range(r)]
    yield "ring", [[ci * seq + ri * u + ui for ri in range(r)] for ci in range(c) for ui in range(u)]
