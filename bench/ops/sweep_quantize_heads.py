"""Tiles of ``diffc.quantize_heads`` (attention's v quantized per head, two passes): ``python -m bench.ops.sweep_quantize_heads``.

At FLUX.1's (4608 tokens, 24 x 128), Wan2.1-1.3B's (32,760, 12 x 128) and Wan2.1-14B's (32,760, 40 x 128) values,
each :class:`diffc.ops.qk_norm_rope.KernelConfig` tile size and threads' share is timed graphed (both passes and
the scales' zeroing), with the output bytes compared against the default tile's. ``attention_fp8.HEADS_CONFIG``
comes from this table.
"""

from __future__ import annotations

import dataclasses

import torch

from bench.ops import graphed_ms, require_cuda
from diffc.ops import attention_fp8
from diffc.ops.fp8 import FP8
from diffc.ops.qk_norm_rope import KernelConfig, tile_plan

SHAPES = {"flux v 4608tok 24x128": (4608, 24), "wan-1.3b v 32760tok 12x128": (32760, 12),
          "wan-14b v 32760tok 40x128": (32760, 40)}
TILES = (2048, 4096, 8192, 16384, 32768)
PER_THREAD = (8, 16, 32)


def main() -> None:
    require_cuda()
    print(f"# diffc.quantize_heads tiles: {torch.cuda.get_device_name()}, torch {torch.__version__}; CUDA-graph replay, "
          "do_bench median us; bandwidth: v read twice, fp8 written once", flush=True)
    base = attention_fp8.HEADS_CONFIG
    try:
        for name, (tokens, heads) in SHAPES.items():
            v = torch.randn(1, tokens, heads, 128, device="cuda").bfloat16()
            out = torch.empty(v.shape, dtype=FP8, device="cuda")
            scale = torch.empty(1, heads, device="cuda")
            moved = 2 * v.numel() * 2 + v.numel()
            attention_fp8.HEADS_CONFIG = base
            torch.ops.diffc.quantize_heads(v, out, scale)
            want = out.view(torch.uint8).clone()
            rows = []
            for tile in TILES:
                for per in PER_THREAD:
                    config = dataclasses.replace(KernelConfig(), tile=tile, per_thread=per)
                    attention_fp8.HEADS_CONFIG = config
                    ms = graphed_ms(lambda: torch.ops.diffc.quantize_heads(v, out, scale), rep=200)
                    same = torch.equal(out.view(torch.uint8), want)
                    plan = tile_plan(tokens, heads, 128, False, config)
                    rows.append((ms, tile, per, plan, same))
            for ms, tile, per, plan, same in sorted(rows, key=lambda r: r[0]):
                mark = " <- default" if (tile, per) == (base.tile, base.per_thread) else ""
                print(f"{name:28s} tile {tile:5d} per_thread {per:2d} (block_t {plan.block_t:3d}, block_h "
                      f"{plan.block_h}, warps {plan.num_warps:2d}): {ms * 1e3:7.1f} us {moved / ms / 1e9:5.2f} TB/s"
                      f"  bytes as the default's: {same}{mark}", flush=True)
    finally:
        attention_fp8.HEADS_CONFIG = base


if __name__ == "__main__":
    main()
