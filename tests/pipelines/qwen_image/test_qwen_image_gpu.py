"""Qwen-Image on a GPU (bf16): DiT parity with diffusers at a realistic head size, and the tiny pipelines compiled
(fused Triton kernels, attention lowering) and under CUDA graphs against eager, with true CFG and an edit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffc
from diffc.models.qwen_image.transformer import QwenImageTransformer2DModel, QwenImageTransformerConfig
from tests.helpers import REL_TOL, psnr_uint8, rel_err

from .test_qwen_image_edit import picture

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
diffusers = pytest.importorskip("diffusers")
DEV = torch.device("cuda")
# 2 blocks of Qwen-Image's own head layout (heads of 128, axes (16, 56, 56)), 4 heads instead of 24
CONFIG = dict(in_channels=64, out_channels=16, num_layers=2, attention_head_dim=128, num_attention_heads=4,
              joint_attention_dim=256, axes_dims_rope=(16, 56, 56))


@pytest.mark.parametrize("padded", [False, True])
def test_dit_matches_diffusers_bf16(padded):
    torch.manual_seed(0)
    ref = diffusers.QwenImageTransformer2DModel(**CONFIG).to(DEV, torch.bfloat16).eval()
    model = QwenImageTransformer2DModel(QwenImageTransformerConfig(**CONFIG)).to(DEV, torch.bfloat16).eval()
    model.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    batch, shapes, n_txt = 2, ((1, 32, 32), (1, 24, 40)), 77
    mask = None
    if padded:
        mask = torch.ones(batch, n_txt, dtype=torch.long, device=DEV)
        mask[0, 50:] = 0
    inputs = dict(hidden_states=torch.randn(batch, 32 * 32 + 24 * 40, 64, generator=g).to(DEV, torch.bfloat16),
                  encoder_hidden_states=torch.randn(batch, n_txt, 256, generator=g).to(DEV, torch.bfloat16),
                  timestep=torch.tensor([0.3, 0.8], device=DEV, dtype=torch.bfloat16), encoder_hidden_states_mask=mask)
    with torch.no_grad():
        expected = ref(img_shapes=[list(shapes)] * batch, return_dict=False, **inputs)[0]
        out = model(img_shapes=shapes, **inputs)
    assert rel_err(out, expected) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("graphs", [False, True], ids=["compiled", "compiled+cuda-graphs"])
def test_compiled_pipeline_matches_eager(qwen_checkpoint, graphs):
    path, _ = qwen_checkpoint("t2i")
    pipe = diffc.load(path, device="cuda", cuda_graphs=graphs)
    request = dict(height=64, width=64, num_inference_steps=4, seed=3, progress=False, negative_prompt=" ",
                   true_cfg_scale=4.0)
    eager = np.asarray(pipe.generate("a red fox", **request).images[0])
    pipe.compile([{"height": 64, "width": 64}], log=lambda line: None)
    out = pipe.generate("a red fox in snow", **request)
    assert out.timings.runtime["compiled"]["eager_fallbacks"] == 0
    again = pipe.generate("a red fox", **request)
    assert psnr_uint8(np.asarray(again.images[0]), eager) >= 40.0


def test_edit_on_gpu_matches_cpu(qwen_checkpoint):
    path, _ = qwen_checkpoint("edit")
    kw = dict(image=picture(40, 24, 0), height=32, width=48, num_inference_steps=2, seed=5, progress=False)
    cpu = diffc.load(path, device="cpu").generate("make it night", **kw)
    gpu = diffc.load(path, device="cuda", dtype="fp32").generate("make it night", **kw)
    assert psnr_uint8(np.asarray(gpu.images[0]), np.asarray(cpu.images[0])) >= 40.0
