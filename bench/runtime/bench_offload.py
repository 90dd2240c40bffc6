"""Layerwise offload at real size: ``python -m bench.runtime.bench_offload --model wan-14b|flux-dev``.

Builds the DiT with random weights directly on the GPU in bf16 (float32 where the model keeps it) from
diffc's native classes and published specs, feeds real-size inputs, and measures the forward (CUDA
events, median of the repeats) and the DiT's peak GPU memory (``max_memory_allocated`` after a reset,
so weights on the GPU count) for: fully resident; layerwise with each ``--prefetch`` x
``--resident-blocks``; automatic residency on the whole GPU and under each ``--memory-limit-gb``.
Every offloaded output is compared bit for bit with the resident one. A timeline model
(``offload_plan.trace``) fed with the resident per-block times and the measured copy bandwidth
predicts each configuration, which shows where the time goes. Prints a table, writes JSON + Markdown.

Wan2.1-14B, 832x480x81 (21 x 60 x 104 latents, 32,760 tokens) and 512 text tokens, batch 1: resident
3.3 s a forward on an H200; goals: peak under 6 GB, forward within 3% of resident (diffusers' group
offload with streams: 3,689 ms vs 3,303 ms at 5.6 GB). FLUX.1-dev at 1024² (4096 + 512 tokens): a double
block copies in ~12 ms and computes in ~3 ms, so copies cannot hide; this reports by how much, and how
many blocks automatic residency keeps under each memory limit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.measure import GB, stats, time_calls
from bench.report import environment, gpu_slug
from diffc.models.flux.transformer import FLUX_TRANSFORMER_SPECS, FluxTransformer2DModel
from diffc.models.wan.transformer import WAN_TRANSFORMER_SPECS, WanTransformer3DModel
from diffc.pipelines.flux import latent_image_ids
from diffc.runtime.offload import (
    CudaStreams,
    apply_offload,
    packed_bytes,
    repeated_blocks,
)
from diffc.runtime.offload_plan import RingPlan, trace

DTYPE = torch.bfloat16


def wan_inputs(cfg, batch: int, device) -> dict[str, torch.Tensor]:
    g = torch.Generator(device).manual_seed(1)
    return dict(hidden_states=torch.randn(batch, 16, 21, 60, 104, generator=g, device=device, dtype=DTYPE),
                timestep=torch.full((batch,), 999.0, device=device),
                encoder_hidden_states=torch.randn(batch, 512, cfg.text_dim, generator=g, device=device, dtype=DTYPE))


def flux_inputs(cfg, batch: int, device) -> dict[str, torch.Tensor]:
    g = torch.Generator(device).manual_seed(1)
    return dict(hidden_states=torch.randn(batch, 4096, cfg.in_channels, generator=g, device=device, dtype=DTYPE),
                encoder_hidden_states=torch.randn(batch, 512, cfg.joint_attention_dim, generator=g, device=device,
                                                  dtype=DTYPE),
                pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g, device=device,
                                               dtype=DTYPE),
                timestep=torch.full((batch,), 1.0, device=device), img_ids=latent_image_ids(64, 64, device, DTYPE),
                txt_ids=torch.zeros(512, 3, device=device, dtype=DTYPE),
                guidance=torch.full((batch,), 3.5, device=device))


@dataclasses.dataclass(frozen=True)
class Target:
    cls: type
    config: Any
    inputs: Callable
    shape: str
    prefetch: tuple[int, ...]
    resident: tuple[int, ...]
    limits_gb: tuple[float, ...]


TARGETS = {
    "wan-14b": Target(WanTransformer3DModel, WAN_TRANSFORMER_SPECS["wan2.1-t2v-14b"], wan_inputs,
                      "832x480x81 (32,760 tokens) + 512 text tokens", (1, 2), (0,), (24.0,)),
    "flux-dev": Target(FluxTransformer2DModel, FLUX_TRANSFORMER_SPECS["flux-dev"], flux_inputs,
                       "1024x1024 (4,096 tokens) + 512 text tokens", (1, 2), (0, 19, 38), (12.0, 16.0, 20.0)),
}


def log(message: str) -> None:
    print(f"[bench_offload {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build(target: Target, device: torch.device) -> torch.nn.Module:
    """The DiT on ``device`` with random weights, built on meta and initialised in place (no host copy)."""
    with torch.device("meta"):
        model = target.cls(target.config)
    model = model.to(DTYPE)
    for name, p in model.named_parameters():
        if any(f in name.split(".") for f in model._keep_in_fp32_modules):
            p.data = p.data.float()
    model = model.to_empty(device=device).eval().requires_grad_(False)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=g)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.01, generator=g)
            else:
                p.fill_(1.0)
    return model


def block_profile(model, inputs) -> tuple[list[float], float]:
    """Per-block compute ms and the rest of the forward's ms, from one resident forward with events."""
    blocks = repeated_blocks(model)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in blocks]
    hooks = []
    for block, (start, end) in zip(blocks, events):
        hooks.append(block.register_forward_pre_hook(lambda *_, e=start: e.record()))
        hooks.append(block.register_forward_hook(lambda *_, e=end: e.record()))
    first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.inference_mode():
        first.record()
        model(**inputs)
        last.record()
    torch.cuda.synchronize()
    for h in hooks:
        h.remove()
    block_ms = [s.elapsed_time(e) for s, e in events]
    return block_ms, first.elapsed_time(last) - sum(block_ms)


def copy_bandwidth(nbytes: int, device: torch.device, repeats: int = 5) -> float:
    """Bytes per ms of a pinned host -> GPU copy of one block on a side stream."""
    streams = CudaStreams(device)
    host, dst = streams.pin(nbytes), streams.empty(nbytes)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(streams.copy_stream):
            start.record()
            dst.copy_(host.tensor, non_blocking=True)
            end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    host.release()
    return nbytes / statistics.median(times)


def run_config(name, model, inputs, ref, args, device, reserve, block_ms, rest_ms, bandwidth, **offload):
    torch.cuda.synchronize()
    start = time.perf_counter()
    handle = apply_offload({"transformer": model}, device, "layerwise", activation_reserve=reserve, **offload)
    setup_s = time.perf_counter() - start
    ring = handle.rings["transformer"]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        timed = time_calls(lambda: model(**inputs), args.warmup, args.repeats, device)
    peak = torch.cuda.max_memory_allocated(device) / GB
    equal = bool(torch.equal(timed.output.cpu(), ref))
    plan: RingPlan = ring.plan
    copy_ms = [ring.block_bytes[b] / bandwidth for b in plan.streamed]
    predicted = rest_ms + trace(plan, plan.forward_ops(), block_ms, copy_ms).total_ms
    row = {"name": name, "forward_ms": stats(timed.times_ms), "peak_gb": peak, "bit_equal": equal,
           "predicted_ms": predicted, "setup_s": setup_s, "offload": handle.describe()}
    del timed
    handle.remove()
    torch.cuda.empty_cache()
    log(f"{name}: {row['forward_ms']['median']:.1f} ms, peak {peak:.2f} GB, bit-equal {equal}")
    return row


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(TARGETS), required=True)
    p.add_argument("--prefetch", type=int, nargs="+", help="ring depths - 1 to measure (default per model)")
    p.add_argument("--resident-blocks", type=int, nargs="+", help="fixed residency counts (default per model)")
    p.add_argument("--memory-limit-gb", type=float, nargs="*", help="automatic residency under these limits")
    p.add_argument("--placement", choices=("spread", "first"), nargs="+", default=["spread"])
    p.add_argument("--activation-reserve-gb", type=float, help="for automatic residency (default: measured peak x 1.1)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_offload needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    target = TARGETS[args.model]
    env = environment(device, ["-m", "bench.runtime.bench_offload", *(sys.argv[1:] if argv is None else argv)])
    log(f"building {args.model} with random weights on {env['gpu']}")
    model = build(target, device)
    inputs = target.inputs(target.config, args.batch, device)
    weights_gb = torch.cuda.memory_allocated(device) / GB
    block_bytes = [packed_bytes(b) for b in repeated_blocks(model)]

    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        timed = time_calls(lambda: model(**inputs), args.warmup, args.repeats, device)
    resident_peak = torch.cuda.max_memory_allocated(device) / GB
    resident_ms = stats(timed.times_ms)
    ref = timed.output.cpu()
    del timed
    block_ms, rest_ms = block_profile(model, inputs)
    bandwidth = copy_bandwidth(max(block_bytes), device)
    reserve = int((args.activation_reserve_gb or (resident_peak - weights_gb) * 1.1) * GB)
    log(f"resident: {resident_ms['median']:.1f} ms, peak {resident_peak:.2f} GB ({weights_gb:.2f} GB weights); "
        f"copy {bandwidth / 1e6:.1f} GB/s; blocks {statistics.median(block_ms):.2f} ms median, "
        f"{max(block_bytes) / 1e6:.0f} MB largest")

    rows = []
    common = (model, inputs, ref, args, device, reserve, block_ms, rest_ms, bandwidth)
    for placement in args.placement:
        for prefetch in args.prefetch or target.prefetch:
            for resident_blocks in args.resident_blocks if args.resident_blocks is not None else target.resident:
                rows.append(run_config(f"p{prefetch} r{resident_blocks} {placement}", *common, prefetch=prefetch,
                                       resident_blocks=resident_blocks, placement=placement))
        prefetch = (args.prefetch or target.prefetch)[0]
        limits = target.limits_gb if args.memory_limit_gb is None else args.memory_limit_gb
        for limit in (None, *limits):
            label = "whole GPU" if limit is None else f"{limit:g} GB"
            rows.append(run_config(f"p{prefetch} auto@{label} {placement}", *common, prefetch=prefetch,
                                   resident_blocks=None, placement=placement,
                                   memory_limit=None if limit is None else int(limit * GB)))

    result = {"bench": "offload", "model": args.model, "shape": target.shape, "batch": args.batch, "env": env,
              "weights_gb": weights_gb, "resident": {"forward_ms": resident_ms, "peak_gb": resident_peak},
              "copy_gb_per_s": bandwidth / 1e6, "block_bytes": block_bytes, "block_ms": block_ms,
              "rest_ms": rest_ms, "activation_reserve_gb": reserve / GB, "configs": rows}
    text = table(result)
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{gpu_slug(env['gpu'])}-{env['date']}-offload-{args.model}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out_dir / f"{stem}.md").write_text(f"# offload — {args.model} on {env['gpu']}\n\n`{env['command']}`\n\n"
                                             f"{text}\n")
    log(f"wrote {args.out_dir / stem}.json and .md")
    return 0 if all(r["bit_equal"] for r in rows) else 1


def table(result: dict[str, Any]) -> str:
    base = result["resident"]["forward_ms"]["median"]
    lines = [f"{result['model']}, {result['shape']}, batch {result['batch']}, bf16; copy "
             f"{result['copy_gb_per_s']:.1f} GB/s; peak = max_memory_allocated during the forward, weights included",
             "",
             "| config | resident blocks | ring slots | fwd ms | vs resident | predicted ms | peak GB | bit-equal |",
             "|---|---:|---:|---:|---:|---:|---:|---|",
             f"| resident | all | – | {base:.1f} | – | – | {result['resident']['peak_gb']:.2f} | ref |"]
    for r in result["configs"]:
        m = r["offload"]["models"]["transformer"]
        ms = r["forward_ms"]["median"]
        lines.append(f"| {r['name']} | {m['resident_blocks']}/{m['blocks']} | {m['ring_slots']} | {ms:.1f} | "
                     f"{(ms / base - 1) * 100:+.1f}% | {r['predicted_ms']:.1f} | {r['peak_gb']:.2f} | "
                     f"{'yes' if r['bit_equal'] else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
