"""The rowwise fp8 kernels of ``csrc/`` built from another source folder against this tree's, in one process:
``python -m bench.ops.compare_csrc_sources --old DIR`` (DIR: a ``csrc/`` of another commit, e.g. from
``git archive <commit> csrc | tar x -C /tmp/old``).

For the fp8 tier's GELU + quantize kernels (``gelu_tanh_fp8``, ``quantize_rows_gelu`` for FLUX.1's single block)
and the plain quantization at FLUX.1 and Wan2.1 production rows: the graphed time of each build and of this
tree's Triton kernel, the share of fp8 output bytes two builds disagree on, and each output's relative L2
distance from a float64 GELU reference (``bench/results/ops/h100-2026-12-05-gelu-fp8-old-new.txt``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bench.ops import graphed_ms, require_cuda
from diffc.ops import csrc, csrc_sources
from diffc.ops.fp8 import FP8
from diffc.ops.gelu_tanh import gelu_tanh_ref

STEMS = ("gelu_tanh_fp8", "quantize_rows")
GELU = {  # name: (rows, width of the part quantized as it is, width of the GELU part)
    "flux ff 4096x12288": (4096, 0, 12288),
    "flux single 4608x(3072+12288)": (4608, 3072, 12288),
    "wan-1.3b ffn 32760x8960": (32760, 0, 8960),
    "wan-14b ffn 32760x13824": (32760, 0, 13824),
}
PLAIN = {"flux single quantize 4608x15360": (4608, 15360), "wan-14b attn out 32760x5120": (32760, 5120)}


def _build(directory: Path, tag: str) -> dict:
    device = torch.device("cuda")
    return {stem: csrc._compile(f"{stem}_{tag}", csrc_sources.source(stem, directory), csrc.arch(device))
            for stem in STEMS}


def _rows_call(module: dict, a, b, q, s, gelu: bool):
    """quantize_rows[_gelu] of cat([a, b]) (a None: b alone, through gelu_tanh_fp8 when gelu)."""
    device = b.device
    rows, kb = b.shape
    ka = 0 if a is None else a.shape[1]
    nv, threads = csrc.row_launch(ka + kb, b.dtype)
    if a is None and gelu:
        kern = module["gelu_tanh_fp8"].get_kernel(f"gelu_tanh_fp8_bf16_{nv}")
        return lambda: csrc.launch(kern, device, rows, threads, b, None, q, s, np.int32(kb))
    kern = module["quantize_rows"].get_kernel(f"quantize_rows_{'gelu_' if gelu else ''}bf16_{nv}")
    first, second = (b, None) if a is None else (a, b)
    return lambda: csrc.launch(kern, device, rows, threads, first, np.int64(first.stride(0)), np.int32(first.shape[1]),
                               second, np.int64(0 if second is None else second.stride(0)),
                               np.int32(0 if second is None else second.shape[1]), None, q, s)


def _agree(one, other) -> str:
    (q0, s0), (q1, s1) = one, other
    differ = float((q0.view(torch.uint8) != q1.view(torch.uint8)).float().mean())
    return f"bytes differ {differ:.1e}, scale max rel diff {float(((s0 - s1).abs() / s0).max()):.1e}"


def _outputs(rows: int, width: int):
    return torch.empty(rows, width, dtype=FP8, device="cuda"), torch.empty(rows, 1, device="cuda")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, type=Path, help="a csrc/ folder of another commit")
    args = parser.parse_args()
    if not (args.old / "common.cuh").is_file():
        raise SystemExit(f"--old: {args.old} holds no common.cuh; expected a csrc/ folder")
    require_cuda()
    if (why := csrc.unavailable(torch.device("cuda"))) is not None:
        raise SystemExit(f"the csrc kernels cannot run here: {why}")
    csrc._cuda_core().Device(torch.cuda.current_device()).set_current()
    builds = {"old": _build(args.old, "old"), "new": _build(csrc_sources.source_dir(), "new")}
    print(f"# csrc rowwise fp8 kernels, {args.old} ('old') against this tree ('new'): {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}; CUDA-graph replay, do_bench median; bf16 read + fp8 written once")
    for name, (rows, ka, kb) in GELU.items():
        g = torch.Generator(device="cuda").manual_seed(rows + kb)
        h = (2.0 * torch.randn(rows, kb, generator=g, device="cuda")).bfloat16()
        a = torch.randn(rows, ka, generator=g, device="cuda").bfloat16() if ka else None
        ref = gelu_tanh_ref(h.double()).to(torch.bfloat16).double()
        want = ref if a is None else torch.cat([a.double(), ref], 1)
        outs, times = {}, {}
        for tag, module in builds.items():
            q, s = _outputs(rows, ka + kb)
            fn = _rows_call(module, a, h, q, s, gelu=True)
            fn()
            outs[tag], times[tag] = (q.clone(), s.clone()), graphed_ms(fn, rep=200)
        q, s = _outputs(rows, ka + kb)
        with csrc.disabled():
            def triton_fn():
                if a is None:
                    torch.ops.diffc.gelu_tanh_fp8(h, None, q, s)
                else:
                    torch.ops.diffc.quantize_rows_cat_gelu(a, h, None, q, s)
            triton_fn()
            outs["triton"], times["triton"] = (q.clone(), s.clone()), graphed_ms(triton_fn, rep=200)
        moved = rows * (ka + kb) * 3
        errors = "  ".join(f"{tag} {float(((o[0].float() * o[1]).double() - want).norm() / want.norm()):.3e}"
                           for tag, o in outs.items())
        print(f"{name:32s} " + "  ".join(f"{k}={v * 1e3:7.1f}us {moved / v / 1e9:4.2f}TB/s" for k, v in times.items())
              + f" | new vs old: {_agree(outs['new'], outs['old'])}"
              + f" | new vs triton: {_agree(outs['new'], outs['triton'])}"
              + f" | rel L2 vs float64 reference: {errors}", flush=True)
    for name, (rows, width) in PLAIN.items():
        x = torch.randn(rows, width, device="cuda").bfloat16()
        outs, times = {}, {}
        for tag, module in builds.items():
            q, s = _outputs(rows, width)
            fn = _rows_call(module, None, x, q, s, gelu=False)
            fn()
            outs[tag], times[tag] = (q.clone(), s.clone()), graphed_ms(fn, rep=200)
        print(f"{name:32s} " + "  ".join(f"{k}={v * 1e3:7.1f}us {rows * width * 3 / v / 1e9:4.2f}TB/s"
                                           for k, v in times.items()) + f" | {_agree(outs['new'], outs['old'])}",
              flush=True)


if __name__ == "__main__":
    main()
