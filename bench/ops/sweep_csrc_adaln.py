"""The adaLN row kernels, Triton against CUDA C++ (``csrc/adaln_rows.cu``): ``python -m bench.ops.sweep_csrc_adaln``.

At the production rows of FLUX.1 (3072 wide, bf16 modulation rounded as eager rounds it), Wan2.1-1.3B (1536) and
Wan2.1-14B (5120; both with the modulation table's float32 rows added) and Z-Image / SD3.5's widths, each form the
models run (``adaln_modulate``, the fused ``gated_residual_adaln``, their fp8 variants) is timed graphed with its
Triton kernel and with the CUDA kernel at 1 / 2 / 4 / 8 16-byte vectors a thread, every width let through
(``adaln_modulate.CSRC_MIN_VECTORS = 0``). Each kernel's outputs are compared with the torch reference's (the
share of bf16 values or fp8 bytes that differ). ``adaln_modulate.CSRC_MIN_VECTORS`` and
``CSRC_VECTORS_PER_THREAD`` come from this table.
"""

from __future__ import annotations

import torch

from bench.ops import graphed_ms, require_cuda
from diffc.ops import adaln_modulate, csrc
from diffc.ops.fp8 import FP8

# name: (rows, width, modulation: "bf16" (FLUX's rounded bf16 math) or "table" (bf16 + float32 rows, Wan))
ROWS = {
    "flux img 4096x3072": (4096, 3072, "bf16"),
    "flux single 4608x3072": (4608, 3072, "bf16"),
    "wan-1.3b 32760x1536": (32760, 1536, "table"),
    "sd3.5 4250x2432": (4250, 2432, "bf16"),
    "z-image 4096x3840": (4096, 3840, "bf16"),
    "wan-14b 32760x5120": (32760, 5120, "table"),
}
VECTORS_PER_THREAD = (1, 2, 4, 8)


def _forms(rows: int, width: int, modulation: str):
    """(form, run(), outputs, the reference's outputs, bytes moved) for each op form at this size."""
    from diffc.ops.adaln_modulate import adaln_modulate_ref, biased
    from diffc.ops.fp8 import quantize_rows_ref
    from diffc.ops.gated_residual import gated_residual_ref

    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, dtype=torch.bfloat16, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, device="cuda")).to(dtype)

    x, y = rnd(1, rows, width, scale=3.0), rnd(1, rows, width)
    scale, shift, gate = (rnd(1, 1, width, scale=0.3) for _ in range(3))
    table = modulation == "table"
    biases = dict(scale_bias=rnd(width, dtype=torch.float32, scale=0.3), shift_bias=rnd(width, dtype=torch.float32),
                  ) if table else {}
    gate_bias = {"gate_bias": rnd(width, dtype=torch.float32)} if table else {}
    res, out = torch.empty_like(x), torch.empty_like(x)
    q, qs = torch.empty(x.shape, dtype=FP8, device="cuda"), torch.empty(rows, 1, device="cuda")
    sc, sh = biased(scale, biases.get("scale_bias")), biased(shift, biases.get("shift_bias"))
    residual = gated_residual_ref(x, y, biased(gate, gate_bias.get("gate_bias")))
    modulated, modulated_pair = adaln_modulate_ref(x, sc, sh, 1e-6), adaln_modulate_ref(residual, sc, sh, 1e-6)

    def fp8(t):
        data, s = quantize_rows_ref(t.reshape(rows, width))
        return data.view(x.shape), s

    n = x.numel()
    d = torch.ops.diffc
    return [
        ("adaln", lambda: d.adaln_modulate(x, scale, shift, 1e-6, out, **biases), (out,), (modulated,), 4 * n),
        ("adaln_fp8", lambda: d.adaln_modulate_fp8(x, scale, shift, 1e-6, q, qs, **biases), (q, qs), fp8(modulated),
         3 * n),
        ("pair", lambda: d.gated_residual_adaln(x, y, gate, scale, shift, 1e-6, res, out, **biases, **gate_bias),
         (res, out), (residual, modulated_pair), 8 * n),
        ("pair_fp8", lambda: d.gated_residual_adaln_fp8(x, y, gate, scale, shift, 1e-6, res, q, qs, **biases,
                                                         **gate_bias), (res, q, qs), (residual, *fp8(modulated_pair)),
         7 * n),
    ]


def _differ(outs, refs) -> str:
    """The share of each bf16 output's values (fp8: bytes) that differ from the reference's; scales skipped."""
    shares = []
    for a, b in zip(outs, refs):
        if a.dtype == torch.float32:
            continue
        a, b = (a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == FP8 else (a, b)
        shares.append(f"{(a != b).float().mean().item():.1e}")
    return "/".join(shares)


def main() -> None:
    require_cuda()
    import triton

    def timed(fn) -> float:
        return graphed_ms(fn, rep=200)

    print(f"# adaLN rows, csrc/adaln_rows.cu vs Triton: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}; CUDA-graph replay, do_bench median us (bandwidth: rows read and written "
          "once; the modulation rows not counted)")
    print("# columns: triton = the Triton kernel; nv[vectors per thread, threads] = the csrc kernel; then the share of "
          "each output's values (bf16 values, fp8 bytes) differing from the torch reference's, Triton's and csrc's "
          f"(at {adaln_modulate.CSRC_VECTORS_PER_THREAD} vectors a thread)")
    base = (adaln_modulate.CSRC_MIN_VECTORS, adaln_modulate.CSRC_VECTORS_PER_THREAD)
    for name, (rows, width, modulation) in ROWS.items():
        for form, fn, outs, refs, moved in _forms(rows, width, modulation):
            with csrc.disabled():
                results = [("triton", timed(fn))]
                fn()
                agree = [f"triton {_differ(outs, refs)}"]
            try:
                adaln_modulate.CSRC_MIN_VECTORS = 0
                for nv in VECTORS_PER_THREAD:
                    adaln_modulate.CSRC_VECTORS_PER_THREAD = nv
                    results.append((f"nv{list(csrc.row_launch(width, torch.bfloat16, 0, nv))}", timed(fn)))
                    if nv == base[1]:
                        for o in outs:
                            o.zero_()
                        fn()
                        agree.append(f"csrc {_differ(outs, refs)}")
            finally:
                adaln_modulate.CSRC_MIN_VECTORS, adaln_modulate.CSRC_VECTORS_PER_THREAD = base
            print(f"{name:24s} {form:9s} " + "  ".join(f"{n}={t * 1e3:6.1f}us {moved / t / 1e9:4.2f}TB/s"
                                                      for n, t in results)
                  + f"  | differ from the reference: {', '.join(agree)}", flush=True)

if __name__ == "__main__":
    main()
