"""The two engines under test behind one interface: DiT forward, VAE decode, text encode, generation.

An engine is loaded either from a saved checkpoint (``diffusers.<Pipeline>.from_pretrained`` or
``diffc.load``: the whole pipeline, for end-to-end runs) or, with ``--skip-e2e``, as bare DiT + VAE
modules sharing one set of random weights in memory.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
import warnings
from typing import Any

import numpy as np
import torch

from .families import Family
from .measure import StepTimer, sync
from .specs import Workload

log = logging.getLogger("bench")


@dataclasses.dataclass
class Generation:
    output: np.ndarray  # uint8 image (H, W, 3) or video (F, H, W, 3)
    wall_s: float
    step_ms: list[float]
    stages_s: dict[str, float] | None = None  # diffc's per-stage wall times
    stage_peak_gb: dict[str, float] | None = None
    peak_gb: float | None = None
    runtime: dict[str, Any] | None = None  # diffc's timings.runtime (the cache's report among it)


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    return out.sample if hasattr(out, "sample") else out[0]


class Engine:
    """Common parts; ``kind`` is "diffusers" or "diffc"."""

    kind = ""

    def __init__(self, family: Family, device: torch.device, dtype: torch.dtype, transformer, vae, pipe=None):
        self.family, self.device, self.dtype = family, device, dtype
        self.transformer, self.vae, self.pipe = transformer, vae, pipe
        self.compiled = False
        self.compile_reports: list = []

    @property
    def has_pipeline(self) -> bool:
        return self.pipe is not None

    @property
    def components_key(self) -> str:
        """Configurations with the same key share one VAE decode / text encode measurement."""
        return self.kind

    def close(self) -> None:
        """Remove what this engine installed on its modules (nothing, unless overridden)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _first(self.vae.decode(latents.to(next(self.vae.parameters()).dtype)))

    def regional_compile(self) -> str:
        """torch.compile each repeated block (FLUX's two block kinds, Wan's blocks) with fullgraph=True."""
        model = self.transformer
        self.compiled = True
        if hasattr(model, "compile_repeated_blocks") and getattr(model, "_repeated_blocks", None):
            model.compile_repeated_blocks(fullgraph=True)
            return "compile_repeated_blocks(fullgraph=True)"
        blocks = self.repeated_blocks()
        for block in blocks:
            block.compile(fullgraph=True)
        return f"torch.compile(fullgraph=True) on each of {len(blocks)} repeated blocks"

    def repeated_blocks(self) -> list[torch.nn.Module]:
        """diffc's ``_repeated_blocks`` names ModuleList attributes; diffusers' names block classes."""
        model, names = self.transformer, set(getattr(self.transformer, "_repeated_blocks", None) or ())
        if not names:  # a diffusers class without the attribute (SD3): every direct ModuleList of blocks
            return [block for child in model.children() if isinstance(child, torch.nn.ModuleList) for block in child]
        lists = [getattr(model, n) for n in names if isinstance(getattr(model, n, None), torch.nn.ModuleList)]
        if lists:
            return [block for blocks in lists for block in blocks]
        return [m for m in model.modules() if type(m).__name__ in names]


class DiffusersEngine(Engine):
    kind = "diffusers"

    @classmethod
    def from_checkpoint(cls, family: Family, path: str, device: torch.device, dtype: torch.dtype) -> "DiffusersEngine":
        import diffusers

        pipe_cls = getattr(diffusers, family.diffusers_pipeline)
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
        if device.type == "cuda":
            try:  # straight onto the GPU (needs accelerate); fall back to a CPU load and a move
                pipe = pipe_cls.from_pretrained(path, torch_dtype=dtype, device_map=str(device))
            except (ValueError, NotImplementedError, ImportError) as exc:
                log.warning("device_map load failed (%s); loading on the CPU and moving", exc)
                pipe = pipe_cls.from_pretrained(path, torch_dtype=dtype).to(device)
        else:
            pipe = pipe_cls.from_pretrained(path, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return cls(family, device, dtype, pipe.transformer, pipe.vae, pipe)

    def forward(self, inputs: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            if self.family.diffusers_forward is not None:  # a diffusers DiT whose call differs from diffc's
                return self.family.diffusers_forward(self.transformer, inputs)
            return self.transformer(**inputs, return_dict=False)[0]

    def encode(self, wl: Workload) -> None:
        with torch.no_grad():
            self.family.diffusers_encode(self.pipe, wl)

    def generate(self, wl: Workload, steps: int) -> Generation:
        timer = StepTimer(self.device)
        hook = self.pipe.transformer.register_forward_pre_hook(timer.begin)

        def on_step_end(_pipe, _i, _t, _kwargs):
            timer.end()
            return {}

        kwargs = dict(self.family.call_kwargs(wl), num_inference_steps=steps)
        try:
            sync(self.device)
            start = time.perf_counter()
            out = self.pipe(prompt=wl.prompt, generator=torch.Generator("cpu").manual_seed(wl.seed), output_type="np",
                            callback_on_step_end=on_step_end, **kwargs)
            sync(self.device)
            wall = time.perf_counter() - start
        finally:
            hook.remove()
        return Generation(self.family.diffusers_output(out), wall, timer.step_ms())


class DiffcEngine(Engine):
    kind = "diffc"

    def __init__(self, family: Family, device: torch.device, dtype: torch.dtype, transformer, vae, pipe=None):
        from diffc.runtime.dit_stack import DiTStack

        if not isinstance(transformer, DiTStack):  # a bare DiT (--skip-e2e): a stack of its own
            transformer = DiTStack("transformer", transformer, device, cuda_graphs=False)
        super().__init__(family, device, dtype, transformer, vae, pipe)

    @classmethod
    def from_checkpoint(cls, family: Family, path: str, device: torch.device, dtype: torch.dtype) -> "DiffcEngine":
        import diffc

        pipe = diffc.load(path, device=device, dtype=dtype, cuda_graphs=False)  # graphs are their own config
        return cls(family, device, dtype, pipe.components["transformer"], pipe.components["vae"], pipe)

    def compile(self, inputs: dict[str, Any], wl: Workload, *, disable: tuple[str, ...] = (),
                enable: tuple[str, ...] = (), graphs: bool = False, tier: str = "fast", precompute: bool = True,
                attention: str = "auto") -> str:
        """diffc's compiler on the DiT's regions: graphs for the benchmark's DiT inputs (as a step passes them:
        :meth:`step_inputs`) and, with a pipeline, for the shapes its generation passes (Wan's CFG pair is batch
        2). ``tier="fp8"`` adds the fp8 weight transform first (removed again by any other tier).
        ``precompute=False``: no input the pipeline precomputes for many steps (``DiTStack.takes``).
        ``attention``: the compiler's ``--attention`` (one backend name: measured against torch's own and lowered
        onto where it is correct and faster, as ``diffc compile --attention NAME`` does)."""
        from diffc.compile.pipeline import capture_inputs, compile_dit, describe_bucket, fused_vae_tier
        from diffc.compile.regions import call_key
        from diffc.runtime.compiled import CompiledDiT

        stack = self.transformer
        stack.set_compiled(None)
        stack.set_precompute(precompute)
        self.setup_key = None
        stack.set_weight_quantization("fp8" if tier == "fp8" else None)  # the fp8 tier's weight copies, or none
        calls = [self.step_inputs(inputs)]
        if self.pipe is not None:
            captured = capture_inputs(self.pipe, dict(self.family.call_kwargs(wl), prompt=wl.prompt))["transformer"]
            if call_key((), captured) != call_key((), calls[0]):
                calls.append(captured)
        by_region, keys, lines, shared = {}, [], [], {}
        with stack.bare() as eager:
            for kwargs in calls:
                report = compile_dit(eager, kwargs, graphs=by_region, shared=shared, device=self.device,
                                     dtype=self.dtype, disable=disable, enable=enable, tier=tier, attention=attention)
                keys.append(report.key)
                self.compile_reports.append(report)
                lines.append(" ".join(describe_bucket(report).split()))
        stack.set_compiled(CompiledDiT(by_region, keys, {"tier": tier, "disabled": list(disable)}))
        fused = self.device.type == "cuda" and fused_vae_tier(tier)  # as Executor.install_compiled
        self.fused_vae(fused)
        self.fused_encoders(fused)
        if graphs:
            self.cuda_graphs()
        return "diffc compile" + (f" {tier}" if tier != "fast" else "") + \
            (f" --attention {attention}" if attention != "auto" else "") + \
            (f" without {', '.join(disable)}" if disable else "") + \
            (f" with {', '.join(enable)}" if enable else "") + \
            (" + CUDA graphs" if graphs else "") + ": " + " | ".join(lines)

    def close(self) -> None:
        """The DiT's blocks back to their own forwards, no CUDA graphs (the modules may be shared)."""
        self.transformer.set_compiled(None)
        self.transformer.set_cuda_graphs(False)
        self.transformer.set_precompute(True)
        self.encoder_graphs(False)
        self.fused_vae(False)
        self.fused_encoders(False)

    def encoder_graphs(self, enabled: bool) -> None:
        """The pipeline's text encoders replaying CUDA graphs or eager (the executor's ``encoders``; a pipeline
        loaded with CUDA graphs on runs them graphed)."""
        if self.pipe is not None:
            self.pipe.executor.encoders.set_cuda_graphs(enabled)

    def fused_vae(self, enabled: bool) -> None:
        """The VAE's fused kernels on or off, as the executor switches them with a compiled DiT on a GPU
        (``Executor.install_compiled``)."""
        from diffc.models.vae_blocks import has_fused_path, set_fused_vae

        if has_fused_path(self.vae):
            set_fused_vae(self.vae, enabled)

    def fused_encoders(self, enabled: bool) -> None:
        """The text encoders' masked attention on SDPA's fused kernels (contiguous masks) or as transformers calls it,
        as the executor switches it with a compiled DiT on a GPU (``Executor.install_compiled``)."""
        if self.pipe is not None:
            self.pipe.executor.encoders.set_fused_attention(enabled)

    @property
    def components_key(self) -> str:
        from diffc.models.vae_blocks import uses_fused_vae

        encoders = None if self.pipe is None else self.pipe.executor.encoders
        graphed = encoders is not None and bool(encoders.modules) and encoders.reason is None
        fused = encoders is not None and encoders.fused_attention
        return self.kind + (" (fused VAE)" if uses_fused_vae(self.vae) else "") + \
            (" (graphed encoders)" if graphed else "") + (" (fused encoder attention)" if fused else "")

    def ensure_compiled(self, inputs: dict[str, Any], wl: Workload, *, graphs: bool = False,
                        precompute: bool = True) -> str:
        """:meth:`compile` with the default passes, unless the engine is compiled so already (cache configs
        share the compiled DiT of ``diffc-compiled``). ``precompute=False``: neither the pipeline nor the DiT
        forward passes an input precomputed for many steps at once (FLUX's adaLN modulation)."""
        key = ("compiled", graphs, precompute)
        if getattr(self, "setup_key", None) != key or self.transformer.compiled is None:
            self.setup_description = self.compile(inputs, wl, graphs=graphs, precompute=precompute) + \
                ("" if precompute else "; no precomputed step inputs")
            self.setup_key = key
        return self.setup_description

    def clear_cache(self) -> None:
        """No step cache on the DiT (a cache configuration leaves its cache installed)."""
        self.transformer.set_cache(None)

    def ensure_eager(self) -> str:
        """The eager DiT without CUDA graphs, as ``diffc-eager`` runs it."""
        self.transformer.set_compiled(None)
        self.transformer.set_cuda_graphs(False)
        self.transformer.set_precompute(True)
        self.transformer.set_weight_quantization(None)
        self.encoder_graphs(False)
        self.fused_vae(False)
        self.fused_encoders(False)
        self.setup_key = ("eager",)
        return "eager"

    def cuda_graphs(self) -> str:
        """Capture and replay the DiT forward and the text encoders in CUDA graphs (the executor's graph layers,
        as a pipeline loaded with CUDA graphs on runs them)."""
        self.transformer.set_cuda_graphs(True)
        self.encoder_graphs(True)
        return "CUDA graphs"

    def forward(self, inputs: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            return _first(self.transformer(**self.step_inputs(inputs)))  # a diffusers model's output: generic backend

    def step_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The DiT call a denoising step makes from the benchmark's ``inputs``: with the adaLN modulation the
        pipeline precomputes for all of a generation's steps (FLUX.1, Qwen-Image: ``modulation``, computed once
        here, outside the timed calls; ``e2e`` pays it once a window of steps) where the stack takes it."""
        stack = self.transformer
        module = stack.module
        if not hasattr(module, "modulation") or not stack.takes("modulation") or "modulation" in inputs:
            return inputs
        key = (id(inputs), len(stack.transforms))
        if getattr(self, "_step_key", None) != key:
            names = inspect.signature(module.modulation).parameters
            kwargs = {k: inputs[k] for k in names if inputs.get(k) is not None}
            with torch.no_grad():
                modulation = module.modulation(**kwargs, dtype=inputs["hidden_states"].dtype)
            self._step_key, self._step = key, {**inputs, "modulation": modulation}
        return self._step

    def encode(self, wl: Workload) -> None:
        if self.family.diffc_encode is not None:
            with torch.inference_mode():
                self.family.diffc_encode(self.pipe, wl)
            return
        from diffc.pipelines.stages import RunContext
        from diffc.runtime.perf import PerfRecorder

        pipe = self.pipe
        request = pipe.resolve(prompt=wl.prompt, **self.family.call_kwargs(wl))
        state = dataclasses.asdict(request)
        state.update(prompt=request.prompts, seeds=[wl.seed])
        stage = next(s for s in pipe.graph.stages if s.name == "encode_prompt")
        ctx = RunContext(pipe.components, pipe.device, pipe.dtype, PerfRecorder(pipe.device), progress=False)
        with torch.inference_mode():
            stage.fn(ctx, {k: state[k] for k in stage.inputs})

    def generate(self, wl: Workload, steps: int, cache: tuple[str, dict[str, Any]] | None = None) -> Generation:
        """A whole generation; ``cache``: ``(kind, options)`` of a step cache for it (None: none)."""
        kwargs = dict(self.family.call_kwargs(wl), num_inference_steps=steps)
        if cache is not None:
            kwargs.update(cache=cache[0], cache_options=dict(cache[1]))
        sync(self.device)
        start = time.perf_counter()
        out = self.pipe.generate(wl.prompt, seed=wl.seed, progress=False, **kwargs)
        sync(self.device)
        wall = time.perf_counter() - start
        t = out.timings
        to_gb = (lambda mb: None if mb is None else mb / 1024)
        return Generation(self.family.diffc_output(out), wall, list(t.step_ms), dict(t.stages),
                          {k: to_gb(v) for k, v in t.stage_peak_memory_mb.items()}, to_gb(t.peak_memory_mb), t.runtime)


ENGINES = {"diffusers": DiffusersEngine, "diffc": DiffcEngine}
