"""The text encoders' masked attention on SDPA's fused kernels (diffc.runtime.encoders.ContiguousMasks) on a GPU: a
bf16 T5 encoder replayed from its CUDA graph, every mask SDPA reads contiguous, the output within bf16 rounding
of transformers' own call (which, with transformers 5.17's permuted position bias, runs torch's math path)."""

from __future__ import annotations

import pytest
import torch

from diffc.runtime.encoders import EncoderGraphs
from tests.runtime.test_encoder_attention import MaskSpy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", ["T5EncoderModel", "UMT5EncoderModel"])
def test_t5_family_encoder_replays_with_contiguous_masks(name):
    import transformers

    torch.manual_seed(0)
    config_cls = transformers.T5Config if name == "T5EncoderModel" else transformers.UMT5Config
    config = config_cls(vocab_size=128, d_model=256, d_kv=64, d_ff=512, num_layers=4, num_heads=4,
                        feed_forward_proj="gated-gelu", decoder_start_token_id=0, is_encoder_decoder=False)
    encoder = getattr(transformers, name)(config).to("cuda", torch.bfloat16).eval().requires_grad_(False)
    components = {"text_encoder": encoder}
    graphs = EncoderGraphs(components, ("text_encoder",), torch.device("cuda"), cuda_graphs=True)
    ids = torch.randint(1, 128, (1, 120), device="cuda")
    with torch.inference_mode():
        ref = components["text_encoder"](ids).last_hidden_state.float()
        graphs.set_fused_attention(True)
        spy = MaskSpy()
        with spy:
            outs = [components["text_encoder"](ids).last_hidden_state.float()]  # the warm-up run, then the capture
        assert spy.masks and all(m is None or m.stride(-1) == 1 for m in spy.masks)
        outs += [components["text_encoder"](ids).last_hidden_state.float() for _ in range(2)]  # replays
    for out in outs:
        assert ((out - ref).norm() / ref.norm()).item() < 2e-2
    assert torch.equal(outs[1], outs[2])
