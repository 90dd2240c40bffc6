"""The compiler on the Qwen-Image DiT: the existing passes find its sites (no Qwen-specific pass), exact counts.

Tiny DiT (``QWEN_IMAGE_TRANSFORMER_SPECS["tiny"]``): 2 double-stream blocks, 2 heads of 16 (Qwen-Image: 60 blocks,
24 heads of 128). Per block, as in FLUX's double-stream block:
  adaln_modulate 4 (image and text norm1, image and text MLP norms) + norm_out 1;
  gated_residual 4 (image/text after attention and after the MLP); gelu_tanh 2 (img_mlp, txt_mlp);
  qk_norm_rope 1 match (two op calls: text rows, image rows);
  gated_residual_adaln: 2 per block (attention residuals into the MLP norms), 2 between blocks (the MLP
  residuals into the next block's norm1) and 1 into norm_out = 4L - 1;
  timestep_embedding 1 (diffusers' sine-first, flipped, scaled sinusoid); rms_norm 0 (txt_norm and the q/k norms
  are nn.RMSNorm, already aten.rms_norm); silu_mul 0 (no SwiGLU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffc
from diffc.compile import CompileCounters, PassManager, trace_module
from diffc.compile.passes import FUSION_PASSES, graph_targets
from diffc.models.qwen_image.transformer import QWEN_IMAGE_TRANSFORMER_SPECS, QwenImageTransformer2DModel
from tests.compile.common import GRAPH_TOL, OPT_IN
from tests.helpers import psnr_uint8, rel_err
from tests.pipelines.qwen_image.conftest import qwen_checkpoint  # noqa: F401, F811 (the session fixture)

BLOCKS = QWEN_IMAGE_TRANSFORMER_SPECS["tiny"].num_layers
EXPECTED = {
    "rms_norm": 0,
    "rms_norm_kernel": 1,  # the text input's RMSNorm (narrow rows at this tiny size)
    "qk_norm_rope": BLOCKS,
    "adaln_modulate": 4 * BLOCKS + 1,
    "gated_residual": 4 * BLOCKS,
    "gelu_tanh": 2 * BLOCKS,
    "timestep_embedding": 1,
    "silu_mul": 0,
    "gated_residual_adaln": 4 * BLOCKS - 1,
    "modulation_table": 0,
    "key_padding_attention": 0,
    "cat_transposed": BLOCKS,  # the joint attention's value concatenation
    "split_cat_linear": 0,
}
# One row (batch 1): the blocks' img_mod / txt_mod projections, norm_out's and the timestep MLP's two linears.
# Batch 2 keeps every GEMM (diffc.gemv measured faster for one row only).
GEMV = {1: 2 * BLOCKS + 3, 2: 0}
SHAPES = ((1, 3, 4), (1, 2, 3))  # the generated image (12 tokens) and one input image (6 tokens)


def _inputs(batch: int, padded: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    mask = None
    if padded:
        mask = torch.ones(batch, 5, dtype=torch.long)
        mask[0, -2:] = 0
    return dict(hidden_states=torch.randn(batch, 18, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, 5, 32, generator=g),
                timestep=torch.full((batch,), 0.4), img_shapes=SHAPES, encoder_hidden_states_mask=mask)


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "text-padding-mask"])
def test_passes_find_every_site(padded):
    torch.manual_seed(0)
    net = QwenImageTransformer2DModel(QWEN_IMAGE_TRANSFORMER_SPECS["tiny"]).eval()
    inputs = _inputs(2 if padded else 1, padded)
    program = trace_module(net, inputs)
    with torch.no_grad():
        unfused = program.module()(**inputs)
    counters = PassManager().run(program)
    matches = {k: v for k, v in counters.matches.items() if k != "canonicalize_casts"}
    gemv = GEMV[inputs["hidden_states"].shape[0]]
    assert matches == {**EXPECTED, "gemv": gemv}  # key_padding_attention: 0, the sequence is far below MIN_KEYS
    assert counters == CompileCounters(graphs_rewritten=1, passes_run=1 + len(FUSION_PASSES) - len(OPT_IN),
                                       passes_skipped=0, matches=counters.matches)
    entered = {k: v for k, v in graph_targets(program.graph_module).items() if k.startswith("diffc.")}
    pairs = EXPECTED["gated_residual_adaln"]
    assert entered == {
        "diffc.adaln_modulate.default": EXPECTED["adaln_modulate"] - pairs,
        "diffc.gated_residual.default": EXPECTED["gated_residual"] - pairs,
        "diffc.gated_residual_adaln.default": pairs,
        "diffc.gelu_tanh.default": EXPECTED["gelu_tanh"],
        "diffc.timestep_embedding.default": 1,
        "diffc.qk_norm_rope_per_head.default": 2 * BLOCKS,
        "diffc.rms_norm.default": EXPECTED["rms_norm_kernel"],
        **({"diffc.gemv.default": gemv} if gemv else {}),
    }
    assert graph_targets(program.graph_module).get("aten.scaled_dot_product_attention.default") == BLOCKS
    with torch.no_grad():
        assert rel_err(program.module()(**inputs), unfused) < GRAPH_TOL[torch.float32]


def test_compiled_pipeline_matches_eager(qwen_checkpoint):  # noqa: F811
    """Regional compile of the tiny T2I pipeline (both blocks share one graph) == eager, within 40 dB, with true CFG:
    the prompt (not the compile-time example prompt) and the negative prompt share the example's text bucket, so
    every DiT call runs the compiled graph."""
    path, _ = qwen_checkpoint("t2i")
    pipe = diffc.load(path, device="cpu")
    request = dict(height=32, width=32, num_inference_steps=2, seed=3, progress=False, negative_prompt=" ",
                   true_cfg_scale=4.0)
    eager = np.asarray(pipe.generate("a red fox", **request).images[0])
    report = pipe.compile([{"height": 32, "width": 32}], log=lambda line: None)
    (bucket,) = report.buckets
    assert {k: v for k, v in bucket.matches.items() if k in EXPECTED} == {
        **EXPECTED,
        "adaln_modulate": 4 * BLOCKS, "gated_residual_adaln": 2 * BLOCKS,  # norm_out and the sinusoid are outside
        "timestep_embedding": 0, "rms_norm_kernel": 0}                    # the blocks; region edges cut the pairs
    out = pipe.generate("a red fox", **request)
    assert psnr_uint8(np.asarray(out.images[0]), eager) >= 40.0
    runtime = out.timings.runtime["compiled"]
    assert (runtime["compiled_calls"], runtime["eager_fallbacks"]) == (4, 0)
