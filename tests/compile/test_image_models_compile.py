"""Compiling Z-Image and FLUX.1 Kontext with the generic passes: per-region match counts, compiled == eager.

Z-Image's blocks (tiny: 1 noise refiner, 1 context refiner, 2 main layers) hold per block one q/k RMSNorm +
RoPE (heads after the tokens, one table for q and k), two gated residuals ``x + tanh(g) * norm(y)`` in
the modulated blocks (the context refiner adds ungated residuals), no adaLN (its modulation scales an
RMSNorm, without a shift: not the LayerNorm op), no SiLU-mul (SwiGLU from two separate projections) and
no GELU. Kontext is the FLUX DiT with the input image's tokens appended: FLUX's counts exactly.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import diffc
from diffc.pipelines import flux_kontext
from tests.compile.test_artifact import REGION_MATCHES
from tests.helpers import psnr_uint8

ZERO = {"canonicalize_casts": 14, "rms_norm": 0, "rms_norm_kernel": 0, "adaln_modulate": 0, "gelu_tanh": 0,
        "timestep_embedding": 0, "silu_mul": 0, "gated_residual_adaln": 0, "modulation_table": 0,
        "key_padding_attention": 0, "gemv": 0, "cat_transposed": 0,
        "split_cat_linear": 0}
ZIMAGE_REGIONS = {
    # the sandwich RMSNorms around attention and the feed-forward: narrow rows at this tiny size = 4
    "noise_refiner": {**ZERO, "qk_norm_rope": 1, "gated_residual": 2, "rms_norm_kernel": 4, "gemv": 1},
    "context_refiner": {**ZERO, "qk_norm_rope": 1, "gated_residual": 0, "rms_norm_kernel": 4},
    "layers": {**ZERO, "qk_norm_rope": 1, "gated_residual": 2, "rms_norm_kernel": 4, "gemv": 1},
}
ZIMAGE_BLOCKS = {"noise_refiner": 1, "context_refiner": 1, "layers": 2}
# as tests/compile/test_artifact.py: the same blocks, more tokens
FLUX_REGIONS = {name: REGION_MATCHES[name] for name in ("transformer_blocks", "single_transformer_blocks")}


def _compile_and_compare(pipe, request: dict, expected: dict, bucket: dict | None = None):
    kw = dict(num_inference_steps=2, seed=5, progress=False)
    eager = np.asarray(pipe.generate("a lighthouse", **kw, **request).images[0])
    report = pipe.compile([bucket or request], log=lambda line: None)
    (bucket,) = report.buckets
    for region in bucket.regions:
        matches = {k: v for k, v in region.matches.items() if k != "attention"}
        assert matches == expected[region.region], region.region
    assert {r.region for r in bucket.regions} == set(expected)
    assert bucket.rel_err_vs_eager < 1e-4
    compiled = pipe.executor.compiled()
    before = compiled.counters.compiled_calls
    out = pipe.generate("a lighthouse", **kw, **request)
    assert compiled.counters.compiled_calls == before + 2 and compiled.counters.eager_fallbacks == 0
    assert eager.std() > 1.0
    assert psnr_uint8(out.images[0], eager) >= 40.0
    return bucket


def test_zimage_compiles_with_the_generic_passes(zimage_checkpoint):
    pipe = diffc.load(zimage_checkpoint("tiny"))
    bucket = _compile_and_compare(pipe, {"height": 32, "width": 32, "max_sequence_length": 24}, ZIMAGE_REGIONS)
    assert {r.region: r.blocks for r in bucket.regions} == ZIMAGE_BLOCKS
    assert bucket.matches["qk_norm_rope"] == 4 and bucket.matches["gated_residual"] == 6


def test_kontext_edit_compiles_like_flux(flux_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(flux_kontext, "PREFERRED_RESOLUTIONS", ((32, 32),))
    root = tmp_path / "ckpt"
    shutil.copytree(flux_checkpoint("dev-tiny"), root)
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxKontextPipeline"}))
    pipe = diffc.load(root)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    # compiled for the input image's size (a gray example image, as `diffc compile --image-size 32x32`), run on
    # a real image of that size
    bucket = _compile_and_compare(pipe, {"image": image, "max_sequence_length": 8}, FLUX_REGIONS,
                                  bucket={"image_size": "32x32", "max_sequence_length": 8})
    # the DiT call holds the 8x8 output tokens and the 8x8 input-image tokens
    assert "hidden_states=1x128x16" in bucket.key


def test_zimage_compiles_one_shape_per_example_prompt_length(zimage_checkpoint):
    """Z-Image's DiT holds the prompt at its own length (padded to 32 tokens): each example prompt of another
    padded length compiles its own shape, one of an equal length is compiled once, and a run whose prompt has one
    of the compiled lengths runs compiled."""
    pipe = diffc.load(zimage_checkpoint("tiny"))
    size = {"height": 32, "width": 32, "max_sequence_length": 128}
    long = "portrait of an old sailor with a white beard, oil painting, golden hour light, dramatic clouds"
    lines: list[str] = []
    report = pipe.compile([{**size, "prompt": ["a lighthouse"]}, {**size, "prompt": [long]},
                           {**size, "prompt": ["a red fox"]}], log=lines.append)
    keys = [b.key for b in report.buckets]
    assert len(keys) == 2 and "padded_caption_lengths=(int=32)" in keys[0] and "(int=96)" in keys[1]
    assert any("the same DiT input shapes as an earlier bucket, compiled once" in line for line in lines)
    kw = dict(num_inference_steps=2, seed=5, progress=False, **size)
    counters = pipe.executor.compiled().counters
    out = pipe.generate(long, **kw)
    assert counters.compiled_calls == 2 and counters.eager_fallbacks == 0
    with pipe.executor.bare():
        eager = np.asarray(pipe.generate(long, **kw).images[0])
    assert eager.std() > 1.0 and psnr_uint8(out.images[0], eager) >= 40.0
