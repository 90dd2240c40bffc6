"""A native pipeline's generations with its encoders replayed from (emulated) CUDA graphs equal eager ones,
with one capture per encoder and call signature (the negative prompt replays the prompt's graph).

tests/runtime/test_encoder_graphs.py has the wrapper's placement rules; the GPU captures are in
tests/runtime/test_encoder_graphs_gpu.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import diffc
import diffc.runtime.encoders as encoders_module
from diffc.runtime.dit_stack import unwrap
from tests.runtime.test_cudagraphs import EmulatedGraphs

# family -> (checkpoint fixture, variant, request, encoder calls per generation)
CASES = {
    "flux": ("flux_checkpoint", "dev-tiny", dict(height=32, width=32, num_inference_steps=1),
             {"text_encoder": 1, "text_encoder_2": 1}),
    "wan-cfg": ("wan_checkpoint", "base", dict(height=32, width=32, num_frames=5, num_inference_steps=1,
                                              guidance_scale=4.0), {"text_encoder": 2}),  # prompt, then negative
    "zimage": ("zimage_checkpoint", "tiny", dict(height=32, width=32, num_inference_steps=1), {"text_encoder": 1}),
}


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(encoders_module, "CudaGraphModule", EmulatedGraphs)


def pixels(out) -> list[np.ndarray]:
    return out.images if out.images is not None else out.videos


def same(a, b) -> bool:
    return len(pixels(a)) == len(pixels(b)) and all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b)))


@pytest.mark.parametrize("case", list(CASES))
def test_generations_replay_the_encoders_and_match_eager(request, emulated, case):
    fixture, variant, kw, calls = CASES[case]
    pipe = diffc.load(request.getfixturevalue(fixture)(variant), device="cpu")
    prompts = ["a red fox in the snow", "an old lighthouse"]
    eager = [pipe.generate(p, seed=3, progress=False, **kw) for p in prompts]
    assert all(not isinstance(pipe.components[n], EmulatedGraphs) for n in calls)
    assert pipe.executor.describe()["encoders"] == {n: {"enabled": False, "reason": "off on cpu"} for n in calls}

    pipe.executor.encoders.set_cuda_graphs(True)
    graphed = [pipe.generate(p, seed=3, progress=False, **kw) for p in prompts + prompts[:1]]
    for got, want in zip(graphed, eager + eager[:1]):
        assert same(got, want)  # the replays read each prompt's ids from the static buffers
    described = pipe.executor.describe()["encoders"]
    for name, per_generation in calls.items():
        wrapper = pipe.components[name]
        assert isinstance(wrapper, EmulatedGraphs) and unwrap(wrapper) is pipe.executor.encoders.modules[name]
        total = 3 * per_generation
        assert (wrapper.counters.captures, wrapper.counters.replays, wrapper.counters.fallbacks) == (1, total - 1, 0)
        assert described[name]["enabled"] and len(described[name]["graphs"]) == 1
