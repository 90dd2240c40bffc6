"""Compile a loaded pipeline's DiTs for shape buckets, and write the artifact.

For each bucket (a generation request: size, frames, guidance, batch) the compiler

1. captures each denoiser's keyword arguments by running the pipeline up to its first DiT call (so
   the inputs are exactly what the family's pipeline passes, with no per-family code here);
2. runs the eager DiT once on them, recording the arguments of each region's first block
   (:func:`~.regions.capture_region_inputs`) and the output (the reference);
3. compiles each region (:func:`~.compiler.compile_region`): trace one block, run the passes for the
   quality tier, lower attention onto the backend measured fastest, warm the graph up;
4. runs the DiT with the compiled regions and measures its error against the eager output.

Regions with the same code and shapes in another denoiser (Wan2.2's second expert) reuse the graph.
:func:`compile_pipeline` returns the report and the compiled graphs per denoiser; given ``out`` it
writes the artifact (:mod:`.artifact`). The pipeline object is used through a small duck-typed
surface: ``generate``, ``spec``, ``device``, ``dtype``, ``source`` and ``executor`` (``stacks`` of
denoisers with ``module``, and ``bare()``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..models.vae_blocks import has_fused_path, set_fused_vae, uses_fused_vae
from . import artifact as art
from .compiler import (BucketReport, check_attention, compile_region, fusion_passes, kernel_configs, pass_sources,
                       triton_cache)
from .examples import EXAMPLE_PROMPT, example_request, expand_prompt_lengths
from .numerics import output_rel_err
from .regions import RegionGraph, call_key, capture_region_inputs, dit_regions


@dataclasses.dataclass
class DiTBucketReport:
    """One denoiser compiled for one request: its regions' reports and the whole DiT's error."""

    stage: str
    key: str
    request: dict[str, Any]
    regions: list[BucketReport]
    rel_err_vs_eager: float | None
    reused: list[str] = dataclasses.field(default_factory=list)  # regions whose graph an earlier bucket compiled

    @property
    def matches(self) -> dict[str, int]:
        """Pass matches over the whole DiT (each region's count times its blocks)."""
        total: dict[str, int] = {}
        for r in self.regions:
            for name, n in r.matches.items():
                total[name] = total.get(name, 0) + n * r.blocks
        return total


@dataclasses.dataclass
class CompileReport:
    tier: str
    disabled: list[str]
    buckets: list[DiTBucketReport]
    total_s: float = 0.0
    enabled: list[str] = dataclasses.field(default_factory=list)
    artifact: str | None = None
    artifact_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Captured(Exception):
    pass


def capture_inputs(pipe, request: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each denoiser's keyword arguments for ``request`` (one generation, stopped at the first DiT call).

    A denoiser the pipeline had not called by then (a second expert that runs in later steps) gets
    the arguments of one with the same class and config.
    """
    stacks = pipe.executor.stacks
    recorded: dict[str, dict[str, Any]] = {}
    hooks = []

    def recorder(name: str):
        def hook(_module, args, kwargs):
            if args:
                raise InvalidArgumentError("bucket", f"the pipeline calls its {name} with positional arguments; "
                                           "the compiler captures keyword calls only")
            recorded[name] = {k: v.detach().contiguous().clone() if isinstance(v, torch.Tensor) else v
                              for k, v in kwargs.items()}
            raise _Captured
        return hook

    request = example_request(pipe, request)
    with pipe.executor.bare():
        for name, stack in stacks.items():
            # prepend: the whole call, before a parallel layer's hook keeps this rank's share of it
            hooks.append(stack.module.register_forward_pre_hook(recorder(name), with_kwargs=True, prepend=True))
        try:
            pipe.generate(**{"prompt": EXAMPLE_PROMPT, "seed": 0, **request, "progress": False})
        except _Captured:
            pass
        finally:
            for h in hooks:
                h.remove()
    if not recorded:
        raise InvalidArgumentError("bucket", f"the pipeline never called its DiT for {request}")
    for name, stack in stacks.items():
        if name not in recorded:
            twin = next((n for n in recorded if _same_model(stacks[n].module, stack.module)), None)
            if twin is None:
                raise InvalidArgumentError("bucket", f"the pipeline did not call {name} before its first denoising "
                                           "step, and no other denoiser has the same config to take inputs from")
            recorded[name] = recorded[twin]
    return recorded


def _same_model(a: nn.Module, b: nn.Module) -> bool:
    return type(a) is type(b) and getattr(a, "config", None) == getattr(b, "config", None)


def compile_pipeline(pipe, requests: Sequence[dict[str, Any]], *, out: str | Path | None = None,
                     tier: str = "fast", disable: Sequence[str] = (), enable: Sequence[str] = (),
                     attention: str = "auto", verify: bool = True, log=print):
    """Compile every denoiser of ``pipe`` for each request; write an artifact at ``out`` if given.

    Returns ``(CompileReport, {denoiser: (region graphs, DiT-level bucket keys)})``; installing the graphs
    is the caller's (the executor's) job.
    """
    requests = expand_prompt_lengths(pipe, requests)
    if not requests:
        raise InvalidArgumentError("bucket", "give at least one shape to compile (height/width[/num_frames])")
    fusion_passes(tier, disable, enable)  # validate names before any work
    check_attention(attention)
    if "concat_linear" in enable and getattr(pipe.runtime_options, "offload", "none") == "layerwise":
        raise InvalidArgumentError("enable", "concat_linear packs each block's weights on the GPU, which layerwise "
                                   "offload streams from host memory; use one or the other")
    if tier == "fp8" and pipe.dtype != torch.bfloat16:
        raise InvalidArgumentError("quality", f"fp8 compiles bf16 models (its GEMMs write bf16); this pipeline runs in "
                                   f"{str(pipe.dtype).removeprefix('torch.')}: load it with dtype bfloat16 (--dtype bf16)")
    # the fp8 tier's graphs read fp8 copies of the weights (a weight transform of the DiT stack); other
    # tiers' graphs must not record them as inputs
    pipe.executor.set_weight_quantization("fp8" if tier == "fp8" else None)
    started = time.perf_counter()
    writer = art.ArtifactWriter(Path(out)) if out is not None else None
    try:
        result, compiled = _compile_all(pipe, requests, writer, tier=tier, disable=disable, enable=enable,
                                        attention=attention, verify=verify, log=log)
        if writer is not None:
            manifest = build_manifest(pipe, result, tier, disable, enable)
            result.artifact = str(writer.commit(manifest))
            result.artifact_bytes = art.directory_size(Path(result.artifact))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    result.total_s = time.perf_counter() - started
    return result, compiled


def _compile_all(pipe, requests, writer, *, tier, disable, enable, attention, verify, log):
    cache = writer.file(art.TRITON_CACHE) if writer is not None else None
    stacks = pipe.executor.stacks
    compiled: dict[str, tuple[dict[str, dict[str, RegionGraph]], list[str]]] = {
        name: ({}, []) for name in stacks}
    shared: dict[tuple, tuple[BucketReport, RegionGraph]] = {}
    reports: list[DiTBucketReport] = []
    options = dict(device=pipe.device, dtype=pipe.dtype, tier=tier, disable=disable, enable=enable,
                   attention=attention, kernel_cache=cache, verify=verify)
    for request in requests:
        inputs = capture_inputs(pipe, request)
        with pipe.executor.bare():
            for name, stack in stacks.items():
                graphs, keys = compiled[name]
                if call_key((), inputs[name]) in keys:  # e.g. another example prompt padded to the same length
                    log(f"{name} {_request_text(request)}: the same DiT input shapes as an earlier bucket, "
                        "compiled once")
                    continue
                bucket = compile_dit(stack.module, inputs[name], stage=name, request=request, graphs=graphs,
                                     shared=shared, writer=writer, **options)
                keys.append(bucket.key)
                reports.append(bucket)
                log(describe_bucket(bucket))
        if fused_vae_tier(tier):
            with triton_cache(cache):
                warm_vae_kernels(pipe, request, inputs)
    return CompileReport(tier, list(disable), reports, enabled=list(enable)), compiled


def fused_vae_tier(tier: str | None) -> bool:
    """Whether a compiled pipeline of quality ``tier`` decodes with the VAE's fused kernels: every tier but
    ``lossless``, whose output stays bit-identical to eager (the fused VAE rounds where its float32 sums fall)."""
    return tier != "lossless"


def _vae_latent_size(pipe, vae, request: dict[str, Any], inputs: dict[str, dict[str, Any]]):
    """(frames, height, width) of the VAE latents a bucket decodes: from the DiT's 5-D latents (Wan: at most two
    frames, the first chunk's one-frame shapes and the later ones), else one frame of the request's image size
    (Qwen-Image packs its latents into tokens); None when neither says."""
    latents = inputs.get("transformer", {}).get("hidden_states")
    if isinstance(latents, torch.Tensor) and latents.dim() == 5:
        return min(2, latents.shape[2]), latents.shape[3], latents.shape[4]
    defaults = getattr(getattr(pipe, "spec", None), "defaults", {}) or {}
    height, width = (request.get(k) if request.get(k) is not None else defaults.get(k) for k in ("height", "width"))
    ratio = getattr(vae, "spatial_compression_ratio", None)
    if ratio is None:  # a diffusers AutoencoderKL: every block but the last halves the size
        ratio = 2 ** (len(vae.config.block_out_channels) - 1)
    if not isinstance(height, int) or not isinstance(width, int) or height < ratio or width < ratio:
        return None
    return 1, height // ratio, width // ratio


def warm_vae_kernels(pipe, request: dict[str, Any], inputs: dict[str, dict[str, Any]], *, force: bool = False) -> bool:
    """Decode zero latents of a bucket's size with the VAE's fused kernels, as a compiled pipeline decodes on a
    GPU (``Executor.install_compiled``): Triton builds their kernels (into the artifact while compiling; from its
    cache at load) and cuDNN picks its plans before the first generation does.

    Runs on CUDA (elsewhere only with ``force``) for a VAE with fused kernels whose weights are on the device
    (diffc's VAEs, and the generic backend's 2-D diffusers autoencoders); returns whether it decoded. The VAE's
    fused setting is kept.
    """
    vae = pipe.components.get("vae")
    video = hasattr(vae, "temporal_compression_ratio")  # (batch, channels, frames, h, w) latents; else one image
    if not has_fused_path(vae) or (video and not hasattr(vae, "set_fused_kernels")):
        return False  # (the generic backend's video autoencoders: their first decode builds the kernels)
    weight = next(vae.parameters())
    device = torch.device(pipe.device)
    if (device.type != "cuda" and not force) or weight.device.type != device.type:
        return False  # (a VAE under model offload waits on the host: nothing to warm on the device)
    size = _vae_latent_size(pipe, vae, request, inputs)
    if size is None:
        return False
    was = uses_fused_vae(vae)
    set_fused_vae(vae, True)
    try:
        frames, height, width = size
        shape = (1, vae.config.z_dim, frames, height, width) if video else (1, vae.config.latent_channels, height, width)
        z = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        with torch.inference_mode():
            vae.decode(z)
    finally:
        set_fused_vae(vae, was)
    return True


def compile_dit(dit: nn.Module, kwargs: dict[str, Any], *, graphs: dict[str, dict[str, RegionGraph]],
                stage: str = "transformer", request: dict[str, Any] | None = None,
                shared: dict[tuple, tuple[BucketReport, RegionGraph]] | None = None, writer=None,
                verify: bool = True, **options) -> DiTBucketReport:
    """Compile every region of ``dit`` for the call ``dit(**kwargs)`` into ``graphs[region][block key]``.

    ``shared`` reuses graphs across calls (same model class, config, region and block key), ``writer``
    saves each new program into the artifact. ``options`` are :func:`~.compiler.compile_region`'s.
    """
    shared = {} if shared is None else shared
    request = dict(request or {})
    regions = dit_regions(dit)
    captured, reference = capture_region_inputs(dit, kwargs, regions)
    region_reports, reused = [], []
    for region in regions:
        args, kw = captured[region.name]
        ident = (type(dit).__name__, repr(getattr(dit, "config", None)), region.name, call_key(args, kw))
        if ident in shared:
            report, graph = shared[ident]
            report = dataclasses.replace(report, request=request)
            reused.append(region.name)
        else:
            program, report, graph = compile_region(region, args, kw, verify=verify, **options)
            report.request = request
            report.file = f"{stage}/{region.name}/bucket-{len(shared)}.json"
            if writer is not None:
                report.bytes = writer.save_program(program, report.file)
            shared[ident] = (report, graph)
        graphs.setdefault(region.name, {})[report.key] = graph
        region_reports.append(report)
    rel = None
    if verify:
        with _installed(regions, graphs), torch.no_grad():
            rel = output_rel_err(dit(**kwargs), reference)
    return DiTBucketReport(stage, call_key((), kwargs), request, region_reports, rel, reused)


@contextlib.contextmanager
def _installed(regions, graphs: dict[str, dict[str, RegionGraph]]):
    """The DiT's blocks run their region's compiled graph (by call key) inside the block."""
    def forward_of(graph_by_key, block):
        eager = block.forward

        def forward(*args, **kwargs):
            graph = graph_by_key.get(call_key(args, kwargs))
            return eager(*args, **kwargs) if graph is None else graph(block, args, kwargs)
        return forward

    blocks = [(b, graphs.get(r.name, {})) for r in regions for b in r.blocks]
    for block, by_key in blocks:
        block.forward = forward_of(by_key, block)
    try:
        yield
    finally:
        for block, _ in blocks:
            block.__dict__.pop("forward", None)


def build_manifest(pipe, report: CompileReport, tier: str, disable: Sequence[str],
                   enable: Sequence[str] = ()) -> dict[str, Any]:
    checkpoint = Path(pipe.source)
    stages: dict[str, Any] = {}
    for bucket in report.buckets:
        stage = stages.setdefault(bucket.stage, {"buckets": []})
        entry = {"key": bucket.key, "request": bucket.request, "rel_err_vs_eager": bucket.rel_err_vs_eager,
                 "matches": bucket.matches, "regions": [dataclasses.asdict(r) for r in bucket.regions]}
        if tier == "fp8":
            entry["fp8"] = fp8_summary(bucket)
        stage["buckets"].append(entry)
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
        "weights": {"quantization": "fp8" if tier == "fp8" else None,
                    **({"format": "float8_e4m3fn (out, in) + float32 (1, out) per-output-channel scales, "
                                  "quantized from the checkpoint at every load (not stored)"} if tier == "fp8" else {})},
        "stages": stages,
    }


def fp8_summary(bucket: DiTBucketReport) -> dict[str, Any]:
    """The fp8 quality report of one DiT bucket: the whole forward's error vs bf16 eager and the layers'."""
    regions = [r for r in bucket.regions if r.fp8]
    layer_errs = [e for r in regions for e in r.fp8["rel_err"].values()]
    return {"per_forward_rel_err": bucket.rel_err_vs_eager,
            "linears_fp8": sum(r.fp8["linears_fp8"] * r.blocks for r in regions),
            "linears_bf16": sum(r.fp8["linears_bf16"] * r.blocks for r in regions),
            "quantized_standalone": sum(r.fp8.get("quantized_standalone", 0) * r.blocks for r in regions),
            "attention_fp8": sum(r.fp8.get("attention_fp8", 0) * r.blocks for r in regions),
            "max_attention_rel_err": max((e for r in regions for e in r.fp8.get("attention_rel_err", {}).values()),
                                         default=None),
            "max_layer_rel_err": max(layer_errs, default=None),
            "mean_layer_rel_err": sum(layer_errs) / len(layer_errs) if layer_errs else None}


def _request_text(request: dict[str, Any]) -> str:
    """A bucket's request as the log shows it: its fields, the prompts as their count and length."""
    shape = {k: v for k, v in request.items() if k != "prompt"}
    prompt = request.get("prompt")
    if isinstance(prompt, list):
        shape["batch"] = len(prompt)
        prompt = prompt[0] if prompt else None
    if isinstance(prompt, str) and prompt != EXAMPLE_PROMPT:
        shape["prompt"] = f"{len(prompt.split())} words"
    return str(shape)


def describe_bucket(b: DiTBucketReport) -> str:
    err = "" if b.rel_err_vs_eager is None else f", rel. error vs eager {b.rel_err_vs_eager:.2e}"
    lines = [f"  {b.stage} {_request_text(b.request)}: {len(b.regions)} region(s){err}"]
    for r in b.regions:
        if r.region in b.reused:
            lines.append(f"    {r.region} x{r.blocks}: the graph of an earlier bucket (the same block inputs)")
            continue
        fused = ", ".join(f"{k} {v}" for k, v in r.matches.items())
        att = f"; attention -> {r.attention.get('backend')}{_passed_over(r.attention)}" if r.attention else ""
        lines.append(f"    {r.region} x{r.blocks}: traced {r.nodes_before} nodes in {r.trace_s:.1f}s; passes "
                     f"{r.passes_s:.1f}s ({fused}); {r.nodes_after} nodes{att}; warm-up {r.warmup_s:.1f}s")
        if r.fp8:
            lines.append(describe_fp8(r.fp8))
    return "\n".join(lines)


def _passed_over(attention: dict[str, Any]) -> str:
    """Why a backend asked for by name (``--attention NAME``) runs none of the region's attention shapes it
    does not: unavailable here, failed, wrong, or not faster than torch's own by the selection's margin."""
    name = attention.get("requested")
    if name in (None, "auto"):
        return ""
    reasons = []
    for shape in attention.get("shapes", []):
        result = shape["candidates"].get(name) or {}
        if name in (shape["backend"], shape.get("torch_default")) or not result:
            continue  # chosen, or the very kernel torch's dispatcher runs for the node left to it
        if result.get("status") == "ok":
            ms, sdpa = result.get("median_ms"), (shape["candidates"].get("sdpa") or {}).get("median_ms")
            why = (f"{ms:.3g} ms against sdpa's {sdpa:.3g}, not faster by the margin" if ms and sdpa
                   else result.get("reason") or "not faster than sdpa")
        else:
            why = f"{result.get('status')}: {result.get('reason')}"
        reasons.append(why)
    if not attention.get("applied", True) and name in str(attention.get("backend")).split(","):
        reasons.append("measured, not applied under --quality lossless")
    return f" ({name} not used: {'; '.join(dict.fromkeys(reasons))})" if reasons else ""


def describe_fp8(fp8: dict[str, Any]) -> str:
    """The compile log's per-layer fp8 report of one region."""
    errs = ", ".join(f"{name.removesuffix('.weight')} {err:.2e}" for name, err in fp8["rel_err"].items())
    kept = ", ".join(name.removesuffix(".weight") for name in fp8["kept_bf16"])
    alone = fp8.get("quantized_standalone", 0)
    rows = f"; {fp8['gemv_fp8']} one-row, weight-only" if fp8.get("gemv_fp8") else ""
    return (f"      fp8: {fp8['linears_fp8']} linear(s) fp8 ({alone} input(s) quantized on their own{rows}), "
            f"{fp8['linears_bf16']} bf16; rel. error per layer vs bf16: "
            f"{errs or 'none'}" + (f"; kept bf16 (not worth quantizing on its own): {kept}" if kept else "")
            + _describe_fp8_attention(fp8))


def _describe_fp8_attention(fp8: dict[str, Any]) -> str:
    errs = ", ".join(f"{site} {err:.2e}" for site, err in fp8.get("attention_rel_err", {}).items())
    kept = "; ".join(f"{site}: {why}" for site, why in fp8.get("attention_bf16", {}).items())
    return ((f"; fp8 attention rel. error vs bf16: {errs}" if errs else "")
            + (f"; attention kept bf16: {kept}" if kept else ""))


__all__ = ["CompileReport", "DiTBucketReport", "capture_inputs", "compile_dit", "compile_pipeline", "build_manifest"]
