"""diffc vs diffusers, side by side, in one process on one device, at real model sizes with random weights.

    python -m bench.compare --model flux-dev --height 1024 --width 1024 --steps 28
    python -m bench.compare --model wan-1.3b --height 480 --width 832 --num-frames 81

For each configuration (diffusers eager, diffusers + regional torch.compile, diffc eager) it measures the
DiT forward, the VAE decode, the text encode and a whole generation, with peak memory, achieved TFLOP/s
against the measured matmul ceiling and PSNR against diffusers' output; results go to
``<out-dir>/<gpu>-<date>-<model>.{json,md,png}``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from diffc.compile.attention_select import BACKENDS as ATTENTION_BACKENDS

from .build import build_diffusers_models, ensure_checkpoint, native_like
from .engines import ENGINES, Engine
from .families import FAMILIES, INPUT_SEED
from .measure import (allocated_gb, free_memory, matmul_ceiling, peak_memory, psnr_uint8, rel_err, stats,
                      time_calls)
from .report import candidate_times, environment, output_paths, summary_text, write_results
from .specs import SPECS, BenchSpec, Workload
from .flops import tflops_per_s


@dataclasses.dataclass(frozen=True)
class Config:
    """One configuration under test: which engine, and what is done to it before measuring."""

    name: str
    engine: str
    setup: Callable[[Engine, "Run"], str | None] = lambda engine, run: None
    on_cpu_by_default: bool = True
    dit_only: bool = False  # measure the DiT forward only (per-pass ablations), not the generation
    cache: tuple[str, dict[str, Any]] | None = None  # a step cache (kind, options): the generation only
    base: str | None = None  # the uncached configuration of the same engine: the cache's quality reference
    by_default: bool = True  # run when --configs is not given


# Step caches, each run on diffc-eager's and diffc-compiled's DiT: the generation only (a lone DiT forward has
# no previous step), with its skip counts and PSNR against the same engine's uncached output. Random weights
# say little about quality: the fixed-* configurations skip known steps (speed at a known skip count), the
# thresholds are Cache-DiT's and TeaCache's recommendations for real checkpoints.
CACHES: dict[str, tuple[str, dict[str, Any]]] = {
    "dbcache-0": ("dbcache", {"fn": 1, "bn": 0, "threshold": 0.0, "warmup_steps": 0}),  # decides, never skips
    "fixed-half": ("fbcache", {"threshold": 100.0, "warmup_steps": 2, "max_skips_in_a_row": 1}),  # 2, 4, 6, ...
    "fixed-2of3": ("fbcache", {"threshold": 100.0, "warmup_steps": 2, "max_skips_in_a_row": 2}),  # 2, 3, 5, 6, ...
    "dbcache-0.08": ("dbcache", {}),  # Cache-DiT's defaults: F8B0, threshold 0.08, 8 warm-up steps
    "fbcache-0.08": ("fbcache", {"threshold": 0.08}),
    "fbcache-0.12-taylorseer": ("fbcache", {"threshold": 0.12, "taylorseer": True}),
    "teacache": ("teacache", {}),  # the threshold TeaCache's authors give for the checkpoint
}


def _cache_configs() -> list["Config"]:
    out = []
    for base in ("diffc-eager", "diffc-compiled"):
        setup = (lambda e, r: e.ensure_eager()) if base == "diffc-eager" else \
            (lambda e, r: e.ensure_compiled(r.inputs, r.wl, graphs=r.device.type == "cuda"))
        out += [Config(f"{base}-{name}", "diffc", setup=setup, cache=cache, base=base, by_default=False)
                for name, cache in CACHES.items()]
    return out


# The compiler's passes, each left out in one configuration to measure its own contribution.
ABLATIONS = ("rms_norm", "qk_norm_rope", "adaln_modulate", "gated_residual", "gelu_tanh", "timestep_embedding",
             "gated_residual_adaln", "modulation_table", "key_padding_attention", "gemv", "cat_transposed",
             "attention", "split_cat_linear")
OPT_IN = ("concat_linear", "cat_linear_rows")  # passes off by default, each measured switched on

# In run order: the eager pair first, so that a run cut short still has diffc against diffusers (this
# costs a second diffusers load when compile is measured too).
CONFIGS: dict[str, Config] = {c.name: c for c in (
    Config("diffusers-eager", "diffusers"),
    Config("diffc-eager", "diffc"),
    Config("diffc-cudagraphs", "diffc", setup=lambda e, r: e.cuda_graphs(), on_cpu_by_default=False),
    Config("diffc-compiled", "diffc",
           setup=lambda e, r: e.ensure_compiled(r.inputs, r.wl, graphs=r.device.type == "cuda")),
    # the compiled DiT without the step inputs the pipeline precomputes for all steps (FLUX's adaLN modulation)
    Config("diffc-compiled-no-precompute", "diffc", on_cpu_by_default=False, by_default=False,
           setup=lambda e, r: e.ensure_compiled(r.inputs, r.wl, graphs=r.device.type == "cuda", precompute=False)),
    # the generation with its key-masked attention (a prompt padded to its bucket: Qwen-Image) left to the masked
    # SDPA instead of the selection's graph-safe form; the DiT row's calls carry no mask
    Config("diffc-compiled-no-key_mask_attention", "diffc", on_cpu_by_default=False, by_default=False,
           setup=lambda e, r: e.compile(r.inputs, r.wl, disable=("key_mask_attention",),
                                        graphs=r.device.type == "cuda")),
    # the fp8 tier; base: its PSNR against diffc-compiled's bf16 output (psnr_vs_base_db) besides the reference's
    Config("diffc-compiled-fp8", "diffc", on_cpu_by_default=False, base="diffc-compiled",
           setup=lambda e, r: e.compile(r.inputs, r.wl, tier="fp8", graphs=r.device.type == "cuda")),
    # the fp8 tier without one of its steps (fp8 attention, the standalone quantization of unfused inputs)
    *(Config(f"diffc-compiled-fp8-no-{name}", "diffc", dit_only=True, on_cpu_by_default=False, base="diffc-compiled",
             setup=lambda e, r, name=name: e.compile(r.inputs, r.wl, tier="fp8", disable=(name,), graphs=True))
      for name in ("fp8_attention", "fp8_quantize_rows", "fp8_quantize_concat", "fp8_gemv", "fp8_fast_accum")),
    *(Config(f"diffc-compiled-no-{name}", "diffc", dit_only=True, on_cpu_by_default=False,
             setup=lambda e, r, name=name: e.compile(r.inputs, r.wl, disable=(name,), graphs=True))
      for name in ABLATIONS),
    # the compiled DiT with one attention backend asked for by name (`diffc compile --attention NAME`: measured
    # against torch's own kernel per shape and lowered onto where correct and faster), beside the selection's pick
    *(Config(f"diffc-compiled-attention-{name}", "diffc", dit_only=True, on_cpu_by_default=False, by_default=False,
             setup=lambda e, r, name=name: e.compile(r.inputs, r.wl, attention=name, graphs=True))
      for name in ATTENTION_BACKENDS if name != "sdpa"),
    *(Config(f"diffc-compiled-with-{name}", "diffc", dit_only=True, on_cpu_by_default=False,
             setup=lambda e, r, name=name: e.compile(r.inputs, r.wl, enable=(name,), graphs=True))
      for name in OPT_IN),
    Config("diffusers-compile", "diffusers", setup=lambda e, r: e.regional_compile(), on_cpu_by_default=False),
    *_cache_configs(),
)}

_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[bench +{time.perf_counter() - _T0:6.1f}s] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, choices=sorted(SPECS), help="named workload (bench/specs.py)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--num-frames", type=int, help="video models only")
    p.add_argument("--steps", type=int, help="denoising steps of the end-to-end generation")
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--max-sequence-length", type=int, help="text tokens (default: the family's, 512)")
    p.add_argument("--repeats", type=int, default=10, help="timed DiT forwards after warm-up (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed DiT forwards first (compilation happens here)")
    cpu = ", ".join(c.name for c in select_configs(None, torch.device("cpu")))
    p.add_argument("--configs", help=f"comma list of {', '.join(CONFIGS)} (default: those not marked 'not run "
                                     f"unless named' in bench/README.md; on a CPU: {cpu})")
    p.add_argument("--skip-e2e", action="store_true",
                   help="DiT forward and VAE decode only, no checkpoint, no text encoders, no generation")
    p.add_argument("--skip-vae", action="store_true",
                   help="no VAE decode or text encode timing (DiT forward only; with --skip-e2e)")
    p.add_argument("--ckpt-dir", help="where the random-weight pipeline is saved (default /tmp/diffc-bench/<model>)")
    p.add_argument("--rebuild-ckpt", action="store_true", help="rebuild the checkpoint even if one is present")
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--dtype", help="bf16 (GPU default), fp16 or fp32 (CPU default)")
    p.add_argument("--device", help="cuda (default when present) or cpu")
    p.add_argument("--ceiling-size", type=int, help="matmul size for the ceiling (default 8192 on GPU, 256 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=Workload.prompt)
    return p.parse_args(argv)


def select_configs(text: str | None, device: torch.device) -> list[Config]:
    if text is None:
        return [c for c in CONFIGS.values() if c.by_default and (device.type == "cuda" or c.on_cpu_by_default)]
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        raise SystemExit(f"--configs: unknown {unknown or 'empty list'}; accepted: {', '.join(CONFIGS)}")
    return [c for c in CONFIGS.values() if c.name in names]  # run order, whatever order was asked


@dataclasses.dataclass
class Run:
    """What the configurations share: the workload, fixed inputs and the reference outputs."""

    spec: BenchSpec
    wl: Workload
    device: torch.device
    dtype: torch.dtype
    args: argparse.Namespace
    e2e: bool
    flops: int
    ceiling_tflops: float | None
    inputs: dict[str, Any]
    latents: torch.Tensor
    ref_name: str  # the configuration the others are compared with (diffusers eager when it runs)
    configs: list[Config]  # those selected, in run order
    ref_forward: torch.Tensor | None = None
    ref_decode: torch.Tensor | None = None
    ref_output: Any = None
    components: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    uncached: dict[str, tuple[Any, float]] = dataclasses.field(default_factory=dict)  # base config -> (output, e2e s)


def open_engine(kind: str, run: Run, ckpt: str | None, shared: dict | None) -> tuple[Engine, dict[str, Any]]:
    family = FAMILIES[run.spec.family]
    before = allocated_gb(run.device)
    start = time.perf_counter()
    if ckpt is not None:
        engine = ENGINES[kind].from_checkpoint(family, ckpt, run.device, run.dtype)
    elif kind == "diffusers" or family.native_transformer is None:  # the generic backend runs the same modules
        engine = ENGINES[kind](family, run.device, run.dtype, shared["transformer"], shared["vae"])
    else:
        engine = ENGINES[kind](family, run.device, run.dtype,
                               native_like(shared["transformer"], family.native_transformer, run.spec.transformer),
                               native_like(shared["vae"], family.native_vae, run.spec.vae))
    info = {"load_s": time.perf_counter() - start, "from": "checkpoint" if ckpt else "shared in-memory weights"}
    if before is not None:
        info["weights_gb"] = allocated_gb(run.device) - before
    return engine, info


def measure_components(engine: Engine, run: Run, is_ref: bool) -> dict[str, Any]:
    """VAE decode and text encode: once per engine and VAE variant (compiling diffc's DiT on a GPU switches its
    VAE to its fused kernels, as a compiled pipeline runs it; the text encoders do not change)."""
    warmup, repeats, dev = min(run.args.warmup, 2), min(run.args.repeats, 5), run.device
    out: dict[str, Any] = {}
    with peak_memory(dev) as peak:
        timed = time_calls(lambda: engine.decode(run.latents), warmup, repeats, dev)
    decoded = timed.output.to(device="cpu", dtype=torch.float32)
    timed.output = None
    out.update(vae_decode_ms=stats(timed.times_ms), vae_peak_gb=peak["peak_gb"])
    if is_ref:
        run.ref_decode = decoded
    elif run.ref_decode is not None:
        out["vae_rel_err"] = rel_err(decoded, run.ref_decode)
    del decoded
    if engine.has_pipeline:
        with peak_memory(dev) as peak:
            timed = time_calls(lambda: engine.encode(run.wl), warmup, repeats, dev)
        out.update(text_encode_ms=stats(timed.times_ms), text_peak_gb=peak["peak_gb"])
    return out


def attention_selection(reports: list) -> list[dict[str, Any]]:
    """What the compile-time attention selection measured for each attention shape of these compile reports:
    the backend it chose and every candidate's median ms (or why it was not timed), once per shape."""
    out, seen = [], set()
    for bucket in reports:
        for region in bucket.regions:
            for shape in (region.attention or {}).get("shapes", []):
                key = tuple(sorted(shape["shape"].items()))
                if key in seen:
                    continue
                seen.add(key)
                out.append({"region": region.region, "shape": shape["shape"], "backend": shape["backend"],
                            "candidates": {name: c["median_ms"] if c.get("status") == "ok" else c.get("status")
                                           for name, c in shape["candidates"].items()}})
    return out


def measure(config: Config, engine: Engine, run: Run, r: dict[str, Any]) -> None:
    """Fill ``r`` with one configuration's figures (in place, so a failure keeps what was measured)."""
    dev, args, is_ref = run.device, run.args, config.name == run.ref_name
    if config.cache is None and hasattr(engine, "clear_cache"):
        engine.clear_cache()
    compiled_before = len(getattr(engine, "compile_reports", []))
    r["setup"] = config.setup(engine, run)
    selection = attention_selection(getattr(engine, "compile_reports", [])[compiled_before:])
    if selection:
        r["attention_selection"] = selection
        for s in selection:
            log(f"{config.name}: attention {s['shape']} -> {s['backend']} (ms: {candidate_times(s)})")
    if config.cache is not None:
        measure_cached(config, engine, run, r)
        return
    log(f"{config.name}: DiT forward x{args.warmup}+{args.repeats}")
    with peak_memory(dev) as peak:
        timed = time_calls(lambda: engine.forward(run.inputs), args.warmup, args.repeats, dev)
    out = timed.output.to(device="cpu", dtype=torch.float32)
    timed.output = None
    median = timed.median_ms
    tflops = tflops_per_s(run.flops, median)
    r.update(dit_forward_ms=stats(timed.times_ms), dit_first_call_s=timed.first_call_s, dit_peak_gb=peak["peak_gb"],
             dit_tflops=tflops, dit_ceiling_frac=tflops / run.ceiling_tflops if tflops and run.ceiling_tflops else None,
             dit_output_finite=bool(torch.isfinite(out).all()))
    if is_ref:
        run.ref_forward = out
    elif run.ref_forward is not None:
        r["dit_rel_err"] = rel_err(out, run.ref_forward)
    del out
    log(f"{config.name}: DiT forward {median:.2f} ms (first call {timed.first_call_s:.1f} s)")

    key = engine.components_key
    if key not in run.components and not args.skip_vae:
        log(f"{config.name}: VAE decode" + (" and text encode" if engine.has_pipeline else ""))
        run.components[key] = dict(measure_components(engine, run, is_ref), measured_in=config.name)
    r.update(run.components.get(key, {}))
    free_memory(dev)

    if run.e2e and engine.has_pipeline and not config.dit_only:
        warm = FAMILIES[run.spec.family].warmup_steps
        log(f"{config.name}: warm-up generation ({warm} step{'s' if warm > 1 else ''}), then {run.wl.steps} steps")
        engine.generate(run.wl, steps=warm)
        with peak_memory(dev) as peak:
            gen = engine.generate(run.wl, run.wl.steps)
        per_step = FAMILIES[run.spec.family].forwards_per_step(run.wl) * run.flops
        r.update(e2e_s=gen.wall_s, step_ms=stats(gen.step_ms) if gen.step_ms else None,
                 e2e_peak_gb=gen.peak_gb if gen.peak_gb is not None else peak["peak_gb"],
                 stages_s=gen.stages_s, stage_peak_gb=gen.stage_peak_gb, output_shape=list(gen.output.shape),
                 output_std=float(gen.output.std()))
        if gen.step_ms:
            r["step_tflops"] = tflops_per_s(per_step, r["step_ms"]["median"])
        if is_ref:
            run.ref_output = gen.output
        elif run.ref_output is not None:
            r["psnr_db"] = psnr_uint8(gen.output, run.ref_output)
        if config.base in run.uncached:  # e.g. fp8 against the same engine's bf16 output
            r["psnr_vs_base_db"] = psnr_uint8(gen.output, run.uncached[config.base][0])
        if any(c.base == config.name for c in run.configs):
            run.uncached[config.name] = (gen.output, gen.wall_s)
        log(f"{config.name}: generation {gen.wall_s:.2f} s" + (f", PSNR {r['psnr_db']:.2f} dB" if "psnr_db" in r else ""))


def measure_cached(config: Config, engine: Engine, run: Run, r: dict[str, Any]) -> None:
    """A generation with a step cache: seconds, what it skipped, PSNR against the same engine uncached."""
    if not (run.e2e and engine.has_pipeline):
        r["skipped"] = "a step cache is measured on whole generations (not with --skip-e2e)"
        return
    dev, wl = run.device, run.wl
    if config.base not in run.uncached:
        log(f"{config.name}: the uncached generation of {config.base} first (the quality reference)")
        engine.generate(wl, steps=1)
        gen = engine.generate(wl, wl.steps)
        run.uncached[config.base] = (gen.output, gen.wall_s)
    reference, uncached_s = run.uncached[config.base]
    log(f"{config.name}: warm-up generation (1 step), then {wl.steps} steps with {config.cache[0]} {config.cache[1]}")
    engine.generate(wl, steps=FAMILIES[run.spec.family].warmup_steps, cache=config.cache)
    with peak_memory(dev) as peak:
        gen = engine.generate(wl, wl.steps, cache=config.cache)
    report = gen.runtime["cache"]
    r.update(e2e_s=gen.wall_s, step_ms=stats(gen.step_ms) if gen.step_ms else None,
             e2e_peak_gb=gen.peak_gb if gen.peak_gb is not None else peak["peak_gb"], stages_s=gen.stages_s,
             stage_peak_gb=gen.stage_peak_gb, output_shape=list(gen.output.shape), uncached_e2e_s=uncached_s,
             speedup_vs_uncached=uncached_s / gen.wall_s, psnr_vs_uncached_db=psnr_uint8(gen.output, reference),
             cuda_graphs=gen.runtime.get("cuda_graphs"),
             cache={k: report[k] for k in ("kind", "options", "threshold", "warmup_steps", "blocks", "forwards",
                                           "middle_blocks", "skipped_steps")})
    if run.ref_output is not None:
        r["psnr_db"] = psnr_uint8(gen.output, run.ref_output)
    f = report["forwards"]
    log(f"{config.name}: generation {gen.wall_s:.2f} s ({uncached_s / gen.wall_s:.2f}x uncached), skipped "
        f"{f['skipped']} of {f['computed'] + f['skipped']} forwards, PSNR {r['psnr_vs_uncached_db']:.1f} dB vs uncached")


def quiet_libraries() -> None:
    """Truncation warnings (repeated at every call) and loading progress bars would bury the summary."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("diffc").setLevel(logging.ERROR)
    for name in ("diffusers", "transformers"):
        try:
            lib_logging = importlib.import_module(f"{name}.utils.logging")
        except ImportError:
            continue
        lib_logging.set_verbosity_error()
        lib_logging.disable_progress_bar()


def run_bench(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Path], bool]:
    from diffc.loader.pipeline import resolve_device, resolve_dtype

    quiet_libraries()
    try:
        importlib.import_module("diffusers")
    except ImportError as exc:
        raise SystemExit(f"diffusers is needed (it builds the random-weight models and is the baseline): {exc}. "
                         "On a machine without network, carry its wheel: see bench/README.md") from None
    spec = SPECS[args.model]
    family = FAMILIES[spec.family]
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    wl = Workload.from_spec(spec, height=args.height, width=args.width, num_frames=args.num_frames, steps=args.steps,
                            guidance_scale=args.guidance_scale, max_sequence_length=args.max_sequence_length,
                            seed=args.seed, prompt=args.prompt)
    configs = select_configs(args.configs, device)
    env = environment(device, sys.argv if args.argv is None else ["-m", "bench.compare", *args.argv])
    paths = output_paths(Path(args.out_dir), env, spec.name)
    flops = family.dit_flops(spec, wl)
    if args.skip_vae and not args.skip_e2e:
        raise SystemExit("--skip-vae measures the DiT forward alone: give --skip-e2e too")
    if not family.e2e and not args.skip_e2e:
        log(f"{spec.name}: no end-to-end run for this family yet ({family.note.split('. ')[-1]}); comparing the DiT "
            "forward and the VAE only")
        args.skip_e2e = True
    result: dict[str, Any] = {
        "schema": 1, "model": spec.name, "source": spec.source, "env": env, "dtype": str(dtype).replace("torch.", ""),
        "workload": dataclasses.asdict(wl), "e2e": not args.skip_e2e,
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "input_seed": INPUT_SEED},
        "flops": dict(flops.to_dict(), forwards_per_step=family.forwards_per_step(wl)),
        "notes": [n for n in (family.note,) if n],
        "configs": {c.name: {"engine": c.engine} for c in configs},
        "reference": "diffusers-eager" if "diffusers-eager" in [c.name for c in configs] else configs[0].name,
    }
    log(f"{spec.name} on {env['gpu']} ({dtype}): {wl.height}x{wl.width}"
        + (f"x{wl.num_frames}" if wl.num_frames else "") + f", {wl.steps} steps; configs: {', '.join(result['configs'])}")

    size = args.ceiling_size or (8192 if device.type == "cuda" else 256)
    result["matmul_ceiling"] = matmul_ceiling(device, dtype, size)
    log(f"matmul {size}^3 {result['matmul_ceiling']['dtype']}: {result['matmul_ceiling']['tflops']:.1f} TFLOP/s")

    ckpt, shared = None, None
    if args.skip_e2e:
        shared = build_diffusers_models(spec, device, dtype)
    else:
        root = Path(args.ckpt_dir or f"/tmp/diffc-bench/{spec.name}")
        result["checkpoint"] = ensure_checkpoint(spec, root, device, dtype, rebuild=args.rebuild_ckpt, log=log)
        ckpt = result["checkpoint"]["path"]
    latent_gen = torch.Generator("cpu").manual_seed(INPUT_SEED + 1)
    run = Run(spec, wl, device, dtype, args, not args.skip_e2e, flops.total, result["matmul_ceiling"]["tflops"],
              family.dit_inputs(spec, wl, device, dtype),
              torch.randn(family.latent_shape(spec, wl), generator=latent_gen).to(device, dtype), result["reference"],
              configs)

    engine, load_info, failed = None, None, False
    for config in configs:
        r = result["configs"][config.name]
        try:
            if engine is None or engine.kind != config.engine:
                compiled, engine = engine is not None and engine.compiled, close(engine)
                release(device, compiled)
                log(f"loading {config.engine}")
                engine, load_info = open_engine(config.engine, run, ckpt, shared)
                log(f"loaded {config.engine} in {load_info['load_s']:.1f} s")
            r["load"] = load_info
            measure(config, engine, run, r)
        except Exception as exc:  # keep going: one failing configuration must not lose the others
            failed = True
            r["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            r["traceback"] = traceback.format_exc()[-4000:]
            log(f"{config.name} FAILED: {r['error'][:300]}")
            if engine is not None and engine.compiled:  # a broken compiled engine is not reused
                engine = close(engine)
                release(device, compiled=True)
            free_memory(device)
        write_results(result, paths)  # after every configuration: a run cut short keeps what it measured
    compiled, engine = engine is not None and engine.compiled, close(engine)
    release(device, compiled)
    result["total_s"] = time.perf_counter() - _T0
    write_results(result, paths)
    return result, paths, failed


def close(engine: Engine | None) -> None:
    """Undo what an engine installed on modules it may share with the next one (the generic backend's
    --skip-e2e engines run the same diffusers modules); returns None, for ``engine = close(engine)``."""
    if engine is not None:
        engine.close()


def release(device: torch.device, compiled: bool) -> None:
    """Free what the last engine left (the caller has dropped its reference), compiled code included."""
    if compiled:
        torch._dynamo.reset()
    free_memory(device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = argv
    result, paths, failed = run_bench(args)
    print(summary_text(result))
    print("wrote " + ", ".join(str(p) for p in paths.values() if p.exists()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
