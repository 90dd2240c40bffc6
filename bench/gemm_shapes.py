"""How close a DiT's GEMMs run to the GPU's matmul ceiling: ``python -m bench.gemm_shapes --model flux-dev``.

Builds the named workload's DiT with random weights (diffusers' class), runs one forward with a hook on every
``nn.Linear`` to record the GEMMs it does (rows x in -> out, bias or not, how many per forward), then times each
distinct shape alone as cuBLAS runs it (``F.linear``, replayed from a CUDA graph, as the compiled runtime runs it)
and reports its TFLOP/s against a bf16 8192^3 matmul measured in the same run, and the sum over one forward:
the time the forward's linear layers take when each runs at its own best, a floor for the compiled DiT (its GEMMs
run the same cuBLAS kernels; the tanh-GELU epilogue diffc adds to some is not timed here).

``--triton N`` also compiles the N shapes that take the most time per forward with ``torch.compile``'s
max-autotune (Triton matmul templates against cuBLAS) and times the winner the same way: what a Triton GEMM could
gain over cuBLAS, shape by shape. Writes ``<out-dir>/<gpu>-<date>-<model>-gemm-shapes.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .build import build_diffusers_models, native_like
from .compare import quiet_libraries
from .families import FAMILIES
from .flops import matmul_flops, tflops_per_s
from .measure import free_memory, matmul_ceiling
from .report import environment, gpu_slug
from .specs import SPECS, Workload


@dataclasses.dataclass(frozen=True)
class Gemm:
    """One linear layer's GEMM: ``rows`` tokens x ``d_in`` -> ``d_out``."""

    rows: int
    d_in: int
    d_out: int
    bias: bool

    @property
    def flop(self) -> int:
        return matmul_flops(self.rows, self.d_out, self.d_in)


def build_dit(spec, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The workload's DiT with random weights, as the benchmark's DiT inputs call it (diffc's model for the
    families whose inputs are its own, holding the same tensors)."""
    dit = build_diffusers_models(spec, device, dtype)["transformer"]
    native = FAMILIES[spec.family].native_transformer
    return dit if native is None else native_like(dit, native, spec.transformer)


def record_gemms(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[dict[Gemm, int], dict[Gemm, list[str]]]:
    """Run ``model(**inputs)`` once; every linear layer's GEMM shape, with how many times it ran and where."""
    counts: dict[Gemm, int] = {}
    names: dict[Gemm, list[str]] = {}

    def hook(name):
        def record(module, args, _output):
            x = args[0]
            gemm = Gemm(x.numel() // x.shape[-1], module.in_features, module.out_features, module.bias is not None)
            counts[gemm] = counts.get(gemm, 0) + 1
            short = ".".join(p for p in name.split(".") if not p.isdigit())
            if short not in names.setdefault(gemm, []):
                names[gemm].append(short)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return counts, names


def graph_ms(fn, device: torch.device, calls: int, repeats: int) -> float:
    """Median ms of one ``fn()``: ``calls`` of it captured in one CUDA graph, replayed ``repeats`` times."""
    from diffc.capture import replayer

    replay = replayer(lambda: [fn() for _ in range(calls)], device)
    replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def time_gemm(gemm: Gemm, device: torch.device, dtype: torch.dtype, calls: int, repeats: int,
              triton: bool) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(gemm.rows, gemm.d_in, device=device, dtype=dtype, generator=gen)
    w = torch.randn(gemm.d_out, gemm.d_in, device=device, dtype=dtype, generator=gen) * gemm.d_in ** -0.5
    b = torch.randn(gemm.d_out, device=device, dtype=dtype, generator=gen) if gemm.bias else None
    row: dict[str, Any] = {"cublas_ms": graph_ms(lambda: F.linear(x, w, b), device, calls, repeats)}
    if triton:
        import torch._inductor.config as inductor_config

        torch._dynamo.reset()
        with inductor_config.patch(max_autotune_gemm_backends="TRITON,ATEN"):
            tuned = torch.compile(lambda x, w, b: F.linear(x, w, b), mode="max-autotune-no-cudagraphs",
                                  fullgraph=True)
            tuned(x, w, b)
        row["autotuned_ms"] = graph_ms(lambda: tuned(x, w, b), device, calls, repeats)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gemm_shapes", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, choices=sorted(SPECS))
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--calls", type=int, default=20, help="GEMM calls per CUDA graph")
    p.add_argument("--repeats", type=int, default=7, help="graph replays timed per shape (the median is kept)")
    p.add_argument("--triton", type=int, default=0, metavar="N",
                   help="also max-autotune (Triton templates vs cuBLAS) the N shapes taking the most time per forward")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    for name in ("calls", "repeats", "triton"):
        if getattr(args, name) < (0 if name == "triton" else 1):
            p.error(f"--{name} must be {'>= 0' if name == 'triton' else 'positive'}")
    quiet_libraries()
    spec, device, dtype = SPECS[args.model], torch.device("cuda"), torch.bfloat16
    family = FAMILIES[spec.family]
    wl = Workload.from_spec(spec)
    counts, names = record_gemms(build_dit(spec, device, dtype), family.dit_inputs(spec, wl, device, dtype))
    free_memory(device)
    ceiling = matmul_ceiling(device, dtype, 8192)
    rows = []
    for gemm, count in counts.items():
        rows.append({**dataclasses.asdict(gemm), "count": count, "layers": names[gemm],
                     **time_gemm(gemm, device, dtype, args.calls, args.repeats, triton=False)})
    rows.sort(key=lambda r: -r["cublas_ms"] * r["count"])
    for row in rows[:args.triton]:
        gemm = Gemm(row["rows"], row["d_in"], row["d_out"], row["bias"])
        row["autotuned_ms"] = time_gemm(gemm, device, dtype, args.calls, args.repeats, triton=True)["autotuned_ms"]
    for row in rows:
        flop = Gemm(row["rows"], row["d_in"], row["d_out"], row["bias"]).flop
        row["cublas_tflops"] = tflops_per_s(flop, row["cublas_ms"])
        row["cublas_of_ceiling"] = row["cublas_tflops"] / ceiling["tflops"]
        if "autotuned_ms" in row:
            row["autotuned_tflops"] = tflops_per_s(flop, row["autotuned_ms"])
    total = sum(r["cublas_ms"] * r["count"] for r in rows)
    best = sum(min(r["cublas_ms"], r.get("autotuned_ms", r["cublas_ms"])) * r["count"] for r in rows)
    flop = sum(Gemm(r["rows"], r["d_in"], r["d_out"], r["bias"]).flop * r["count"] for r in rows)
    result = {"model": spec.name, "env": environment(device, ["-m", "bench.gemm_shapes", *(argv or [])]),
              "ceiling": ceiling, "linear_tflop": flop / 1e12, "cublas_total_ms": total,
              "best_total_ms": best if args.triton else None, "shapes": rows}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{gpu_slug(result['env']['gpu'])}-{result['env']['date']}-{spec.name}-gemm-shapes"
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# {spec.name}: the DiT's linear layers, each GEMM shape alone (cuBLAS, CUDA-graph replay)", "",
             f"{result['env']['gpu']}, torch {result['env']['torch']}, bf16; one forward at the bench's workload "
             f"({wl.height}x{wl.width}{f'x{wl.num_frames}' if wl.num_frames else ''}): "
             f"{result['linear_tflop']:.1f} TFLOP in linear layers. Matmul ceiling (8192^3): "
             f"{ceiling['tflops']:.0f} TFLOP/s.", "",
             "`" + " ".join(["python -m bench.gemm_shapes", *(argv or [])]) + "`", "",
             "| rows x in -> out | bias | per forward | layers | cuBLAS ms | TFLOP/s | of ceiling | ms per forward "
             "| autotuned ms | autotuned TFLOP/s |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        auto = (f"{r['autotuned_ms']:.4f} | {r['autotuned_tflops']:.0f}" if "autotuned_ms" in r else "– | –")
        lines.append(f"| {r['rows']} x {r['d_in']} -> {r['d_out']} | {'yes' if r['bias'] else 'no'} | {r['count']} | "
                     f"{', '.join(r['layers'])} | {r['cublas_ms']:.4f} | {r['cublas_tflops']:.0f} | "
                     f"{100 * r['cublas_of_ceiling']:.0f}% | {r['cublas_ms'] * r['count']:.2f} | {auto} |")
    lines += ["", f"Sum over one forward: {total:.1f} ms with cuBLAS"
              + (f", {best:.1f} ms taking the faster of cuBLAS and the autotuned kernel per shape" if args.triton
                 else "") + "."]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
