"""A compiled DiT forward with a padded prompt, with and without the key-padding attention pass:
``python -m bench.key_padding_dit --model qwen-image --kept 40``.

The workload's DiT (random weights) gets its prompt padded to ``max_sequence_length`` tokens of which
``--kept`` are real, with the boolean mask the native pipeline passes (Qwen-Image pads every prompt to a
128-token bucket). It is compiled twice through the runtime's DiT stack, differing only in the
``key_padding_attention`` pass, each with the CUDA graphs the stack then allows (none where the pass
read the mask on the host). Forwards are timed in interleaved rounds (A B A B ...) so clock drift hits
both alike; writes ``<out-dir>/<gpu>-<date>-<model>-key-padding-dit.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from .build import build_diffusers_models, native_like
from .compare import quiet_libraries
from .families import FAMILIES
from .measure import Interval
from .report import environment, gpu_slug
from .specs import SPECS, Workload

MASKS = {"qwen_image": "encoder_hidden_states_mask", "qwen_image_edit": "encoder_hidden_states_mask"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.key_padding_dit", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, choices=sorted(s for s, v in SPECS.items() if v.family in MASKS))
    p.add_argument("--kept", type=int, default=40, help="real prompt tokens of max_sequence_length")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--device", default="cuda", help="cpu only checks the script (with --rounds 0)")
    args = p.parse_args(argv)
    quiet_libraries()
    from diffc.compile.pipeline import compile_dit
    from diffc.runtime.compiled import CompiledDiT
    from diffc.runtime.dit_stack import DiTStack

    spec, device, dtype = SPECS[args.model], torch.device(args.device), torch.bfloat16
    family = FAMILIES[spec.family]
    wl = Workload.from_spec(spec)
    native = build_diffusers_models(spec, device, dtype)["transformer"]
    if family.native_transformer is not None:
        native = native_like(native, family.native_transformer, spec.transformer)
    inputs = family.dit_inputs(spec, wl, device, dtype)
    mask = torch.zeros(1, wl.max_sequence_length, dtype=torch.int64, device=device)
    mask[:, :args.kept] = 1
    inputs[MASKS[spec.family]] = mask
    layers, errors, described = {}, {}, {}
    stack = DiTStack("transformer", native, device)  # CUDA graphs where the stack allows them
    with torch.no_grad():
        ref = native(**inputs)
        ref = (ref if isinstance(ref, torch.Tensor) else ref[0]).float()
        for name, disable in (("key_padding_attention", ()), ("masked sdpa", ("key_padding_attention",))):
            graphs: dict = {}
            with stack.bare() as eager:
                report = compile_dit(eager, inputs, graphs=graphs, device=device, dtype=dtype, disable=disable)
            layers[name] = CompiledDiT(graphs, [report.key], {"tier": "fast"})
            stack.set_compiled(layers[name])
            out = stack(**inputs)
            out = (out if isinstance(out, torch.Tensor) else out[0]).float()
            errors[name] = float((out - ref).norm() / ref.norm())
            described[name] = {"matches": report.matches, "cuda_graphs": stack.describe_graphs()}
            print(name, report.matches, described[name]["cuda_graphs"], f"rel err {errors[name]:.2e}", flush=True)
        times: dict[str, list[float]] = {n: [] for n in layers}
        for _ in range(args.rounds):
            for name, layer in layers.items():
                stack.set_compiled(layer)  # graphs (where allowed) are captured again by the first call
                for _ in range(2):
                    stack(**inputs)
                for _ in range(args.per_round):
                    interval = Interval(device)
                    interval.start()
                    stack(**inputs)
                    interval.stop()
                    times[name].append(interval.ms())
    env = environment(device, ["-m", "bench.key_padding_dit", *(argv or [])])
    result = {"model": spec.name, "env": env, "prompt_tokens": {"padded": wl.max_sequence_length, "kept": args.kept},
              "median_ms": {n: statistics.median(t) for n, t in times.items() if t}, "rel_err_vs_eager": errors,
              "compile": described, "times_ms": times}
    for name, ms in result["median_ms"].items():
        print(f"{spec.name} DiT forward, {name:22s}: {ms:8.2f} ms (median of {len(times[name])}, interleaved)")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{gpu_slug(env['gpu'])}-{env['date']}-{spec.name}-key-padding-dit.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
