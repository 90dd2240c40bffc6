"""The step cache over compiled region graphs: threshold 0 is bit-identical to the compiled DiT without a
cache, and compiled + cache equals eager + cache within 40 dB (the same steps skipped). The compiled
blocks run under Triton's CPU interpreter, so one tiny FLUX (both block lists) and three steps."""

from __future__ import annotations

import math

import pytest
import torch

from diffc.compile.pipeline import compile_dit
from diffc.runtime.cache import CacheConfig, build_cache
from diffc.runtime.compiled import CompiledDiT
from diffc.runtime.dit_stack import DiTStack
from tests.runtime.test_cache import denoise
from tests.runtime.test_offload import tiny_flux

CPU = torch.device("cpu")


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of ``out`` against ``ref``, peak = ``ref``'s range."""
    mse = float(((out.double() - ref.double()) ** 2).mean())
    peak = float(ref.max() - ref.min())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)
STEPS = 3
SKIPPING = CacheConfig("dbcache", fn=1, bn=1, threshold=100.0, warmup_steps=1, max_skips_in_a_row=1)


@pytest.fixture(scope="module")
def compiled_flux():
    model, inputs = tiny_flux(layers=1, single_layers=2)
    graphs: dict = {}
    report = compile_dit(model, inputs, graphs=graphs, device=CPU, dtype=torch.float32)
    return model, inputs, CompiledDiT(graphs, [report.key], {"tier": "fast"})


def test_threshold_zero_is_bit_identical_compiled(compiled_flux):
    model, inputs, layer = compiled_flux
    stack = DiTStack("transformer", model, CPU, cuda_graphs=False)
    stack.set_compiled(layer)
    ref = denoise(stack, inputs, STEPS, 1.0)
    cache = build_cache(CacheConfig("dbcache", fn=1, bn=1, threshold=0.0, warmup_steps=0), model)
    stack.set_cache(cache)
    assert torch.equal(denoise(stack, inputs, STEPS, 1.0, cache), ref)
    assert cache.describe()["forwards"] == {"computed": STEPS, "skipped": 0}
    assert layer.counters.region_fallbacks == 0


def test_compiled_cache_matches_eager_cache(compiled_flux):
    model, inputs, layer = compiled_flux
    eager = DiTStack("transformer", model, CPU, cuda_graphs=False)
    eager_cache = build_cache(SKIPPING, model)
    eager.set_cache(eager_cache)
    ref = denoise(eager, inputs, STEPS, 1.0, eager_cache)
    eager.set_cache(None)

    stack = DiTStack("transformer", model, CPU, cuda_graphs=False)
    stack.set_compiled(layer)
    cache = build_cache(SKIPPING, model)
    stack.set_cache(cache)
    calls = layer.counters.region_calls
    out = denoise(stack, inputs, STEPS, 1.0, cache)
    assert cache.describe()["skipped_steps"] == eager_cache.describe()["skipped_steps"] == [1]
    assert layer.counters.region_calls - calls == 3 + 2 + 3  # the skipped step ran its first and last block only
    assert psnr(out, ref) > 40.0
