"""Every fused op against its torch reference on the GPU, at production sizes, bf16 and fp32.

``python -m bench.ops.check_gpu`` runs the cases of every ``bench_<op>.py``: outputs poisoned with
NaN, the fused op (its Triton kernel, checked through the launch counter), then the reference. It
prints, per output, the elements left unwritten, ``max|out - ref| / max|ref|``, the norm-relative
error and the share of elements bit-identical to the reference; then replays the fused op from a
CUDA graph and checks the replay reproduces it bit for bit. Exits 1 if any check fails.
"""

from __future__ import annotations

import importlib
import sys

import torch

from bench.ops import DTYPES, capture_graph, header, require_cuda
from diffc.ops.registry import COUNTERS

MODULES = (
    "bench_qk_norm_rope",
    "bench_adaln_modulate",
    "bench_gated_residual",
    "bench_timestep_embedding",
    "bench_gelu_tanh",
    "bench_silu_mul",
    "bench_channel_norm",
)
# Bounds on (max|out - ref| / max|ref|, ||out - ref|| / ||ref||) per dtype. bf16: a few ulps at most;
# fp32: reduction order and the timestep angles (up to 1000 rad, ~1e-4 absolute).
BOUNDS = {torch.bfloat16: (3e-2, 1e-2), torch.float32: (1e-3, 2e-4)}


def as_tuple(x) -> tuple[torch.Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def replays_in_cuda_graph(case) -> bool:
    """Capture ``case.fused`` in a CUDA graph; a replay into poisoned outputs must equal the eager call."""
    eager = [o.clone() for o in case.outs]
    replay = capture_graph(case.fused)
    for o in case.outs:
        o.fill_(float("nan"))
    replay()
    torch.cuda.synchronize()
    return all(torch.equal(o, e) for o, e in zip(case.outs, eager))


def check_case(case, dtype_name: str) -> bool:
    for o in case.outs:
        o.fill_(float("nan"))
    COUNTERS.reset()
    case.fused()
    torch.cuda.synchronize()
    launched = COUNTERS.kernel_launches >= 1 and COUNTERS.reference_fallbacks == 0
    refs = as_tuple(case.ref(*case.args))
    ok = launched
    for i, (out, ref) in enumerate(zip(case.outs, refs)):
        ref = ref.to(out.dtype)
        unwritten = int(out.isnan().sum()) - int(ref.isnan().sum())
        diff = (out.double() - ref.double()).abs()
        max_rel = float(diff.max() / ref.double().abs().max().clamp_min(1e-30))
        norm_rel = float(diff.norm() / ref.double().norm().clamp_min(1e-30))
        identical = float((out == ref).double().mean())
        max_bound, norm_bound = BOUNDS[out.dtype]
        good = unwritten == 0 and max_rel <= max_bound and norm_rel <= norm_bound
        ok &= good
        print(
            f"{case.name[:34]:34s} {dtype_name:5s} out{i} {unwritten:9d} {max_rel:11.3e} {norm_rel:11.3e} "
            f"{100 * identical:8.2f}% {'ok' if good and launched else 'FAIL'}"
        )
    graph_ok = replays_in_cuda_graph(case)
    if not graph_ok:
        print(f"{case.name[:34]:34s} {dtype_name:5s} CUDA graph replay differs from the eager call: FAIL")
    return ok and graph_ok


def main() -> int:
    require_cuda()
    print(header("diffc fused ops vs torch references (GPU correctness)"))
    print(
        f"{'case':34s} {'dtype':5s} {'out':4s} {'unwritten':>9s} {'max rel err':>11s} {'norm rel':>11s} "
        f"{'bit-equal':>9s}"
    )
    failures = 0
    for module in MODULES:
        cases = importlib.import_module(f"bench.ops.{module}").cases
        for dtype_name, dtype in DTYPES.items():
            for case in cases(dtype):
                failures += not check_case(case, dtype_name)
                del case
            torch.cuda.empty_cache()
    print("all ops match their references" if failures == 0 else f"{failures} case(s) FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
