"""``diffc.gemv`` against cuBLAS (``F.linear(F.silu(x), W, b)``), and a sweep of its Triton tiles and of its
CUDA kernel's instances (``csrc/gemv.cu`` built with ``GEMV_SWEEP``): ``python -m bench.ops.bench_gemv``.

The adaptive norms' projections of FLUX.1 and Qwen-Image (one conditioning row, 3072 -> 6 x 3072 or 3 x 3072)
with bf16 weights and with the fp8 tier's float8 copies. Each timing replays a CUDA graph of ``COPIES`` calls over
as many different weights (as a forward runs them, block after block: no weight is in L2 when read) and
reports the time of one call and the bandwidth its weight bytes make. The op's launch constants (``BLOCK_N``,
``BLOCK_K_ELEMS``, ``NUM_WARPS``; ``CSRC_ROWS_PER_WARP``, ``CSRC_VECTORS_IN_FLIGHT``, ``CSRC_WARPS``) come from
this table (``bench/results/ops/``).
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch
import torch.nn.functional as F

from bench.ops import Case, graphed_ms, nbytes, randn, require_cuda
from diffc.ops import csrc, csrc_sources
from diffc.ops import gemv as gemv_mod
from diffc.ops.fp8 import quantize_weight

SHAPES = {  # name: (rows, in_features, out_features)
    "flux double norm1 1x3072->18432": (1, 3072, 18432),
    "flux single norm 1x3072->9216": (1, 3072, 9216),
    "batch 2 1x3072->18432": (2, 3072, 18432),
    "wan-14b time projection 1x5120->30720": (1, 5120, 30720),
}
COPIES = 8
TILES = list(itertools.product((8, 16, 32), (256, 512, 1024), (4, 8)))  # BLOCK_N, BLOCK_K_ELEMS, NUM_WARPS
# csrc instances (rows per warp, vectors in flight) of GEMV_SWEEP, each at 4 and 8 warps a block
CSRC = [(1, 2), (1, 4), (2, 1), (2, 2), (2, 4), (4, 1), (4, 2), (8, 1)]


def cases(dtype: torch.dtype, device="cuda") -> list[Case]:
    """The one-row FLUX.1 shapes with the model's weights and with the fp8 tier's (pytest-benchmark's cases)."""
    out = []
    for name, (rows, k, n) in SHAPES.items():
        if rows != 1:
            continue
        x = randn(rows, k, dtype=dtype, device=device, seed=1)
        w = randn(n, k, dtype=dtype, device=device, seed=2, scale=0.02)
        b = randn(n, dtype=dtype, device=device, seed=3)
        for weights, (ww, s) in (("weights", (w, None)), ("fp8 weights", quantize_weight(w))):
            outs = (torch.empty(rows, n, dtype=dtype, device=device),)

            def fused(x=x, ww=ww, s=s, b=b, outs=outs):
                torch.ops.diffc.gemv(x, ww, s, b, "silu", *outs)

            def ref(x, ww, s, b):
                return gemv_mod.gemv_ref(x, ww, s, b, "silu")

            out.append(Case(f"{name} {weights}", ref, (x, ww, s, b), fused, outs, nbytes(x, ww, s, b, *outs)))
    return out


def _sweep_module():
    """csrc/gemv.cu with every instance of its sweep, compiled for this GPU (None without cuda-python)."""
    if csrc.unavailable(torch.device("cuda")) is not None:
        return None
    csrc._cuda_core().Device(torch.cuda.current_device()).set_current()
    text = "#define GEMV_SWEEP\n" + csrc_sources.source("gemv", csrc_sources.source_dir())
    return csrc._compile("gemv_sweep", text, csrc.arch(torch.device("cuda")))


def main() -> None:
    parser = argparse.ArgumentParser(description="diffc.gemv against cuBLAS; its Triton tiles and csrc instances")
    parser.add_argument("--skip-triton-tiles", action="store_true", help="time the default Triton tile only")
    args = parser.parse_args()
    require_cuda()
    import triton

    def per_call(fn) -> float:
        return graphed_ms(fn, warmup=10, rep=100) / COPIES

    print(f"# diffc.gemv vs cuBLAS: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}; CUDA-graph replay of {COPIES} calls on different weights, median us per call")
    base = (gemv_mod.BLOCK_N, gemv_mod.BLOCK_K_ELEMS, gemv_mod.NUM_WARPS)
    module = _sweep_module()
    for name, (rows, k, n) in SHAPES.items():
        x = torch.randn(rows, k, device="cuda").bfloat16()
        weights = [(torch.randn(n, k, device="cuda") * 0.02).bfloat16() for _ in range(COPIES)]
        bias = torch.randn(n, device="cuda").bfloat16()
        fp8 = [quantize_weight(w) for w in weights]
        out = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)

        def cublas():
            for w in weights:
                F.linear(F.silu(x), w, bias)

        def ours(quantized: bool):
            def run():
                for i in range(COPIES):
                    w, s = fp8[i] if quantized else (weights[i], None)
                    torch.ops.diffc.gemv(x, w, s, bias, "silu", out)
            return run

        ref = F.linear(F.silu(x), weights[0], bias).float()
        torch.ops.diffc.gemv(x, weights[0], None, bias, "silu", out)
        err = float((out.float() - ref).norm() / ref.norm())
        t_cublas = per_call(cublas)
        wbytes = n * k * 2
        print(f"{name}: cuBLAS {t_cublas * 1e3:6.1f} us ({wbytes / t_cublas / 1e9:4.2f} TB/s); gemv rel err vs "
              f"cuBLAS {err:.1e}", flush=True)
        t16, t8 = per_call(ours(False)), per_call(ours(True))
        print(f"  diffc.gemv as it launches (csrc where it serves): bf16 {t16 * 1e3:6.1f} us ({t_cublas / t16:4.2f}x "
              f"cuBLAS)  fp8 {t8 * 1e3:6.1f} us ({t_cublas / t8:4.2f}x)", flush=True)
        results = []
        try:
            with csrc.disabled():  # the Triton kernel's tiles
                for block_n, elems, warps in ([base] if args.skip_triton_tiles else TILES):
                    gemv_mod.BLOCK_N, gemv_mod.BLOCK_K_ELEMS, gemv_mod.NUM_WARPS = block_n, elems, warps
                    results.append(((block_n, elems, warps), per_call(ours(False)), per_call(ours(True))))
        finally:
            gemv_mod.BLOCK_N, gemv_mod.BLOCK_K_ELEMS, gemv_mod.NUM_WARPS = base
        for tile, t16, t8 in sorted(results, key=lambda r: r[1]):
            mark = " <- default" if tile == base else ""
            print(f"  triton BLOCK_N={tile[0]:2d} BLOCK_K_ELEMS={tile[1]:4d} warps={tile[2]}: bf16 {t16 * 1e3:6.1f} us "
                  f"({wbytes / t16 / 1e9:4.2f} TB/s, {t_cublas / t16:4.2f}x cuBLAS)  fp8 {t8 * 1e3:6.1f} us "
                  f"({wbytes / 2 / t8 / 1e9:4.2f} TB/s, {t_cublas / t8:4.2f}x){mark}", flush=True)
        if rows == 1 and module is not None:
            _csrc_sweep(module, x, weights, fp8, bias, out, t_cublas, wbytes, per_call)


def _csrc_sweep(module, x, weights, fp8, bias, out, t_cublas, wbytes, per_call) -> None:
    n, k = weights[0].shape
    device = x.device
    ref8 = gemv_mod.gemv_ref(x, fp8[-1][0], fp8[-1][1], bias, "silu").float()  # the last call's, left in out
    results = []
    for (rows_per_warp, in_flight), warps in itertools.product(CSRC, (4, 8)):
        def call(quantized: bool, rows_per_warp=rows_per_warp, in_flight=in_flight, warps=warps):
            kern = module.get_kernel(f"gemv_bf16_{'fp8' if quantized else 'bf16'}_{rows_per_warp}_{in_flight}")

            def run():
                for i in range(COPIES):
                    w, s = fp8[i] if quantized else (weights[i], None)
                    csrc.launch(kern, device, -(-n // (warps * rows_per_warp)), 32 * warps, x, w,
                                np.int64(k), s, bias, out, np.int32(n), np.int32(k), np.int32(1))
            return run

        call(True)()
        err = float((out.float() - ref8).norm() / ref8.norm())
        results.append(((rows_per_warp, in_flight, warps), per_call(call(False)), per_call(call(True)), err))
    base = (gemv_mod.CSRC_ROWS_PER_WARP, gemv_mod.CSRC_VECTORS_IN_FLIGHT, gemv_mod.CSRC_WARPS)
    for (r, u, warps), t16, t8, err in sorted(results, key=lambda r: r[2]):
        mark = " <- default" if (r, u, warps) == base else ""
        print(f"  csrc rows/warp={r} in flight={u} warps={warps}: bf16 {t16 * 1e3:6.1f} us ({wbytes / t16 / 1e9:4.2f} "
              f"TB/s, {t_cublas / t16:4.2f}x cuBLAS)  fp8 {t8 * 1e3:6.1f} us ({wbytes / 2 / t8 / 1e9:4.2f} TB/s, "
              f"{t_cublas / t8:4.2f}x; rel err vs reference {err:.1e}){mark}", flush=True)


if __name__ == "__main__":
    main()
