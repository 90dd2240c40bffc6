"""The fp8 weight transform of a DiT stack: float8_e4m3 copies of the blocks' linear weights.

The ``fp8`` quality tier (``diffc compile --quality fp8``) runs the repeated blocks' linear layers as
``torch._scaled_mm`` on float8_e4m3 operands. Their weights are quantized here, at load, from the
checkpoint's own tensors (the checkpoint is never converted): every ``nn.Linear`` of a repeated block
whose dimensions ``_scaled_mm`` accepts (multiples of 16) gets two buffers beside its ``weight``,

- ``weight_fp8``: float8_e4m3fn (out, in), and
- ``weight_fp8_scale``: float32 (1, out), one scale per output channel (``weight ~= weight_fp8 * scale``),

which the compiled block graphs read by name like any other tensor of the block. Merging a LoRA
re-quantizes the layers it wrote (in place: compiled graphs and CUDA graphs keep their addresses). The
transform is data, computed again at every load; artifacts never store it.

The bf16 ``weight`` of a layer no compiled graph reads (every call of it runs on the fp8 copy) leaves the
GPU: :meth:`Fp8Weights.release` moves it to host memory, so a compiled fp8 DiT holds about one byte per
weight on the device instead of three. The parameter keeps its name and stays the exact original; the
layer's forward, should a block run eagerly (a shape no graph was compiled for), multiplies the fp8 copy
out (``weight_fp8 * scale``, fp8 quality). A weight the loader read from a checkpoint and nothing wrote
since becomes a memory-mapped view of its file (:mod:`diffc.stored`): no copy, no time, no host memory
beyond the page cache; any other weight is copied. :meth:`Fp8Weights.restore` brings originals back where
something needs them on the device: a compile (its trace and bf16 reference), removing the tier, and a
LoRA merge, whose layers then stay on the device (it writes into the bf16 weight and stashes the
original there, as without fp8). The DiT stack decides which layers go (:mod:`diffc.runtime.dit_stack`).
"""

from __future__ import annotations

import contextlib
import time
import types
import warnings
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DiffcError, InvalidArgumentError
from ..models.structure import dit_regions, has_regions
from ..ops.fp8 import FP8, fp8_linear_ok, quantize_weight
from ..stored import stored_weights
from .staged_copy import Ring, host_available_bytes

WEIGHT = "weight_fp8"
SCALE = "weight_fp8_scale"
SCHEMES = ("fp8",)
RELEASE_BATCH_BYTES = 1 << 30  # bf16 originals copied to the host together while the transform is applied
HOST_RESERVE_BYTES = 4 << 30  # host memory the originals' copies leave free for everything else


def fp8_linears(module: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers of ``module``'s repeated blocks the fp8 tier quantizes, by their names in ``module``."""
    if not has_regions(module):
        raise InvalidArgumentError("quality", f"fp8 needs a DiT that declares its repeated blocks; "
                                   f"{type(module).__name__} declares none")
    owner = {id(m): n for n, m in module.named_modules()}
    found: dict[str, nn.Linear] = {}
    for region in dit_regions(module):
        for block in region.blocks:
            prefix = owner.get(id(block), "")
            for name, m in block.named_modules():
                if (isinstance(m, nn.Linear) and m.weight.dtype.is_floating_point
                        and fp8_linear_ok(m.in_features, m.out_features)):
                    found[f"{prefix}.{name}" if prefix else name] = m
    return found


def unread_linears(module: nn.Module, linears: dict[str, nn.Linear], graphs: dict[str, dict[str, Any]]) -> set[str]:
    """The layers of ``linears`` (by ``module``'s names) whose ``weight`` no graph of their region reads:
    ``graphs[region][key]`` are :class:`~diffc.compile.regions.RegionGraph`; a region without graphs runs
    its blocks eagerly, so all of its layers are read."""
    owner = {id(m): n for n, m in module.named_modules()}
    unread = set()
    for region in dit_regions(module):
        per_key = graphs.get(region.name)
        if not per_key:
            continue
        read = set().union(*(graph.read_state_names for graph in per_key.values()))
        for block in region.blocks:
            prefix = owner[id(block)] + "."
            unread.update(name for name in linears
                          if name.startswith(prefix) and f"{name[len(prefix):]}.weight" not in read)
    return unread


class Fp8Weights:
    """One DiT's fp8 weight transform: :meth:`apply` adds the buffers, :meth:`remove` takes them away."""

    kind = "fp8"

    def __init__(self, module: nn.Module):
        self.module = module
        self.linears = fp8_linears(module)
        self.requantized = 0
        self.released: set[str] = set()  # layers whose bf16 weight is in host memory (``release``)
        self.mapped: set[str] = set()  # those of them whose host weight is a view of the checkpoint file
        self.kept: set[str] = set()  # unread layers left on the device: too little host memory for their copies
        self.held: set[str] = set()  # layers a LoRA wrote: their bf16 weight stays on the device
        self.release_s = 0.0  # time spent moving originals to the host

    def apply(self, release: Iterable[str] = ()) -> Fp8Weights:
        """Quantize every layer; those in ``release`` (graphs known before the transform, e.g. an artifact's)
        move their bf16 weight to the host in batches (``RELEASE_BATCH_BYTES``) as their copies are made, so the
        device never holds both for more than one batch."""
        release = set(release)
        batch, size = [], 0
        with torch.no_grad(), Ring() as ring:
            for name, linear in self.linears.items():
                w8, scale = quantize_weight(linear.weight)
                linear.register_buffer(WEIGHT, w8)
                linear.register_buffer(SCALE, scale)
                if name in release:  # in batches: the device holds at most one batch's bf16 beside its fp8
                    batch.append(name)
                    size += _nbytes(linear.weight)
                    if size >= RELEASE_BATCH_BYTES:
                        self.release(batch, free_cache=False, ring=ring)
                        batch, size = [], 0
            self.release(batch, free_cache=False, ring=ring)
        if self.released:
            _free_cache(self.linears.values())
        return self

    def unread(self, graphs: dict[str, dict[str, Any]] | None) -> set[str]:
        """The layers whose bf16 weight none of ``graphs`` (by region; None: no graphs) reads."""
        return set() if graphs is None else unread_linears(self.module, self.linears, graphs)

    def place(self, graphs: dict[str, dict[str, Any]] | None) -> None:
        """Originals where ``graphs`` need them: the unread ones on the host, every other one on the device."""
        unread = self.unread(graphs)
        self.kept &= unread
        self.restore(self.released - unread)
        self.release(unread)

    def remove(self) -> None:
        self.restore()
        self.kept.clear()
        for linear in self.linears.values():
            linear._buffers.pop(WEIGHT, None)
            linear._buffers.pop(SCALE, None)

    # ---- where the bf16 originals live ----------------------------------------------------------

    def release(self, names: Iterable[str], host: torch.device | str = "cpu", free_cache: bool = True,
                ring: Ring | None = None) -> int:
        """Move the bf16 weight of each layer in ``names`` (the DiT's module names) to ``host``, where no
        compiled graph reads it; an eager call of the layer multiplies its fp8 copy out. Layers a LoRA wrote
        stay. A weight still equal to its checkpoint tensor becomes a view of the file (:mod:`diffc.stored`)
        rather than a copy; the others are copied through page-locked staging buffers (``ring``, else a
        ring of this call's). ``free_cache``: hand the freed GPU memory back to the driver (what
        ``nvidia-smi`` shows). Returns the bytes that left the device."""
        moved, started = 0, time.perf_counter()
        host = torch.device(host)
        stored = stored_weights(self.module) if host.type == "cpu" else None
        todo = [n for n in dict.fromkeys(names) if n in self.linears and n not in self.released
                and n not in self.held and WEIGHT in self.linears[n]._buffers]
        views = {} if stored is None else stored.views({f"{n}.weight": self.linears[n].weight for n in todo})
        copies: list[str] = []
        with torch.no_grad():
            for name in todo:
                view = views.get(f"{name}.weight")
                if view is None:
                    copies.append(name)
                    continue
                weight = self.linears[name].weight
                moved += _nbytes(weight)
                weight.data = view  # still the checkpoint's tensor: map the file instead of copying
                self.mapped.add(name)
                self._released(name)
            copies = self._room_for(copies) if host.type == "cpu" else copies
            if copies:
                weights = [self.linears[n].weight for n in copies]
                if host.type == "cpu":
                    with contextlib.nullcontext(ring) if ring is not None else Ring() as staging:
                        hosted = staging.to_host([w.data for w in weights])
                else:
                    hosted = [w.data.to(host) for w in weights]
                for name, weight, data in zip(copies, weights, hosted):
                    moved += _nbytes(weight)
                    weight.data = data
                    self._released(name)
        if moved:
            if free_cache:
                _free_cache(self.linears.values())
            self.release_s += time.perf_counter() - started
        return moved

    def _released(self, name: str) -> None:
        linear = self.linears[name]
        linear.forward = types.MethodType(_fp8_weight_forward, linear)
        self.released.add(name)
        self.kept.discard(name)

    def _room_for(self, names: list[str]) -> list[str]:
        """Those of ``names`` whose copies fit in the host memory available (less ``HOST_RESERVE_BYTES``); the
        rest stay on the device (``kept``, with a warning): running out of host memory would end the process."""
        room = host_available_bytes()
        if room is None:
            return names
        room -= HOST_RESERVE_BYTES
        fit, kept = [], []
        for name in names:
            size = _nbytes(self.linears[name].weight)
            if size <= room:
                fit.append(name)
                room -= size
            else:
                kept.append(name)
        if kept and not set(kept) <= self.kept:
            gb = sum(_nbytes(self.linears[n].weight) for n in kept) / 1e9
            warnings.warn(f"fp8: {len(kept)} bf16 weights ({gb:.1f} GB) the compiled graphs do not read stay on the "
                          f"GPU: the host has too little memory available for them (diffc keeps "
                          f"{HOST_RESERVE_BYTES >> 30} GiB free); free host memory to save that GPU memory",
                          stacklevel=4)
        self.kept.update(kept)
        return fit

    def restore(self, names: Iterable[str] | None = None) -> None:
        """Bring the bf16 weights of released layers (``names``; None: all) back beside their fp8 copies."""
        stored = stored_weights(self.module)
        back = sorted(self.released if names is None else set(names) & self.released)
        for name in back:
            if name in self.mapped:
                stored.check_unchanged(f"{name}.weight")
        with torch.no_grad(), Ring() as ring:
            by_device: dict[torch.device, list[str]] = {}
            for name in back:
                by_device.setdefault(self.linears[name]._buffers[WEIGHT].device, []).append(name)
            for device, group in by_device.items():
                weights = [self.linears[n].weight for n in group]
                try:
                    back_on_device = ring.to_device([w.data for w in weights], device)
                except torch.OutOfMemoryError:
                    gb = sum(_nbytes(w) for w in weights) / 1e9
                    raise DiffcError(f"fp8: bringing {len(weights)} bf16 weights ({gb:.1f} GB) back to {device} "
                                     f"(for a compile, another quality tier, offload or a LoRA) needs more GPU "
                                     f"memory than is free; free GPU memory, or keep --quality fp8 and the "
                                     f"compiled graphs as they are") from None
                for name, weight, data in zip(group, weights, back_on_device):
                    weight.data = data
                    if name in self.mapped:  # the file's values again: a later release may map it anew
                        stored.renew(f"{name}.weight", weight)
                        self.mapped.discard(name)
                    self.linears[name].__dict__.pop("forward", None)
                    self.released.discard(name)

    def weights_needed(self, names: Iterable[str]) -> None:
        """Parameters ``names`` are about to be written in place (a LoRA merge): their layers' bf16 weights
        come back to the device and stay there."""
        layers = {name.rpartition(".")[0] for name in names if name.endswith(".weight")} & set(self.linears)
        self.restore(layers)
        self.held |= layers

    def host_bytes(self, mapped: bool = False) -> int:
        """Bytes of the released originals copied to host memory (``mapped``: those viewing the checkpoint)."""
        return sum(_nbytes(self.linears[n].weight) for n in self.released if (n in self.mapped) == mapped)

    def weights_written(self, names: Iterable[str]) -> None:
        """Parameters ``names`` (by the DiT's names) changed in place (a LoRA merge): re-quantize their layers."""
        with torch.no_grad():
            for name in names:
                owner, _, attr = name.rpartition(".")
                linear = self.linears.get(owner)
                if attr != "weight" or linear is None or WEIGHT not in linear._buffers:
                    continue
                w8, scale = quantize_weight(linear.weight.to(linear._buffers[WEIGHT].device))
                linear._buffers[WEIGHT].copy_(w8)
                linear._buffers[SCALE].copy_(scale)
                self.requantized += 1

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for m in self.linears.values()
                   for k, b in m._buffers.items() if k in (WEIGHT, SCALE) and b is not None)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "format": f"{str(FP8).removeprefix('torch.')}, per-output-channel float32 scales",
                "linears": len(self.linears), "bytes": self.nbytes(), "requantized": self.requantized,
                "originals_on_host": len(self.released), "host_bytes": self.host_bytes(),
                "originals_mapped": len(self.mapped), "mapped_bytes": self.host_bytes(mapped=True),
                "kept_for_host_memory": len(self.kept),
                "release_s": round(self.release_s, 3)}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _free_cache(linears: Iterable[nn.Linear]) -> None:
    """Return the caching allocator's unused blocks to the driver when the fp8 copies are on a GPU."""
    first = next((m._buffers.get(WEIGHT) for m in linears), None)
    if first is not None and first.device.type == "cuda":
        torch.cuda.empty_cache()


def _fp8_weight_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A released layer's eager forward: its fp8 copy multiplied out (the bf16 original is in host memory). The
    e4m3 values are exact in bfloat16 and float32, so there the GEMM runs on the unscaled copy cast to ``x``'s
    dtype (one write of it, no float32 temporaries of the whole weight) and the per-channel scales multiply its
    output; float16's range could not hold that unscaled product, so it scales the weight first."""
    w8, scale = self._buffers[WEIGHT], self._buffers[SCALE]
    if x.dtype == torch.float16:
        return F.linear(x, (w8.to(torch.float32) * scale.reshape(-1, 1)).to(x.dtype), self.bias)
    out = (F.linear(x, w8.to(x.dtype)) * scale.reshape(-1)).to(x.dtype)
    return out if self.bias is None else out + self.bias


def check_scheme(scheme: str | None) -> None:
    if scheme is not None and scheme not in SCHEMES:
        raise InvalidArgumentError("quality", f"no weight quantization {scheme!r}; accepted: {', '.join(SCHEMES)}")


__all__ = ["SCALE", "SCHEMES", "WEIGHT", "Fp8Weights", "check_scheme", "fp8_linears", "unread_linears"]
