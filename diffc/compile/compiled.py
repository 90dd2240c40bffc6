"""The compiled DiT at run time: one rewritten graph per shape bucket, the eager model for the rest.

:class:`CompiledModule` is what ``pipeline.components["transformer"]`` becomes after
``diffc run --compiled`` / ``--compile``: it calls the graph compiled for the call's input signature
(every tensor argument's shape and dtype, which arguments are None) and the eager model for any other
signature, counting each fallback (``describe()`` goes into the perf dump) and warning once per
signature. The graphs share the eager model's parameters (assigned, not copied), so the CUDA-graph
wrapper, ``.to()`` and memory accounting see one set of weights.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import fx, nn

log = logging.getLogger(__name__)


def signature_key(kwargs: dict[str, Any]) -> str:
    """A call's bucket key: ``name:shape:dtype`` for tensors, ``name:None`` for None, sorted by name."""
    parts = []
    for name in sorted(kwargs):
        value = kwargs[name]
        if isinstance(value, torch.Tensor):
            parts.append(f"{name}:{'x'.join(map(str, value.shape)) or 'scalar'}:{str(value.dtype).removeprefix('torch.')}")
        elif value is None:
            parts.append(f"{name}:None")
        else:
            parts.append(f"{name}:{type(value).__name__}={value!r}")
    return ",".join(parts)


@dataclasses.dataclass
class CompiledCounters:
    compiled_calls: int = 0
    eager_fallbacks: int = 0
    fallback_keys: dict[str, int] = dataclasses.field(default_factory=dict)


class CompiledModule(nn.Module):
    """Dispatch ``forward(**kwargs)`` to ``graphs[signature_key(kwargs)]`` or to ``eager``.

    Attribute reads the wrapper does not define (``config``, ``dtype``, ...) go to the eager model,
    so pipeline code written against the native module works unchanged.
    """

    def __init__(self, eager: nn.Module, graphs: dict[str, fx.GraphModule], info: dict[str, Any] | None = None):
        super().__init__()
        self.eager = eager
        self.graphs = nn.ModuleDict({f"bucket{i}": gm for i, gm in enumerate(graphs.values())})
        self._keys = {key: f"bucket{i}" for i, key in enumerate(graphs)}
        self.info = dict(info or {})
        self.counters = CompiledCounters()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("eager"), name)

    @property
    def buckets(self) -> list[str]:
        return list(self._keys)

    def forward(self, *args, **kwargs):
        if args:
            raise TypeError("the compiled DiT takes keyword arguments only, as the pipelines call it")
        key = signature_key(kwargs)
        name = self._keys.get(key)
        if name is None:
            self.counters.eager_fallbacks += 1
            self.counters.fallback_keys[key] = self.counters.fallback_keys.get(key, 0) + 1
            log.info("no compiled graph for %s; running the eager DiT", key)
            return self.eager(**kwargs)
        self.counters.compiled_calls += 1
        kwargs = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return self.graphs[name](**kwargs)

    def describe(self) -> dict[str, Any]:
        return {**self.info, "buckets": self.buckets, **dataclasses.asdict(self.counters)}


def find_compiled(components: dict[str, Any]) -> CompiledModule | None:
    """The pipeline's :class:`CompiledModule`, under a CUDA-graph wrapper if there is one."""
    from ..runtime.cudagraphs import CudaGraphModule

    dit = components.get("transformer")
    dit = dit.module if isinstance(dit, CudaGraphModule) else dit
    return dit if isinstance(dit, CompiledModule) else None


def fallback_warning(compiled: CompiledModule, before: int) -> str | None:
    """A user-facing warning when DiT calls since ``before`` (an ``eager_fallbacks`` count) ran eagerly."""
    n = compiled.counters.eager_fallbacks - before
    if n <= 0:
        return None
    shapes = "; ".join(_shape_text(k) for k in list(compiled.counters.fallback_keys)[-1:])
    compiled_shapes = " | ".join(_shape_text(k) for k in compiled.buckets)
    return (f"the compiled DiT has no graph for this shape, so {n} DiT call(s) ran eagerly (slower). "
            f"This call: {shapes}. Compiled: {compiled_shapes}. Compile this shape with `diffc compile`.")


def _shape_text(key: str) -> str:
    return " ".join(part.split(":")[0] + " " + part.split(":")[1] for part in key.split(",")
                    if not part.endswith(":None") and part.split(":")[0] in ("hidden_states", "encoder_hidden_states"))


def attach_weights(graph: fx.GraphModule, eager: nn.Module, names: list[str], where: str) -> None:
    """Assign ``eager``'s parameters and buffers ``names`` (the program's state dict) into ``graph`` (no copies).

    Every weight the graph reads must exist in ``eager`` with the same shape and dtype; raises
    ``ArtifactError`` naming the first ones that do not.
    """
    from .artifact import ArtifactError

    source = dict(eager.state_dict(keep_vars=True))
    own = dict(graph.state_dict(keep_vars=True))
    wanted = {n: own[n] for n in names}
    missing = [n for n in wanted if n not in source]
    wrong = [f"{n} {tuple(source[n].shape)}/{source[n].dtype} vs {tuple(t.shape)}/{t.dtype}"
             for n, t in wanted.items() if n in source and (source[n].shape != t.shape or source[n].dtype != t.dtype)]
    if missing or wrong:
        detail = (f"missing {missing[:5]}" if missing else "") + (f" shape/dtype differ: {wrong[:3]}" if wrong else "")
        raise ArtifactError(f"{where}: the graph's weights do not match the loaded model ({detail.strip()}); "
                            "was the artifact compiled for another checkpoint?")
    graph.load_state_dict({n: source[n] for n in wanted}, strict=False, assign=True)
