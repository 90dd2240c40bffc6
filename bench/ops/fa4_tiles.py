"""FlashAttention-4's Hopper forward at the DiTs' attention shapes, under other tile configurations than its own.

``flash_attn_func`` picks FA4's tile per head size (128 x 128 at head_dim 128 on sm_90, two MMA warpgroups, P kept
in registers, the two warpgroups' GEMMs overlapped); FlashAttention-3's C++ kernel used 128 x 176 there. FLUX.1 at
1024² has 36 query tiles x 24 heads = 864 tiles for 132 SMs (6.5 waves), so the tile also decides how full the last
wave is. This probe runs FA4's own entry (``flash_attn.cute.interface._flash_attn_fwd``) with each configuration,
checks it against the default's output and a float32 SDPA, times each from a CUDA graph in interleaved rounds, and
prints one line per configuration and shape::

    python -m bench.ops.fa4_tiles --out tiles.json
    python -m bench.ops.fa4_tiles --shapes flux --configs 128x128,128x176 --rounds 3

Shapes: ``flux`` (1 x 24 heads x 4,608 tokens), ``wan13`` (12 x 32,760), ``wan14`` (40 x 32,760), all head_dim 128.
A configuration is ``MxN`` with optional ``-nors`` (P through shared memory, not registers) and ``-noov`` (no
intra-warpgroup overlap); tile_m 192 runs three MMA warpgroups (512 threads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from bench.ops import capture_graph, interleaved_rounds_ms

SHAPES = {"flux": (1, 24, 4608), "wan13": (1, 12, 32760), "wan14": (1, 40, 32760)}
CONFIGS = ("128x128", "128x176", "128x160", "128x192", "128x144", "128x112", "128x96", "192x128", "192x112",
           "128x128-noov", "128x128-nors", "128x176-nors")
HEAD_DIM = 128


def parse_config(text: str) -> dict:
    """``MxN[-nors][-noov]`` -> the keyword arguments of ``_flash_attn_fwd``."""
    tile, *flags = text.split("-")
    try:
        m, n = (int(x) for x in tile.split("x"))
    except ValueError:
        raise SystemExit(f"--configs: {text!r} is not MxN[-nors][-noov] (e.g. 128x144)") from None
    if m % 64 or not 64 <= m <= 192 or n % 16 or n <= 0:
        raise SystemExit(f"--configs: {text!r}: tile_m must be 64, 128 or 192 and tile_n a multiple of 16")
    unknown = set(flags) - {"nors", "noov"}
    if unknown:
        raise SystemExit(f"--configs: unknown flag(s) {sorted(unknown)} in {text!r}; accepted: nors, noov")
    return {"tile_mn": (m, n), "mma_pv_is_rs": "nors" not in flags, "intra_wg_overlap": "noov" not in flags,
            "num_threads": 128 * (m // 64 + 1)}


def fa4_call(q, k, v, config: dict):
    from flash_attn.cute.interface import _flash_attn_fwd

    out = _flash_attn_fwd(q, k, v, causal=False, **config)
    return out[0] if isinstance(out, tuple) else out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="flux,wan13,wan14")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20, help="graph replays per timing in a round")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    unknown = [name for name in args.shapes.split(",") if name not in SHAPES]
    if unknown:
        raise SystemExit(f"--shapes: unknown {', '.join(unknown)}; accepted: {', '.join(SHAPES)}")
    configs = {name: parse_config(name) for name in args.configs.split(",")}
    if not torch.cuda.is_available():
        raise SystemExit("fa4_tiles needs a CUDA GPU")
    device = torch.device("cuda")
    record = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for shape_name in args.shapes.split(","):
        batch, heads, seq = SHAPES[shape_name]
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(batch, seq, heads, HEAD_DIM, generator=gen, device=device, dtype=torch.bfloat16)
                   for _ in range(3))
        flop = 4 * batch * heads * seq * seq * HEAD_DIM
        ref = None
        if seq <= 8192:  # float32 SDPA at Wan's 32,760 tokens takes longer than the whole probe
            ref = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v))).transpose(1, 2)
        default = fa4_call(q, k, v, {}).float()
        calls, results = {}, {}
        for name, config in configs.items():
            row = {"shape": shape_name, "config": name}
            try:
                start = time.perf_counter()
                out = fa4_call(q, k, v, config).float()
                torch.cuda.synchronize()
                row["first_call_s"] = round(time.perf_counter() - start, 2)
            except Exception as e:  # noqa: BLE001  (a configuration the kernel does not build)
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(f"{shape_name:6} {name:14} failed: {row['error']}", flush=True)
                record["rows"].append(row)
                continue
            row["rel_l2_vs_default"] = float((out - default).norm() / default.norm())
            if ref is not None:
                row["rel_l2_vs_fp32"] = float((out - ref).norm() / ref.norm())
            ok = row["rel_l2_vs_default"] < 1e-2
            row["correct"] = ok
            if ok:
                calls[name] = capture_graph(lambda config=config: fa4_call(q, k, v, config))
            results[name] = row
            record["rows"].append(row)
        per_round = interleaved_rounds_ms(calls, args.rounds, args.iters)
        for name, times in per_round.items():
            row = results[name]
            row["rounds_ms"] = [round(t, 4) for t in times]
            row["median_ms"] = statistics.median(times)
            row["tflops"] = flop / row["median_ms"] / 1e9
        base = results.get("128x128", {}).get("median_ms")
        for name, row in results.items():
            if "median_ms" in row:
                rel = f" ({row['median_ms'] / base:.3f}x default)" if base else ""
                err = f", vs fp32 {row['rel_l2_vs_fp32']:.1e}" if "rel_l2_vs_fp32" in row else ""
                print(f"{shape_name:6} {name:14} {row['median_ms']:8.4f} ms {row['tflops']:6.0f} TFLOP/s{rel}"
                      f"  first call {row['first_call_s']} s, vs default {row['rel_l2_vs_default']:.1e}{err}",
                      flush=True)
            elif "error" not in row:
                print(f"{shape_name:6} {name:14} WRONG: vs default {row['rel_l2_vs_default']:.2e}", flush=True)
        del q, k, v, calls
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
