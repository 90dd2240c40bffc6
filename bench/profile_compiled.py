"""Where a compiled DiT forward spends its GPU time: ``python -m bench.profile_compiled --model flux-dev``.

Builds the named workload's DiT with random weights (diffusers' class, then diffc's native model on the
same tensors), compiles it with diffc's compiler, runs a few forwards under ``torch.profiler`` (eager and
compiled, CUDA graphs off so every kernel is seen) and sums CUDA kernel time per category: GEMM,
attention, diffc's fused Triton kernels, and everything else (copies, elementwise, norms). Writes
``<out-dir>/<gpu>-<date>-<model>-profile.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch

from .build import build_diffusers_models, native_like
from .compare import quiet_libraries
from .families import FAMILIES
from .report import environment, gpu_slug
from .specs import SPECS, Workload

# First matching pattern names a kernel's category (kernel names as CUDA reports them).
CATEGORIES = (
    # cuDNN's convolutions and their layout transposes (a VAE), before "cudnn" counts as attention
    ("conv", re.compile(r"fprop_implicit_gemm|dgrad|conv|nchwToNhwc|nhwcToNchw", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|cudnn|sdpa|softmax", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|sm90_xmma|nvjet|matmul|cublas", re.I)),
    # diffc's fused ops: Triton kernels (``*_kernel``) and the CUDA C++ ones of csrc/ (``<op>_<dtype>_<n>``)
    ("diffc triton", re.compile(r"_kernel$|qk_norm_rope|adaln|gated_residual|gelu_tanh|timestep|silu_mul|"
                                r"quantize_rows", re.I)),
    ("copy/cat", re.compile(r"copy|cat|elementwise_kernel_with_index|CatArray", re.I)),
)


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other elementwise/norm"


def profile(fn, steps: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    per_cat: dict[str, float] = {}
    kernels: dict[str, float] = {}
    idle = timeline(prof, steps)
    for evt in prof.key_averages():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = evt.device_time_total / 1000 / steps
        per_cat[category(evt.key)] = per_cat.get(category(evt.key), 0.0) + ms
        kernels[evt.key] = kernels.get(evt.key, 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    return {"total_ms": sum(per_cat.values()), "by_category_ms": dict(sorted(per_cat.items(), key=lambda kv: -kv[1])),
            "top_kernels_ms": dict(top), **idle}


def timeline(prof, steps: int) -> dict[str, Any]:
    """The GPU's time line over the profiled forwards: ``span_ms`` (first kernel start to last kernel end) and
    ``idle_ms`` (no kernel running) per forward, and ``idle_between_ms``: the idle time per forward after each
    kind of kernel before the next one, the largest 15 (``"previous -> next"``)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and getattr(e, "time_range", None) is not None)
    if not spans:
        return {}
    between: dict[str, float] = {}
    idle, end = 0.0, spans[0][1]
    for (start, stop, name), (_, _, previous) in zip(spans[1:], spans):
        if start > end:  # microseconds
            idle += start - end
            key = f"{previous[:60]} -> {name[:60]}"
            between[key] = between.get(key, 0.0) + (start - end) / 1000 / steps
        end = max(end, stop)
    top = sorted(between.items(), key=lambda kv: -kv[1])[:15]
    return {"span_ms": (end - spans[0][0]) / 1000 / steps, "idle_ms": idle / 1000 / steps,
            "idle_between_ms": dict(top)}


def batched(inputs: dict[str, Any], batch: int) -> dict[str, Any]:
    """The DiT's batch-1 inputs as a batch of ``batch`` (a pipeline's classifier-free-guidance pair runs as one
    batch-2 forward): each tensor whose first dimension is 1 repeated along it; the others (FLUX.1's position
    ids, which have no batch dimension) and non-tensors as they are."""
    if batch < 1:
        raise ValueError(f"--batch must be at least 1, got {batch}")
    if batch == 1:
        return dict(inputs)
    return {k: v.repeat(batch, *([1] * (v.ndim - 1))) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == 1
            else v for k, v in inputs.items()}


def parse_variants(parser: argparse.ArgumentParser, text: str, known: tuple[str, ...]) -> list[str]:
    """The ``--variants`` of a profiling tool (``bench.profile_vae``, ``bench.profile_encoders``): a comma-separated
    list of ``known`` names, in order; anything else is the parser's error."""
    variants = [v.strip() for v in text.split(",") if v.strip()]
    if not variants or any(v not in known for v in variants):
        parser.error(f"--variants takes a comma-separated list of {', '.join(known)}, got {text!r}")
    return variants


def top_kernel_lines(top: dict[str, float], title: str) -> list[str]:
    """A profile's top kernels as markdown list lines under ``title``."""
    return ["", f"{title}:", ""] + [f"- {ms:.2f} {name[:140]}" for name, ms in top.items()]


def write_report(stem: Path, result: dict[str, Any], lines: list[str]) -> None:
    """``result`` to ``<stem>.json``, ``lines`` to ``<stem>.md`` and the console."""
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2))
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_compiled", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, choices=sorted(SPECS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--tier", default="fast", choices=("fast", "fp8"), help="the compiled quality tier to profile")
    p.add_argument("--skip-eager", action="store_true", help="profile the compiled forward only")
    p.add_argument("--disable", default="", help="comma list of compile passes to leave out")
    p.add_argument("--batch", type=int, default=1, help="the forward's batch (2: a pipeline's CFG pair, as Wan's "
                                                       "generation runs it); the FLOP count stays batch 1's")
    p.add_argument("--graphs", action="store_true", help="replay the compiled forward from a CUDA graph, as the "
                                                         "runtime does (default: launched one kernel at a time)")
    args = p.parse_args(argv)
    quiet_libraries()
    from diffc.compile.pipeline import compile_dit
    from diffc.runtime.compiled import CompiledDiT
    from diffc.runtime.dit_stack import DiTStack

    spec, device, dtype = SPECS[args.model], torch.device("cuda"), torch.bfloat16
    family = FAMILIES[spec.family]
    wl = Workload.from_spec(spec)
    shared = build_diffusers_models(spec, device, dtype)
    native = shared.pop("transformer")
    if family.native_transformer is not None:  # the generic backend compiles diffusers' own module
        native = native_like(native, family.native_transformer, spec.transformer)
    inputs = batched(family.dit_inputs(spec, wl, device, dtype), args.batch)
    result: dict[str, Any] = {"model": spec.name, "env": environment(device, ["-m", "bench.profile_compiled", *(argv or [])]),
                              "flops_tflop": family.dit_flops(spec, wl).total / 1e12}
    with torch.no_grad():
        empty = {"total_ms": 0.0, "by_category_ms": {}, "top_kernels_ms": {}}
        result["eager"] = empty if args.skip_eager else profile(lambda: native(**inputs), args.steps)
        graphs: dict = {}
        disable = tuple(d for d in args.disable.split(",") if d)
        stack = DiTStack("transformer", native, device, cuda_graphs=args.graphs)
        stack.set_weight_quantization("fp8" if args.tier == "fp8" else None)
        with stack.bare() as eager:
            report = compile_dit(eager, inputs, graphs=graphs, device=device, dtype=dtype, tier=args.tier,
                                 disable=disable)
        stack.set_compiled(CompiledDiT(graphs, [report.key], {"tier": args.tier, "disabled": list(disable)}))
        backends = sorted({(r.attention or {}).get("backend") for r in report.regions} - {None})
        result["compile"] = {"matches": report.matches, "attention": ",".join(backends)}
        result["compiled"] = profile(lambda: stack(**inputs), args.steps)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = (("" if args.tier == "fast" else f"-{args.tier}") + "".join(f"-no-{d}" for d in disable)
              + (f"-batch{args.batch}" if args.batch != 1 else "") + ("-graphs" if args.graphs else ""))
    stem = out / f"{gpu_slug(result['env']['gpu'])}-{result['env']['date']}-{spec.name}{suffix}-profile"
    lines = [f"# {spec.name} DiT forward, CUDA kernel time per category (ms per forward)", "",
             f"{result['env']['gpu']}, torch {result['env']['torch']}; batch {args.batch}; "
             f"{result['flops_tflop']:.1f} TFLOP per batch-1 forward; "
             f"tier {args.tier}; compiled: {result['compile']['matches']}, attention {result['compile']['attention']}", "",
             "| category | eager ms | compiled ms |", "|---|---:|---:|"]
    cats = list(dict.fromkeys([*result["eager"]["by_category_ms"], *result["compiled"]["by_category_ms"]]))
    for c in cats:
        lines.append(f"| {c} | {result['eager']['by_category_ms'].get(c, 0):.1f} | "
                     f"{result['compiled']['by_category_ms'].get(c, 0):.1f} |")
    lines.append(f"| total | {result['eager']['total_ms']:.1f} | {result['compiled']['total_ms']:.1f} |")
    compiled = result["compiled"]
    if "span_ms" in compiled:
        lines += ["", f"Compiled forward{' (CUDA graph replay)' if args.graphs else ''}: {compiled['span_ms']:.1f} ms "
                      f"from the first kernel's start to the last one's end, {compiled['idle_ms']:.1f} ms of it with no "
                      "kernel running. Idle time per forward after a kernel, before the next:", ""]
        lines += [f"- {ms:.2f} {pair}" for pair, ms in compiled["idle_between_ms"].items()]
    lines += top_kernel_lines(result["compiled"]["top_kernels_ms"], "Top compiled kernels (ms per forward)")
    write_report(stem, result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
