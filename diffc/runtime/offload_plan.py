"""Layerwise offload as plain data: which blocks stay resident, which ring slot each streamed block
uses, and the exact sequence of stream operations the offload hooks issue. No CUDA here, so all of
it is tested exhaustively on a CPU.

Vocabulary. A model's repeated blocks run once each per forward, in declared order. Resident blocks
keep their weights on the GPU. Streamed blocks are numbered by *position* ``k`` (0, 1, ... in run
order); position ``k`` always lives in ring slot ``k % ring_slots``. Two streams take part: the
compute stream (whatever stream runs the forward) and a copy stream. The hooks issue:

- at the start of a forward: ``Record(compute, START)``, ``Wait(copy, START)``, then the copies of
  the first ``ring_slots`` positions, each followed by ``Record(copy, copied(k))``;
- before streamed block ``k`` runs: ``Wait(compute, copied(k))``;
- after it ran: ``Record(compute, computed(k))`` and, if position ``k + ring_slots`` exists,
  ``Wait(copy, computed(k))``, its copy into the slot just freed, ``Record(copy, copied(k + R))``.

Every wait refers to an event recorded earlier in the same forward, and the copy stream's last
operation is waited on by the compute stream, so one forward is a self-contained fork/join of the
two streams: exactly what CUDA graph capture needs. ``trace`` builds the happens-before relation of
any operation sequence and ``check_schedule`` proves that no block reads a slot that is not yet
filled or already being overwritten.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Union

COMPUTE, COPY = "compute", "copy"
START = ("start",)
PLACEMENTS = ("spread", "first")


def copied(k: int) -> tuple[str, int]:
    return ("copied", k)


def computed(k: int) -> tuple[str, int]:
    return ("computed", k)


@dataclasses.dataclass(frozen=True)
class Record:
    """Record ``event`` on ``stream`` (marks everything issued there so far)."""

    stream: str
    event: tuple


@dataclasses.dataclass(frozen=True)
class Wait:
    """Make ``stream`` wait for the latest record of ``event``."""

    stream: str
    event: tuple


@dataclasses.dataclass(frozen=True)
class Copy:
    """Copy streamed position ``position`` from pinned host memory into its slot, on the copy stream."""

    position: int
    stream: str = COPY


@dataclasses.dataclass(frozen=True)
class Compute:
    """Block ``block`` runs on the compute stream (a marker for checking and simulation only)."""

    block: int
    stream: str = COMPUTE


Op = Union[Record, Wait, Copy, Compute]


class ScheduleError(AssertionError):
    """An operation sequence lets a block read a slot that does not hold its weights."""


def resident_mask(num_blocks: int, num_resident: int, placement: str = "spread") -> tuple[bool, ...]:
    """Which blocks stay resident when ``num_resident`` of ``num_blocks`` do.

    ``"first"`` keeps blocks ``0 .. n-1``. ``"spread"`` spaces the streamed blocks evenly, the last
    block always streamed and the first resident whenever any is: while a resident block computes the
    copy engine keeps filling the ring, which matters when copies take longer than compute (FLUX).
    """
    if not 0 <= num_resident <= num_blocks:
        raise ValueError(f"num_resident must be from 0 to {num_blocks}, got {num_resident}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement == "first":
        return tuple(i < num_resident for i in range(num_blocks))
    streamed = num_blocks - num_resident
    mask = [True] * num_blocks
    for j in range(streamed):  # counted back from the last block: gaps of floor/ceil(B / M)
        mask[num_blocks - 1 - j * num_blocks // streamed] = False
    return tuple(mask)


@dataclasses.dataclass(frozen=True)
class RingPlan:
    """The schedule for one model: resident mask, ring size, and the operations of each hook."""

    resident: tuple[bool, ...]
    ring_slots: int
    streamed: tuple[int, ...]  # block index of each streamed position
    position: tuple[int | None, ...]  # streamed position of each block (None: resident)
    start: tuple[Op, ...]
    before: tuple[tuple[Op, ...], ...]  # per block
    after: tuple[tuple[Op, ...], ...]  # per block

    @classmethod
    def build(cls, resident: Sequence[bool], prefetch: int) -> RingPlan:
        """``prefetch`` blocks are copied ahead of the one computing: ``ring_slots = prefetch + 1``
        (fewer when fewer blocks stream)."""
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        resident = tuple(bool(r) for r in resident)
        streamed = tuple(i for i, r in enumerate(resident) if not r)
        position = [None] * len(resident)
        for k, block in enumerate(streamed):
            position[block] = k
        m = len(streamed)
        slots = min(prefetch + 1, m)
        start: list[Op] = []
        if m:
            start = [Record(COMPUTE, START), Wait(COPY, START)]
            for k in range(slots):
                start += [Copy(k), Record(COPY, copied(k))]
        before, after = [], []
        for block in range(len(resident)):
            k = position[block]
            if k is None:
                before.append(())
                after.append(())
                continue
            before.append((Wait(COMPUTE, copied(k)),))
            ops: list[Op] = [Record(COMPUTE, computed(k))]
            if k + slots < m:
                ops += [Wait(COPY, computed(k)), Copy(k + slots), Record(COPY, copied(k + slots))]
            after.append(tuple(ops))
        return cls(resident, slots, streamed, tuple(position), tuple(start), tuple(before), tuple(after))

    @property
    def num_blocks(self) -> int:
        return len(self.resident)

    @property
    def num_streamed(self) -> int:
        return len(self.streamed)

    def slot(self, position: int) -> int:
        return position % self.ring_slots

    def forward_ops(self) -> list[Op]:
        """Every operation of one forward in the order the hooks issue them, with compute markers."""
        ops = list(self.start)
        for block in range(self.num_blocks):
            ops += [*self.before[block], Compute(block), *self.after[block]]
        return ops


@dataclasses.dataclass
class Trace:
    """Happens-before relation and simulated timing of an operation sequence."""

    ops: list[Op]
    ancestors: list[int]  # bitset of the ops that happen before op i
    end_ms: list[float]  # simulated completion time of op i

    def before(self, i: int, j: int) -> bool:
        """Op ``i`` happens before op ``j`` (stream order plus record -> wait edges)."""
        return bool(self.ancestors[j] >> i & 1)

    @property
    def total_ms(self) -> float:
        return max(self.end_ms, default=0.0)


def trace(plan: RingPlan, ops: Sequence[Op], compute_ms: Sequence[float] | None = None,
          copy_ms: Sequence[float] | None = None) -> Trace:
    """Happens-before edges and a timing simulation of ``ops`` on two in-order streams.

    A wait depends on the latest record of its event issued before it (CUDA semantics; a wait on a
    never-recorded event is a no-op). With durations, each op starts when its stream and its
    dependency are done: ``compute_ms`` per block, ``copy_ms`` per streamed position.
    """
    last_on_stream: dict[str, int] = {}
    last_record: dict[tuple, int] = {}
    ancestors: list[int] = []
    end: list[float] = []
    for i, op in enumerate(ops):
        deps = [last_on_stream.get(op.stream)]
        if isinstance(op, Wait):
            deps.append(last_record.get(op.event))
        bits, t = 0, 0.0
        for d in deps:
            if d is not None:
                bits |= ancestors[d] | (1 << d)
                t = max(t, end[d])
        if isinstance(op, Compute) and compute_ms is not None:
            t += compute_ms[op.block]
        elif isinstance(op, Copy) and copy_ms is not None:
            t += copy_ms[op.position]
        if isinstance(op, Record):
            last_record[op.event] = i
        last_on_stream[op.stream] = i
        ancestors.append(bits)
        end.append(t)
    return Trace(list(ops), ancestors, end)


def check_schedule(plan: RingPlan, ops: Sequence[Op]) -> Trace:
    """Raise ``ScheduleError`` unless every streamed block reads its own weights, race-free.

    For each ``Compute(b)`` of a streamed block in slot ``s``: the copies into ``s`` ordered before it
    must be totally ordered and the latest must be ``b``'s; every other copy into ``s`` must be ordered
    after it. Also checks that the copy stream is joined back into the compute stream at the end.
    """
    t = trace(plan, ops)
    writers: dict[int, list[int]] = {}
    for i, op in enumerate(ops):
        if isinstance(op, Copy):
            writers.setdefault(plan.slot(op.position), []).append(i)
    for i, op in enumerate(ops):
        if not isinstance(op, Compute) or plan.position[op.block] is None:
            continue
        k = plan.position[op.block]
        slot = plan.slot(k)
        earlier = [w for w in writers.get(slot, []) if t.before(w, i)]
        for w in writers.get(slot, []):
            if w not in earlier and not t.before(i, w):
                raise ScheduleError(f"block {op.block} (op {i}) reads slot {slot} while copy op {w} "
                                    f"(position {ops[w].position}) may overwrite it")
        if not earlier:
            raise ScheduleError(f"block {op.block} (op {i}) reads slot {slot} before any copy filled it")
        latest = earlier[-1]
        if any(not t.before(w, latest) for w in earlier[:-1]):
            raise ScheduleError(f"copies into slot {slot} before block {op.block} are not ordered")
        if ops[latest].position != k:
            raise ScheduleError(f"block {op.block} (op {i}) reads slot {slot} holding position "
                                f"{ops[latest].position}, not its own position {k}")
    copy_ops = [i for i, op in enumerate(ops) if op.stream == COPY]
    compute_ops = [i for i, op in enumerate(ops) if op.stream == COMPUTE]
    if copy_ops and (not compute_ops or not t.before(copy_ops[-1], compute_ops[-1])):
        raise ScheduleError("the copy stream is not joined back into the compute stream")
    return t


def pack_layout(nbytes: Sequence[int], align: int = 512) -> tuple[list[int], int]:
    """Byte offsets placing tensors of ``nbytes`` one after another, each ``align``-aligned; and the total."""
    offsets, total = [], 0
    for n in nbytes:
        total = -(-total // align) * align
        offsets.append(total)
        total += n
    return offsets, total


def ring_bytes(plan: RingPlan, block_bytes: Sequence[int]) -> int:
    """GPU bytes of the ring: ``ring_slots`` slots, each the size of the largest streamed block."""
    return plan.ring_slots * max((block_bytes[b] for b in plan.streamed), default=0)


def resident_bytes(plan: RingPlan, block_bytes: Sequence[int]) -> int:
    return sum(b for b, r in zip(block_bytes, plan.resident) if r)


def choose_resident_count(block_bytes: Sequence[int], prefetch: int, budget: int,
                          placement: str = "spread") -> int:
    """The most blocks that can stay resident with resident weights + ring within ``budget`` bytes.

    Returns 0 when even streaming every block does not fit (the caller decides what to say).
    """
    n = len(block_bytes)
    for count in range(n, -1, -1):
        plan = RingPlan.build(resident_mask(n, count, placement), prefetch)
        if resident_bytes(plan, block_bytes) + ring_bytes(plan, block_bytes) <= budget:
            return count
    return 0
