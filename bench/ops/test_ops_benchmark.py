"""The fused ops' micro-benchmarks under pytest-benchmark, to compare them across commits on one GPU::

    python -m pytest bench/ops --benchmark-only --benchmark-autosave     # saves .benchmarks/<machine>/NNNN_*.json
    python -m pytest bench/ops --benchmark-only --benchmark-compare      # ... and compares with the last save
    python -m pytest bench/ops --benchmark-only -k "fp8_quant"           # one op module

The cases are every ``bench_<op>.py``'s (production sizes, bf16), the ones ``python -m bench.ops.bench_<op>``
prints as a table beside the unfused torch sequence. Each round replays the fused call from a CUDA graph
(as diffc's runtime runs it) ``REPLAYS`` times and synchronizes, so a reported time is ``REPLAYS`` calls;
``extra_info`` holds the bytes one call moves at least and the bandwidth that makes. Without a CUDA GPU
every case is skipped (CI never runs these: they live outside ``tests/``).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from bench.ops import capture_graph

MODULES = ("bench_qk_norm_rope", "bench_adaln_modulate", "bench_gated_residual", "bench_timestep_embedding",
           "bench_gelu_tanh", "bench_silu_mul", "bench_fp8_quant", "bench_channel_norm", "bench_gemv",
           "bench_group_norm")
REPLAYS = 20
_BUILT: dict[str, list] = {}


def _cases(module: str) -> list:
    """The module's cases, built once (on the GPU) and shared by its parameters."""
    if module not in _BUILT:
        _BUILT.clear()  # one module's tensors at a time
        torch.cuda.empty_cache()
        _BUILT[module] = importlib.import_module(f"bench.ops.{module}").cases(torch.bfloat16)
    return _BUILT[module]


def _params() -> list:
    if not torch.cuda.is_available():
        return [pytest.param(None, None, marks=pytest.mark.skip(reason="GPU micro-benchmarks: no CUDA device"))]
    out = []
    for module in MODULES:
        names = [case.name for case in importlib.import_module(f"bench.ops.{module}").cases(torch.bfloat16)]
        torch.cuda.empty_cache()
        out += [pytest.param(module, i, id=f"{module.removeprefix('bench_')}:{name}") for i, name in enumerate(names)]
    return out


@pytest.mark.parametrize("module,index", _params())
def test_fused_op(benchmark, module, index):
    from diffc.ops.registry import COUNTERS

    case = _cases(module)[index]
    COUNTERS.reset()
    case.fused()
    assert COUNTERS.kernel_launches >= 1 and COUNTERS.reference_fallbacks == 0, COUNTERS  # the kernel, not the ref
    replay = capture_graph(case.fused)

    def rounds():
        for _ in range(REPLAYS):
            replay()
        torch.cuda.synchronize()

    benchmark.extra_info.update({"replays_per_round": REPLAYS, "bytes_per_call": case.bytes_moved,
                                 "gpu": torch.cuda.get_device_name()})
    benchmark.pedantic(rounds, warmup_rounds=3, rounds=20)
    per_call = benchmark.stats.stats.median / REPLAYS
    benchmark.extra_info["median_us_per_call"] = per_call * 1e6
    benchmark.extra_info["gb_per_s"] = case.bytes_moved / per_call / 1e9
