"""Compile a loaded pipeline's DiT for a set of shape buckets, and install or save the result.

For each bucket (a generation request: size, frames, guidance, batch) the compiler

1. captures the DiT's keyword arguments by running the pipeline up to the first denoising step
   (so the inputs are exactly what the family's pipeline passes, with no per-family code here);
2. traces the eager DiT with ``torch.export`` (:func:`trace_module`);
3. runs the pass manager for the quality tier, minus any passes named in ``disable``;
4. lowers attention onto the backend measured fastest on this device (:mod:`.attention_select`);
5. warms the rewritten graph up on the captured inputs (compiling its Triton kernels into the
   artifact's kernel cache) and measures its error against the eager DiT on those inputs.

:func:`compile_pipeline` returns a :class:`CompileReport` and, given ``out``, writes the artifact
(:mod:`.artifact`); :func:`install` puts the compiled graphs into a pipeline in place of its DiT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError
from . import artifact as art
from .compiled import CompiledModule, attach_weights, signature_key
from .manager import TIERS, PassManager
from .passes import FUSION_PASSES, graph_targets
from .trace import trace_module

STAGE = "transformer"


@dataclasses.dataclass
class BucketReport:
    key: str
    request: dict[str, Any]
    file: str
    trace_s: float
    passes_s: float
    warmup_s: float
    matches: dict[str, int]
    nodes_before: int
    nodes_after: int
    fused_ops: dict[str, int]
    attention: dict[str, Any] | None
    rel_err_vs_eager: float | None
    bytes: int = 0


@dataclasses.dataclass
class CompileReport:
    stage: str
    tier: str
    disabled: list[str]
    buckets: list[BucketReport]
    total_s: float = 0.0
    enabled: list[str] = dataclasses.field(default_factory=list)
    artifact: str | None = None
    artifact_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fusion_passes(tier: str, disable: Sequence[str] = (), enable: Sequence[str] = ()) -> list:
    """The fusion passes a compile runs, in order: those on by default plus ``enable``, minus ``disable``."""
    names = [cls.name for cls in FUSION_PASSES] + ["attention"]
    for field, given in (("disable", disable), ("enable", enable)):
        unknown = [n for n in given if n not in names]
        if unknown:
            raise InvalidArgumentError(field, f"unknown pass {unknown[0]!r}; passes: {', '.join(names)}")
    if tier not in TIERS:
        raise InvalidArgumentError("quality", f"expected one of {', '.join(TIERS)}, got {tier!r}")
    return [cls() for cls in FUSION_PASSES
            if (cls.default_enabled or cls.name in enable) and cls.name not in disable]


def pass_sources() -> dict[str, str]:
    """Hash of each pass's and each fused op's source file: an edit to either invalidates artifacts."""
    from .. import ops

    files = {cls.name: inspect.getsourcefile(cls) for cls in FUSION_PASSES}
    files["manager"] = inspect.getsourcefile(PassManager)
    for name in sorted(ops.registry.REGISTERED):
        files[f"op:{name}"] = inspect.getsourcefile(ops.registry.REGISTERED[name]._init_fn)
    return {name: art.sha256_text(Path(path).read_text())[:16] for name, path in sorted(files.items())}


def kernel_configs() -> dict[str, Any]:
    """The tile configuration of each tunable fused kernel this compile ran with (recorded, not re-tuned)."""
    from ..ops import qk_norm_rope

    name = os.environ.get(qk_norm_rope.CONFIG_ENV) or "default"
    return {"qk_norm_rope": {"config": name, **dataclasses.asdict(qk_norm_rope.kernel_config())}}


class _Captured(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for the DiT for one call: records the keyword arguments, then stops the generation."""

    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit
        self.kwargs: dict[str, Any] | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("dit"), name)

    def forward(self, **kwargs):
        self.kwargs = {k: v.detach().contiguous().clone() if isinstance(v, torch.Tensor) else v
                       for k, v in kwargs.items()}
        raise _Captured


def eager_dit(pipe) -> nn.Module:
    """The pipeline's native DiT, under any CUDA-graph or compiled wrapper."""
    return unwrap_dit(pipe.components[STAGE])


def unwrap_dit(module: nn.Module) -> nn.Module:
    """``module`` without its CUDA-graph and compiled wrappers: the eager native DiT."""
    from ..runtime.cudagraphs import CudaGraphModule

    while True:
        if isinstance(module, CudaGraphModule):
            module = module.module
        elif isinstance(module, CompiledModule):
            module = module.eager
        else:
            return module


def capture_inputs(pipe, request: dict[str, Any]) -> dict[str, Any]:
    """The DiT's keyword arguments for ``request`` (one short generation, stopped at the first DiT call)."""
    recorder = _Recorder(eager_dit(pipe))
    saved = pipe.components[STAGE]
    pipe.components[STAGE] = recorder
    try:
        pipe.generate(**{"prompt": "a compile-time example prompt", "seed": 0, **request, "progress": False})
    except _Captured:
        pass
    finally:
        pipe.components[STAGE] = saved
    if recorder.kwargs is None:
        raise InvalidArgumentError("bucket", f"the pipeline never called its DiT for {request}")
    return recorder.kwargs


@contextlib.contextmanager
def triton_cache(directory: Path | None):
    """Point Triton's on-disk kernel cache at ``directory`` while compiling (None: leave it)."""
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(directory)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = old


def _rel_err(a, b) -> float:
    """Relative error of ``a`` against ``b``: tensors, or the worst over the tensors of a structured output
    (a block's tuple, a diffusers model's output object)."""
    from torch.utils._pytree import tree_leaves

    pairs = [(x, y) for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True) if isinstance(y, torch.Tensor)]
    errs = [float((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-12)) for x, y in pairs]
    return max(errs, default=0.0)


def _fused_ops(gm) -> dict[str, int]:
    return {k: v for k, v in sorted(graph_targets(gm).items()) if k.startswith("diffc.") or "attention" in k}


def compile_bucket(pipe, request: dict[str, Any], *, tier: str, disable: Sequence[str], enable: Sequence[str],
                   attention: str, kernel_cache: Path | None, verify: bool = True):
    """Capture the DiT's inputs for one request, then :func:`compile_module`."""
    kwargs = capture_inputs(pipe, request)
    program, report, graph = compile_module(eager_dit(pipe), kwargs, device=pipe.device, dtype=pipe.dtype, tier=tier,
                                            disable=disable, enable=enable, attention=attention,
                                            kernel_cache=kernel_cache, verify=verify)
    report.request = dict(request)
    return program, report, graph


def compile_module(dit: nn.Module, kwargs: dict[str, Any], *, device: torch.device, dtype: torch.dtype,
                   tier: str = "fast", disable: Sequence[str] = (), enable: Sequence[str] = (),
                   attention: str = "auto", kernel_cache: Path | None = None, verify: bool = True):
    """Trace ``dit(**kwargs)``, rewrite it, lower attention and warm it up.

    Returns ``(program, BucketReport, graph)``: the rewritten ExportedProgram (what the artifact
    saves), the report, and the runnable unlifted graph sharing ``dit``'s weights (weight
    concatenations folded, Triton kernels compiled).
    """
    key = signature_key(kwargs)
    t0 = time.perf_counter()
    with torch.no_grad():
        program = trace_module(dit, kwargs)
    t1 = time.perf_counter()
    nodes_before = len(program.graph.nodes)
    counters = PassManager(passes=fusion_passes(tier, disable, enable), tier=tier).run(program)
    choice = None
    if "attention" not in disable:
        choice = lower_attention(program, device, dtype, attention, tier)
        counters.matches["attention"] = choice.pop("replaced")
    t2 = time.perf_counter()
    rel = None
    with torch.no_grad(), triton_cache(kernel_cache):
        graph = program.module()
        fold_weights(graph)
        out = graph(**kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t3 = time.perf_counter()
        if verify:
            rel = _rel_err(out, dit(**kwargs))
    report = BucketReport(key=key, request={}, file="", trace_s=t1 - t0, passes_s=t2 - t1,
                          warmup_s=t3 - t2, matches=dict(counters.matches), nodes_before=nodes_before,
                          nodes_after=len(program.graph.nodes), fused_ops=_fused_ops(program.graph_module),
                          attention=choice, rel_err_vs_eager=rel)
    return program, report, graph


def lower_attention(program, device: torch.device, dtype: torch.dtype, attention: str, tier: str) -> dict[str, Any]:
    """Measure the attention backends on this graph's attention shapes and lower onto the choice.

    ``attention`` is "auto" (every backend available here) or one backend name (measured and checked
    all the same, so a wrong or failing kernel falls back to "sdpa"). Under ``lossless`` a choice that
    is not torch's own kernel is measured and reported but not applied. Returns the choice as a dict
    with ``backend`` (a summary), ``replaced`` and ``applied``.
    """
    from .attention_select import select_attention_backend
    from .passes.attention import AttentionLoweringPass, attention_shapes

    check_attention(attention)
    gm = program.graph_module
    shapes = attention_shapes(gm, dtype)
    if not shapes:
        return {"backend": "none", "replaced": 0, "applied": False, "shapes": []}
    candidates = None if attention == "auto" else ["sdpa", attention]
    choice = select_attention_backend(shapes, device, dtype, candidates=candidates)
    lowering = AttentionLoweringPass(choice)
    applied = tier == "fast" or lowering.bit_exact
    replaced = lowering(gm) if applied else 0
    picked = sorted(set(choice.backends.values()))
    return {"backend": ",".join(picked), "replaced": replaced, "applied": applied, **choice.to_dict()}


def check_attention(attention: str) -> None:
    from .attention_select import BACKENDS

    if attention != "auto" and attention not in BACKENDS:
        raise InvalidArgumentError("attention", f"unknown backend {attention!r}; accepted: auto, {', '.join(BACKENDS)}")


def fold_weights(graph) -> int:
    """Fold weight concatenations a pass put in the graph into packed parameters (load-time prepack)."""
    try:
        from .prepack import fold_weight_concats
    except ImportError:
        return 0
    return fold_weight_concats(graph)


def compile_pipeline(pipe, requests: Sequence[dict[str, Any]], *, out: str | Path | None = None,
                     tier: str = "fast", disable: Sequence[str] = (), enable: Sequence[str] = (),
                     attention: str = "auto", install_graphs: bool = True, verify: bool = True,
                     log=print) -> CompileReport:
    """Compile ``pipe``'s DiT for each request in ``requests``; write an artifact at ``out`` if given.

    With ``install_graphs`` the compiled graphs replace the pipeline's DiT (``diffc run --compile``).
    """
    if not requests:
        raise InvalidArgumentError("bucket", "give at least one shape to compile (height/width[/num_frames])")
    fusion_passes(tier, disable, enable)  # validate names before any work
    check_attention(attention)
    if pipe.runtime_options.offload != "none":
        raise InvalidArgumentError("offload", "compiled graphs hold the whole DiT; compile and run without --offload")
    started = time.perf_counter()
    writer = art.ArtifactWriter(Path(out)) if out is not None else None
    try:
        cache = writer.file(art.TRITON_CACHE) if writer is not None else None
        programs, graphs, reports = {}, {}, []
        for i, request in enumerate(requests):
            program, report, graph = compile_bucket(pipe, request, tier=tier, disable=disable, enable=enable,
                                                    attention=attention, kernel_cache=cache, verify=verify)
            if report.key in programs:
                raise InvalidArgumentError("bucket", f"{request} gives the same DiT input shapes as an earlier bucket")
            report.file = f"{STAGE}/bucket-{i}.pt2"
            if writer is not None:
                report.bytes = writer.save_program(program, report.file)
            programs[report.key], graphs[report.key] = program, graph
            reports.append(report)
            log(describe_bucket(report))
        result = CompileReport(STAGE, tier, list(disable), reports, enabled=list(enable))
        if writer is not None:
            manifest = build_manifest(pipe, result, tier, disable, enable)
            result.artifact = str(writer.commit(manifest))
            result.artifact_bytes = art.directory_size(Path(result.artifact))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    result.total_s = time.perf_counter() - started
    if install_graphs:
        install(pipe, graphs, {"artifact": result.artifact, "tier": tier})
    return result


def build_manifest(pipe, report: CompileReport, tier: str, disable: Sequence[str],
                   enable: Sequence[str] = ()) -> dict[str, Any]:
    checkpoint = Path(pipe.source)
    return {
        "format_version": art.FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"path": str(checkpoint.resolve()), "pipeline_class": pipe.spec.pipeline_class,
                  "config_hash": art.config_hash(checkpoint)},
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "environment": art.environment(pipe.device),
        "built_with": art.informational(),
        "passes": {"tier": tier, "disabled": list(disable), "enabled": list(enable), "sources": pass_sources()},
        "kernels": kernel_configs(),
        "stages": {STAGE: {"buckets": [dataclasses.asdict(b) for b in report.buckets]}},
    }


def describe_bucket(b: BucketReport) -> str:
    shape = {k: v for k, v in b.request.items() if k != "prompt"}
    if isinstance(b.request.get("prompt"), list):
        shape["batch"] = len(b.request["prompt"])
    fused = ", ".join(f"{k} {v}" for k, v in b.matches.items())
    err = "" if b.rel_err_vs_eager is None else f", rel. error vs eager {b.rel_err_vs_eager:.2e}"
    att = ""
    if b.attention:
        att = f"; attention -> {b.attention.get('backend')}"
    return (f"  {STAGE} {shape}: traced {b.nodes_before} nodes in {b.trace_s:.1f}s; passes {b.passes_s:.1f}s "
            f"({fused}); {b.nodes_after} nodes{att}; warm-up {b.warmup_s:.1f}s{err}")


def load_artifact(pipe, path: str | Path) -> dict[str, Any]:
    """Check ``path`` against this pipeline and machine, then install its graphs; returns the manifest."""
    root = Path(path).expanduser()
    manifest = art.read_manifest(root)
    art.check_compatible(manifest, device=pipe.device, dtype=pipe.dtype,
                         model_hash=art.config_hash(Path(pipe.source)), where=str(root))
    if pipe.runtime_options.offload != "none":
        raise InvalidArgumentError("offload", "a compiled artifact holds the whole DiT graph; run it without --offload")
    dit = eager_dit(pipe)
    graphs = {}
    for bucket in manifest["stages"][STAGE]["buckets"]:
        program = art.load_program(root / bucket["file"])
        names = list(program.state_dict)
        graph = program.module()
        del program
        attach_weights(graph, dit, names, where=str(root / bucket["file"]))
        fold_weights(graph)
        graphs[bucket["key"]] = graph
    merge_kernel_cache(root / art.TRITON_CACHE)
    install(pipe, graphs, {"artifact": str(root), "tier": manifest["passes"]["tier"]})
    return manifest


def compile_cached(pipe, bucket: dict[str, Any], *, tier: str = "fast", log=print) -> dict[str, Any] | CompileReport:
    """``diffc run --compile``: load this bucket's artifact from the cache, or compile and cache it.

    The cache key covers the model config, dtype, tier, bucket, pass and kernel sources and the
    environment, so any change compiles anew instead of loading a stale graph.
    """
    from ..demo import cache_dir

    key_source = json.dumps({"model": art.config_hash(Path(pipe.source)), "dtype": str(pipe.dtype), "tier": tier,
                             "bucket": bucket, "passes": pass_sources(), "env": art.environment(pipe.device),
                             "format": art.FORMAT_VERSION}, sort_keys=True, default=str)
    path = cache_dir() / "compiled" / art.sha256_text(key_source)[:20]
    if (path / art.MANIFEST).is_file():
        log(f"diffc: using the compiled DiT cached at {path}")
        return load_artifact(pipe, path)
    log(f"diffc: compiling the DiT for {bucket} (cached at {path} for later runs)")
    return compile_pipeline(pipe, [bucket], out=path, tier=tier, log=log)


def merge_kernel_cache(source: Path) -> int:
    """Copy the artifact's compiled Triton kernels into this process's Triton cache; returns files copied."""
    if not source.is_dir():
        return 0
    target = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    copied = 0
    for path in source.rglob("*"):
        dest = target / path.relative_to(source)
        if path.is_file() and not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
            copied += 1
    return copied


def install(pipe, graphs: dict[str, Any], info: dict[str, Any]) -> CompiledModule:
    """Replace the pipeline's DiT by a :class:`CompiledModule` over ``graphs``, re-applying CUDA graphs."""
    from ..runtime.cudagraphs import wrap_cuda_graphs

    dit = eager_dit(pipe)
    wrap_cuda_graphs(pipe.components, pipe.device, False)
    compiled = CompiledModule(dit, graphs, info)
    pipe.components[STAGE] = compiled
    wrap_cuda_graphs(pipe.components, pipe.device, pipe.runtime_options.cuda_graphs)
    return compiled


__all__ = ["BucketReport", "CompileReport", "compile_pipeline", "load_artifact", "install", "capture_inputs"]
