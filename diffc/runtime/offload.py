"""Offload: weights live in pinned host memory and come to the GPU only when, and where, needed.

``apply_offload(components, device, mode, ...)`` after loading; it returns an ``OffloadHandle``
(``counters``, ``describe()`` for the perf dump, ``remove()`` to go back to fully resident).

Modes
- ``"none"``: nothing moves.
- ``"layerwise"``: the repeated blocks of every native model that declares ``_repeated_blocks`` (the
  DiT) live in pinned host memory, one contiguous page-locked buffer per block; everything else of
  that model stays on the GPU. The components named in ``text_encoders`` also live in pinned host
  memory and are uploaded for their forward only.
- ``"model"``: every ``nn.Module`` component (text encoders, DiT, VAE) lives in pinned host memory and
  is uploaded when it starts (its forward, ``encode`` or ``decode``); the previous one is dropped from
  the GPU then, as diffusers' model CPU offload does.

Ring (layerwise). A streamed block's parameters are fixed views into one of ``ring_slots =
offload_prefetch + 1`` GPU buffers: streamed block number ``k`` always uses slot ``k % ring_slots``.
A copy stream prefetches the next ``offload_prefetch`` blocks while the current one computes; events
order each copy after the last reader of its slot and each block after its copy. The schedule is
plain data in ``offload_plan`` (tested exhaustively on CPU); the hooks here only issue it.
Resident blocks (``resident_blocks``, or chosen automatically) are spread evenly between the streamed
ones, so the copy engine keeps working while they compute. Weights keep the 512-byte alignment of the
CUDA allocator, so cuBLAS picks the same kernels and offloaded outputs equal resident ones bit for bit.

Automatic residency (``resident_blocks=None``): with ``A`` = free GPU memory plus torch's cached
blocks plus the blocks' own bytes if they are on the GPU now, keep the most blocks resident such that
resident bytes + ring bytes <= A - headroom. ``headroom`` = max(activation reserve, largest offloaded
text encoder + 1 GiB), since the text encoder visits the GPU while the DiT's weights are there but
never together with the DiT's activations. The activation reserve defaults to max(4 GiB, 15% of the
GPU (of ``memory_limit`` when given): Wan2.1-14B at 832x480x81 peaks at about 3.7 GiB of activations
per batch-1 forward, ~7.5 GiB with batched CFG, ~20 GiB at 720p with CFG; FLUX at 1024² at under
2 GiB. Pass ``activation_reserve`` (bytes) for other workloads, e.g. a measured activation peak, and
``memory_limit`` (bytes) to stay within a share of the GPU.

CUDA graphs. The schedule is built to be capturable: block weights always sit at the same addresses
(the ring slots), the host buffers never move, every forward issues the same operations (the copy
stream forks from and joins back into the compute stream through events recorded in the same forward),
so a graph of the whole forward would replay the copies with no Python involved. But PyTorch 2.11
refuses to capture a host-to-device copy from memory its own pinned allocator did not hand out
("Cannot copy between CPU and CUDA tensors during CUDA graph capture unless the CPU tensor is
pinned"), and the host buffers here are plain allocations registered with ``cudaHostRegister``, which
avoids that allocator's power-of-two rounding (Wan2.1-14B: 26 GiB pinned instead of 40 GiB). So
layerwise offload runs without CUDA graphs (``graph_safe`` is False; ``diffc.load`` refuses
``cuda_graphs=True`` with it and leaves graphs off by default). At the DiT sizes offload is for, a
forward takes seconds and launch overhead is well under 1%. ``remove()`` gives the weights new
addresses, which a ``CudaGraphModule`` notices (it drops its graphs).
``"model"`` mode is not graph-safe (``graph_safe`` is False): the DiT's GPU copy is dropped when
another component starts and lands elsewhere when it returns, so graphs are recaptured once per
generation (``CudaGraphModule`` detects the move); turning graphs off there saves the recapture.

Weights are treated as read-only: dropping a component from the GPU rebinds its parameters to the
host copy without copying back. ``remove()`` gives every model fresh GPU tensors again.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from typing import Any

import torch
from torch import nn

from ..errors import DiffcError, InvalidArgumentError
from ..models.structure import dit_regions, has_regions, regions_in_run_order
from .offload_host import (ALIGN, CudaStreams, GiB, HostBuffer, HostResident, OneAtATime, _Packing, _tensors,
                           packed_bytes)
from .offload_plan import (PLACEMENTS, START, Copy, Record, RingPlan, choose_resident_count, computed, copied,
                           resident_bytes, resident_mask, ring_bytes)

__all__ = ["ALIGN", "BlockRing", "CudaStreams", "GiB", "HostBuffer", "HostResident", "OffloadCounters",
           "OffloadHandle", "apply_offload", "packed_bytes", "repeated_blocks"]

log = logging.getLogger(__name__)

MODES = ("none", "layerwise", "model")
MAX_PREFETCH = 16
MIN_ACTIVATION_RESERVE = 4 * GiB
ACTIVATION_RESERVE_FRACTION = 0.15
TEXT_ENCODER_MARGIN = 1 * GiB


@dataclasses.dataclass
class OffloadCounters:
    """What offload set up and did. Copies are counted when issued: a CUDA graph capture counts once,
    its replays not at all."""

    blocks_total: int = 0
    blocks_resident: int = 0
    blocks_streamed: int = 0
    ring_slots: int = 0
    prefetch_copies: int = 0
    bytes_pinned: int = 0
    ring_forwards: int = 0
    component_loads: int = 0
    component_unloads: int = 0


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (its regions' blocks, ``_repeated_blocks``) in run order
    (:func:`~diffc.models.structure.regions_in_run_order`). A forward that runs them otherwise is refused by
    the ring."""
    if not has_regions(model):
        return []
    return [block for region in regions_in_run_order(model) for block in region.blocks]


def _check_blocks_own_weights(name: str, model: nn.Module) -> None:
    owner_of: dict[int, int | None] = {}
    prefixes = [f"{region.name}.{j}." for region in dit_regions(model) for j in range(len(region.blocks))]
    for pname, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                    model.named_buffers(remove_duplicate=False)):
        if t.device.type == "meta":
            raise DiffcError(f"offload: '{name}' has weights on the meta device ({pname}); load it first")
        owner = next((i for i, p in enumerate(prefixes) if pname.startswith(p)), None)
        if owner_of.setdefault(id(t), owner) != owner:
            raise DiffcError(f"offload: '{name}' shares the tensor {pname} between a repeated block and "
                             "another part of the model; layerwise offload needs blocks with their own weights")


# ---------------------------------------------------------------------------------------------
# Layerwise ring
# ---------------------------------------------------------------------------------------------


class BlockRing:
    """Layerwise offload of one model's repeated blocks, following a ``RingPlan`` (module docstring)."""

    def __init__(self, name: str, model: nn.Module, plan: RingPlan, device: torch.device, streams,
                 counters: OffloadCounters, info: dict[str, Any] | None = None):
        self.name, self.model, self.plan, self.device = name, model, plan, device
        self.streams, self.counters = streams, counters
        self.blocks = repeated_blocks(model)
        self.packings = [_Packing(_tensors(b)) for b in self.blocks]
        self.block_bytes = [p.nbytes for p in self.packings]
        self.info = dict(info or {})
        streamed_ids = {id(t) for b in plan.streamed for t in self.packings[b].tensors}
        for t in _tensors(model):
            if id(t) not in streamed_ids and t.device != device:
                t.data = t.data.to(device)
        self.host: list[HostBuffer] = []
        self._host_views: list[list[torch.Tensor]] = []
        self.slots: list[torch.Tensor] = []
        self._hooks: list = []
        try:
            self._stream_out(plan, streams, counters)
        except BaseException:
            self.remove()
            raise
        keys = [START] + [f(k) for k in range(plan.num_streamed) for f in (copied, computed)]
        self._events = {key: streams.event(key) for key in keys} if plan.num_streamed else {}
        self._cursor, self._started = 0, False
        self._hooks = []
        if plan.num_streamed:
            self._hooks.append(model.register_forward_pre_hook(self._begin))
            for i, block in enumerate(self.blocks):
                self._hooks.append(block.register_forward_pre_hook(functools.partial(self._before, i)))
                self._hooks.append(block.register_forward_hook(functools.partial(self._after, i)))
        counters.blocks_total += plan.num_blocks
        counters.blocks_resident += plan.num_blocks - plan.num_streamed
        counters.blocks_streamed += plan.num_streamed
        counters.ring_slots += plan.ring_slots

    def _stream_out(self, plan: RingPlan, streams, counters: OffloadCounters) -> None:
        for block in plan.streamed:  # to pinned host memory first: GPU memory is freed before the ring exists
            packing = self.packings[block]
            buf = streams.pin(packing.nbytes)
            views = packing.views(buf.tensor)
            packing.fill(views)
            self.host.append(buf)
            packing.bind(views)
            self._host_views.append(views)
            counters.bytes_pinned += packing.nbytes
        slot_bytes = max((self.block_bytes[b] for b in plan.streamed), default=0)
        self.slots = [streams.empty(slot_bytes) for _ in range(plan.ring_slots)]
        self._dst, self._src = [], []
        for k, block in enumerate(plan.streamed):
            packing, slot = self.packings[block], self.slots[plan.slot(k)]
            packing.bind(packing.views(slot))
            self._dst.append(slot[: packing.nbytes])
            self._src.append(self.host[k].tensor)

    def _issue(self, ops) -> None:
        for op in ops:
            if type(op) is Copy:
                self.streams.copy(self._dst[op.position], self._src[op.position], op)
                self.counters.prefetch_copies += 1
            elif type(op) is Record:
                self.streams.record(op.stream, self._events[op.event], op)
            else:
                self.streams.wait(op.stream, self._events[op.event], op)

    def _begin(self, *_) -> None:
        self._cursor, self._started = 0, True
        self._issue(self.plan.start)

    def _before(self, index: int, *_) -> None:
        if index == 0 and (not self._started or self._cursor):
            self._begin()  # forward() called without module hooks, or the previous forward was aborted
        if index != self._cursor:
            raise RuntimeError(
                f"offload: block {index} of '{self.name}' ran where block {self._cursor} was expected; "
                "layerwise offload needs the repeated blocks to run once each, in declared order, inside "
                "the model's forward")
        self._issue(self.plan.before[index])

    def _after(self, index: int, *_) -> None:
        self._issue(self.plan.after[index])
        self._cursor += 1
        if self._cursor == self.plan.num_blocks:
            self._cursor, self._started = 0, False
            self.counters.ring_forwards += 1

    def describe(self) -> dict[str, Any]:
        p = self.plan
        return {"blocks": p.num_blocks, "resident_blocks": p.num_blocks - p.num_streamed,
                "streamed_blocks": p.num_streamed, "ring_slots": p.ring_slots,
                "ring_gb": ring_bytes(p, self.block_bytes) / GiB,
                "resident_gb": resident_bytes(p, self.block_bytes) / GiB,
                "pinned_gb": sum(self.block_bytes[b] for b in p.streamed) / GiB, **self.info}

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.streams.synchronize()
        restored = set()
        for block, views in zip(self.plan.streamed, self._host_views):  # all of them, or those moved so far
            self.packings[block].restore(views, self.device)
            restored.update(id(t) for t in self.packings[block].tensors)
        for t in _tensors(self.model):  # new addresses for all: a CUDA graph wrapper sees its graphs are stale
            if id(t) not in restored:
                t.data = t.data.to(self.device, copy=True)
        for buf in self.host:
            buf.release()
        self.host, self._host_views, self.slots, self._dst, self._src, self._events = [], [], [], [], [], {}


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


class OffloadHandle:
    """What ``apply_offload`` set up: ``counters``, ``describe()``, ``remove()``, ``graph_safe``."""

    def __init__(self, mode: str, device: torch.device, counters: OffloadCounters | None = None):
        self.mode, self.device = mode, device
        self.counters = counters or OffloadCounters()
        self.rings: dict[str, BlockRing] = {}
        self.components: dict[str, HostResident] = {}
        self.removed = False

    @property
    def graph_safe(self) -> bool:
        """Whether a CUDA graph of the DiT forward can be captured and stays valid under this offload."""
        return self.mode == "none"

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "graph_safe": self.graph_safe, "removed": self.removed,
                "pinned_gb": self.counters.bytes_pinned / GiB,
                "models": {name: ring.describe() for name, ring in self.rings.items()},
                "offloaded_components": sorted(self.components),
                "components_on_gpu": sorted(n for n, c in self.components.items() if c.loaded),
                "counters": dataclasses.asdict(self.counters)}

    def remove(self) -> None:
        """Make every model fully resident on the device again and release the pinned memory."""
        with torch.no_grad(), torch.inference_mode(False):
            for ring in self.rings.values():
                ring.remove()
            for component in self.components.values():
                component.remove(self.device)
        self.rings, self.components, self.removed = {}, {}, True

    def __repr__(self) -> str:
        return f"OffloadHandle(mode={self.mode!r}, {self.counters})"


def _validate(components, mode, prefetch, resident_blocks, text_encoders, placement, activation_reserve,
              memory_limit) -> None:
    if mode not in MODES:
        raise InvalidArgumentError("offload", f"'{mode}' is not an offload mode; accepted: {', '.join(MODES)}")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or not 1 <= prefetch <= MAX_PREFETCH:
        raise InvalidArgumentError("offload_prefetch", f"must be an integer from 1 to {MAX_PREFETCH}, got {prefetch!r}")
    if resident_blocks is not None and (isinstance(resident_blocks, bool) or not isinstance(resident_blocks, int)
                                        or resident_blocks < 0):
        raise InvalidArgumentError("resident_blocks",
                                   f"must be a non-negative integer or None (automatic), got {resident_blocks!r}")
    if placement not in PLACEMENTS:
        raise InvalidArgumentError("placement", f"'{placement}' is not accepted; use one of {', '.join(PLACEMENTS)}")
    for field, value in (("activation_reserve", activation_reserve), ("memory_limit", memory_limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InvalidArgumentError(field, f"must be a number of bytes (a non-negative integer) or None, "
                                              f"got {value!r}")
    if isinstance(text_encoders, str):
        raise InvalidArgumentError("text_encoders",
                                   f"must be a tuple of component names, got the string {text_encoders!r}")
    for name in text_encoders:
        if not isinstance(components.get(name), nn.Module):
            modules = sorted(n for n, c in components.items() if isinstance(c, nn.Module))
            raise InvalidArgumentError("text_encoders", f"'{name}' is not a model component of this pipeline; "
                                       f"model components: {', '.join(modules)}")


def _auto_resident(name, model, blocks_bytes, blocks_on_device, streams, device, prefetch, placement,
                   activation_reserve, memory_limit, text_encoder_bytes) -> tuple[int, dict[str, Any]]:
    available, total, allocated = streams.memory()
    if memory_limit is not None:
        total = min(total, memory_limit)
    reserve = activation_reserve if activation_reserve is not None else max(
        MIN_ACTIVATION_RESERVE, int(ACTIVATION_RESERVE_FRACTION * total))
    headroom = max(reserve, text_encoder_bytes + TEXT_ENCODER_MARGIN) if text_encoder_bytes else reserve
    block_ids = {id(t) for b in repeated_blocks(model) for t in _tensors(b)}
    to_move = sum(t.numel() * t.element_size() for t in _tensors(model)
                  if id(t) not in block_ids and t.device != device)
    budget = available + blocks_on_device - to_move - headroom
    if memory_limit is not None:
        budget = min(budget, memory_limit - (allocated - blocks_on_device) - to_move - headroom)
    count = choose_resident_count(blocks_bytes, prefetch, budget, placement)
    plan = RingPlan.build(resident_mask(len(blocks_bytes), count, placement), prefetch)
    if ring_bytes(plan, blocks_bytes) + resident_bytes(plan, blocks_bytes) > budget:
        log.warning("offload: '%s' needs %.2f GiB for its ring but only %.2f GiB are free after a %.2f GiB "
                    "headroom; streaming every block and hoping activations fit", name,
                    ring_bytes(plan, blocks_bytes) / GiB, budget / GiB, headroom / GiB)
    info = {"resident_choice": "auto", "budget_gb": budget / GiB, "headroom_gb": headroom / GiB,
            "activation_reserve_gb": reserve / GiB}
    return count, info


def apply_offload(components: dict[str, Any], device: torch.device | str, mode: str, prefetch: int = 1,
                  resident_blocks: int | None = None, text_encoders: tuple[str, ...] = (), *,
                  placement: str = "spread", activation_reserve: int | None = None,
                  memory_limit: int | None = None, streams=None,
                  dits: tuple[str, ...] | None = None) -> OffloadHandle:
    """Offload a loaded pipeline's components (see the module docstring for the modes): eager modules (the
    executor hands over its DiT stacks' and graphed encoders' own modules; a wrapper given here is refused);
    other values are left alone.

    ``prefetch``: blocks copied ahead of the one computing (ring depth - 1). ``resident_blocks``:
    blocks kept on the GPU (None: as many as memory allows). ``text_encoders``: components offloaded
    after use in layerwise mode. ``placement``: where resident blocks go ("spread" or "first").
    ``activation_reserve``/``memory_limit``: bytes, for the automatic residency choice.
    ``streams``: a stand-in for ``CudaStreams`` (tests). ``dits``: the components whose repeated blocks
    layerwise offload streams (None: every model declaring repeated blocks; a diffusers VAE may declare
    ``_no_split_modules`` too, and is offloaded whole like the other components). Raises ``InvalidArgumentError`` naming the
    field for bad values, and for offload on a device that is not a CUDA GPU.
    """
    _validate(components, mode, prefetch, resident_blocks, text_encoders, placement, activation_reserve,
              memory_limit)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())  # tensors report cuda:N, never bare cuda
    handle = OffloadHandle(mode, device)
    if mode == "none":
        return handle
    if streams is None:
        if device.type != "cuda" or not torch.cuda.is_available():
            raise InvalidArgumentError(
                "offload", f"--offload {mode} needs a CUDA GPU (it keeps weights in pinned host memory and "
                f"copies them to GPU memory when needed); this pipeline runs on '{device}', use --offload none")
        streams = CudaStreams(device)
    wrapped = [n for n, c in components.items()
               if not isinstance(c, nn.Module) and isinstance(getattr(c, "module", None), nn.Module)]
    if wrapped:  # a DiT stack or graphed encoder: offloading its module behind its back would leave it stale
        verb = "is a wrapper" if len(wrapped) == 1 else "are wrappers"
        raise InvalidArgumentError("offload", f"{', '.join(wrapped)} {verb} of a module (a pipeline's DiT stacks "
                                   "and graphed encoders are); offload a loaded pipeline with "
                                   "pipe.executor.place(mode, ...) or diffc.load(..., offload=mode), which hand over "
                                   "the eager modules")
    modules = {n: c for n, c in components.items() if isinstance(c, nn.Module)}
    dits = [n for n, m in modules.items() if n not in text_encoders and (dits is None or n in dits)
            and repeated_blocks(m)]
    if mode == "layerwise":
        if not dits:
            raise InvalidArgumentError("offload", "layerwise offload streams the repeated blocks of a model that "
                                       f"declares them (_repeated_blocks); none of {', '.join(modules)} does; "
                                       "use --offload model")
        for n in dits:
            _check_blocks_own_weights(n, modules[n])
            count = len(repeated_blocks(modules[n]))
            if resident_blocks is not None and resident_blocks > count:
                raise InvalidArgumentError("resident_blocks", f"'{n}' has {count} repeated blocks; "
                                           f"got {resident_blocks} (use 0 to {count}, or leave it automatic)")
    try:
        with torch.no_grad(), torch.inference_mode(False):
            if mode == "model":
                coordinator = OneAtATime()
                for n, m in modules.items():
                    handle.components[n] = HostResident(n, m, streams, handle.counters, coordinator)
            else:
                _apply_layerwise(handle, modules, dits, device, streams, prefetch, resident_blocks,
                                 tuple(text_encoders), placement, activation_reserve, memory_limit)
    except BaseException:
        handle.remove()
        raise
    return handle


def _apply_layerwise(handle, modules, dits, device, streams, prefetch, resident_blocks, text_encoders,
                     placement, activation_reserve, memory_limit) -> None:
    for n, m in modules.items():
        if n not in text_encoders and n not in dits:
            m.to(device)
    te_bytes = 0
    for n in text_encoders:
        handle.components[n] = HostResident(n, modules[n], streams, handle.counters)
        te_bytes = max(te_bytes, handle.components[n].packing.nbytes)
    for n in dits:
        model = modules[n]
        packings = [_Packing(_tensors(b)) for b in repeated_blocks(model)]
        sizes = [p.nbytes for p in packings]
        if resident_blocks is None:
            count, info = _auto_resident(n, model, sizes, sum(p.bytes_on(device) for p in packings), streams,
                                         device, prefetch, placement, activation_reserve, memory_limit, te_bytes)
        else:
            count, info = resident_blocks, {"resident_choice": "fixed"}
        plan = RingPlan.build(resident_mask(len(sizes), count, placement), prefetch)
        info.update(prefetch=prefetch, placement=placement)
        handle.rings[n] = BlockRing(n, model, plan, device, streams, handle.counters, info)
        log.info("offload: '%s' keeps %d of %d blocks resident, streams %d through %d slots",
                 n, count, len(sizes), plan.num_streamed, plan.ring_slots)
