"""The runtime executor: the one owner of a pipeline's denoiser slots (a :class:`~.dit_stack.DiTStack` each, whose
layers :mod:`.dit_stack` describes), the text encoders' CUDA graphs and the offload placement of every component.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ..models.structure import RegionError
from ..models.vae_blocks import has_fused_path, set_fused_vae
from .dit_stack import DiTStack, unwrap
from .encoders import EncoderGraphs
from .options import RuntimeOptions

DENOISERS = ("transformer", "transformer_2")


class Executor:
    """Builds and owns every denoiser slot's :class:`DiTStack`, the encoders' CUDA graphs and the offload."""

    def __init__(self, components: dict[str, Any], device: torch.device, options: RuntimeOptions,
                 text_encoders: tuple[str, ...] = (), *, streams=None):
        self.components, self.device, self.options = components, torch.device(device), options
        self.offload = None
        self.stacks: dict[str, DiTStack] = {}
        for name in DENOISERS:
            module = components.get(name)
            if isinstance(module, nn.Module):
                stack = DiTStack(name, module, self.device, options.cuda_graphs)
                self.stacks[name] = stack
                components[name] = stack
        # the encoders named in ``text_encoders`` replay CUDA graphs where they can
        self.encoders = EncoderGraphs(components, text_encoders, self.device, options.cuda_graphs)
        if options.offload != "none":
            self.place(options.offload, prefetch=options.offload_prefetch, resident_blocks=options.resident_blocks,
                       text_encoders=text_encoders, streams=streams)

    def place(self, mode: str, *, prefetch: int = 1, resident_blocks: int | None = None,
              text_encoders: tuple[str, ...] = (), streams=None, **placement) -> None:
        """(Re)build the placement layer: offload ``mode`` (or "none") for the components and every DiT.

        Compiled graphs and weight transforms stay as they are; each stack drops its captured CUDA
        graphs (the weights move) and decides again whether graphs can run under this placement.
        """
        from .offload import apply_offload

        if self.offload is not None:
            self.offload.remove()
            self.offload = None
        # offload hooks go on the eager encoders, which then move between host and device at every call
        self.encoders.set_blocked(None if mode == "none" else f"{mode} offload moves the encoders' weights")
        if mode != "none":
            for stack in self.stacks.values():  # offload streams every weight from the device's copy
                fp8 = stack._fp8()
                if fp8 is not None:
                    fp8.restore()
            eager = {name: unwrap(c) for name, c in self.components.items()}  # the stacks notice moved weights
            self.offload = apply_offload(eager, self.device, mode, prefetch=prefetch,
                                         resident_blocks=resident_blocks, text_encoders=text_encoders,
                                         streams=streams, dits=tuple(self.stacks), **placement)
        for name, stack in self.stacks.items():
            stack.set_placement(None if self.offload is None else _Placement(self.offload, name))

    def describe(self) -> dict[str, Any]:
        """What the perf dump shows: offload, the first DiT's CUDA graphs and compiled graphs, every stack."""
        out: dict[str, Any] = {}
        if self.offload is not None:
            out["offload"] = self.offload.describe()
        first = next(iter(self.stacks.values()), None)
        out["cuda_graphs"] = first.describe_graphs() if first is not None else {"enabled": False}
        out["compiled"] = first.compiled.describe() if first is not None and first.compiled is not None else None
        out["cache"] = first.cache.describe() if first is not None and first.cache is not None else None
        out["dit"] = {name: stack.describe() for name, stack in self.stacks.items()}
        out["encoders"] = self.encoders.describe()
        return out

    def compiled(self):
        """The first DiT's compiled layer, or None."""
        first = next(iter(self.stacks.values()), None)
        return None if first is None else first.compiled

    @contextlib.contextmanager
    def bare(self) -> Iterator[dict[str, nn.Module]]:
        """Every DiT runs as its plain eager module inside the block."""
        with contextlib.ExitStack() as stack:
            yield {name: stack.enter_context(s.bare()) for name, s in self.stacks.items()}

    def install_compiled(self, compiled: dict[str, Any]) -> None:
        """Install a :class:`~diffc.runtime.compiled.CompiledDiT` per denoiser slot named in ``compiled``.

        On a GPU the VAE is lowered with the DiT: a VAE with fused kernels (``set_fused_kernels``: diffc's Wan and
        2-D KL VAEs; the generic backend's diffusers autoencoders: their group norms) switches them on, so a
        compiled pipeline's decode runs them too, and the text encoders' masked attention runs on SDPA's fused
        kernels (:meth:`~.encoders.EncoderGraphs.set_fused_attention`); not in the ``lossless`` tier, whose output
        stays bit-identical to eager (the fused kernels sum in another order).
        """
        from ..compile.pipeline import fused_vae_tier

        for name, layer in compiled.items():
            self.stacks[name].set_compiled(layer)
        if compiled and self.device.type == "cuda":
            fused = all(fused_vae_tier(getattr(layer, "info", {}).get("tier")) for layer in compiled.values())
            self.set_fused_vae(fused)
            self.encoders.set_fused_attention(fused)

    def set_fused_vae(self, enabled: bool) -> None:
        """Switch the fused path of every VAE component that has one (:func:`~diffc.models.vae_blocks.set_fused_vae`)."""
        for component in self.components.values():
            if isinstance(component, nn.Module) and has_fused_path(component):
                set_fused_vae(component, enabled)

    def set_cuda_graphs(self, enabled: bool | None) -> None:
        for stack in self.stacks.values():
            stack.set_cuda_graphs(enabled)
        self.encoders.set_cuda_graphs(enabled)

    def set_weight_quantization(self, scheme: str | None, graphs: dict[str, dict[str, dict[str, Any]]] | None = None
                                ) -> None:
        """Add (``"fp8"``) or remove (None) the fp8 weight transform on every DiT (:mod:`.fp8`); ``graphs``:
        per DiT, the compiled graphs by region about to be installed (see :meth:`DiTStack.set_weight_quantization`)."""
        from ..errors import InvalidArgumentError
        from .fp8 import check_scheme

        check_scheme(scheme)
        if scheme is not None and self.offload is not None:
            raise InvalidArgumentError("quality", f"the fp8 tier keeps fp8 copies of the DiT's weights on the device; "
                                       f"it does not run with offload {self.offload.mode!r} (use --offload none)")
        if scheme is not None:
            from ..ops.fp8 import fp8_gemm_unavailable

            why = fp8_gemm_unavailable(self.device)
            if why is not None:
                raise InvalidArgumentError("quality", f"the fp8 tier cannot run here: {why}; use --quality fast")
        for name, stack in self.stacks.items():
            stack.set_weight_quantization(scheme, None if graphs is None else graphs.get(name))

    def place_originals(self) -> None:
        """Every DiT's fp8 bf16 originals where its installed graphs need them (after a failed artifact load)."""
        for stack in self.stacks.values():
            stack._place_originals()

    def weight_quantization(self) -> str | None:
        """"fp8" when the DiTs carry the fp8 weight transform, else None."""
        return "fp8" if any(s._fp8() is not None for s in self.stacks.values()) else None

    def check_cache(self, config) -> None:
        """Raise ``InvalidArgumentError`` if a :class:`~diffc.runtime.cache.CacheConfig` cannot run on these DiTs."""
        if config is not None and any(s.parallel is not None for s in self.stacks.values()):
            from ..errors import InvalidArgumentError

            raise InvalidArgumentError("cache", "the step cache decides per rank, which a multi-GPU run cannot "
                                       "keep in step yet; run multi-GPU without --cache")
        for stack in self.stacks.values():
            _build_cache(config, stack.module)

    def set_cache(self, config) -> None:
        """Install the step cache ``config`` asks for on every DiT (None: remove it). A cache with equal
        settings stays (its state is reset at each generation), so its CUDA graphs are not recaptured."""
        for stack in self.stacks.values():
            current = stack.cache
            if config is None:
                if current is not None:
                    stack.set_cache(None)
            elif current is None or getattr(current, "config", None) != config:
                stack.set_cache(_build_cache(config, stack.module))

    def set_parallel(self, mesh) -> None:
        """Spread every DiT over the ranks of ``mesh`` (a :class:`~diffc.parallel.Mesh`; None: one process)."""
        from ..errors import InvalidArgumentError
        from ..parallel.layer import ParallelDiT

        if mesh is not None and self.options.offload != "none":
            raise InvalidArgumentError("offload", f"'{self.options.offload}' offload with several GPUs is not "
                                       "supported yet: each rank holds the whole DiT; use --offload none "
                                       "(or one GPU with offload)")
        for stack in self.stacks.values():
            if stack.parallel is not None:
                stack.parallel.detach()
            layer = None
            if mesh is not None:
                layer = ParallelDiT(stack.module, mesh)
                layer.attach()
            stack.set_parallel(layer)

    def cache_warnings(self) -> list[str]:
        found = [w for stack in self.stacks.values() if stack.cache is not None
                 for w in getattr(stack.cache, "warnings", lambda: [])()]
        return list(dict.fromkeys(found))

    def begin_generation(self, total_steps: int | None) -> None:
        """A generation of ``total_steps`` denoising steps starts: every cache forgets the last one."""
        for stack in self.stacks.values():
            if stack.cache is not None:
                stack.cache.begin_generation(total_steps)

    def begin_step(self, index: int) -> None:
        for stack in self.stacks.values():
            if stack.cache is not None:
                stack.cache.begin_step(index)

    def end_generation(self) -> None:
        for stack in self.stacks.values():
            if stack.cache is not None:
                stack.cache.end_generation()


def _build_cache(config, module: nn.Module):
    from ..errors import InvalidArgumentError
    from .cache import build_cache

    try:
        return build_cache(config, module)
    except RegionError as exc:
        raise InvalidArgumentError("cache", f"this model ({type(module).__name__}) does not support a step cache yet; "
                                            f"run it without one (why: {exc})") from None


class _Placement:
    """The placement layer of one DiT under offload: its mode and whether CUDA graphs can capture it."""

    def __init__(self, handle, name: str):
        self.handle, self.name, self.mode = handle, name, handle.mode

    @property
    def graph_safe(self) -> bool:
        return self.handle.graph_safe

    @property
    def graphs_reason(self) -> str:
        if self.mode == "layerwise":
            return ("layerwise offload copies blocks from registered host memory, which PyTorch will not "
                    "capture in a CUDA graph (see diffc/runtime/offload.py)")
        return "model offload moves the DiT's weights to a new address every generation"

    def describe(self) -> dict[str, Any]:
        ring = self.handle.rings.get(self.name)
        return {"mode": self.mode, **({"ring": ring.describe()} if ring is not None else {})}
