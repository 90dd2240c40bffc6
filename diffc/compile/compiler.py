"""Compile one module or one DiT region: trace, run the fusion passes, lower attention, warm up.

:func:`compile_module` compiles ``module(*args, **kwargs)`` as one graph (any module: a whole DiT in
the pass tests and benchmarks, one block on the generic path); :func:`compile_region` compiles a
repeated-block region (:mod:`.regions`) and returns a :class:`~.regions.RegionGraph` that runs it for
every block of the region. What a pipeline compiles and how the artifact is written is
:mod:`.pipeline`; installing compiled graphs into a DiT is the runtime executor's job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError
from .fp8 import Fp8LinearPass, lowering_report, placeholder_values, site_errors, start_lowering
from .fp8_attention import Fp8AttentionPass
from .manager import TIERS, PassManager
from .numerics import output_rel_err
from .passes import FUSION_PASSES, graph_targets
from .regions import Region, RegionGraph, call_key
from .trace import trace_module


@dataclasses.dataclass
class BucketReport:
    """What compiling one graph did: for a region, ``key`` is its blocks' call key; for a whole module,
    the module's call key. ``region`` is empty for a whole module."""

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
    region: str = ""
    blocks: int = 1
    fp8: dict[str, Any] | None = None  # the fp8 tier's lowering and per-layer errors (compile/fp8.py)


# Steps of the fp8 tier's lowering that ``disable`` can leave out (no effect outside the tier):
# ``fp8_quantize_rows`` keeps the linears whose input no fused kernel quantizes in bf16,
# ``fp8_quantize_concat`` quantizes a concatenation after writing it (not from its parts), ``fp8_gemv`` keeps
# the bf16 weights of the few-row linears ``diffc.gemv`` runs (the adaptive norms' projections), ``fp8_attention``
# keeps attention in bf16, ``fp8_fast_accum`` has the fp8 GEMMs promote their sums to float32 every few k-steps
# (``_scaled_mm``'s ``use_fast_accum=False``) instead of accumulating in the fp8 MMA's own precision.
FP8_STEPS = ("fp8_quantize_rows", "fp8_quantize_concat", "fp8_gemv", "fp8_attention", "fp8_fast_accum")
# the attention lowering's step for calls under a mask that drops keys (disabled: they stay masked sdpa)
KEY_MASK_STEP = "key_mask_attention"


def fusion_passes(tier: str, disable: Sequence[str] = (), enable: Sequence[str] = ()) -> list:
    """The fusion passes a compile runs, in order: those on by default plus ``enable``, minus ``disable``."""
    names = [cls.name for cls in FUSION_PASSES] + ["attention", KEY_MASK_STEP, *FP8_STEPS]
    for field, given in (("disable", disable), ("enable", enable)):
        unknown = [n for n in given if n not in names]
        if unknown:
            raise InvalidArgumentError(field, f"unknown pass {unknown[0]!r}; passes: {', '.join(names)}")
    if tier not in TIERS:
        raise InvalidArgumentError("quality", f"expected one of {', '.join(TIERS)}, got {tier!r}")
    refused = [cls.name for cls in FUSION_PASSES if cls.name in enable and tier == "fp8" and not cls.fp8]
    if refused:
        raise InvalidArgumentError("enable", f"{refused[0]} does not run under the fp8 tier (its fp8 steps rewrite "
                                   "the same ops); use it with --quality fast")
    return [_make_pass(cls, tier) for cls in FUSION_PASSES
            if (cls.default_enabled or cls.name in enable) and cls.name not in disable]


def _make_pass(cls, tier: str):
    """A pass for ``tier``: under ``fp8`` the tanh-GELU stays diffc's kernel (never the GEMM's bf16 epilogue),
    whose fp8 variant then quantizes the feed-forward's hidden activation for the fp8 down-projection."""
    from .passes import GeluTanhPass

    if tier == "fp8" and cls is GeluTanhPass:
        return cls(epilogue=False)
    return cls()


def pass_sources() -> dict[str, str]:
    """Hash of each pass's and each fused op's source file, and of the CUDA C++ sources of ``csrc/`` the ops
    run: an edit to any invalidates artifacts."""
    from .. import ops
    from . import artifact as art

    # a pass is its own file and the files its patterns live in (qk_norm_rope keeps its forms in two modules)
    files = {cls.name: [inspect.getsourcefile(c) for c in (cls, *map(type, getattr(cls, "patterns", ())))]
             for cls in FUSION_PASSES}
    files["manager"] = [inspect.getsourcefile(PassManager)]
    files["regions"] = [inspect.getsourcefile(RegionGraph)]
    files["fp8_linear"] = [inspect.getsourcefile(Fp8LinearPass)]
    files["fp8_attention"] = [inspect.getsourcefile(Fp8AttentionPass)]
    for name in sorted(ops.registry.REGISTERED):
        files[f"op:{name}"] = [inspect.getsourcefile(ops.registry.REGISTERED[name]._init_fn)]
    files["csrc"] = sorted(str(p) for p in ops.csrc_sources.source_dir().glob("*.cu*"))  # the ops' CUDA C++ kernels
    return {name: art.sha256_text("".join(Path(p).read_text() for p in sorted(set(paths))))[:16]
            for name, paths in sorted(files.items())}


def kernel_configs() -> dict[str, Any]:
    """The tile configuration of each tunable fused kernel this compile ran with (recorded, not re-tuned)."""
    from ..ops import qk_norm_rope

    name = os.environ.get(qk_norm_rope.CONFIG_ENV) or "default"
    return {"qk_norm_rope": {"config": name, **dataclasses.asdict(qk_norm_rope.kernel_config())}}


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


def _fused_ops(gm) -> dict[str, int]:
    return {k: v for k, v in sorted(graph_targets(gm).items()) if k.startswith("diffc.") or "attention" in k}


def rewrite(program: torch.export.ExportedProgram, *, device: torch.device, dtype: torch.dtype, tier: str,
            disable: Sequence[str], enable: Sequence[str], attention: str) -> tuple[dict[str, int], Any]:
    """Run the fusion passes and the attention lowering on ``program`` in place; returns (matches, choice)."""
    matches, choice, _ = _rewrite(program, device=device, dtype=dtype, tier=tier, disable=disable, enable=enable,
                                  attention=attention)
    return matches, choice


def _rewrite(program, *, device, dtype, tier, disable, enable, attention):
    """:func:`rewrite`, and under the ``fp8`` tier the fp8 lowering last; returns (matches, choice, lowering)."""
    counters = PassManager(passes=fusion_passes(tier, disable, enable), tier=tier).run(program)
    lowering = None
    if tier == "fp8":
        lowering = start_lowering(program)
        if "fp8_attention" not in disable:  # before the attention selection, which measures what stays bf16
            counters.matches[Fp8AttentionPass.name] = Fp8AttentionPass(device)(program, lowering)
    choice = None
    if "attention" not in disable:
        choice = lower_attention(program, device, dtype, attention, tier, key_masks=KEY_MASK_STEP not in disable)
        counters.matches["attention"] = choice.pop("replaced")
    if tier == "fp8":
        Fp8LinearPass(standalone="fp8_quantize_rows" not in disable,
                      concat="fp8_quantize_concat" not in disable,
                      gemv="fp8_gemv" not in disable,
                      fast_accum="fp8_fast_accum" not in disable)(program, lowering)
        counters.matches[Fp8LinearPass.name] = lowering.replaced
    return dict(counters.matches), choice, lowering


def _fp8_report(lowering, program, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    if lowering is None:
        return None
    return lowering_report(lowering, site_errors(lowering, program, placeholder_values(program, module, args, kwargs)))


def compile_module(dit: nn.Module, kwargs: dict[str, Any], *, args: tuple = (), device: torch.device,
                   dtype: torch.dtype, tier: str = "fast", disable: Sequence[str] = (), enable: Sequence[str] = (),
                   attention: str = "auto", kernel_cache: Path | None = None, verify: bool = True):
    """Trace ``dit(*args, **kwargs)`` as one graph, rewrite it, lower attention and warm it up.

    Returns ``(program, BucketReport, graph)``: the rewritten ExportedProgram, the report, and the
    runnable unlifted graph sharing ``dit``'s weights (weight concatenations folded, Triton kernels
    compiled).
    """
    def build(program):
        graph = program.module()
        fold_weights(graph)
        return graph

    return _compile(dit, args, kwargs, build, lambda graph: graph(*args, **kwargs), {}, device=device, dtype=dtype,
                    tier=tier, disable=disable, enable=enable, attention=attention, kernel_cache=kernel_cache,
                    verify=verify)


def compile_region(region: Region, args: tuple, kwargs: dict[str, Any], *, device: torch.device,
                   dtype: torch.dtype, tier: str = "fast", disable: Sequence[str] = (), enable: Sequence[str] = (),
                   attention: str = "auto", kernel_cache: Path | None = None, verify: bool = True):
    """Trace the region's first block on its captured arguments and rewrite it; the graph serves every block.

    Returns ``(program, BucketReport, RegionGraph)``. The warm-up runs the graph for the first block
    (compiling its Triton kernels) and, with ``verify``, measures its error against that block eagerly.
    """
    block = region.blocks[0]
    return _compile(block, args, kwargs, RegionGraph, lambda graph: graph(block, args, kwargs),
                    {"region": region.name, "blocks": len(region.blocks)}, device=device, dtype=dtype, tier=tier,
                    disable=disable, enable=enable, attention=attention, kernel_cache=kernel_cache, verify=verify)


def _compile(module: nn.Module, args: tuple, kwargs: dict[str, Any], build: Callable, run: Callable,
             report_fields: dict[str, Any], *, device, dtype, tier, disable, enable, attention, kernel_cache, verify):
    """Trace ``module(*args, **kwargs)``, rewrite the program, ``build`` its runnable graph and ``run`` it once
    (the warm-up that compiles its kernels); with ``verify``, measure the output against ``module``'s own."""
    t0 = time.perf_counter()
    with torch.no_grad():
        program = trace_module(module, kwargs, args)
    t1 = time.perf_counter()
    nodes_before = len(program.graph.nodes)
    matches, choice, lowering = _rewrite(program, device=device, dtype=dtype, tier=tier, disable=disable,
                                         enable=enable, attention=attention)
    t2 = time.perf_counter()
    rel = fp8 = None
    with torch.no_grad(), triton_cache(kernel_cache):
        graph = build(program)
        out = run(graph)
        _sync(device)
        t3 = time.perf_counter()
        if verify:
            rel = output_rel_err(out, module(*args, **kwargs))
            fp8 = _fp8_report(lowering, program, module, args, kwargs)
    report = BucketReport(key=call_key(args, kwargs), request={}, file="", trace_s=t1 - t0, passes_s=t2 - t1,
                          warmup_s=t3 - t2, matches=matches, nodes_before=nodes_before,
                          nodes_after=len(program.graph.nodes), fused_ops=_fused_ops(program.graph_module),
                          attention=choice, rel_err_vs_eager=rel, fp8=fp8, **report_fields)
    return program, report, graph


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lower_attention(program, device: torch.device, dtype: torch.dtype, attention: str, tier: str,
                    key_masks: bool = True) -> dict[str, Any]:
    """Measure the attention backends on this graph's attention shapes and lower onto the choice.

    ``attention`` is "auto" (every backend available here) or one backend name (measured and checked
    all the same, so a wrong or failing kernel falls back to "sdpa"). Under ``lossless`` a choice that
    is not torch's own kernel is measured and reported but not applied. Returns the choice as a dict
    with ``backend`` (a summary), ``requested``, ``replaced`` and ``applied``.
    """
    from .attention_select import BACKENDS, select_attention_backend
    from .passes.attention import AttentionLoweringPass, attention_shapes

    check_attention(attention)
    gm = program.graph_module
    candidates = None if attention == "auto" else ["sdpa", attention]
    # key-masked calls are measured where a candidate other than the masked sdpa can take them
    key_masks = key_masks and any(BACKENDS[name].key_mask_op is not None and BACKENDS[name].unavailable(device) is None
                                  for name in (candidates or BACKENDS))
    shapes = attention_shapes(gm, dtype, key_masks=key_masks)
    if not shapes:
        return {"backend": "none", "replaced": 0, "applied": False, "shapes": []}
    choice = select_attention_backend(shapes, device, dtype, candidates=candidates)
    lowering = AttentionLoweringPass(choice)
    applied = tier != "lossless" or lowering.bit_exact
    replaced = lowering(gm) if applied else 0
    picked = sorted(set(choice.backends.values()))
    return {"backend": ",".join(picked), "requested": attention, "replaced": replaced, "applied": applied,
            **choice.to_dict()}


def check_attention(attention: str) -> None:
    from .attention_select import BACKENDS

    if attention != "auto" and attention not in BACKENDS:
        raise InvalidArgumentError("attention", f"unknown backend {attention!r}; accepted: auto, {', '.join(BACKENDS)}")


def fold_weights(graph) -> int:
    """Fold weight concatenations a pass put in an unlifted graph into packed parameters (load-time prepack)."""
    from .prepack import fold_weight_concats

    return fold_weight_concats(graph)


__all__ = ["BucketReport", "compile_module", "compile_region", "fusion_passes", "pass_sources", "rewrite"]
