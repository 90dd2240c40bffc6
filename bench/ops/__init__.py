"""GPU micro-benchmarks of diffc's fused ops; run one as ``python -m bench.ops.bench_<op>``.

Each ``bench_<op>.py`` lists :class:`Case` s at the models' production sizes and calls :func:`run`,
which times, with ``triton.testing.do_bench`` medians in milliseconds, the unfused torch sequence
(the op's ``_ref``), ``torch.compile`` of that sequence, and the fused op writing into preallocated
outputs, and prints one table. ``python -m bench.ops.check_gpu`` reuses the same cases to check the
fused ops against their references on the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
from collections.abc import Callable

import torch

from bench.measure import back_to_back_ms

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclasses.dataclass
class Case:
    """One op call at one size. ``fused()`` writes ``outs``; ``ref(*args)`` returns the same outputs.

    Each ``bench_<op>.py`` builds its cases with ``cases(dtype, device="cuda")``.
    """

    name: str
    ref: Callable
    args: tuple
    fused: Callable[[], None]
    outs: tuple[torch.Tensor, ...]
    bytes_moved: int  # least HBM traffic of the fused op: inputs read once, outputs written once


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def randn(*shape: int, dtype: torch.dtype, device, seed: int = 0, scale: float = 1.0, offset: float = 0.0):
    g = torch.Generator(device=device).manual_seed(seed)
    return (offset + scale * torch.randn(*shape, generator=g, device=device)).to(dtype)


def norm_weight(n: int, dtype: torch.dtype, device, seed: int = 0) -> torch.Tensor:
    return randn(n, dtype=dtype, device=device, seed=seed, scale=0.3, offset=1.0)


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench/ops are GPU micro-benchmarks: no CUDA device is visible")


def header(title: str) -> str:
    import triton

    gpu = torch.cuda.get_device_name()
    return (
        f"# {title}\n# {gpu}, torch {torch.__version__}, triton {triton.__version__}, "
        f"python {platform.python_version()}; do_bench median ms"
    )


def capture_graph(fn: Callable[[], None]) -> Callable[[], None]:
    """Warm ``fn`` up on a side stream, capture it in a CUDA graph, return the graph's ``replay``
    (:func:`diffc.capture.replayer`, as the compiler times attention kernels)."""
    from diffc.capture import replayer

    return replayer(fn, torch.device("cuda", torch.cuda.current_device()))


def graphed_ms(fn: Callable[[], None], warmup: int = 25, rep: int = 100) -> float:
    """``do_bench`` median (ms) of ``fn`` replayed from a CUDA graph (:func:`capture_graph`)."""
    from triton.testing import do_bench

    return do_bench(capture_graph(fn), warmup=warmup, rep=rep, return_mode="median")


def interleaved_rounds_ms(calls: dict[str, Callable[[], None]], rounds: int = 5, iters: int = 20) -> dict[str, list[float]]:
    """Each call's mean time (ms) over ``iters`` back-to-back calls, in ``rounds`` rounds that time every call in an
    order reversing from one round to the next (the GPU clock's drift falls on all of them alike): name -> rounds."""
    per_round: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            calls[name]()  # one untimed call first
            per_round[name].append(back_to_back_ms(calls[name], iters))
    return per_round


def run(title: str, make_cases: Callable[[torch.dtype], list[Case]]) -> None:
    """Time every case of ``make_cases(dtype)`` and print a table.

    Columns: the unfused torch sequence, ``torch.compile`` of it, the fused op called eagerly (Python
    dispatch and launch included, as without CUDA graphs), the fused op replayed from a CUDA graph
    (as diffc's runtime runs it); speedups of the eager fused op; achieved bandwidth of the graphed one.
    Where the op ran a CUDA C++ kernel of ``csrc/``, ``triton`` is the graphed op with its Triton kernel
    instead (``diffc.ops.csrc.disabled()``), else ``-``.
    """
    parser = argparse.ArgumentParser(description=title)
    parser.add_argument("--dtype", choices=[*DTYPES, "all"], default="bf16", help="activation dtype (default bf16)")
    dtypes = list(DTYPES) if (arg := parser.parse_args().dtype) == "all" else [arg]
    require_cuda()
    from triton.testing import do_bench

    from diffc.ops import csrc
    from diffc.ops.registry import COUNTERS

    print(header(title))
    print(
        f"{'case':34s} {'dtype':5s} {'unfused':>9s} {'compiled':>9s} {'fused':>9s} {'graphed':>9s} "
        f"{'x unfused':>9s} {'x compile':>9s} {'GB/s':>6s} {'triton':>9s}"
    )
    for dtype_name in dtypes:
        for case in make_cases(DTYPES[dtype_name]):
            torch._dynamo.reset()  # a fresh compile per case, no recompile limit reached
            compiled = torch.compile(case.ref, fullgraph=True, dynamic=False)
            compiled(*case.args)
            COUNTERS.reset()
            case.fused()
            assert COUNTERS.kernel_launches >= 1 and COUNTERS.reference_fallbacks == 0, COUNTERS
            t_unfused = do_bench(lambda c=case: c.ref(*c.args), warmup=25, rep=100, return_mode="median")
            t_compiled = do_bench(lambda c=case, f=compiled: f(*c.args), warmup=25, rep=100, return_mode="median")
            t_fused = do_bench(case.fused, warmup=25, rep=100, return_mode="median")
            t_graphed = graphed_ms(case.fused)
            gbps = case.bytes_moved / (t_graphed * 1e-3) / 1e9
            triton_col = f"{'-':>9s}"
            if COUNTERS.csrc_launches:
                with csrc.disabled():
                    t_triton = graphed_ms(case.fused)
                triton_col = f"{t_triton:9.4f}"
            print(
                f"{case.name:34s} {dtype_name:5s} {t_unfused:9.4f} {t_compiled:9.4f} {t_fused:9.4f} {t_graphed:9.4f} "
                f"{t_unfused / t_fused:9.2f} {t_compiled / t_fused:9.2f} {gbps:6.0f} {triton_col}"
            )
            torch.cuda.empty_cache()
