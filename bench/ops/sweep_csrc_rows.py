"""Sweep of the csrc rowwise kernels' block width against Triton: ``python -m bench.ops.sweep_csrc_rows``.

For ``gelu_tanh_fp8`` and ``quantize_rows`` at FLUX.1 and Wan2.1 production rows, the graphed op with its Triton
kernel, then its CUDA kernel (``csrc/``) at ``TARGET_THREADS`` 256 / 512 / 1024 with ``MIN_VECTORS`` lifted (so
short rows run it too). ``diffc.ops.csrc``'s choices (512 threads, rows of 4096+ elements) come from this table
(``bench/results/ops/h200-2026-12-04-csrc-rows.txt``).
"""

from __future__ import annotations

import torch

from bench.ops import graphed_ms, require_cuda
from diffc.ops import csrc
from diffc.ops.fp8 import FP8

ROWS = {  # name: (rows, width)
    "flux ff 4096x12288": (4096, 12288),
    "flux single proj_out 4608x15360": (4608, 15360),
    "flux attn out 4608x3072": (4608, 3072),
    "wan-1.3b ffn 32760x8960": (32760, 8960),
    "wan-1.3b attn out 32760x1536": (32760, 1536),
    "wan-14b ffn 32760x13824": (32760, 13824),
    "wan-14b attn out 32760x5120": (32760, 5120),
}
TARGETS = (256, 512, 1024)


def main() -> None:
    require_cuda()
    import triton

    def timed(fn) -> float:
        return graphed_ms(fn, rep=200)

    print(f"# csrc rowwise kernels vs Triton: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}; CUDA-graph replay, do_bench median us (bandwidth counts x read once, fp8 + scales "
          f"written once)")
    print("# columns: triton = the op's Triton kernel; tNNN = csrc kernel with TARGET_THREADS = NNN "
          "[vectors per thread, threads]")
    base = (csrc.TARGET_THREADS, csrc.MIN_VECTORS)
    for name, (rows, width) in ROWS.items():
        x = torch.randn(rows, width, device="cuda").bfloat16()
        bias = torch.randn(width, device="cuda").bfloat16()
        q, s = torch.empty(rows, width, dtype=FP8, device="cuda"), torch.empty(rows, 1, device="cuda")
        moved = x.numel() * 3 + rows * 4
        ops = (("gelu_tanh_fp8", lambda: torch.ops.diffc.gelu_tanh_fp8(x, bias, q, s)),
               ("quantize_rows", lambda: torch.ops.diffc.quantize_rows(x, q, s)))
        for op, fn in ops:
            with csrc.disabled():
                results = [("triton", timed(fn))]
            try:
                for target in TARGETS:
                    csrc.TARGET_THREADS, csrc.MIN_VECTORS = target, 0
                    results.append((f"t{target}{list(csrc.row_launch(width, torch.bfloat16))}", timed(fn)))
            finally:
                csrc.TARGET_THREADS, csrc.MIN_VECTORS = base
            print(f"{name:32s} {op:14s} " + "  ".join(f"{n}={t * 1e3:6.1f}us {moved / t / 1e9:4.2f}TB/s"
                                                   for n, t in results), flush=True)


if __name__ == "__main__":
    main()
