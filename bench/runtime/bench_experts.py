"""Two experts on one GPU budget (Wan2.2 A14B): ``python -m bench.runtime.bench_experts``.

Builds two Wan 14B DiTs with random weights (the Wan2.2 T2V-A14B experts' config) directly on the GPU, then
runs the denoising loop's DiT calls as the pipeline makes them: ``--steps`` batch-2 (CFG pair) forwards,
the high-noise expert (``transformer``) for the first ``--switch-step`` steps and the low-noise one
(``transformer_2``) after, at 832x480x81 (32,760 tokens, 512 text tokens). Measured twice, same inputs:

- resident: both experts on the GPU (57 GB of weights);
- ``--offload model``: diffc's model offload keeps both in pinned host memory and uploads the expert whose
  forward starts, dropping the other; the peak is one expert plus activations.

Reports the loop's wall time, each step's time (the switch step carries the 28 GB upload), the peak GPU
memory of each, the overhead of offload over resident (goal <= 5%) and whether the outputs are identical.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.measure import GB
from bench.report import environment, gpu_slug
from bench.runtime.bench_offload import TARGETS, build, wan_inputs
from diffc.runtime.offload import apply_offload


def log(message: str) -> None:
    print(f"[bench_experts] {message}", flush=True)


def run_loop(experts: list[torch.nn.Module], inputs: dict[str, torch.Tensor], steps: int, switch: int,
             device: torch.device) -> tuple[list[float], list[torch.Tensor]]:
    """Each step's milliseconds and the outputs of the last step of each expert."""
    times, outputs = [], {}
    with torch.inference_mode():
        for i in range(steps):
            expert = 0 if i < switch else 1
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            out = experts[expert](**inputs)
            torch.cuda.synchronize(device)
            times.append((time.perf_counter() - start) * 1000)
            outputs[expert] = out.float().cpu()
    return times, [outputs[k] for k in sorted(outputs)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="denoising steps (one batch-2 forward each)")
    p.add_argument("--switch-step", type=int, default=4, help="the first step of the low-noise expert")
    p.add_argument("--layers", type=int, help="blocks per expert (default: the published 40)")
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_experts needs a CUDA GPU", file=sys.stderr)
        return 2
    if not 0 < args.switch_step < args.steps:
        print("--switch-step must be between 1 and --steps - 1", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    target = TARGETS["wan-14b"]
    if args.layers is not None:
        import dataclasses

        target = dataclasses.replace(target, config=dataclasses.replace(target.config, num_layers=args.layers))
    env = environment(device, ["-m", "bench.runtime.bench_experts", *(sys.argv[1:] if argv is None else argv)])
    log(f"building two experts ({target.config.num_layers} blocks each) on {env['gpu']}")
    experts = [build(target, device), build(target, device)]
    with torch.no_grad():  # the second expert is another model, not a copy of the first
        for p_ in experts[1].parameters():
            if p_.ndim >= 2:
                p_.mul_(-1.0)
    inputs = wan_inputs(target.config, 2, device)
    weights_gb = torch.cuda.memory_allocated(device) / GB
    run_loop(experts, inputs, 2, 1, device)  # warm-up: kernels, cuDNN plans
    torch.cuda.reset_peak_memory_stats(device)
    resident_ms, resident_out = run_loop(experts, inputs, args.steps, args.switch_step, device)
    resident_peak = torch.cuda.max_memory_allocated(device) / GB
    log(f"resident: {sum(resident_ms) / 1000:.2f} s, peak {resident_peak:.1f} GB")

    handle = apply_offload({"transformer": experts[0], "transformer_2": experts[1]}, device, "model")
    torch.cuda.empty_cache()
    run_loop(experts, inputs, 2, 1, device)  # warm-up under offload (ends with expert 2 on the GPU)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    offload_ms, offload_out = run_loop(experts, inputs, args.steps, args.switch_step, device)
    offload_peak = torch.cuda.max_memory_allocated(device) / GB
    counters = handle.describe()
    handle.remove()
    identical = all(torch.equal(a, b) for a, b in zip(resident_out, offload_out))
    overhead = sum(offload_ms) / sum(resident_ms) - 1
    log(f"model offload: {sum(offload_ms) / 1000:.2f} s ({overhead:+.1%}), peak {offload_peak:.1f} GB, "
        f"identical: {identical}")

    result: dict[str, Any] = {
        "environment": env, "config": target.config.to_dict(), "steps": args.steps, "switch_step": args.switch_step,
        "tokens": 21 * 30 * 52, "weights_gb_both_experts": weights_gb,
        "resident": {"step_ms": resident_ms, "total_s": sum(resident_ms) / 1000, "peak_gb": resident_peak},
        "model_offload": {"step_ms": offload_ms, "total_s": sum(offload_ms) / 1000, "peak_gb": offload_peak,
                          "offload": counters},
        "overhead": overhead, "outputs_identical": identical,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{gpu_slug(env['gpu'])}-{env['date']}-experts-wan2.2-a14b"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    switch = args.switch_step
    lines = [f"# Wan2.2 A14B experts on one GPU ({env.get('gpu')}, {env['date']})", "",
             f"Two {target.config.num_layers}-block 14B experts (random weights, bf16), 832x480x81 (32,760 tokens), "
             f"CFG pair as one batch-2 forward, {args.steps} steps, switch to the low-noise expert at step {switch}.",
             "", "| | loop | step before / at / after the switch | peak GPU memory |", "|---|---|---|---|"]
    for name, ms, peak in (("both resident", resident_ms, resident_peak),
                           ("`--offload model`", offload_ms, offload_peak)):
        lines.append(f"| {name} | {sum(ms) / 1000:.2f} s | {ms[switch - 1]:.0f} / {ms[switch]:.0f} / "
                     f"{ms[min(switch + 1, len(ms) - 1)]:.0f} ms | {peak:.1f} GB |")
    lines += ["", f"Offload overhead over resident: {overhead:+.1%} (goal: at most +5%). Outputs identical: "
              f"{identical}. Weights of both experts: {weights_gb:.1f} GB.", "",
              f"Command: `{env['command']}`", ""]
    (out_dir / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
