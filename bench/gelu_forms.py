"""The three feed-forward GELU forms inside the whole compiled DiT: ``python -m bench.gelu_forms --model flux-dev``.

Compiles the workload's DiT (random weights) three times, differing only in the ``gelu_tanh`` pass:
cuBLASLt GELU epilogue (the default on CUDA), bias-free GEMM + ``diffc.gelu_tanh``, and no GELU pass
(biased GEMM + ATen GELU); each under CUDA graphs. Forwards are timed in interleaved rounds (A B C A B C
...) so clock drift hits every form alike; prints the median of each and writes ``--out`` JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from .build import build_diffusers_models, native_like
from .compare import quiet_libraries
from .families import FAMILIES
from .measure import Interval
from .report import environment
from .specs import SPECS, Workload


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gelu_forms", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, choices=sorted(SPECS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--out")
    args = p.parse_args(argv)
    quiet_libraries()
    from diffc.compile.manager import PassManager, default_passes
    from diffc.compile.passes.gelu_tanh import GeluTanhPass
    from diffc.runtime.cudagraphs import CudaGraphModule

    spec, device, dtype = SPECS[args.model], torch.device("cuda"), torch.bfloat16
    family = FAMILIES[spec.family]
    wl = Workload.from_spec(spec)
    native = native_like(build_diffusers_models(spec, device, dtype)["transformer"], family.native_transformer,
                         spec.transformer)
    inputs = family.dit_inputs(spec, wl, device, dtype)
    others = [f for f in default_passes() if f.name != "gelu_tanh"]
    forms = {"epilogue": [GeluTanhPass()], "diffc kernel": [GeluTanhPass(epilogue=False)], "no pass": []}
    runners, outs = {}, {}
    from diffc.compile.trace import trace_module

    with torch.no_grad():
        ref = native(**inputs).float()
        for name, gelu in forms.items():
            program = trace_module(native, inputs)
            counters = PassManager(passes=[*others[:3], *gelu, *others[3:]]).run(program)
            graph = program.module()
            runners[name] = CudaGraphModule(graph)  # the whole DiT as one graph (an experiment, not the runtime path)
            for _ in range(3):
                outs[name] = runners[name](**inputs)
            outs[name] = float((outs[name].float() - ref).norm() / ref.norm())
            print(name, counters.matches, f"rel err {outs[name]:.2e}", flush=True)
        times: dict[str, list[float]] = {n: [] for n in forms}
        for _ in range(args.rounds):
            for name, run in runners.items():
                for _ in range(args.per_round):
                    interval = Interval(device)
                    interval.start()
                    run(**inputs)
                    interval.stop()
                    times[name].append(interval.ms())
    result = {"model": spec.name, "env": environment(device, ["-m", "bench.gelu_forms", *(argv or [])]),
              "median_ms": {n: statistics.median(t) for n, t in times.items()}, "rel_err": outs, "times_ms": times}
    for n, ms in result["median_ms"].items():
        print(f"{spec.name} DiT forward, GELU {n:13s}: {ms:8.2f} ms (median of {len(times[n])}, interleaved)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
