"""How one request is spread over N processes: CFG-parallel x Ulysses x ring (``N = cfg * U * R``).

- ``cfg`` (1 or 2): the ranks of the two CFG groups each run half of the DiT's batch (Wan's conditional
  and unconditional pass; FLUX's batch of prompts); one all-gather joins the halves.
- ``ulysses`` (U): an all-to-all turns sequence-sharded q/k/v into head-sharded ones around attention
  and back; the heads must divide by U.
- ``ring`` (R): key/value blocks travel around a ring of R ranks, merged with the online softmax
  (log-sum-exp), so attention over the whole sequence never sits on one rank.

Ranks are laid out ``rank = cfg_index * (U * R) + ring_index * U + ulysses_index``: the Ulysses group,
which moves the most data, is made of neighbouring GPUs.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from ..errors import InvalidArgumentError

DEFAULT_TIMEOUT_S = 600.0


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """``world`` processes = ``cfg * ulysses * ring``; ``timeout_s``: how long a collective may wait for
    a peer before the run fails (a dead or stuck worker)."""

    world: int = 1
    cfg: int = 1
    ulysses: int = 1
    ring: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self):
        for field in ("world", "cfg", "ulysses", "ring"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(_FLAGS[field], f"must be a positive integer, got {value!r}")
        if self.cfg not in (1, 2):
            raise InvalidArgumentError("--enable-cfg-parallel", f"CFG-parallel splits a pair: degree 1 or 2, got {self.cfg}")
        if self.cfg * self.ulysses * self.ring != self.world:
            raise InvalidArgumentError(
                "--num-gpus", f"{self.world} GPU(s) cannot run cfg {self.cfg} x ulysses {self.ulysses} x ring "
                f"{self.ring} = {self.cfg * self.ulysses * self.ring}; valid with {self.world}: "
                f"{'; '.join(valid_layouts(self.world))}")
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 1 <= t <= 86400:
            raise InvalidArgumentError("--parallel-timeout", f"must be from 1 to 86400 seconds, got {t!r}")

    @property
    def sequence(self) -> int:
        """Ranks sharing one sequence (Ulysses x ring)."""
        return self.ulysses * self.ring

    @property
    def timeout(self) -> timedelta:
        return timedelta(seconds=self.timeout_s)

    def describe(self) -> dict:
        return {"world": self.world, "cfg": self.cfg, "ulysses": self.ulysses, "ring": self.ring,
                "timeout_s": self.timeout_s}

    def text(self) -> str:
        return f"{self.world} processes: cfg {self.cfg} x ulysses {self.ulysses} x ring {self.ring}"


_FLAGS = {"world": "--num-gpus", "cfg": "--enable-cfg-parallel", "ulysses": "--ulysses-degree",
          "ring": "--ring-degree"}


def valid_layouts(world: int) -> list[str]:
    """Every ``--enable-cfg-parallel / --ulysses-degree / --ring-degree`` combination for ``world`` processes."""
    out = []
    for cfg in (1, 2):
        if world % cfg:
            continue
        rest = world // cfg
        for ulysses in range(1, rest + 1):
            if rest % ulysses == 0:
                flags = (["--enable-cfg-parallel"] if cfg == 2 else []) + [f"--ulysses-degree {ulysses}",
                                                                           f"--ring-degree {rest // ulysses}"]
                out.append(" ".join(flags))
    return out


def resolve(world: int, cfg_parallel: bool = False, ulysses: int | None = None, ring: int | None = None,
            timeout_s: float | None = None) -> ParallelConfig:
    """The layout the flags ask for; an unset degree takes what is left (Ulysses first, then ring)."""
    cfg = 2 if cfg_parallel else 1
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise InvalidArgumentError("--num-gpus", f"must be a positive integer, got {world!r}")
    for flag, degree in (("--ulysses-degree", ulysses), ("--ring-degree", ring)):
        if degree is not None and (isinstance(degree, bool) or not isinstance(degree, int) or degree < 1):
            raise InvalidArgumentError(flag, f"must be a positive integer, got {degree!r}")
    if cfg_parallel and world % 2:
        raise InvalidArgumentError("--enable-cfg-parallel", f"needs an even number of GPUs, got {world}; valid with "
                                   f"{world}: {'; '.join(valid_layouts(world))}")
    rest = world // cfg if world % cfg == 0 else world
    if ulysses is None and ring is None:
        ulysses, ring = rest, 1
    elif ulysses is None:
        ulysses = rest // ring if ring and rest % ring == 0 else 0
    elif ring is None:
        ring = rest // ulysses if ulysses and rest % ulysses == 0 else 0
    if not ulysses or not ring:
        raise InvalidArgumentError("--num-gpus", f"{world} GPU(s) cannot be split as asked; valid with {world}: "
                                   f"{'; '.join(valid_layouts(world))}")
    return ParallelConfig(world=world, cfg=cfg, ulysses=ulysses, ring=ring,
                          timeout_s=DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)


def check_model(config: ParallelConfig, heads: int, model: str) -> None:
    """Ulysses shards the attention heads: refuse a degree that does not divide them."""
    if heads % config.ulysses:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise InvalidArgumentError("--ulysses-degree", f"{model} has {heads} attention heads, which Ulysses degree "
                                   f"{config.ulysses} does not divide; accepted degrees: "
                                   f"{', '.join(map(str, divisors))} (use --ring-degree for the rest)")
