"""CUDA graphs for the DiT forward: capture once per call signature, replay every denoising step.

``CudaGraphModule`` wraps a module (eager or compiled). A call's *key* is its signature: for every
argument, in order (positional, then keywords sorted by name), ``(shape, stride, dtype, device)`` of a
tensor or the value itself (tagged with its type) of a ``None``/bool/int/float/str/dtype/device or a
tuple/list of them. The first call with a new key runs the module eagerly on the wrapper's capture
stream (the warm-up: lazy initialisation, cuBLAS/cuDNN workspaces, torch.compile, shape-keyed caches
all happen here, outside the capture) and returns that eager result; then the same forward is captured
into a ``torch.cuda.CUDAGraph`` reading static input buffers. Later calls with that key copy their
tensors into the static buffers, replay the graph and return a clone of its static output.

CFG as one batch-2 forward is simply another key (batch 2 instead of 1): one graph holds both halves.

A call runs eagerly, counted as a fallback with its reason, when it cannot be replayed: a CPU tensor
argument, a tensor that requires grad, autograd on with trainable parameters, an argument that cannot
be part of a key, ``max_graphs`` keys already captured, or a key whose capture failed (the forward did
something a graph cannot hold, such as a host-to-device copy from pageable memory or a sync).
``counters`` and ``describe()`` make all of this visible; tests assert the counters exactly.

What a graph bakes in, and so what the wrapped forward must respect (diffc's DiTs do): its Python
control flow may depend on the key only, never on tensor values (value-dependent control flow needs a
device sync, which fails the capture, which falls back); it does not mutate its inputs in place; its
weights stay at the same device addresses (in-place updates such as ``load_state_dict`` are seen by the
next replay; a parameter that moved, e.g. through ``.to()``, is detected by a check of the first and
last parameter and drops every graph, counted in ``counters.invalidations``); forward hooks run at
warm-up and capture only. A forward may fork side streams from the current (capture) stream and join
them back, and copy from pinned host memory: both are legal in a capture. One caller at a time.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..capture import capture
from ..errors import InvalidArgumentError

DEFAULT_MAX_GRAPHS = 4
_NOT_RUN = object()
_SCALARS = (type(None), bool, int, float, str, torch.dtype, torch.device)
_CHAINED = frozenset({"to", "cuda", "cpu", "half", "float", "bfloat16", "eval", "train", "requires_grad_",
                      "to_empty"})
_OWN = frozenset({"module", "max_graphs", "clone_outputs", "counters", "_graphs", "_failed", "_streams", "_pools",
                  "_weights", "_names"})


@dataclasses.dataclass
class CudaGraphCounters:
    """What a ``CudaGraphModule`` did, since it was built.

    ``captures``: graphs captured (one per key; the capturing call returns its eager warm-up result);
    ``replays``: calls answered by a replay; ``fallbacks``: calls run eagerly, by reason in
    ``fallback_reasons``; ``invalidations``: times every graph was dropped because the weights moved.
    """

    captures: int = 0
    replays: int = 0
    fallbacks: int = 0
    invalidations: int = 0
    fallback_reasons: dict[str, int] = dataclasses.field(default_factory=dict)

    def copy(self) -> CudaGraphCounters:
        return dataclasses.replace(self, fallback_reasons=dict(self.fallback_reasons))

    def since(self, earlier: CudaGraphCounters) -> CudaGraphCounters:
        """The counts added after ``earlier`` (a ``copy()`` taken before, e.g. at a generation's start)."""
        reasons = {r: n - earlier.fallback_reasons.get(r, 0) for r, n in self.fallback_reasons.items()}
        return CudaGraphCounters(self.captures - earlier.captures, self.replays - earlier.replays,
                                 self.fallbacks - earlier.fallbacks, self.invalidations - earlier.invalidations,
                                 {r: n for r, n in reasons.items() if n})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph (or a test double with .replay())
    static_inputs: list[torch.Tensor]  # in key order
    static_output: Any
    capture_ms: float
    replays: int = 0


def _layout(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s strides with those of size-1 dimensions zeroed: they never move an address, and a batch-1
    slice of a larger tensor and a fresh tensor of the same shape must share a graph."""
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride()))


def _value_key(value: Any, tensors: list[torch.Tensor] | None = None) -> tuple | None:
    """Hashable, type-tagged key of a non-tensor argument (``True`` and ``1`` differ); None if it has none.

    Tuples, lists and string-keyed dicts are keyed element by element. With ``tensors`` given, a tensor
    inside one (a RoPE ``(cos, sin)`` pair) is keyed by its layout and appended to ``tensors``.
    """
    if isinstance(value, _SCALARS):
        return (type(value), value)
    if isinstance(value, torch.Tensor):
        if tensors is None:
            return None
        tensors.append(value)
        return (torch.Tensor, (tuple(value.shape), _layout(value), value.dtype, value.device))
    if isinstance(value, (tuple, list)):
        parts = tuple(_value_key(v, tensors) for v in value)
        return None if any(p is None for p in parts) else (type(value), parts)
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        parts = tuple((k, _value_key(value[k], tensors)) for k in sorted(value))
        return None if any(p is None for _, p in parts) else (dict, parts)
    return None


def _map_tensors(out: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor in a nest of tuples, lists and dicts; other leaves are kept."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # namedtuple
        return type(out)(*(_map_tensors(o, fn) for o in out))
    if isinstance(out, (tuple, list)):
        return type(out)([_map_tensors(o, fn) for o in out])
    if dataclasses.is_dataclass(out) and not isinstance(out, type):  # diffusers' outputs: dataclass and dict
        fields = [f.name for f in dataclasses.fields(out) if f.init]
        return dataclasses.replace(out, **{name: _map_tensors(getattr(out, name), fn) for name in fields})
    if isinstance(out, dict):
        return type(out)({k: _map_tensors(v, fn) for k, v in out.items()})
    return out


def _tensors(out: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map_tensors(out, found.append)
    return found


def _unalias(out: Any, buffers: list[torch.Tensor]) -> Any:
    """``out`` with every tensor that shares memory with one of ``buffers`` cloned."""
    storages = {b.untyped_storage().data_ptr() for b in buffers}
    return _map_tensors(out, lambda t: t.clone() if t.untyped_storage().data_ptr() in storages else t)


def _exception_reason(exc: BaseException) -> str:
    """The first line of the exception that started a chain (capture_end's error wraps the real one)."""
    root = exc
    while root.__context__ is not None and root.__context__ is not root:
        root = root.__context__
    lines = str(root).strip().splitlines()
    return f"{type(root).__name__}: {lines[0] if lines else ''}".strip()


class CudaGraphModule:
    """A module whose forward is captured into a CUDA graph per call signature and replayed.

    Called with the module's own arguments; any other attribute (``config``, ``_repeated_blocks``,
    ``parameters()``, ``state_dict()``, ...) is the wrapped module's. ``.to()``/``.eval()`` and the like
    return the wrapper. ``max_graphs`` bounds the keys captured; ``clone_outputs=False`` returns the
    graph's static output itself, which the next replay of the same key overwrites (then every graph
    gets its own memory pool; with clones, all graphs share one pool, so activations cost the largest
    graph's, not the sum).
    """

    _device_types = ("cuda",)  # where inputs can be captured; tests emulate graphs on the CPU

    def __init__(self, module: nn.Module, *, max_graphs: int = DEFAULT_MAX_GRAPHS, clone_outputs: bool = True):
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 0:
            raise InvalidArgumentError("max_graphs", f"must be a non-negative integer, got {max_graphs!r}")
        if isinstance(module, CudaGraphModule):
            module = module.module
        set_ = object.__setattr__
        set_(self, "module", module)
        set_(self, "max_graphs", max_graphs)
        set_(self, "clone_outputs", bool(clone_outputs))
        set_(self, "counters", CudaGraphCounters())
        set_(self, "_graphs", {})  # key -> _Graph
        set_(self, "_failed", {})  # key -> reason its capture failed
        set_(self, "_streams", {})  # device -> capture stream
        set_(self, "_pools", {})  # device -> shared graph memory pool
        set_(self, "_weights", None)  # sampled (owner, name, param, data_ptr) at the first capture
        set_(self, "_names", _positional_names(module))

    # ---- attribute forwarding -------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        if name in _OWN:  # not set yet (e.g. while unpickling): never recurse into the wrapped module
            raise AttributeError(name)
        attr = getattr(self.module, name)
        if name in _CHAINED and callable(attr):
            def chained(*args, **kwargs):
                result = attr(*args, **kwargs)
                return self if result is self.module else result
            return chained
        return attr

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.module, name, value)

    def __repr__(self) -> str:
        return (f"CudaGraphModule({type(self.module).__name__}, graphs={len(self._graphs)}/{self.max_graphs}, "
                f"captures={self.counters.captures}, replays={self.counters.replays}, "
                f"fallbacks={self.counters.fallbacks})")

    # ---- calls ----------------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        key, tensors, reason = self._signature(args, kwargs)
        if reason is not None:
            return self._fallback(reason, args, kwargs)
        entry = self._graphs.get(key)
        if entry is not None and not self._weights_unchanged():
            self.reset()
            self.counters.invalidations += 1
            entry = None
        if entry is not None:
            for static, tensor in zip(entry.static_inputs, tensors):
                static.copy_(tensor)
            entry.graph.replay()
            entry.replays += 1
            self.counters.replays += 1
            return _map_tensors(entry.static_output, torch.Tensor.clone) if self.clone_outputs else entry.static_output
        if key in self._failed:
            return self._fallback(self._failed[key], args, kwargs)
        if len(self._graphs) >= self.max_graphs:
            return self._fallback(f"max_graphs={self.max_graphs} reached", args, kwargs)
        return self._capture_new(key, tensors, args, kwargs)

    forward = __call__

    def warmup(self, *args, **kwargs) -> bool:
        """Capture the key of this call ahead of time (no replay); True if it is captured now."""
        key, _, reason = self._signature(args, kwargs)
        if reason is None and key not in self._graphs and key not in self._failed:
            self(*args, **kwargs)
        return reason is None and key in self._graphs

    def reset(self) -> None:
        """Free every graph, its static buffers and memory pools, and forget failed captures."""
        if self._graphs and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # a replay may still be reading the buffers about to be freed
        self._graphs.clear()
        self._failed.clear()
        self._pools.clear()
        object.__setattr__(self, "_weights", None)

    def describe(self) -> dict[str, Any]:
        """Settings, counters and one entry per captured key, for the perf dump."""
        return {
            "enabled": True,
            "max_graphs": self.max_graphs,
            "clone_outputs": self.clone_outputs,
            **self.counters.as_dict(),
            "graphs": [{"key": format_key(k), "capture_ms": round(e.capture_ms, 3), "replays": e.replays}
                       for k, e in self._graphs.items()],
            "failed_captures": [{"key": format_key(k), "reason": r} for k, r in self._failed.items()],
        }

    # ---- internals ------------------------------------------------------------------------------

    def _name(self, slot: int | str) -> str:
        if isinstance(slot, str):
            return slot
        return self._names[slot] if slot < len(self._names) else f"arg{slot}"

    def _signature(self, args: tuple, kwargs: dict) -> tuple[tuple | None, list[torch.Tensor], str | None]:
        """(key, tensors in key order, None), or (None, [], reason) when this call cannot use a graph."""
        parts, tensors = [], []
        items = list(enumerate(args)) + [(k, kwargs[k]) for k in sorted(kwargs)]
        for slot, value in items:
            if isinstance(value, torch.Tensor):
                if value.device.type not in self._device_types:
                    return None, [], f"argument '{self._name(slot)}' is on {value.device.type}, not a CUDA device"
                if value.requires_grad:
                    return None, [], f"argument '{self._name(slot)}' requires grad"
                parts.append((slot, tuple(value.shape), _layout(value), value.dtype, value.device))
                tensors.append(value)
            else:
                nested: list[torch.Tensor] = []
                value_key = _value_key(value, nested)
                if value_key is None:
                    return None, [], (f"argument '{self._name(slot)}' is a {type(value).__name__}, "
                                      "which cannot be part of a graph key")
                for t in nested:
                    if t.device.type not in self._device_types:
                        return None, [], (f"argument '{self._name(slot)}' holds a tensor on {t.device.type}, "
                                          "not a CUDA device")
                    if t.requires_grad:
                        return None, [], f"argument '{self._name(slot)}' holds a tensor that requires grad"
                parts.append((slot, value_key))
                tensors += nested
        if not tensors:
            return None, [], "no tensor arguments"
        if len({t.device for t in tensors}) > 1:
            return None, [], "tensor arguments on several devices"
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.module.parameters()):
            return None, [], "autograd is on and the module has parameters that require grad"
        return tuple(parts), tensors, None

    def _fallback(self, reason: str, args: tuple, kwargs: dict, out: Any = _NOT_RUN):
        """Count a call that runs eagerly, and run it (unless its eager ``out`` is already there)."""
        self.counters.fallbacks += 1
        self.counters.fallback_reasons[reason] = self.counters.fallback_reasons.get(reason, 0) + 1
        return self.module(*args, **kwargs) if out is _NOT_RUN else out

    def _capture_new(self, key: tuple, tensors: list[torch.Tensor], args: tuple, kwargs: dict):
        device = tensors[0].device
        start = time.perf_counter()
        with torch.inference_mode(False):  # normal tensors, so copy_ into them works in and out of inference mode
            static_inputs = [torch.empty_like(t, memory_format=torch.preserve_format) for t in tensors]
        for static, tensor in zip(static_inputs, tensors):
            static.copy_(tensor)
        static_args, static_kwargs = _substitute(args, kwargs, static_inputs)
        # The warm-up sees the very tensors the capture will (so a compiled module's guards hold in the
        # capture); its output is this call's eager result. Errors propagate as they would eagerly.
        out = _unalias(self._warmup(device, static_args, static_kwargs), static_inputs)
        try:
            graph, static_output = self._capture(device, static_args, static_kwargs)
            bad = [t for t in _tensors(static_output) if t.device.type not in self._device_types]
            if bad:
                raise RuntimeError(f"the forward returned a tensor on {bad[0].device}, which a graph cannot refresh")
        except Exception as exc:  # noqa: BLE001 - any capture error becomes a visible, counted fallback
            reason = f"capture failed: {_exception_reason(exc)}"
            self._failed[key] = reason
            warnings.warn(f"CUDA graph capture of {type(self.module).__name__} failed for {format_key(key)}; "
                          f"this signature runs eagerly ({reason})", RuntimeWarning, stacklevel=3)
            return self._fallback(reason, args, kwargs, out)
        if self._weights is None:
            object.__setattr__(self, "_weights", _sample_weights(self.module))
        self._graphs[key] = _Graph(graph, static_inputs, static_output, (time.perf_counter() - start) * 1e3)
        self.counters.captures += 1
        return out

    def _capture_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def _warmup(self, device: torch.device, args: tuple, kwargs: dict):
        """Run eagerly on the capture stream (so per-stream workspaces exist before the capture)."""
        stream = self._capture_stream(device)
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            out = self.module(*args, **kwargs)
        current.wait_stream(stream)
        for t in _tensors(out):
            if t.device.type == "cuda":
                t.record_stream(current)
        return out

    def _capture(self, device: torch.device, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        """Capture ``module(*args, **kwargs)``; returns the graph and its static output. The pool is shared
        with clones, one per graph without (:func:`diffc.capture.capture` undoes a failed capture)."""
        if self.clone_outputs and device not in self._pools:
            self._pools[device] = torch.cuda.graph_pool_handle()
        pool = self._pools[device] if self.clone_outputs else torch.cuda.graph_pool_handle()
        return capture(lambda: self.module(*args, **kwargs), device, pool=pool, stream=self._capture_stream(device))

    def _weights_unchanged(self) -> bool:
        return all(owner._parameters.get(name) is p and p.data_ptr() == ptr for owner, name, p, ptr in self._weights)


def _positional_names(module: nn.Module) -> list[str]:
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _sample_weights(module: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter, int]]:
    """The first and last parameter with their owners: moving the weights moves these too."""
    named = [(owner, name, p) for owner in module.modules() for name, p in owner._parameters.items() if p is not None]
    sample = named[:1] + named[-1:] if len(named) > 1 else named
    return [(owner, name, p, p.data_ptr()) for owner, name, p in sample]


def _substitute(args: tuple, kwargs: dict, tensors: list[torch.Tensor]) -> tuple[tuple, dict]:
    """``args``/``kwargs`` with their tensors (also those inside tuples, lists and dicts) replaced, in key
    order, by ``tensors``."""
    feed = iter(tensors)

    def replace(value):
        if isinstance(value, torch.Tensor):
            return next(feed)
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
            return type(value)(*(replace(v) for v in value))
        if isinstance(value, (tuple, list)):
            return type(value)(replace(v) for v in value)
        if isinstance(value, dict):
            new = dict(value)
            for k in sorted(value):
                new[k] = replace(value[k])
            return new
        return value

    new_args = tuple(replace(a) for a in args)
    new_kwargs = dict(kwargs)
    for k in sorted(kwargs):
        new_kwargs[k] = replace(kwargs[k])
    return new_args, new_kwargs


def format_key(key: tuple) -> str:
    """A readable key: ``hidden_states=(1, 1024, 64) bfloat16 cuda:0, guidance=None, ...``."""
    parts = []
    for part in key:
        slot = part[0] if isinstance(part[0], str) else f"#{part[0]}"
        if len(part) == 5:
            _, shape, stride, dtype, device = part
            layout = "" if stride == tuple(0 if n == 1 else s for n, s in zip(shape, _contiguous_stride(shape))) \
                else f" stride={stride}"
            parts.append(f"{slot}={shape} {str(dtype).removeprefix('torch.')} {device}{layout}")
        else:
            parts.append(f"{slot}={_format_value(part[1])}")
    return ", ".join(parts)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


def _format_value(value_key: tuple) -> str:
    kind, value = value_key
    if kind is torch.Tensor:
        shape, _, dtype, device = value
        return f"{shape} {str(dtype).removeprefix('torch.')} {device}"
    if kind is dict:
        return "{" + ", ".join(f"{k}: {_format_value(v)}" for k, v in value) + "}"
    if kind in (tuple, list):
        inner = ", ".join(_format_value(v) for v in value)
        return f"({inner})" if kind is tuple else f"[{inner}]"
    return repr(value)


def graphs_off_reason(requested: bool | None, device: torch.device) -> str | None:
    """Why the ``cuda_graphs`` option keeps CUDA graphs off on ``device`` (None: on by default for CUDA), or None."""
    enabled = device.type == "cuda" if requested is None else requested
    if enabled:
        return None
    return "turned off" if requested is False else f"off on {device.type}"


def unwrap(module: Any) -> Any:
    """The module inside a ``CudaGraphModule``, or ``module`` itself."""
    return module.module if isinstance(module, CudaGraphModule) else module


def describe_cuda_graphs(module: Any) -> dict[str, Any]:
    """``describe()`` of a wrapped module, else ``{"enabled": False}``: what the perf dump shows."""
    return module.describe() if isinstance(module, CudaGraphModule) else {"enabled": False}
