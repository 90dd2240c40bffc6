"""Three probes of the DiTs' linear layers, each GEMM replayed from a CUDA graph.

``same-input``: linears that read one input (QKV; FLUX.1's single-block QKV + MLP) as separate GEMMs against one GEMM
over their concatenated weights (what ``--enable concat_linear`` does in a graph). ``tunableop``: torch's TunableOp
(``torch.cuda.tunable``: the cuBLASLt algorithms for a shape timed, the fastest kept) against the default pick.
``fp8-accum``: the fp8 tier's rowwise-scaled ``_scaled_mm`` with and without ``use_fast_accum`` (Hopper's fp8 MMA
accumulating without the periodic promotion to float32), tensorwise scaling and bf16 beside them, and each one's
error against float32 on the same dequantized operands::

    python -m bench.ops.linear_probes same-input --out same_input.json
    python -m bench.ops.linear_probes tunableop --out tunableop.json
    python -m bench.ops.linear_probes fp8-accum --out fp8_accum.json

Timings are medians of interleaved rounds (the order reverses each round), so clock drift falls on both sides.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.ops import capture_graph, interleaved_rounds_ms

# name: (rows, in_features, [out_features of each linear reading the input])
SAME_INPUT = {
    "flux_single_qkv": (4608, 3072, [3072, 3072, 3072]),
    "flux_single_qkv_mlp": (4608, 3072, [3072, 3072, 3072, 12288]),
    "flux_double_qkv": (4096, 3072, [3072, 3072, 3072]),
    "flux_double_add_qkv": (512, 3072, [3072, 3072, 3072]),
    "wan13_qkv": (32760, 1536, [1536, 1536, 1536]),
    "wan14_qkv": (32760, 5120, [5120, 5120, 5120]),
}
# (rows, in, out): FLUX.1 1024² (single and double blocks, text stream), Wan2.1-1.3B and 14B at 832x480x81
SHAPES = [(4608, 3072, 3072), (4608, 3072, 12288), (4608, 12288, 3072), (4608, 15360, 3072), (4096, 3072, 3072),
          (4096, 3072, 12288), (4096, 12288, 3072), (512, 3072, 3072), (32760, 1536, 1536), (32760, 1536, 8960),
          (32760, 8960, 1536), (32760, 5120, 5120), (32760, 5120, 13824), (32760, 13824, 5120)]


def interleaved_ms(calls: dict[str, Callable[[], None]]) -> dict[str, float]:
    """The median over interleaved rounds (:func:`bench.ops.interleaved_rounds_ms`) of each call's time, ms."""
    return {name: statistics.median(times) for name, times in interleaved_rounds_ms(calls).items()}


def _linear_inputs(rows: int, k: int, n: int, device) -> tuple[torch.Tensor, ...]:
    x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
    return x, torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02, torch.randn(n, device=device,
                                                                                         dtype=torch.bfloat16)


def same_input(device) -> list[dict]:
    rows_out = []
    for name, (rows, k, widths) in SAME_INPUT.items():
        x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
        ws = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for n in widths]
        bs = [torch.randn(n, device=device, dtype=torch.bfloat16) for n in widths]
        w, b = torch.cat(ws), torch.cat(bs)
        t = interleaved_ms({"separate": capture_graph(lambda: [F.linear(x, wi, bi) for wi, bi in zip(ws, bs)]),
                            "fused": capture_graph(lambda: F.linear(x, w, b))})
        flop = 2 * rows * k * sum(widths)
        rows_out.append({"case": name, **{f"{k_}_ms": v for k_, v in t.items()}})
        print(f"{name:22} separate {t['separate']:.4f} ms ({flop / t['separate'] / 1e9:.0f} TFLOP/s)  fused "
              f"{t['fused']:.4f} ms ({flop / t['fused'] / 1e9:.0f})  saves {t['separate'] - t['fused']:.4f} ms",
              flush=True)
    return rows_out


def tunableop(device) -> list[dict]:
    tunable = torch.cuda.tunable
    rows_out = []
    for rows, k, n in SHAPES:
        x, w, b = _linear_inputs(rows, k, n, device)
        ref = F.linear(x, w, b)
        tunable.enable(False)
        default = capture_graph(lambda: F.linear(x, w, b))
        tunable.enable(True)
        tunable.tuning_enable(True)
        out = F.linear(x, w, b)  # tuned here
        tunable.tuning_enable(False)
        tuned = capture_graph(lambda: F.linear(x, w, b))
        tunable.enable(False)
        t = interleaved_ms({"cublas": default, "tunableop": tuned})
        err = float((out.float() - ref.float()).norm() / ref.float().norm())
        flop = 2 * rows * k * n
        rows_out.append({"shape": [rows, k, n], "cublas_ms": t["cublas"], "tunableop_ms": t["tunableop"],
                         "rel_l2": err})
        print(f"{rows:6}x{k:5}->{n:5}  cublas {t['cublas']:.4f} ms ({flop / t['cublas'] / 1e9:.0f} TFLOP/s)  "
              f"tunableop {t['tunableop']:.4f} ms ({flop / t['tunableop'] / 1e9:.0f})  ratio "
              f"{t['tunableop'] / t['cublas']:.3f}  rel err {err:.1e}", flush=True)
    picked = tunable.get_results() if hasattr(tunable, "get_results") else ()
    print("tunableop picks:", sorted({r[2] for r in picked}) or "none recorded", flush=True)
    return rows_out


def fp8_accum(device) -> list[dict]:
    from diffc.ops.fp8 import fp8_linear_ref, quantize_rows_ref, quantize_weight

    rows_out = []
    for rows, k, n in SHAPES:
        x, w, b = _linear_inputs(rows, k, n, device)
        q, qs = quantize_rows_ref(x)
        w8, ws = quantize_weight(w)
        wt = w8.t()
        one = torch.ones((), device=device)

        def rowwise(fast: bool) -> torch.Tensor:
            return torch._scaled_mm(q, wt, qs, ws, b, None, torch.bfloat16, fast)

        def tensorwise(fast: bool) -> torch.Tensor:
            return torch._scaled_mm(q, wt, one, one, b, None, torch.bfloat16, fast)

        calls = {"bf16": lambda: F.linear(x, w, b), "rowwise": lambda: rowwise(False),
                 "rowwise_fast": lambda: rowwise(True), "tensorwise": lambda: tensorwise(False),
                 "tensorwise_fast": lambda: tensorwise(True)}
        t = interleaved_ms({name: capture_graph(fn) for name, fn in calls.items()})
        exact = fp8_linear_ref(q, qs, w8, ws, b, torch.float32)
        full = F.linear(x.float(), w.float(), b.float())
        outs = {name: calls[name]().float() for name in ("bf16", "rowwise", "rowwise_fast")}
        rel = lambda a, ref: float((a - ref).norm() / ref.norm())  # noqa: E731
        err = {name: rel(outs[name], exact) for name in ("rowwise", "rowwise_fast")}
        err["bf16_vs_fp32"] = rel(outs["bf16"], full)
        err["rowwise_fast_vs_fp32_linear"] = rel(outs["rowwise_fast"], full)
        err["rowwise_vs_fp32_linear"] = rel(outs["rowwise"], full)
        flop = 2 * rows * k * n
        rows_out.append({"shape": [rows, k, n], **{f"{name}_ms": v for name, v in t.items()},
                         **{f"rel_l2_{name}": v for name, v in err.items()}})
        rates = "  ".join(f"{name} {v:.4f} ms ({flop / v / 1e9:.0f})" for name, v in t.items())
        print(f"{rows:6}x{k:5}->{n:5}  {rates}  fast/plain {t['rowwise_fast'] / t['rowwise']:.3f}  "
              f"accumulation err plain {err['rowwise']:.1e} fast {err['rowwise_fast']:.1e}  "
              f"vs fp32 linear plain {err['rowwise_vs_fp32_linear']:.2e} fast {err['rowwise_fast_vs_fp32_linear']:.2e}",
              flush=True)
    return rows_out


PROBES = {"same-input": same_input, "tunableop": tunableop, "fp8-accum": fp8_accum}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("probe", choices=tuple(PROBES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("linear_probes needs a CUDA GPU")
    device = torch.device("cuda")
    rows = PROBES[args.probe](device)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
