"""The runtime executor's layers on the generic backend, on the CPU: offload (with the recording stand-in for
the CUDA streams of tests/runtime/test_offload.py) and CUDA graphs (emulated, tests/runtime/test_cudagraphs.py)
give every tiny diffusers pipeline the pixels it gives without them. The CUDA path: test_generic_gpu.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffc.pipelines.generic.loader import text_encoder_names
from diffc.pipelines.generic.pipeline import pin_execution_device
from tests.generic_pipelines import REQUESTS
from tests.runtime.test_cudagraphs import EmulatedGraphs
from tests.runtime.test_offload import RecordingStreams

NAMES = ("sd3", "hunyuan", "ltx", "cogvideox")
# The components each tiny pipeline keeps in host memory under layerwise offload (its transformers models).
TEXT_ENCODERS = {"sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"),
                 "hunyuan": ("text_encoder", "text_encoder_2"), "ltx": ("text_encoder",),
                 "cogvideox": ("text_encoder",)}


def _output(pipe, name: str) -> np.ndarray:
    out = pipe.generate("a lighthouse at dusk", seed=4, progress=False, **REQUESTS[name])
    return np.asarray(out.images[0]) if out.images else out.frames


@pytest.mark.parametrize("name", NAMES)
def test_offload_gives_the_resident_output(name, generic_pipe):
    pipe = generic_pipe(name)
    resident = _output(pipe, name)
    assert text_encoder_names(pipe.diffusers_pipe) == TEXT_ENCODERS[name]
    try:
        # layerwise: every repeated block of the DiT streams (none resident), the VAE (which may declare
        # _no_split_modules) is no ring, the text encoders visit the device for their forward only
        pipe.executor.place("layerwise", resident_blocks=0, streams=RecordingStreams(),
                            text_encoders=text_encoder_names(pipe.diffusers_pipe))
        handle = pipe.executor.offload
        assert list(handle.rings) == ["transformer"] and sorted(handle.components) == sorted(TEXT_ENCODERS[name])
        assert np.array_equal(_output(pipe, name), resident)
        counters = handle.counters
        assert counters.blocks_resident == 0 and counters.blocks_streamed == counters.blocks_total > 0
        assert counters.ring_forwards > 0 and counters.component_loads == counters.component_unloads > 0
        # model: one component on the device at a time, the VAE uploaded for its decode in every generation
        pipe.executor.place("model", streams=RecordingStreams())
        vae = pipe.executor.offload.components["vae"]
        for _ in range(2):
            loads = pipe.executor.offload.counters.component_loads
            assert np.array_equal(_output(pipe, name), resident)
            assert pipe.executor.offload.counters.component_loads > loads and vae.loaded  # the VAE ran last
        assert pipe.generate("x", progress=False, **REQUESTS[name]).timings.runtime["offload"]["mode"] == "model"
    finally:
        pipe.executor.place("none")
    assert np.array_equal(_output(pipe, name), resident)


@pytest.mark.parametrize("name", NAMES)
def test_cuda_graphs_replay_the_diffusers_transformer(name, generic_pipe, monkeypatch):
    import diffc.runtime.executor as executor_module

    monkeypatch.setattr(executor_module, "CudaGraphModule", EmulatedGraphs)
    pipe = generic_pipe(name)
    resident = _output(pipe, name)
    try:
        pipe.executor.set_cuda_graphs(True)
        outs = [_output(pipe, name) for _ in range(2)]
        graphs = pipe.components["transformer"].graphs
        assert isinstance(graphs, EmulatedGraphs)
        # one signature per pipeline (CFG batched, or no CFG); every forward after the first replays it
        forwards = 2 * REQUESTS[name]["num_inference_steps"]
        assert (graphs.counters.captures, graphs.counters.replays, graphs.counters.fallbacks) == (1, forwards - 1, 0)
    finally:
        pipe.executor.set_cuda_graphs(None)
    assert all(np.array_equal(o, resident) for o in outs)


def test_the_execution_device_is_the_pipelines_wherever_the_weights_are(generic_checkpoint):
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(generic_checkpoint("sd3"))
    cls = type(pipe)
    pin_execution_device(pipe, torch.device("meta"))
    assert pipe._execution_device == torch.device("meta") and pipe.device == torch.device("cpu")
    assert type(pipe).__name__ == cls.__name__ and isinstance(pipe, cls) and type(pipe).__mro__[1] is cls
    pin_execution_device(pipe, torch.device("cpu"))  # pinned again: still one subclass of the original
    assert pipe._execution_device == torch.device("cpu") and type(pipe).__mro__[1] is cls
