"""The runtime executor's layers on the generic backend, on the CPU: offload (with the recording stand-in for
the CUDA streams of tests/runtime/test_offload.py) and CUDA graphs (emulated, tests/runtime/test_cudagraphs.py)
give every tiny diffusers pipeline the pixels it gives without them (offload: up to a uint8 level on a few
pixels, the CPU BLAS's alignment-dependent rounding; see _same_pixels). The CUDA path: test_generic_gpu.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffc.errors import InvalidArgumentError
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


def _same_pixels(out: np.ndarray, ref: np.ndarray) -> bool:
    """The same image or video up to CPU BLAS rounding: MKL's and oneDNN's float results may depend on where
    the weights sit in memory (alignment), and offload gives them new buffers, so a few pixels in ten thousand
    can land one uint8 level apart (seen: 1 in 3 runs, up to 0.03% of pixels). A weight streamed wrong or
    stale changes far more than that."""
    diff = np.abs(out.astype(np.int16) - ref.astype(np.int16))
    return out.shape == ref.shape and int(diff.max()) <= 1 and float((diff > 0).mean()) <= 1e-3


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
        assert _same_pixels(_output(pipe, name), resident)
        counters = handle.counters
        assert counters.blocks_resident == 0 and counters.blocks_streamed == counters.blocks_total > 0
        assert counters.ring_forwards > 0 and counters.component_loads == counters.component_unloads > 0
        # model: one component on the device at a time, the VAE uploaded for its decode in every generation
        pipe.executor.place("model", streams=RecordingStreams())
        vae = pipe.executor.offload.components["vae"]
        for _ in range(2):
            loads = pipe.executor.offload.counters.component_loads
            assert _same_pixels(_output(pipe, name), resident)
            assert pipe.executor.offload.counters.component_loads > loads and vae.loaded  # the VAE ran last
        assert pipe.generate("x", progress=False, **REQUESTS[name]).timings.runtime["offload"]["mode"] == "model"
    finally:
        pipe.executor.place("none")
    assert _same_pixels(_output(pipe, name), resident)


@pytest.mark.parametrize("name", NAMES)
def test_cuda_graphs_replay_the_diffusers_transformer(name, generic_pipe, monkeypatch):
    import diffc.runtime.dit_stack as dit_stack_module

    monkeypatch.setattr(dit_stack_module, "CudaGraphModule", EmulatedGraphs)
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


@pytest.mark.parametrize("name", NAMES)
def test_cuda_graphs_replay_the_diffusers_encoders(name, generic_pipe, monkeypatch):
    """Assigning an encoder component sets the attribute the diffusers pipeline calls: its text encoders replay
    graphs as a native pipeline's do (one capture per encoder; the negative prompt and the next generation replay)."""
    import diffc.runtime.encoders as encoders_module

    monkeypatch.setattr(encoders_module, "CudaGraphModule", EmulatedGraphs)
    pipe = generic_pipe(name)
    resident = _output(pipe, name)
    try:
        pipe.executor.encoders.set_cuda_graphs(True)
        outs = [_output(pipe, name) for _ in range(2)]
        described = pipe.executor.describe()["encoders"]
        assert sorted(described) == sorted(TEXT_ENCODERS[name]) == sorted(text_encoder_names(pipe.diffusers_pipe))
        for encoder in TEXT_ENCODERS[name]:
            assert isinstance(getattr(pipe.diffusers_pipe, encoder), EmulatedGraphs)
            c = described[encoder]
            assert (c["captures"], c["fallbacks"]) == (1, 0) and c["replays"] >= 1
    finally:
        pipe.executor.encoders.set_cuda_graphs(None)
    assert all(np.array_equal(o, resident) for o in outs)
    assert not isinstance(pipe.diffusers_pipe.text_encoder, EmulatedGraphs)


def test_the_execution_device_is_the_pipelines_wherever_the_weights_are(generic_checkpoint):
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(generic_checkpoint("sd3"))
    cls = type(pipe)
    pin_execution_device(pipe, torch.device("meta"))
    assert pipe._execution_device == torch.device("meta") and pipe.device == torch.device("cpu")
    assert type(pipe).__name__ == cls.__name__ and isinstance(pipe, cls) and type(pipe).__mro__[1] is cls
    pin_execution_device(pipe, torch.device("cpu"))  # pinned again: still one subclass of the original
    assert pipe._execution_device == torch.device("cpu") and type(pipe).__mro__[1] is cls


# ---- the step cache --------------------------------------------------------------------------------------

STEPS = 6


def _cached(pipe, name: str, **cache) -> tuple[np.ndarray, dict]:
    request = dict(REQUESTS[name], num_inference_steps=STEPS)
    out = pipe.generate("a lighthouse at dusk", seed=4, progress=False, **cache, **request)
    return (np.asarray(out.images[0]) if out.images else out.frames), out.timings.runtime["cache"]


@pytest.mark.parametrize("name", ["sd3", "hunyuan"])
def test_step_cache_on_the_diffusers_transformer(name, generic_pipe, monkeypatch):
    """The streams come from the blocks' own code; threshold 0 never skips (the uncached pixels), a large one
    skips every step after the warm-up, and CUDA graphs (emulated) capture the block segments around it."""
    import diffc.runtime.dit_stack as dit_stack_module

    pipe = generic_pipe(name)
    plain, none = _cached(pipe, name)
    assert none is None
    exact, described = _cached(pipe, name, cache="fbcache", cache_options={"threshold": 0.0})
    assert np.array_equal(exact, plain) and described["skipped_steps"] == []
    assert described["blocks"] == {"first": 1, "middle": 1, "last": 0}
    options = {"threshold": 100.0, "warmup_steps": 2, "max_skips_in_a_row": STEPS}
    skipping, described = _cached(pipe, name, cache="fbcache", cache_options=options)
    assert described["skipped_steps"] == list(range(2, STEPS)) and not np.array_equal(skipping, plain)
    monkeypatch.setattr(dit_stack_module, "CudaGraphModule", EmulatedGraphs)
    try:
        pipe.executor.set_cuda_graphs(True)
        for _ in range(2):
            replayed, _ = _cached(pipe, name, cache="fbcache", cache_options=options)
            assert np.array_equal(replayed, skipping)
        graphs = pipe.components["transformer"].describe()["cuda_graphs"]
        assert graphs["mode"] == "block segments" and graphs["replays"] > 0 and graphs["fallbacks"] == 0
    finally:
        pipe.executor.set_cuda_graphs(None)
        pipe.executor.set_cache(None)


def test_step_cache_errors_on_the_generic_backend_name_the_option(generic_pipe):
    with pytest.raises(InvalidArgumentError, match="leaves no middle block to skip") as info:
        _cached(generic_pipe("ltx"), "ltx", cache="fbcache")  # the tiny LTX DiT has one block
    assert info.value.field == "cache"
    with pytest.raises(InvalidArgumentError, match="_teacache") as info:
        _cached(generic_pipe("sd3"), "sd3", cache="teacache")
    assert info.value.field == "cache"


class _Joint(torch.nn.Module):
    def forward(self, hidden_states, encoder_hidden_states, temb):
        if temb is None:
            return encoder_hidden_states, hidden_states
        hidden_states = hidden_states + temb
        return encoder_hidden_states, hidden_states


class _CrossAttention(torch.nn.Module):
    def forward(self, hidden_states, encoder_hidden_states, temb=None):
        def helper():
            return temb  # a nested function's return is not the block's

        hidden_states = hidden_states + helper()
        return hidden_states


class _Renamed(torch.nn.Module):
    def forward(self, hidden_states, temb):
        out = hidden_states * temb
        return out


class _Divergent(torch.nn.Module):
    def forward(self, hidden_states, encoder_hidden_states):
        if encoder_hidden_states is None:
            return hidden_states
        return hidden_states, encoder_hidden_states


def test_block_streams_are_read_from_the_blocks_code():
    from diffc.models.structure import BlockStreams, RegionError, inferred_block_streams

    assert inferred_block_streams(_Joint) == BlockStreams(("hidden_states", "encoder_hidden_states"),
                                                          ("encoder_hidden_states", "hidden_states"))
    assert inferred_block_streams(_CrossAttention) == BlockStreams(("hidden_states",), "hidden_states")
    with pytest.raises(RegionError, match="returns something else than its own arguments"):
        inferred_block_streams(_Renamed)
    with pytest.raises(RegionError, match="differently on different paths"):
        inferred_block_streams(_Divergent)
