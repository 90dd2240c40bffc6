"""The layerwise ring schedule as data: residency placement, slots, the hooks' operations, and the
happens-before checker that proves them race-free, over many block counts, ring depths and masks."""

from __future__ import annotations

import itertools

import pytest

from diffc.runtime.offload_plan import (
    COMPUTE,
    COPY,
    START,
    Compute,
    Copy,
    Record,
    RingPlan,
    ScheduleError,
    Wait,
    check_schedule,
    choose_resident_count,
    computed,
    copied,
    pack_layout,
    resident_bytes,
    resident_mask,
    ring_bytes,
    trace,
)

PREFETCH = (1, 2, 3, 5)


def _masks(num_blocks: int):
    return itertools.product((False, True), repeat=num_blocks)


# ---------------------------------------------------------------------------------------------
# Placement of resident blocks
# ---------------------------------------------------------------------------------------------


def test_resident_mask_examples():
    def draw(mask):
        return "".join("R" if r else "." for r in mask)

    assert draw(resident_mask(7, 2, "first")) == "RR....."
    assert draw(resident_mask(7, 2, "spread")) == "R..R..."
    assert draw(resident_mask(4, 2, "spread")) == "R.R."
    assert draw(resident_mask(5, 4, "spread")) == "RRRR."
    assert draw(resident_mask(5, 0, "spread")) == "....."
    assert draw(resident_mask(5, 5, "spread")) == "RRRRR"
    assert draw(resident_mask(10, 7, "spread")) == "RRR.RR.RR."


@pytest.mark.parametrize("placement", ["first", "spread"])
def test_resident_mask_properties(placement):
    for num_blocks in range(1, 61):
        for n in range(num_blocks + 1):
            mask = resident_mask(num_blocks, n, placement)
            assert len(mask) == num_blocks and sum(mask) == n
            if placement == "spread" and 0 < n < num_blocks:
                assert mask[0] and not mask[-1]
                # streamed blocks are evenly spaced: gaps between them differ by at most one
                streamed = [i for i, r in enumerate(mask) if not r]
                gaps = [b - a for a, b in zip([-1] + streamed, streamed)]
                assert max(gaps) - min(gaps) <= 1


def test_resident_mask_rejects_bad_values():
    with pytest.raises(ValueError, match="num_resident must be from 0 to 3"):
        resident_mask(3, 4)
    with pytest.raises(ValueError, match="placement"):
        resident_mask(3, 1, "middle")


# ---------------------------------------------------------------------------------------------
# The plan and its operations
# ---------------------------------------------------------------------------------------------


def test_plan_operations_exact():
    plan = RingPlan.build((True, False, False, False), prefetch=1)
    assert plan.streamed == (1, 2, 3) and plan.position == (None, 0, 1, 2) and plan.ring_slots == 2
    assert [plan.slot(k) for k in range(3)] == [0, 1, 0]
    assert plan.start == (Record(COMPUTE, START), Wait(COPY, START), Copy(0), Record(COPY, copied(0)),
                          Copy(1), Record(COPY, copied(1)))
    assert plan.before == ((), (Wait(COMPUTE, copied(0)),), (Wait(COMPUTE, copied(1)),), (Wait(COMPUTE, copied(2)),))
    assert plan.after[0] == ()
    assert plan.after[1] == (Record(COMPUTE, computed(0)), Wait(COPY, computed(0)), Copy(2), Record(COPY, copied(2)))
    assert plan.after[2] == (Record(COMPUTE, computed(1)),)
    assert plan.after[3] == (Record(COMPUTE, computed(2)),)


def test_all_resident_plan_has_no_operations():
    plan = RingPlan.build((True,) * 4, prefetch=2)
    assert plan.ring_slots == 0 and plan.num_streamed == 0
    assert plan.forward_ops() == [Compute(i) for i in range(4)]


def test_prefetch_must_be_positive():
    with pytest.raises(ValueError, match="prefetch"):
        RingPlan.build((False,), prefetch=0)


def _check_plan(plan: RingPlan, prefetch: int) -> None:
    m = plan.num_streamed
    assert plan.ring_slots == min(prefetch + 1, m)
    one = plan.forward_ops()
    copies = [op.position for op in one if isinstance(op, Copy)]
    assert copies == list(range(m))  # each streamed block copied exactly once per forward, in order
    assert sum(isinstance(op, Compute) for op in one) == plan.num_blocks
    # every wait names an event recorded earlier in the same forward (capturable as one graph)
    recorded = set()
    for op in one:
        if isinstance(op, Record):
            recorded.add(op.event)
        elif isinstance(op, Wait):
            assert op.event in recorded
    check_schedule(plan, one)
    check_schedule(plan, one + one + one)  # the ring reused across forwards


@pytest.mark.parametrize("prefetch", PREFETCH)
def test_every_mask_is_race_free(prefetch):
    """All 2^B residency masks for B <= 10 blocks."""
    for num_blocks in range(1, 11):
        for mask in _masks(num_blocks):
            _check_plan(RingPlan.build(mask, prefetch), prefetch)


@pytest.mark.parametrize("placement", ["first", "spread"])
def test_large_models_are_race_free(placement):
    """Block counts of real DiTs (Wan 1.3B: 30, 14B: 40, FLUX: 57) and around them."""
    for num_blocks in (19, 30, 40, 57, 60):
        for n in sorted({0, 1, num_blocks // 3, num_blocks // 2, num_blocks - 2, num_blocks - 1, num_blocks}):
            for prefetch in PREFETCH:
                _check_plan(RingPlan.build(resident_mask(num_blocks, n, placement), prefetch), prefetch)


# ---------------------------------------------------------------------------------------------
# The checker has teeth
# ---------------------------------------------------------------------------------------------


def _without(ops, victim):
    out = list(ops)
    out.remove(victim)
    return out


def test_checker_catches_missing_wait_for_copy():
    plan = RingPlan.build((False,) * 3, prefetch=1)
    ops = _without(plan.forward_ops(), Wait(COMPUTE, copied(1)))
    with pytest.raises(ScheduleError, match="block 1 .* may overwrite"):
        check_schedule(plan, ops)


def test_checker_catches_slot_overwritten_while_read():
    plan = RingPlan.build((False,) * 3, prefetch=1)
    ops = _without(plan.forward_ops(), Wait(COPY, computed(0)))
    with pytest.raises(ScheduleError, match="block 0 .* copy op .* \\(position 2\\) may overwrite it"):
        check_schedule(plan, ops)


def test_checker_catches_copy_issued_too_early():
    """A copy into a slot issued before the previous reader's event was recorded waits on nothing."""
    plan = RingPlan.build((False,) * 3, prefetch=1)
    ops = plan.forward_ops()
    late = [Wait(COPY, computed(0)), Copy(2), Record(COPY, copied(2))]
    start = ops.index(late[0])
    ops = ops[:start] + ops[start + 3 :]
    ops = ops[:6] + late + ops[6:]  # right after the prologue: computed(0) not recorded yet
    with pytest.raises(ScheduleError, match="may overwrite"):
        check_schedule(plan, ops)


def test_checker_catches_missing_join():
    plan = RingPlan.build((False,) * 2, prefetch=1)
    ops = plan.forward_ops() + [Record(COPY, ("stray",))]  # copy-stream work nothing waits for
    with pytest.raises(ScheduleError, match="not joined"):
        check_schedule(plan, ops)


def test_checker_catches_read_before_any_copy():
    plan = RingPlan.build((False,) * 2, prefetch=1)
    with pytest.raises(ScheduleError, match="before any copy filled it"):
        check_schedule(plan, [Compute(0)])


def test_checker_catches_wrong_block_in_slot():
    plan = RingPlan.build((False,) * 3, prefetch=1)
    ops = [Copy(2), Record(COPY, copied(2)), Wait(COMPUTE, copied(2)), Compute(0)]
    with pytest.raises(ScheduleError, match="holding position 2, not its own position 0"):
        check_schedule(plan, ops)


# ---------------------------------------------------------------------------------------------
# Simulated timelines: copies overlap compute
# ---------------------------------------------------------------------------------------------


def _simulate(plan, compute_ms, copy_ms_per_block):
    copy_ms = [copy_ms_per_block[b] for b in plan.streamed]
    return trace(plan, plan.forward_ops(), compute_ms, copy_ms).total_ms


@pytest.mark.parametrize("prefetch", (1, 2))
def test_compute_bound_hides_all_copies_but_the_first(prefetch):
    """Wan2.1-14B-like: a block computes in ~82 ms and copies in ~13 ms."""
    plan = RingPlan.build((False,) * 40, prefetch)
    assert _simulate(plan, [82.0] * 40, [13.0] * 40) == 13.0 + 40 * 82.0


def test_copy_bound_is_the_copy_engine_time():
    """FLUX-like: every copy (12 ms) is longer than a block (2 ms); the copy engine never idles."""
    plan = RingPlan.build((False,) * 10, prefetch=1)
    assert _simulate(plan, [2.0] * 10, [12.0] * 10) == 10 * 12.0 + 2.0


def test_resident_model_takes_its_compute_time():
    plan = RingPlan.build((True,) * 5, prefetch=1)
    assert _simulate(plan, [3.0] * 5, [9.0] * 5) == 15.0


def test_spread_residency_beats_first_when_copies_dominate():
    """14 of 20 blocks resident, copies 3x compute. Resident-first leaves the copy engine idle while the
    resident blocks run (the ring is full); spread keeps it busy, and here hides every copy."""
    compute, copy = [2.0] * 20, [6.0] * 20
    first = _simulate(RingPlan.build(resident_mask(20, 14, "first"), 1), compute, copy)
    spread = _simulate(RingPlan.build(resident_mask(20, 14, "spread"), 1), compute, copy)
    assert spread == 20 * 2.0
    assert first == 14 * 2.0 + 4 * 6.0 + 2.0 + 2.0  # copies 2..5 start only once the streamed blocks run


# ---------------------------------------------------------------------------------------------
# Memory: layout, ring size, automatic residency
# ---------------------------------------------------------------------------------------------


def test_pack_layout_aligns_every_tensor():
    assert pack_layout([10, 512, 1, 0, 3], align=512) == ([0, 512, 1024, 1536, 1536], 1539)
    assert pack_layout([], align=512) == ([], 0)


def test_ring_and_resident_bytes():
    sizes = [100, 300, 100, 200]
    plan = RingPlan.build(resident_mask(4, 1, "spread"), prefetch=1)  # R...: streams 1, 2, 3
    assert resident_bytes(plan, sizes) == 100
    assert ring_bytes(plan, sizes) == 2 * 300


def test_choose_resident_count_exact():
    sizes = [100] * 10
    # streaming needs a ring of prefetch + 1 slots; all resident needs no ring
    assert choose_resident_count(sizes, 1, budget=1000) == 10
    assert choose_resident_count(sizes, 1, budget=999) == 7  # 7 resident + 2 slots = 900
    assert choose_resident_count(sizes, 2, budget=999) == 6  # 6 + 3 slots
    assert choose_resident_count(sizes, 1, budget=200) == 0
    assert choose_resident_count(sizes, 1, budget=50) == 0  # nothing fits: the caller warns


def test_choose_resident_count_mixed_sizes():
    sizes = [300] * 2 + [100] * 4  # FLUX-like: big double blocks, then small single blocks
    for budget in range(0, 1400, 50):
        count = choose_resident_count(sizes, 1, budget, "first")
        plan = RingPlan.build(resident_mask(6, count, "first"), 1)
        if count:
            assert resident_bytes(plan, sizes) + ring_bytes(plan, sizes) <= budget
        if count < 6:
            bigger = RingPlan.build(resident_mask(6, count + 1, "first"), 1)
            assert resident_bytes(bigger, sizes) + ring_bytes(bigger, sizes) > budget
