"""Z-Image's DiT under real CUDA graphs: with the caption lengths read once a generation (caption_layout), a
prompt padded to ``max_sequence_length`` captures (no host read in the forward) and replays with the eager
pixels, with and without guidance (whose prompt and negative prompt differ in length).

Run with ``python -m pytest tests/pipelines/test_zimage_graphs_gpu.py -q`` on a CUDA machine; skipped elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffc

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("guidance", [0.0, 2.5], ids=["turbo", "cfg"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_padded_prompt_replays_the_dit_graph(zimage_checkpoint, guidance, dtype):
    pipe = diffc.load(zimage_checkpoint("tiny"), device="cuda", dtype=dtype)
    kw = dict(height=64, width=48, num_inference_steps=4, guidance_scale=guidance, max_sequence_length=96,
              negative_prompt="blurry" if guidance else None, seed=7, progress=False)
    stack = pipe.components["transformer"]
    stack.set_cuda_graphs(False)
    eager = pipe.generate("a red fox in snow", **kw).images[0]
    stack.set_cuda_graphs(None)
    for _ in range(2):
        assert np.array_equal(pipe.generate("a red fox in snow", **kw).images[0], eager)
    graphs = stack.describe_graphs()
    assert graphs["failed_captures"] == [] and graphs["fallbacks"] == 0, graphs
    assert graphs["captures"] == 1 and graphs["replays"] == 2 * 4 - 1
