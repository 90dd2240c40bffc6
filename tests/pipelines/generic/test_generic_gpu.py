"""The generic backend's runtime layers on a CUDA GPU: real CUDA graph captures of each tiny diffusers
transformer, and offload's pinned host copies, give the pixels of the plain resident run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffc
from tests.generic_pipelines import REQUESTS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NAMES = ("sd3", "hunyuan", "ltx", "cogvideox")


def _output(pipe, name: str) -> tuple[np.ndarray, dict]:
    out = pipe.generate("a lighthouse at dusk", seed=4, progress=False, **REQUESTS[name])
    return (np.asarray(out.images[0]) if out.images else out.frames), out.timings.runtime


@pytest.mark.parametrize("name", NAMES)
def test_cuda_graphs_and_offload_give_the_resident_pixels(name, generic_checkpoint):
    root = generic_checkpoint(name)
    plain = diffc.load(root, device="cuda", dtype="float32", cuda_graphs=False)
    reference, runtime = _output(plain, name)
    assert runtime["cuda_graphs"] == {"enabled": False, "reason": "turned off"}
    del plain
    graphs = diffc.load(root, device="cuda", dtype="float32")  # graphs on by default on a GPU
    outs = [_output(graphs, name) for _ in range(2)]
    described = outs[-1][1]["cuda_graphs"]
    assert described["enabled"] and described["captures"] == 1 and described["replays"] > 0, described
    assert described["fallbacks"] == 0 and not described["failed_captures"], described
    assert all(np.array_equal(o, reference) for o, _ in outs)
    del graphs
    for mode in ("layerwise", "model"):
        pipe = diffc.load(root, device="cuda", dtype="float32", offload=mode,
                          **({"resident_blocks": 0} if mode == "layerwise" else {}))
        for _ in range(2):
            out, runtime = _output(pipe, name)
            assert np.array_equal(out, reference), mode
        assert runtime["offload"]["mode"] == mode
        del pipe
        torch.cuda.empty_cache()
