"""A denoiser slot's stack of runtime layers (:class:`DiTStack`), built in order; the executor
(:mod:`.executor`) owns one per DiT.

::

    eager module (weights by checkpoint names)
      -> weight transforms (LoRA merges, fp8, QKV concatenation: in-place re-layouts of the weights)
      -> compiled graph (per repeated-block region, from an artifact or compiled in-process)
      -> step cache (skips a forward's middle blocks between similar steps)
      -> placement (resident, or layerwise offload streaming the blocks from pinned host memory)
      -> parallelism (CFG-parallel, Ulysses / ring sequence parallel: module hooks, ``diffc/parallel``)
      -> CUDA graphs (where placement and the cache allow)

``pipe.components["transformer"]`` (and ``"transformer_2"``) is a :class:`DiTStack`: pipelines call it as
they would the module, and read the module's attributes through it (``config``, ``dtype``). The layers
compose through the blocks: the compiled layer and the cache set a block's ``forward`` (the instance
attribute, so the checkpoint's names and the module tree stay as they are), offload drives its copies
from the blocks' forward hooks, and CUDA graphs capture the whole forward when nothing decides on the
host between blocks. Each layer is rebuilt alone: a new compiled graph or cache re-installs the block
forwards and drops the captured CUDA graphs (recaptured at the next call), weight transforms change
tensors in place (no re-trace, no recapture), turning graphs off reloads nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ..models.structure import RegionError, dit_regions, has_regions
from .cache.graphs import SegmentGraphs
from .cudagraphs import DEFAULT_MAX_GRAPHS, CudaGraphModule, graphs_off_reason


def unwrap(component: Any) -> Any:
    """The eager module behind a pipeline component (a :class:`DiTStack`'s or a graphed encoder's ``module``),
    else the component."""
    return component.module if isinstance(component, (DiTStack, CudaGraphModule)) else component


class DiTStack:
    """One denoiser slot's stack of layers (module docstring). Call it like the module."""

    def __init__(self, name: str, module: nn.Module, device: torch.device, cuda_graphs: bool | None = None,
                 placement: Any = None):
        self.__dict__.update(name=name, module=module, device=torch.device(device), transforms=[],
                             compiled=None, cache=None, placement=placement, graphs=None,
                             cuda_graphs=cuda_graphs, graphs_off_reason=None, parallel=None, _entry=module,
                             _bare=0, precompute=True)
        self._rebuild()

    # ---- the module's face ----------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        module = self.__dict__.get("module")
        if module is None:
            raise AttributeError(name)
        return getattr(module, name)

    def __repr__(self) -> str:
        return f"DiTStack({self.name}: {' -> '.join(self.layers())})"

    def __call__(self, *args, **kwargs):
        compiled = self.compiled if not self._bare else None
        if compiled is not None:
            compiled.begin()
        out = self._entry(*args, **kwargs)
        if compiled is not None:
            compiled.end(kwargs)
        return out

    forward = __call__

    # ---- layers ---------------------------------------------------------------------------------

    def set_compiled(self, compiled) -> None:
        """Install a :class:`~diffc.runtime.compiled.CompiledDiT` (None: run the eager blocks)."""
        self.__dict__["compiled"] = compiled
        self._rebuild()

    def set_cache(self, cache) -> None:
        """Install a step cache (an object with ``wrap_block`` / ``wrap_forward`` / ``describe``), or None."""
        self.__dict__["cache"] = cache
        self._rebuild()

    def set_placement(self, placement) -> None:
        self.__dict__["placement"] = placement
        self._rebuild()

    def set_cuda_graphs(self, enabled: bool | None) -> None:
        self.__dict__["cuda_graphs"] = enabled
        self._rebuild()

    def set_precompute(self, enabled: bool) -> None:
        """Let the pipeline pass inputs it precomputes for many steps at once (:meth:`takes`), or not."""
        self.__dict__["precompute"] = bool(enabled)

    def set_weight_quantization(self, scheme: str | None, graphs: dict[str, dict[str, Any]] | None = None) -> None:
        """Add (``"fp8"``) or remove (None) the fp8 weight transform (:mod:`.fp8`): buffers beside the
        weights, so no forward changes and nothing is rebuilt. ``graphs`` (by region, the compiled graphs
        about to be installed) lets the weights they do not read leave the device as they are quantized."""
        from .fp8 import Fp8Weights, check_scheme

        check_scheme(scheme)
        current = self._fp8()
        if scheme is None and current is not None:
            current.remove()
            self.remove_transform(current)
        elif scheme is not None and current is None:
            fp8 = Fp8Weights(self.module)
            self.add_transform(fp8.apply(release=fp8.unread(self._host_graphs(graphs))))

    def set_parallel(self, parallel) -> None:
        """Install a :class:`~diffc.parallel.layer.ParallelDiT` (attached: its hooks are on the module), or None."""
        self.__dict__["parallel"] = parallel
        self._rebuild()

    def add_transform(self, transform) -> None:
        """Record a weight transform applied in place (its ``describe()`` joins the stack's)."""
        self.transforms.append(transform)

    def remove_transform(self, transform) -> None:
        self.transforms.remove(transform)

    def layers(self) -> list[str]:
        out = ["eager " + type(self.module).__name__]
        out += [f"weights: {t.describe().get('kind', type(t).__name__)}" if hasattr(t, "describe")
                else f"weights: {type(t).__name__}" for t in self.transforms]
        if self.compiled is not None:
            out.append(f"compiled ({', '.join(self.compiled.graphs)})")
        if self.cache is not None:
            out.append(f"cache {self.cache.describe().get('kind', '')}".strip())
        if self.placement is not None:
            out.append(f"placement {getattr(self.placement, 'mode', 'offload')}")
        else:
            out.append("placement resident")
        if self.parallel is not None:
            out.append(f"parallel ({self.parallel.mesh.config.text()})")
        if self.graphs is None:
            out.append("no cuda graphs")
        else:
            out.append("cuda graphs" + (f" ({self.graphs.mode})" if isinstance(self.graphs, SegmentGraphs) else ""))
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "layers": self.layers(),
            "transforms": [t.describe() if hasattr(t, "describe") else type(t).__name__ for t in self.transforms],
            "compiled": self.compiled.describe() if self.compiled is not None else None,
            "cache": self.cache.describe() if self.cache is not None else None,
            "cuda_graphs": self.describe_graphs(),
            "parallel": self.parallel.describe() if self.parallel is not None else None,
        }

    def describe_graphs(self) -> dict[str, Any]:
        if self.graphs is not None:
            return self.graphs.describe()
        out: dict[str, Any] = {"enabled": False}
        if self.graphs_off_reason:
            out["reason"] = self.graphs_off_reason
        return out

    def takes(self, keyword: str) -> bool:
        """Whether a call may pass ``keyword``, an input the pipeline precomputes from the module's weights (FLUX's
        ``modulation``): not under offload (the weights are not all on the device), and a compiled DiT has graphs
        for calls that pass it (an artifact compiled without it keeps being served). ``precompute = False`` turns
        every such input off (a benchmark's comparison)."""
        compiled = self.compiled if not self._bare else None
        if not self.precompute or self.placement is not None:
            return False
        return compiled is None or any(f",{keyword}=" in f",{key}" for key in compiled.buckets)

    @contextlib.contextmanager
    def bare(self) -> Iterator[nn.Module]:
        """Run the plain eager module inside the block (compile-time capture and reference outputs)."""
        self.__dict__["_bare"] += 1
        fp8 = self._fp8()
        if fp8 is not None:
            fp8.restore()  # a compile traces the layers and computes its bf16 reference on the originals
        self._install_block_forwards(bare=True)
        self.__dict__["_entry"] = self.module
        try:
            yield self.module
        finally:
            self.__dict__["_bare"] -= 1
            self._rebuild()

    # ---- building -------------------------------------------------------------------------------

    def _rebuild(self) -> None:
        if self._bare:
            return
        mode, reason = self._graphs_plan()
        old = self.graphs
        if old is not None:
            old.reset()  # a captured graph holds the old forwards
        if mode == "blocks":
            graphs = self.cache.segment_graphs(CudaGraphModule)
        elif mode == "whole":
            graphs = old if old is not None and not isinstance(old, SegmentGraphs) else CudaGraphModule(self.module)
            # one graph per compiled call key (Z-Image compiles one per prompt length): past the limit, a key
            # would run without its graph; the graphs share one memory pool, so each costs its static buffers
            graphs.max_graphs = max(DEFAULT_MAX_GRAPHS, len(getattr(self.compiled, "buckets", ())))
        else:
            graphs = None
        self.__dict__.update(graphs=graphs, graphs_off_reason=reason)
        self._install_block_forwards(bare=False)
        self._build_entry()
        self._place_originals()

    def _fp8(self):
        from .fp8 import Fp8Weights

        return next((t for t in self.transforms if isinstance(t, Fp8Weights)), None)

    def _place_originals(self) -> None:
        """With the fp8 weight transform and compiled graphs on a GPU, resident: the bf16 weights no graph reads
        go to host memory (:meth:`~diffc.runtime.fp8.Fp8Weights.place`); otherwise every one is on the device."""
        fp8 = self._fp8()
        if fp8 is not None:
            fp8.place(self._host_graphs(None if self.compiled is None else self.compiled.graphs))

    def _host_graphs(self, graphs: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
        """``graphs`` where the weights they do not read may live on the host (a GPU, resident, not bare), else None."""
        if self._bare or self.placement is not None or self.device.type != "cuda":
            return None
        return graphs

    def _install_block_forwards(self, bare: bool) -> None:
        if not has_regions(self.module):
            if self.compiled is not None or self.cache is not None:
                raise RegionError(f"{type(self.module).__name__} declares no repeated blocks, which compiled "
                                  "graphs and the step cache run on")
            return
        blocks, forwards = {}, {}
        for region in dit_regions(self.module):
            for index, block in enumerate(region.blocks):
                block.__dict__.pop("forward", None)
                if bare or (self.compiled is None and self.cache is None):
                    continue
                forward = block.forward
                if self.compiled is not None:
                    forward = self.compiled.block_forward(region.name, block, forward)
                blocks[(region.name, index)], forwards[(region.name, index)] = block, forward
        if not bare and isinstance(self.graphs, SegmentGraphs):
            forwards = {**forwards, **self.graphs.wrap(blocks, forwards)}  # a segment's first block replays its graph
        for (name, index), block in blocks.items():
            forward = forwards[(name, index)]
            if self.cache is not None:
                forward = self.cache.wrap_block(name, index, block, forward)
            block.forward = forward

    def _build_entry(self) -> None:
        entry = self.graphs if self.graphs is not None and not isinstance(self.graphs, SegmentGraphs) else self.module
        if self.cache is not None:
            entry = self.cache.wrap_forward(entry)
        self.__dict__["_entry"] = entry

    def _graphs_plan(self) -> tuple[str | None, str | None]:
        """How CUDA graphs run: "whole" (one graph per forward), "blocks" (per block segment, when the
        cache decides between blocks) or None with the reason."""
        requested = self.cuda_graphs
        off = graphs_off_reason(requested, self.device)
        if off is not None:
            return None, off
        reason = self._graphs_blocked(explicit=requested is True)
        if reason is not None:
            return None, reason
        if self.cache is not None and not getattr(self.cache, "graph_safe", False):
            if hasattr(self.cache, "segment_graphs"):
                return "blocks", None
            return None, "the step cache decides on the host between blocks"
        return "whole", None

    def _graphs_blocked(self, explicit: bool) -> str | None:
        reads = getattr(self.compiled, "host_reads", None)
        if reads:
            return (f"the compiled graphs of {', '.join(reads)} read the attention mask on the host (attention "
                    "over the keys a padding mask keeps), which a CUDA graph cannot capture")
        parallel = self.parallel
        if parallel is not None and not (explicit and parallel.graph_safe):
            return parallel.graphs_reason
        placement = self.placement
        if placement is not None and not getattr(placement, "graph_safe", False):
            # model offload: graphs still work when asked for (recaptured once per generation)
            if not (explicit and getattr(placement, "mode", None) == "model"):
                return getattr(placement, "graphs_reason", None) or "offload moves the weights between calls"
        return None
