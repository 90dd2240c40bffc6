"""LoRA adapters on a pipeline: a host cache of converted adapters, and merging them into the DiT in place.

Semantics. For every DiT parameter ``W`` some active adapter touches::

    W = cast(W0 + sum_i strength_i * scale_i * up_i @ down_i)      (fp32 sum, adapters in order, one cast)

written into ``W`` itself (``copy_``), with ``W0`` the original weight. Unmerging copies ``W0`` back
from a host copy taken before the first merge touched it, so it is bit-exact. Switching from one set of
adapters to another restores what the old set touched and merges the new set; nothing is re-read from
disk (adapters stay cached by nickname) and no tensor is re-created (compiled graphs, packed weights
and CUDA graphs keep reading the same addresses).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import CheckpointError, InvalidArgumentError
from .convert import Conversion, convert
from .families import NAMINGS
from .files import LoraFile, read_lora_file
from .spec import Active, check_nickname, check_strength, check_target, lora_requests, targets_of
from .stash import WeightStash
from .weights import ModuleWeights

log = logging.getLogger(__name__)

State = tuple[tuple[str, float], ...]  # what one component has merged: (nickname, strength) in order
STALE: State = (("", float("nan")),)  # never equal to a wanted state: forces a rewrite


@dataclasses.dataclass
class LoraCounters:
    """Totals since load, for tests and the perf dump."""

    files_read: int = 0
    conversions: int = 0
    writes: int = 0  # component rewrites (merge, switch or unmerge)
    params_merged: int = 0
    params_restored: int = 0
    last_write_s: float = 0.0
    last_load_s: float = 0.0


@dataclasses.dataclass
class Adapter:
    """A LoRA file read once, and its conversion for each DiT component it was used on."""

    nickname: str
    path: Path
    file: LoraFile
    conversions: dict[str, Conversion] = dataclasses.field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        conv = next(iter(self.conversions.values()), None)
        formats = conv.formats if conv else None
        if self.file.converted_by:  # renamed before diffc's converter saw it (e.g. by diffusers' lora_state_dict)
            formats = [self.file.converted_by]
        return {"nickname": self.nickname, "path": str(self.path), "bytes": self.file.nbytes, "format": formats,
                "rank": conv.rank if conv else None, "modules": conv.matched if conv else None,
                "warnings": conv.warnings if conv else []}


class LoraManager:
    """The LoRA state of one pipeline; see the module docstring. ``weights`` says where merges write;
    ``convert_file``, if given, rewrites every file right after it is read (the generic backend's
    diffusers format conversion) and before diffc's converter maps it onto the model."""

    def __init__(self, components: dict[str, Any], weights: ModuleWeights | None = None,
                 stash_reserve: int | None = None, convert_file: Callable[[LoraFile], LoraFile] | None = None):
        self.convert_file = convert_file
        self.weights = weights or ModuleWeights(components)
        self.weights.manager = self
        self.adapters: dict[str, Adapter] = {}
        self.active: list[Active] = []
        self.merged: dict[str, State] = {}
        self.modified: dict[str, set[str]] = {}
        self.stash = WeightStash(stash_reserve)
        self.counters = LoraCounters()
        self._lock = threading.RLock()

    @property
    def available(self) -> tuple[str, ...]:
        return self.weights.names()

    # ---- loading ---------------------------------------------------------------------------------
    def load(self, nickname: str, path=None, targets: Sequence[str] | None = None) -> Adapter:
        """The cached adapter ``nickname``, read from ``path`` first if it is new or its path changed.

        The file is read and converted without holding the manager's lock, so a server can load an
        adapter while another generates.
        """
        with self._lock:
            cached = self.adapters.get(nickname)
        if path is None and cached is None:
            raise InvalidArgumentError("lora_path", f"no adapter named '{nickname}' is loaded; give its path "
                                       f"(loaded: {', '.join(self.adapters) or 'none'})")
        if path is None or (cached is not None and _same_file(cached, path)):
            for component in targets or ():
                self._convert(cached, component)
            return cached
        started = time.perf_counter()
        file = read_lora_file(path)
        if self.convert_file is not None:
            file = self.convert_file(file)
        adapter = Adapter(nickname, file.path, file)
        for component in targets or self.available:
            self._convert(adapter, component)
        with self._lock:
            self.counters.files_read += 1
            if nickname in self.adapters:
                for component, state in self.merged.items():
                    if any(name == nickname for name, _ in state):
                        self.merged[component] = STALE  # its weights hold the old file's values
            self.adapters[nickname] = adapter
            self.counters.last_load_s = time.perf_counter() - started
        return adapter

    def _convert(self, adapter: Adapter, component: str) -> Conversion:
        conv = adapter.conversions.get(component)
        if conv is None:
            model = self.weights.model(component)
            cls = type(model).__name__
            try:
                conv = convert(adapter.file, self.weights.tensors(component), NAMINGS.get(cls), f"{component} ({cls})")
            except CheckpointError as exc:
                if adapter.file.converter_error is None:
                    raise
                raise CheckpointError(f"{exc}; {adapter.file.converter_error} (that conversion failed too)") from None
            adapter.conversions[component] = conv
            self.counters.conversions += 1
            for warning in conv.warnings:
                log.warning("LoRA '%s' on %s: %s", adapter.nickname, component, warning)
        return conv

    # ---- the Python API --------------------------------------------------------------------------
    def set(self, nickname, path=None, strength=1.0, target="all") -> dict[str, Any]:
        """Load (or reuse) the adapters, make them the active set and merge them; see ``Pipeline.set_lora``."""
        requests = lora_requests(nickname, path, strength, target, self.available)
        with self._lock:
            for name, p, _, t in requests:
                self.load(name, p, targets_of(t, self.available))
            previous = self.active
            self.active = [Active(name, s, t) for name, _, s, t in requests]
            self._apply_or_return(previous)
            return self.describe()

    def merge(self, strength=None, target="all") -> dict[str, Any]:
        """Merge the active adapters into ``target`` (``strength`` replaces every active adapter's)."""
        target = check_target(target, self.available)
        with self._lock:
            if not self.active:
                raise InvalidArgumentError("lora_nickname", "no adapter is set; call set_lora first")
            previous = self.active
            if strength is not None:
                strength = check_strength(strength)
                self.active = [dataclasses.replace(a, strength=strength) for a in self.active]
            self._apply_or_return(previous, targets_of(target, self.available))
            return self.describe()

    def unmerge(self, target="all") -> dict[str, Any]:
        """Restore the original weights of ``target``; the active adapters stay set (merge brings them back)."""
        target = check_target(target, self.available)
        with self._lock:
            for component in targets_of(target, self.available):
                self._write(component, ())
            return self.describe()

    def _apply_or_return(self, previous: list[Active], components: Sequence[str] | None = None) -> None:
        """Merge the active adapters into ``components`` (all by default); if that fails (a merge that would make a
        weight NaN, say), the previous active set comes back and is merged again before the error is raised."""
        try:
            for component in self.available if components is None else components:
                self._write(component, self.wanted(tuple(self.active), component))
        except BaseException:
            self.active = previous
            try:
                for component in self.available if components is None else components:
                    self._write(component, self.wanted(tuple(previous), component))
            except Exception:  # noqa: BLE001 - the first error is the one to report; the weights are the originals
                log.exception("LoRA: merging the previous adapters again failed; the DiT keeps its own weights")
            raise

    def apply(self, adapters: Sequence[Active]) -> None:
        """Bring every DiT component to exactly ``adapters`` (cached nicknames) merged; a no-op when it is."""
        with self._lock:
            for component in self.available:
                self._write(component, self.wanted(adapters, component))

    def snapshot(self) -> tuple[tuple[str, State], ...]:
        """What every DiT component has merged now, as a hashable value :meth:`restore` brings back."""
        with self._lock:
            return tuple((c, self.merged.get(c, ())) for c in self.available)

    def request_snapshot(self, nickname, strength=None) -> tuple[tuple[str, State], ...]:
        """The snapshot of a generation request naming cached adapters (``field`` names as the HTTP API's)."""
        names = list(nickname) if isinstance(nickname, (list, tuple)) else [nickname]
        if not names and strength is not None and not (isinstance(strength, (list, tuple)) and not strength):
            raise InvalidArgumentError("lora_strength", "applies to the adapters named in 'lora', which names none")
        strengths = strength if isinstance(strength, (list, tuple)) else [strength] * len(names)
        if len(strengths) != len(names):
            raise InvalidArgumentError("lora_strength", f"give one strength for all adapters or one per adapter "
                                       f"({len(names)}), got {len(strengths)}")
        adapters = []
        for name, value in zip(names, strengths):
            check_nickname(name, "lora")
            if name not in self.adapters:
                raise InvalidArgumentError("lora", f"no adapter named '{name}' is loaded (loaded: "
                                           f"{', '.join(self.adapters) or 'none'}); load it with set_lora first")
            adapters.append(Active(name, 1.0 if value is None else check_strength(value, "lora_strength")))
        if len({a.nickname for a in adapters}) != len(adapters):  # merged twice, it would double its strength
            raise InvalidArgumentError("lora", f"names an adapter twice: {names}; give each once, with its strength "
                                       "in lora_strength")
        return tuple((c, self.wanted(adapters, c)) for c in self.available)

    def restore(self, snapshot: Sequence[tuple[str, State]]) -> None:
        """Bring the weights to ``snapshot``; a component it does not name gets its original weights."""
        states = dict(snapshot)
        with self._lock:
            for component in self.available:
                self._write(component, states.get(component, ()))

    def wanted(self, adapters: Sequence[Active], component: str) -> State:
        return tuple((a.nickname, a.strength) for a in adapters
                     if component in targets_of(a.target, self.available))

    def describe(self) -> dict[str, Any]:
        """``list_loras``: the cached adapters, and per component the active ones and whether they are merged."""
        with self._lock:
            active = {}
            for component in self.available:
                wanted = self.wanted(tuple(self.active), component)
                merged = self.merged.get(component, ()) == wanted
                active[component] = [{"nickname": n, "path": str(self.adapters[n].path), "strength": s,
                                      "merged": merged} for n, s in wanted]
            return {"loaded_adapters": [a.describe() for a in self.adapters.values()], "active": active,
                    "merged": {c: [{"nickname": n, "strength": s} for n, s in self.merged.get(c, ()) if n]
                               for c in self.available},
                    **self.stash.describe()}

    # ---- merging ---------------------------------------------------------------------------------
    def _write(self, component: str, state: State) -> None:
        if self.merged.get(component, ()) == state:
            return
        started = time.perf_counter()
        tensors = self.weights.tensors(component)
        plan: dict[str, list[tuple[Any, float]]] = {}
        for nickname, strength in state:
            if not nickname:  # STALE: nothing to merge
                continue
            conv = self._convert(self.load(nickname), component)
            for name, pieces in conv.pieces.items():
                plan.setdefault(name, []).extend((p, strength) for p in pieces)
        modified = self.modified.setdefault(component, set())
        restored = [n for n in modified if n not in plan]
        self.weights.prepare(component, sorted(set(plan) | set(restored)))
        adapters = ", ".join(repr(n) for n, _ in state if n)
        try:
            finite: list[torch.Tensor] = []  # per merged weight, copied to the host without a wait; read after the loop
            with torch.no_grad():
                for name in restored:
                    tensors[name].copy_(self.stash.get((component, name)))
                for name, updates in plan.items():
                    tensor = tensors[name]
                    key = (component, name)
                    if name in modified:
                        # restore in the weight's own dtype first (a device or pinned copy-engine transfer), then
                        # widen on the weight's device: ``stash.to(cuda, float32)`` would widen 2x the bytes on the
                        # host
                        tensor.copy_(self.stash.get(key), non_blocking=True)
                    else:
                        self.stash.save(key, tensor)
                        modified.add(name)  # its original is in the stash from here on: a rollback restores it
                    base = tensor.to(torch.float32, copy=True)
                    _accumulate(base, updates, f"{component}.{name}", adapters)
                    tensor.copy_(base)
                    finite.append(torch.isfinite(tensor).all().to("cpu", non_blocking=True))
                if tensors and next(iter(tensors.values())).device.type == "cuda":
                    torch.cuda.synchronize()
                bad = [n for n, ok in zip(plan, finite) if not bool(ok)]
                if bad:
                    name = bad[0]
                    raise CheckpointError(f"{component}.{name}: merging LoRA {adapters} makes this weight NaN or "
                                          "infinite (the adapter's values, alpha or strength are out of range); "
                                          "nothing was merged")
        except BaseException:
            self._roll_back(component, tensors)
            raise
        self.modified[component] = set(plan)
        self.merged[component] = state
        if plan or restored:
            self.weights.written(component, sorted(set(plan) | set(restored)))
        if tensors and next(iter(tensors.values())).device.type == "cuda":
            torch.cuda.synchronize()
        self.counters.writes += 1
        self.counters.params_merged += len(plan)
        self.counters.params_restored += len(restored)
        self.counters.last_write_s = time.perf_counter() - started

    def _roll_back(self, component: str, tensors: dict[str, torch.Tensor]) -> None:
        """After a merge failed part-way: every weight of ``component`` whose original is stashed gets it back, and
        the component counts as merging nothing (the next apply merges what is wanted from there)."""
        touched = sorted(self.modified.get(component, ()))
        with torch.no_grad():
            for name in touched:
                tensors[name].copy_(self.stash.get((component, name)))
        self.modified[component] = set()
        self.merged[component] = ()
        if touched:
            self.weights.written(component, touched)


FLOAT32_MAX = torch.finfo(torch.float32).max


def _accumulate(acc: torch.Tensor, updates, where: str, adapters: str) -> None:
    """``acc`` (fp32, on the weight's device) += each update, in order; a ``set`` replaces the sum so far."""
    device = acc.device
    for piece, strength in updates:
        factor = strength * piece.scale
        if piece.kind in ("lora", "add") and not abs(factor) <= FLOAT32_MAX:
            raise CheckpointError(f"{where}: LoRA {adapters}: its alpha / rank times the strength ({factor:g}) is "
                                  "beyond float32's range; nothing was merged")
        if piece.kind == "lora":
            up = piece.up.to(device, torch.float32, non_blocking=True)
            down = piece.down.to(device, torch.float32, non_blocking=True)
            acc.addmm_(up, down, alpha=factor)
        elif piece.kind == "add":
            acc.add_(piece.value.to(device, torch.float32, non_blocking=True), alpha=factor)
        else:
            acc.copy_(piece.value)


def _same_file(cached: Adapter, path) -> bool:
    """``path`` names the file ``cached`` was read from, unchanged since (a LoRA saved again over the same path is
    read again, not served from the cache)."""
    from ..stored import file_identity
    from .files import resolve_lora_file

    try:
        file = resolve_lora_file(path)
    except InvalidArgumentError:
        return False
    return file.resolve() == cached.path.resolve() and file_identity(file) == cached.file.identity
