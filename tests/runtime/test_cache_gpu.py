"""The step cache on a GPU: block segments captured as real CUDA graphs replay to the same result as the
cache without graphs, with no fallback, for FLUX (two block lists) and Wan; and a whole pipeline with a
cache and graphs on. Run with ``python -m pytest tests/runtime/test_cache_gpu.py -q`` on a CUDA machine."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import diffc
from diffc.demo import demo_checkpoint
from diffc.models.flux.transformer import FLUX_TRANSFORMER_SPECS, FluxTransformer2DModel
from diffc.models.wan.transformer import WAN_TRANSFORMER_SPECS, WanTransformer3DModel
from diffc.runtime.cache import CacheConfig, build_cache
from diffc.runtime.dit_stack import DiTStack

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CONFIG = CacheConfig("dbcache", fn=1, bn=1, threshold=100.0, warmup_steps=1, max_skips_in_a_row=1)
FLUX_SMALL = dataclasses.replace(FLUX_TRANSFORMER_SPECS["tiny"], num_layers=2, num_single_layers=3,
                                 num_attention_heads=3, attention_head_dim=32, axes_dims_rope=(8, 12, 12))


def flux():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(FLUX_SMALL).eval().requires_grad_(False).to("cuda", torch.bfloat16)
    g = torch.Generator("cuda").manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, device="cuda").to(torch.bfloat16)  # noqa: E731
    inputs = dict(hidden_states=rand(1, 64, FLUX_SMALL.in_channels), encoder_hidden_states=rand(1, 16, 32),
                  pooled_projections=rand(1, 24), timestep=torch.full((1,), 0.5, device="cuda", dtype=torch.bfloat16),
                  img_ids=rand(64, 3), txt_ids=torch.zeros(16, 3, device="cuda", dtype=torch.bfloat16),
                  guidance=torch.full((1,), 3.5, device="cuda"))
    return model, inputs, 1.0


def wan():
    torch.manual_seed(0)
    cfg = dataclasses.replace(WAN_TRANSFORMER_SPECS["tiny"], num_layers=4)
    model = WanTransformer3DModel(cfg).eval().requires_grad_(False).to("cuda")
    g = torch.Generator("cuda").manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 4, 3, 8, 8, generator=g, device="cuda"),
                  timestep=torch.full((2,), 500.0, device="cuda"),
                  encoder_hidden_states=torch.randn(2, 7, 16, generator=g, device="cuda"))
    return model, inputs, 1000.0


def denoise(stack, inputs, steps, scale, cache):
    x = inputs["hidden_states"]
    cache.begin_generation(steps)
    with torch.inference_mode():
        for i in range(steps):
            cache.begin_step(i)
            t = torch.full_like(inputs["timestep"], (1 - i / steps) * scale)
            x = x - stack(**{**inputs, "hidden_states": x, "timestep": t}) / steps
    cache.end_generation()
    return x


@pytest.mark.parametrize("make", [flux, wan], ids=["flux", "wan"])
def test_block_segment_graphs_replay_the_cached_forward(make):
    model, inputs, scale = make()
    plain = DiTStack("transformer", model, torch.device("cuda"), cuda_graphs=False)
    plain.set_cache(build_cache(CONFIG, model))
    ref = denoise(plain, inputs, 6, scale, plain.cache)
    plain.set_cache(None)
    stack = DiTStack("transformer", model, torch.device("cuda"), cuda_graphs=True)
    stack.set_cache(build_cache(CONFIG, model))
    out = denoise(stack, inputs, 6, scale, stack.cache)
    graphs = stack.describe()["cuda_graphs"]
    assert graphs["mode"] == "block segments" and graphs["fallbacks"] == 0, graphs
    assert graphs["captures"] == len(stack.cache.segments()) and graphs["replays"] > 0
    assert stack.cache.describe()["skipped_steps"] == [1, 3, 5]
    assert torch.allclose(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_pipeline_with_cache_and_graphs():
    pipe = diffc.load(demo_checkpoint("flux"), device="cuda", dtype="bf16")
    kwargs = dict(height=256, width=256, num_inference_steps=6, seed=0, progress=False)
    ref = pipe.generate("a cat", **kwargs)
    zero = pipe.generate("a cat", cache="dbcache", cache_options={"threshold": 0, "fn": 1, "bn": 1}, **kwargs)
    assert zero.timings.runtime["cuda_graphs"]["mode"] == "block segments"
    assert np.array_equal(np.asarray(zero.images[0]), np.asarray(ref.images[0]))
    fast = pipe.generate("a cat", cache="fbcache", cache_options={"threshold": 100, "warmup_steps": 2,
                                                                  "max_skips": 1}, **kwargs)
    assert fast.timings.runtime["cache"]["skipped_steps"] == [2, 4]
    again = pipe.generate("a cat", **kwargs)
    assert again.timings.runtime["cuda_graphs"].get("mode") is None  # whole-forward graphs again
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(ref.images[0]))


def test_zimage_pipeline_with_cache_and_graphs(zimage_checkpoint):
    """Z-Image's three regions (noise refiner, caption refiner, main layers) as block segments under CUDA graphs."""
    pipe = diffc.load(zimage_checkpoint("tiny"), device="cuda", dtype="bf16")
    kwargs = dict(height=64, width=64, num_inference_steps=6, seed=0, progress=False)
    ref = pipe.generate("a cat", **kwargs)
    zero = pipe.generate("a cat", cache="dbcache", cache_options={"threshold": 0, "fn": 1, "bn": 1}, **kwargs)
    graphs = zero.timings.runtime["cuda_graphs"]
    assert graphs["mode"] == "block segments" and graphs.get("fallbacks", 0) == 0, graphs
    assert np.array_equal(np.asarray(zero.images[0]), np.asarray(ref.images[0]))
    fast = pipe.generate("a cat", cache="fbcache", cache_options={"threshold": 100, "warmup_steps": 2,
                                                                  "max_skips": 1}, **kwargs)
    assert fast.timings.runtime["cache"]["skipped_steps"] == [2, 4]
    assert not np.array_equal(np.asarray(fast.images[0]), np.asarray(ref.images[0]))
