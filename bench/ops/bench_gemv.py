"""``diffc.gemv`` against cuBLAS (``F.linear(F.silu(x), W, b)``), and a sweep of its tiles:
``python -m bench.ops.bench_gemv``.

The adaptive norms' projections of FLUX.1 and Qwen-Image (one conditioning row, 3072 -> 6 x 3072 or 3 x 3072)
with bf16 weights and with the fp8 tier's float8 copies. Each timing replays a CUDA graph of ``COPIES`` calls over
as many different weights (as a forward runs them, block after block: no weight is in L2 when read) and
reports the time of one call and the bandwidth its weight bytes make. The op's launch constants (``BLOCK_N``,
``BLOCK_K_ELEMS``, ``NUM_WARPS``) come from this table (``bench/results/ops/``).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from bench.ops import graphed_ms, require_cuda
from diffc.ops import gemv as gemv_mod
from diffc.ops.fp8 import quantize_weight

SHAPES = {  # name: (rows, in_features, out_features)
    "flux double norm1 1x3072->18432": (1, 3072, 18432),
    "flux single norm 1x3072->9216": (1, 3072, 9216),
    "batch 2 1x3072->18432": (2, 3072, 18432),
}
COPIES = 8
TILES = list(itertools.product((8, 16, 32), (256, 512, 1024), (4, 8)))  # BLOCK_N, BLOCK_K_ELEMS, NUM_WARPS


def main() -> None:
    require_cuda()
    import triton

    def per_call(fn) -> float:
        return graphed_ms(fn, warmup=10, rep=100) / COPIES

    print(f"# diffc.gemv vs cuBLAS: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}; CUDA-graph replay of {COPIES} calls on different weights, median us per call")
    base = (gemv_mod.BLOCK_N, gemv_mod.BLOCK_K_ELEMS, gemv_mod.NUM_WARPS)
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
        results = []
        try:
            for block_n, elems, warps in TILES:
                gemv_mod.BLOCK_N, gemv_mod.BLOCK_K_ELEMS, gemv_mod.NUM_WARPS = block_n, elems, warps
                results.append(((block_n, elems, warps), per_call(ours(False)), per_call(ours(True))))
        finally:
            gemv_mod.BLOCK_N, gemv_mod.BLOCK_K_ELEMS, gemv_mod.NUM_WARPS = base
        for tile, t16, t8 in sorted(results, key=lambda r: r[1]):
            mark = " <- default" if tile == base else ""
            print(f"  BLOCK_N={tile[0]:2d} BLOCK_K_ELEMS={tile[1]:4d} warps={tile[2]}: bf16 {t16 * 1e3:6.1f} us "
                  f"({wbytes / t16 / 1e9:4.2f} TB/s, {t_cublas / t16:4.2f}x cuBLAS)  fp8 {t8 * 1e3:6.1f} us "
                  f"({wbytes / 2 / t8 / 1e9:4.2f} TB/s, {t_cublas / t8:4.2f}x){mark}", flush=True)


if __name__ == "__main__":
    main()
