"""The encoders' CUDA graphs on a GPU: each native family's prompt encoding captures once per signature,
replays with no fallback, and equals the eager encoding bit for bit (bf16 and float32); a whole generation
through them gives the eager pixels.

Run with ``python -m pytest tests/pipelines/test_encoder_graphs_gpu.py -q`` on a CUDA machine; skipped elsewhere.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import diffc
from diffc.pipelines.stages import RunContext
from diffc.runtime.cudagraphs import CudaGraphModule, _tensors
from diffc.runtime.perf import PerfRecorder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# family -> (checkpoint fixture, variant, encode_prompt request fields, encoder names)
FAMILIES = {
    "flux": ("flux_checkpoint", "dev-tiny", dict(max_sequence_length=48, negative_prompt=None, true_cfg_scale=None),
             ("text_encoder", "text_encoder_2")),
    "wan": ("wan_checkpoint", "base", dict(max_sequence_length=64, negative_prompt="blurry", guidance_scale=5.0),
            ("text_encoder",)),
    "zimage": ("zimage_checkpoint", "tiny", dict(max_sequence_length=64, negative_prompt="blurry", guidance_scale=4.0),
               ("text_encoder",)),
}
PROMPTS = (["a red fox in the snow"], ["an old lighthouse at dusk, long exposure"], ["a red fox in the snow"])


def encode(pipe, fields, prompts):
    stage = next(s for s in pipe.graph.stages if s.name == "encode_prompt")
    ctx = RunContext(pipe.components, pipe.device, pipe.dtype, PerfRecorder(pipe.device), progress=False)
    with torch.inference_mode():
        return stage.fn(ctx, {k: ({**fields, "prompt": prompts}).get(k) for k in stage.inputs})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_encoding_replays_and_equals_eager(request, family, dtype):
    fixture, variant, fields, names = FAMILIES[family]
    pipe = diffc.load(request.getfixturevalue(fixture)(variant), device="cuda", dtype=dtype)
    pipe.executor.set_cuda_graphs(False)
    eager = [encode(pipe, fields, p) for p in PROMPTS]
    pipe.executor.set_cuda_graphs(None)  # the default on CUDA: on
    assert all(isinstance(pipe.components[n], CudaGraphModule) for n in names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture warns
        graphed = [encode(pipe, fields, p) for p in PROMPTS]
    for got, want in zip(graphed, eager):
        for key in want:
            for a, b in zip(_tensors(got[key]), _tensors(want[key]), strict=True):
                assert torch.equal(a, b), f"{family} {key}: max |diff| {(a.float() - b.float()).abs().max().item():.3g}"
    assert not torch.equal(_tensors(graphed[0])[0], _tensors(graphed[1])[0])  # the replay read the new prompt
    for name in names:
        c = pipe.components[name].counters
        assert c.captures == 1 and c.fallbacks == 0 and c.replays >= 2, (name, c)


def test_generation_with_graphed_encoders_gives_the_eager_pixels(flux_checkpoint):
    pipe = diffc.load(flux_checkpoint("dev-tiny"), device="cuda", dtype=torch.bfloat16)
    kw = dict(height=64, width=64, num_inference_steps=2, seed=5, progress=False)
    pipe.executor.set_cuda_graphs(False)
    eager = pipe.generate("a lighthouse", **kw).images
    pipe.executor.set_cuda_graphs(None)
    for _ in range(2):
        assert all(np.array_equal(a, b) for a, b in zip(pipe.generate("a lighthouse", **kw).images, eager))
    described = pipe.executor.describe()["encoders"]
    assert described["text_encoder_2"]["replays"] == 1 and described["text_encoder_2"]["fallbacks"] == 0
