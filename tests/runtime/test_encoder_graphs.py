"""The encoders' CUDA graphs (diffc.runtime.encoders) on the CPU: which components are wrapped when, and that
offload and the switch put the modules back (tests/pipelines/test_encoder_graphs.py: generations through them).

The captures run through ``EmulatedGraphs`` (tests/runtime/test_cudagraphs.py: the replay recomputes the
forward from the static input buffers); tests/runtime/test_encoder_graphs_gpu.py captures real graphs.
"""

from __future__ import annotations

import pytest
import torch
from transformers import T5Config, T5EncoderModel

import diffc.runtime.encoders as encoders_module
from diffc.runtime.dit_stack import unwrap
from diffc.runtime.executor import Executor
from diffc.runtime.options import RuntimeOptions
from tests.runtime.test_cudagraphs import EmulatedGraphs
from tests.runtime.test_offload import RecordingStreams

CPU = torch.device("cpu")


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(encoders_module, "CudaGraphModule", EmulatedGraphs)


def tiny_t5() -> T5EncoderModel:
    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    return T5EncoderModel(config).eval().requires_grad_(False)


def test_switch_and_offload_put_the_modules_back(emulated):
    encoder = tiny_t5()
    components = {"text_encoder": encoder, "tokenizer": object()}
    executor = Executor(components, CPU, RuntimeOptions(), ("text_encoder", "tokenizer"))
    assert components["text_encoder"] is encoder and list(executor.encoders.modules) == ["text_encoder"]

    executor.set_cuda_graphs(True)
    wrapper = components["text_encoder"]
    assert isinstance(wrapper, EmulatedGraphs) and unwrap(wrapper) is encoder
    ids = torch.randint(0, 64, (2, 7))
    with torch.inference_mode():
        ref = encoder(input_ids=ids).last_hidden_state
        for _ in range(2):
            out = components["text_encoder"](input_ids=ids)
            assert type(out) is type(encoder(input_ids=ids))  # a transformers ModelOutput keeps its type
            assert torch.equal(out.last_hidden_state, ref) and torch.equal(out[0], ref)
    assert (wrapper.counters.captures, wrapper.counters.replays) == (1, 1)

    executor.place("model", streams=RecordingStreams())  # the offload hooks go on the eager module
    assert components["text_encoder"] is encoder and not wrapper._graphs
    assert executor.describe()["encoders"]["text_encoder"] == {
        "enabled": False, "reason": "model offload moves the encoders' weights"}
    executor.place("none")
    assert isinstance(components["text_encoder"], EmulatedGraphs)
    executor.set_cuda_graphs(False)
    assert components["text_encoder"] is encoder
    assert executor.describe()["encoders"]["text_encoder"] == {"enabled": False, "reason": "turned off"}
