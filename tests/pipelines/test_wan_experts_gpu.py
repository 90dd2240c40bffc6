"""Wan2.2 two-expert pipelines on a GPU: model offload (one expert on the GPU at a time) and layerwise offload
give the resident pipeline's frames, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffc
from tests.pipelines.test_wan_i2v import PROMPT, TEXT_LEN, _image

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("kind", ["t2v-a14b", "i2v-a14b"])
def test_offloaded_experts_match_resident(wan22_checkpoint, kind):
    ckpt = wan22_checkpoint(kind)
    kw = dict(height=32, width=48, num_frames=5, num_inference_steps=4, guidance_scale=4.0, guidance_scale_2=2.0,
              max_sequence_length=TEXT_LEN if kind.startswith("i2v") else 16)
    if kind.startswith("i2v"):
        kw["image"] = _image()
    resident = diffc.load(ckpt, device="cuda", dtype="float32").generate(PROMPT, seed=3, progress=False, **kw)
    for mode in ("model", "layerwise"):
        pipe = diffc.load(ckpt, device="cuda", dtype="float32", offload=mode)
        out = pipe.generate(PROMPT, seed=3, progress=False, **kw)
        assert np.array_equal(out.frames, resident.frames), mode
