"""On a GPU: Z-Image and FLUX.1 Kontext in bf16, eager vs diffusers and compiled vs eager (skipped without CUDA)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import diffc
from diffc.pipelines import flux_kontext
from tests.helpers import psnr_uint8

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
KW = dict(num_inference_steps=4, seed=3, progress=False)


def _check_compiled(pipe, request: dict, bucket: dict | None = None):
    eager = np.asarray(pipe.generate("a lighthouse at dusk", **KW, **request).images[0])
    pipe.compile([bucket or request], log=lambda line: None)
    compiled = pipe.executor.compiled()
    out = pipe.generate("a lighthouse at dusk", **KW, **request)
    assert compiled.counters.eager_fallbacks == 0 and compiled.counters.compiled_calls > 0
    assert eager.std() > 1.0 and psnr_uint8(out.images[0], eager) >= 35.0


def test_zimage_bf16_matches_diffusers_and_compiles(zimage_checkpoint):
    import diffusers

    ckpt = zimage_checkpoint("tiny")
    kw = dict(height=64, width=64, max_sequence_length=32)
    ref = diffusers.ZImagePipeline.from_pretrained(ckpt, torch_dtype=torch.bfloat16).to("cuda")
    ref.set_progress_bar_config(disable=True)
    want = ref("a lighthouse at dusk", generator=torch.Generator("cpu").manual_seed(3), num_inference_steps=4,
               output_type="np", guidance_scale=0.0, **kw).images[0]
    pipe = diffc.load(ckpt, device="cuda", dtype="bf16")
    got = pipe.generate("a lighthouse at dusk", guidance_scale=0.0, **KW, **kw).images[0]
    assert psnr_uint8(got, (want * 255).round().astype("uint8")) >= 30.0
    _check_compiled(pipe, kw)


def test_kontext_bf16_compiles(flux_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(flux_kontext, "PREFERRED_RESOLUTIONS", ((64, 64),))
    root = tmp_path / "ckpt"
    shutil.copytree(flux_checkpoint("dev-tiny"), root)
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxKontextPipeline"}))
    pipe = diffc.load(root, device="cuda", dtype="bf16")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    _check_compiled(pipe, {"image": image, "max_sequence_length": 16},
                    bucket={"image_size": "64x64", "max_sequence_length": 16})
