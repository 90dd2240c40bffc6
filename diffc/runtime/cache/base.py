"""The block-level step cache both strategies share: which blocks may be skipped, the per-branch state,
the cached residuals, and what a skipped block returns.

The repeated blocks of every region, in forward order, split into the *first* ``fn`` (always computed),
the *last* ``bn`` (always computed) and the *middle* ones in between. Once per DiT forward the strategy
decides (on the host) whether the middle blocks run. When they run, each region's middle part records
its output minus input per stream (its residual). When they are skipped, a middle block returns its
input streams unchanged, and the last middle block of each region adds that region's cached residual
(or TaylorSeer's forecast of it), so the region's output is its input plus the residual.

Steps and CFG branches: the pipeline calls :meth:`begin_step` at each denoising step; the n-th DiT
forward inside a step is branch n, with its own state (two DiT calls per step, as true CFG makes, keep
two caches). One batch-2 forward holding both CFG halves (Wan) is one branch: one decision for the pair.
Without step calls, every forward is a step of its own. Outside :meth:`begin_generation` /
:meth:`end_generation` the cache is inert: blocks run as if it were not there.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from ...errors import InvalidArgumentError
from ...models.structure import block_streams, residual_regions
from .config import CacheConfig
from .state import BranchState, CacheCounters
from .streams import StreamIO
from .taylorseer import TaylorSeer

FIRST, MIDDLE, LAST = "first", "middle", "last"


@dataclasses.dataclass
class _Forward:
    step: int
    branch: BranchState
    skip: bool | None = None
    diff: float | None = None
    first_input: torch.Tensor | None = None  # the decision stream entering block 0
    middle_inputs: dict[str, tuple[torch.Tensor, ...]] = dataclasses.field(default_factory=dict)


class BlockStepCache:
    """Base of :class:`~diffc.runtime.cache.dbcache.DBCache` and :class:`~diffc.runtime.cache.teacache.TeaCache`.

    Subclasses set ``fn``/``bn`` in ``_partition`` and decide in ``_at_first_block`` (before any block
    runs) or ``_after_first_blocks`` (on the output of block ``fn - 1``) by setting ``forward.skip``.
    """

    kind = ""
    graph_safe = False  # decides on the host between blocks: CUDA graphs capture block segments instead

    def __init__(self, config: CacheConfig, dit: nn.Module):
        self.config = config
        self.model = type(dit).__name__
        regions = residual_regions(dit)
        self.regions = [(r.name, len(r.blocks)) for r in regions]
        self.streams = {r.name: StreamIO(block_streams(dit, r), r.blocks[0]) for r in regions}
        self.total = sum(n for _, n in self.regions)
        self.decision_stream = self.streams[regions[0].name].names[0]
        self.fn, self.bn = self._partition(dit)
        self.middle = self.total - self.fn - self.bn
        self.roles: dict[tuple[str, int], str] = {}
        self.middle_range: dict[str, tuple[int, int]] = {}
        g = 0
        for name, n in self.regions:
            for i in range(n):
                role = FIRST if g < self.fn else LAST if g >= self.total - self.bn else MIDDLE
                self.roles[(name, i)] = role
                if role == MIDDLE:
                    start, _ = self.middle_range.get(name, (i, i))
                    self.middle_range[name] = (start, i + 1)
                g += 1
        self.threshold = self._threshold()
        self.warmup_steps = config.warmup_steps if config.warmup_steps is not None else self._default_warmup()
        self.active = False
        self._reset()

    # ---- overridden by the strategies -------------------------------------------------------------

    def _partition(self, dit: nn.Module) -> tuple[int, int]:
        raise NotImplementedError

    def _threshold(self) -> float:
        raise NotImplementedError

    def _default_warmup(self) -> int:
        raise NotImplementedError

    def _at_first_block(self, fwd: _Forward, block: nn.Module, io: StreamIO, args: tuple, kwargs: dict) -> None:
        pass

    def _after_first_blocks(self, fwd: _Forward, values: tuple[torch.Tensor, ...], io: StreamIO) -> None:
        pass

    def _describe_strategy(self) -> dict[str, Any]:
        return {}

    def warnings(self) -> list[str]:
        """What a user should know about these settings on this model (shown with the generation)."""
        return []

    # ---- generations and steps ----------------------------------------------------------------------

    def begin_generation(self, total_steps: int | None = None) -> None:
        """Forget everything from before and start counting: the cache acts until :meth:`end_generation`."""
        self._reset()
        self.total_steps = total_steps
        self.active = True

    def end_generation(self) -> None:
        """Drop the cached tensors (the counters stay for ``describe()``); the cache is inert again."""
        self.active = False
        self.branches = {}
        self._fwd = None

    def begin_step(self, index: int) -> None:
        """Denoising step ``index`` starts: the next DiT forward is its branch 0."""
        self._step, self._calls_in_step, self._stepped = index, 0, True

    def _reset(self) -> None:
        self.counters = CacheCounters()
        self.branches: dict[int, BranchState] = {}
        self.total_steps: int | None = None
        self._fwd: _Forward | None = None
        self._step, self._calls_in_step, self._stepped, self._forwards = 0, 0, False, 0

    # ---- the layer's two hooks into the stack ---------------------------------------------------------

    def wrap_forward(self, entry: Callable) -> Callable:
        """The DiT call: opens one forward (its step and branch), closes it with its counts."""

        def forward(*args, **kwargs):
            if not self.active:
                return entry(*args, **kwargs)
            if self._stepped:
                step, branch = self._step, self._calls_in_step
                self._calls_in_step += 1
            else:
                step, branch = self._forwards, 0
            self._forwards += 1
            state = self.branches.setdefault(branch, BranchState())
            fwd = self._fwd = _Forward(step, state)
            try:
                out = entry(*args, **kwargs)
            finally:
                self._fwd = None
            skipped = bool(fwd.skip)
            state.skips_in_a_row = state.skips_in_a_row + 1 if skipped else 0
            if not skipped and fwd.first_input is not None:
                state.input_shape = tuple(fwd.first_input.shape)
            self.counters.record(step, skipped, fwd.diff, self.middle)
            return out

        return forward

    def wrap_block(self, region: str, index: int, block: nn.Module, forward: Callable) -> Callable:
        """``block``'s forward under the cache (``forward``: the compiled or eager one beneath); a block outside
        the residual regions (a diffusers patch embedder) keeps ``forward``."""
        if (region, index) not in self.roles:
            return forward
        role, io = self.roles[(region, index)], self.streams[region]
        is_block0 = (region, index) == (self.regions[0][0], 0)
        decides_after = self.fn > 0 and self._global(region, index) == self.fn - 1
        start, stop = self.middle_range.get(region, (-1, -1))

        def call(*args, **kwargs):
            fwd = self._fwd
            if fwd is None:
                return forward(*args, **kwargs)
            if is_block0:
                fwd.first_input = io.read(args, kwargs)[0]
                self._at_first_block(fwd, block, io, args, kwargs)
            if role != MIDDLE:
                out = forward(*args, **kwargs)
                if decides_after:
                    self._after_first_blocks(fwd, io.split(out), io)
                return out
            if fwd.skip:
                values = io.read(args, kwargs)
                if index == stop - 1:
                    values = self._add_residual(fwd, region, values)
                return io.output(values)
            if index == start:
                fwd.middle_inputs[region] = io.read(args, kwargs)
            out = forward(*args, **kwargs)
            if index == stop - 1:
                self._store_residual(fwd, region, io.split(out))
            return out

        return call

    # ---- residuals --------------------------------------------------------------------------------

    def _store_residual(self, fwd: _Forward, region: str, out: tuple[torch.Tensor, ...]) -> None:
        # a stream the region's last block returns as None (SD3's last joint block drops the text) stays None
        residual = tuple(None if o is None else o - i for o, i in zip(out, fwd.middle_inputs.pop(region)))
        fwd.branch.residuals[region] = residual
        if self.config.taylorseer:
            fwd.branch.extrapolators.setdefault(region, TaylorSeer(self.config.taylorseer_order)).update(
                fwd.step, residual)

    def _add_residual(self, fwd: _Forward, region: str, values: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        seer = fwd.branch.extrapolators.get(region)
        residual = seer.forecast(fwd.step) if seer is not None else fwd.branch.residuals[region]
        return tuple(None if r is None else v + r for v, r in zip(values, residual))

    def _can_skip(self, fwd: _Forward) -> bool:
        """Every middle region has a residual cached by a forward of this branch with the same input shape."""
        return set(fwd.branch.residuals) == set(self.middle_range) and fwd.first_input is not None \
            and fwd.branch.input_shape == tuple(fwd.first_input.shape)

    # ---- structure --------------------------------------------------------------------------------

    def _global(self, region: str, index: int) -> int:
        g = 0
        for name, n in self.regions:
            if name == region:
                return g + index
            g += n
        raise KeyError(region)

    def segments(self) -> list[tuple[str, int, int]]:
        """``(region, start, stop)`` runs of blocks that always run together (same role, same region):
        what CUDA graphs capture when this cache decides between blocks."""
        out = []
        for name, n in self.regions:
            start = 0
            for i in range(1, n + 1):
                if i == n or self.roles[(name, i)] != self.roles[(name, start)]:
                    out.append((name, start, i))
                    start = i
        return out

    def segment_graphs(self, graph_class) -> Any:
        """A :class:`~diffc.runtime.cache.graphs.SegmentGraphs` capturing this cache's segments."""
        from .graphs import SegmentGraphs

        return SegmentGraphs(self.segments(), self.streams, graph_class)

    def check_blocks(self, fn: int, bn: int, where: tuple[str, str]) -> None:
        if fn + bn >= self.total:
            raise InvalidArgumentError(where[0] if fn >= self.total else where[1],
                                       f"fn={fn} + bn={bn} leaves no middle block to skip: {self.model} has "
                                       f"{self.total} repeated blocks ({', '.join(f'{n} {r}' for r, n in self.regions)})")

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "options": self.config.options(), "threshold": self.threshold,
                "warmup_steps": self.warmup_steps, "max_skips_in_a_row": self.config.max_skips_in_a_row,
                "blocks": {"first": self.fn, "middle": self.middle, "last": self.bn},
                **self._describe_strategy(), **self.counters.as_dict()}
