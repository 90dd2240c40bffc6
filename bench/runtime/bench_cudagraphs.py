"""CUDA graphs vs eager for the DiT forward at small workloads: ``python -m bench.runtime.bench_cudagraphs``.

Real-size native DiTs with random weights (built on ``meta``, ``to_empty`` on the GPU, ``normal_(std=0.02)``,
the model's fp32 modules kept in fp32, as the loader does), bf16:

- ``flux-dev-512``: FLUX.1-dev at 512x512: 1024 image tokens, 512 T5 tokens, batch 1, with guidance;
- ``wan2.1-1.3b-320x192x17``: Wan2.1-T2V-1.3B at 320x192, 17 frames: latents (2, 16, 5, 24, 40), i.e.
  CFG as one batch-2 forward, UMT5 states (2, 512, 4096).

For each, one DiT forward is timed with graphs off (eager), on (``CudaGraphModule``, the default: a clone
of the output) and on without the clone; and ``graph.replay()`` alone, back to back (the GPU work with no
host in the way: the floor). Figures, medians in ms: ``isolated`` (CUDA events around one call after a
sync: what a step costs when the host issues it), ``pipelined`` (events around ``--repeats`` calls back to
back, divided), ``host`` (wall time for the call to return, after a sync: the CPU cost of issuing it).
``launch_overhead_share`` = (eager - graphs) / eager, isolated; ``residual_share`` = (graphs - floor) /
graphs: what host work is left per step with graphs on (the goal: under 2%).

Then the pipelines' own denoise stages (``diffc.pipelines.flux.denoise`` / ``wan.denoise`` with their
schedulers, random text states) run ``--loop-steps`` steps with graphs off and on: per-step CUDA-event
times from the PerfRecorder, the stage's wall time, and whether the latents came out identical.
Writes ``<out-dir>/<gpu>-<date>-cudagraphs.json``. About a minute on one H200.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.measure import back_to_back_ms
from bench.report import environment, gpu_slug
from diffc.models.flux.transformer import FLUX_TRANSFORMER_SPECS, FluxTransformer2DModel
from diffc.models.wan.transformer import WAN_TRANSFORMER_SPECS, WanTransformer3DModel
from diffc.pipelines import flux as flux_pipeline
from diffc.pipelines import wan as wan_pipeline
from diffc.pipelines.schedulers.flow_match_euler import FlowMatchEulerDiscreteScheduler
from diffc.pipelines.schedulers.unipc import SCHEDULER_CONFIGS, UniPCMultistepScheduler
from diffc.pipelines.stages import RunContext
from diffc.runtime.cudagraphs import CudaGraphModule
from diffc.runtime.perf import PerfRecorder

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
# FLUX.1-dev's scheduler_config.json.
FLUX_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                  "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}


def build(cls, config) -> torch.nn.Module:
    with torch.device("meta"):
        model = cls(config)
    model.to(DTYPE)
    fp32 = tuple(cls._keep_in_fp32_modules)
    for name, tensor in model.named_parameters():
        if any(f in name.split(".") for f in fp32):
            tensor.data = tensor.data.float()
    model.to_empty(device=DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def randn(*shape, dtype=DTYPE, seed=0):
    g = torch.Generator(DEVICE).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=DEVICE, dtype=torch.float32).to(dtype)


def flux_workload():
    model = build(FluxTransformer2DModel, FLUX_TRANSFORMER_SPECS["flux-dev"])
    h2 = w2 = 32  # 512 px / 8 (VAE) / 2 (packing)
    state = {"latents": randn(1, h2 * w2, 64, seed=1), "prompt_embeds": randn(1, 512, 4096, seed=2),
             "pooled_prompt_embeds": randn(1, 768, seed=3), "text_ids": torch.zeros(512, 3, device=DEVICE, dtype=DTYPE),
             "img_ids": flux_pipeline.latent_image_ids(h2, w2, DEVICE, DTYPE), "guidance_scale": 3.5}
    kwargs = {"hidden_states": state["latents"], "timestep": torch.full([1], 0.7, device=DEVICE, dtype=DTYPE),
              "guidance": torch.full([1], 3.5, device=DEVICE), "pooled_projections": state["pooled_prompt_embeds"],
              "encoder_hidden_states": state["prompt_embeds"], "txt_ids": state["text_ids"], "img_ids": state["img_ids"]}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER)
    return model, kwargs, state, scheduler, flux_pipeline


def wan_workload():
    model = build(WanTransformer3DModel, WAN_TRANSFORMER_SPECS["wan2.1-t2v-1.3b"])
    text = randn(2, 512, 4096, seed=2)
    kwargs = {"hidden_states": randn(2, 16, 5, 24, 40, seed=1), "timestep": torch.full([2], 700, device=DEVICE),
              "encoder_hidden_states": text}
    state = {"latents": randn(1, 16, 5, 24, 40, dtype=torch.float32, seed=1), "prompt_embeds": text[:1],
             "negative_prompt_embeds": text[1:], "guidance_scale": 5.0}
    scheduler = UniPCMultistepScheduler.from_config(SCHEDULER_CONFIGS["wan2.1-480p"])
    return model, kwargs, state, scheduler, wan_pipeline


WORKLOADS: dict[str, Callable] = {"flux-dev-512": flux_workload, "wan2.1-1.3b-320x192x17": wan_workload}


def measure(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Median isolated (events, sync between calls), pipelined (back to back) and host ms of ``fn()``."""
    isolated, host = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        host.append((time.perf_counter() - t0) * 1e3)
        end.synchronize()
        isolated.append(start.elapsed_time(end))
    return {"isolated_ms": statistics.median(isolated), "pipelined_ms": back_to_back_ms(fn, repeats),
            "host_ms": statistics.median(host), "isolated_all": [round(t, 4) for t in isolated]}


def bench_forward(model, kwargs, repeats: int, warmup: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with torch.inference_mode():
        for _ in range(warmup):
            model(**kwargs)
        out["eager"] = measure(lambda: model(**kwargs), repeats)
        for name, clone in (("graphs", True), ("graphs_no_clone", False)):
            wrapper = CudaGraphModule(model, clone_outputs=clone)
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            wrapper(**kwargs)  # warm-up + capture
            torch.cuda.synchronize()
            capture_s = time.perf_counter() - t0
            if not wrapper.counters.captures:
                return {**out, "capture_failed": wrapper.describe()["failed_captures"]}
            held_gb = (torch.cuda.memory_allocated() - before) / 2**30
            for _ in range(warmup):
                wrapper(**kwargs)
            out[name] = measure(lambda w=wrapper: w(**kwargs), repeats)
            out[name].update(capture_s=capture_s, graph_memory_gb=held_gb, counters=wrapper.counters.as_dict())
            if clone:
                graph = next(iter(wrapper._graphs.values())).graph
                out["replay_only"] = measure(graph.replay, repeats)
                out[name]["bitwise_equal_to_eager"] = torch.equal(wrapper(**kwargs), model(**kwargs))
            wrapper.reset()
            del wrapper
    eager, floor = out["eager"]["isolated_ms"], out["replay_only"]["isolated_ms"]
    out["launch_overhead_share"] = (eager - out["graphs"]["isolated_ms"]) / eager
    for name, key in (("graphs", "residual_share"), ("graphs_no_clone", "residual_share_no_clone")):
        out[key] = (out[name]["isolated_ms"] - floor) / out[name]["isolated_ms"]
    return out


def patch_wan_rope() -> None:
    """Bench-only: memoise Wan's RoPE tables per (head_dim, grid, device), so that the forward makes no
    host-to-device copy after its first call (the copy is what stops the capture)."""
    import diffc.models.wan.transformer as wan_transformer

    compute, cache = wan_transformer.rope_frequencies, {}

    def cached(head_dim, grid, device):
        key = (head_dim, tuple(grid), torch.device(device))
        if key not in cache:
            cache[key] = compute(head_dim, grid, device)
        return cache[key]

    wan_transformer.rope_frequencies = cached


def bench_loop(model, state, scheduler, pipeline, steps: int) -> dict[str, Any]:
    """The pipeline's own denoise stage, ``steps`` steps, graphs off then on (first run of each: warm-up)."""
    results: dict[str, Any] = {}
    final = {}
    for name, transformer in (("eager", model), ("graphs", CudaGraphModule(model))):
        ctx = RunContext({"transformer": transformer, "scheduler": scheduler}, DEVICE, DTYPE, PerfRecorder(DEVICE),
                         progress=False)
        runs = []
        with torch.inference_mode():
            for _ in range(3):
                ctx.perf = PerfRecorder(DEVICE)
                s = dict(state, num_inference_steps=steps)
                s.update(pipeline.prepare_timesteps(ctx, s))
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                latents = pipeline.denoise(ctx, s)["latents"]
                torch.cuda.synchronize()
                runs.append(((time.perf_counter() - t0) * 1e3, ctx.perf.finish().step_ms))
        final[name] = latents
        wall, step_ms = runs[-1]
        results[name] = {"stage_ms": wall, "step_ms": step_ms, "median_step_ms": statistics.median(step_ms),
                         "first_run_stage_ms": runs[0][0]}
        if isinstance(transformer, CudaGraphModule):
            results[name]["counters"] = transformer.counters.as_dict()
            transformer.reset()
    results["identical_latents"] = torch.equal(final["eager"], final["graphs"])
    results["stage_saving_share"] = 1 - results["graphs"]["stage_ms"] / results["eager"]["stage_ms"]
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--loop-steps", type=int, default=4)
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    parser.add_argument("--patch-wan-rope", action="store_true",
                        help="bench-only: cache Wan's RoPE tables on the GPU (its forward copies them from the host)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_cudagraphs measures CUDA graphs: no CUDA device is visible")
    env = environment(DEVICE, ["-m", "bench.runtime.bench_cudagraphs", *(sys.argv[1:] if argv is None else argv)])
    result: dict[str, Any] = {"environment": env, "dtype": str(DTYPE), "wan_rope_patched": args.patch_wan_rope,
                              "workloads": {}}
    if args.patch_wan_rope:
        patch_wan_rope()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{gpu_slug(env['gpu'])}-{env['date']}-cudagraphs.json"
    for name in args.workloads.split(","):
        print(f"== {name}", flush=True)
        model, kwargs, state, scheduler, pipeline = WORKLOADS[name]()
        entry = {"forward": bench_forward(model, kwargs, args.repeats, args.warmup)}
        entry["denoise_stage"] = bench_loop(model, state, scheduler, pipeline, args.loop_steps)
        result["workloads"][name] = entry
        _print(entry, args.loop_steps)
        path.write_text(json.dumps(result, indent=1, default=str))
        del model, kwargs, state, scheduler
        torch.cuda.empty_cache()
    print(f"wrote {path}")


def _print(entry: dict[str, Any], steps: int) -> None:
    f, d = entry["forward"], entry["denoise_stage"]
    if "capture_failed" in f:
        print(f"  forward ms (isolated / pipelined / host): eager {_fmt(f['eager'])}; capture FAILED: "
              f"{f['capture_failed']}")
    else:
        print(f"  forward ms (isolated / pipelined / host): eager {_fmt(f['eager'])}, graphs {_fmt(f['graphs'])}, "
              f"no clone {_fmt(f['graphs_no_clone'])}, replay only {_fmt(f['replay_only'])}")
        print(f"  launch overhead share {f['launch_overhead_share']:.1%}, residual with graphs "
              f"{f['residual_share']:.2%} (no clone {f['residual_share_no_clone']:.2%}), capture "
              f"{f['graphs']['capture_s']:.2f}s, graph memory {f['graphs']['graph_memory_gb']:.2f} GB, "
              f"bitwise equal {f['graphs']['bitwise_equal_to_eager']}, counters {f['graphs']['counters']}")
    print(f"  denoise {steps} steps: eager {d['eager']['stage_ms']:.1f} ms "
          f"({d['eager']['median_step_ms']:.2f} ms/step), graphs {d['graphs']['stage_ms']:.1f} ms "
          f"({d['graphs']['median_step_ms']:.2f} ms/step), saving {d['stage_saving_share']:.1%}, "
          f"identical latents {d['identical_latents']}, counters {d['graphs']['counters']}", flush=True)


def _fmt(m: dict[str, float]) -> str:
    return f"{m['isolated_ms']:.2f}/{m['pipelined_ms']:.2f}/{m['host_ms']:.2f}"


if __name__ == "__main__":
    main()
