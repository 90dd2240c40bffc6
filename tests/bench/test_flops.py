"""bench.flops against torch's FlopCounterMode on tiny native models, and against the published figures."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench.flops import flux_dit_flops, wan_dit_flops
from bench.specs import SPECS
from diffc.models.flux.transformer import FLUX_TRANSFORMER_SPECS, FluxTransformer2DModel
from diffc.models.wan.transformer import WAN_TRANSFORMER_SPECS, WanTransformer3DModel

TINY_FLUX = FLUX_TRANSFORMER_SPECS["tiny"]
TINY_WAN = WAN_TRANSFORMER_SPECS["tiny"]

# (config, batch, latent h2, latent w2 (packed), text tokens)
FLUX_CASES = [
    (TINY_FLUX, 1, 4, 6, 7),
    (dataclasses.replace(TINY_FLUX, guidance_embeds=False, num_attention_heads=3, attention_head_dim=8,
                         axes_dims_rope=(2, 2, 4), num_layers=2, num_single_layers=1), 2, 3, 5, 4),
]
# (config, batch, latent frames, height, width, text tokens)
WAN_CASES = [
    (TINY_WAN, 1, 2, 4, 6, 5),
    (dataclasses.replace(TINY_WAN, num_attention_heads=3, attention_head_dim=8, num_layers=1, ffn_dim=20,
                         patch_size=(2, 2, 2)), 2, 4, 6, 4, 3),
]


def counted(model: torch.nn.Module, **inputs) -> int:
    # CPU SDPA kernels are not in the flop counter's table; the math path decomposes into counted matmuls
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("cfg,batch,h2,w2,txt", FLUX_CASES)
def test_flux_flops_match_flop_counter(cfg, batch, h2, w2, txt):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(cfg).eval()
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h2).float(), torch.arange(w2).float(),
                                     indexing="ij"), -1).reshape(-1, 3)
    inputs = dict(hidden_states=torch.randn(batch, h2 * w2, cfg.in_channels),
                  encoder_hidden_states=torch.randn(batch, txt, cfg.joint_attention_dim),
                  pooled_projections=torch.randn(batch, cfg.pooled_projection_dim),
                  timestep=torch.full((batch,), 0.5), img_ids=ids, txt_ids=torch.zeros(txt, 3),
                  guidance=torch.full((batch,), 3.5) if cfg.guidance_embeds else None)
    expected = flux_dit_flops(cfg, batch, h2 * w2, txt)
    assert counted(model, **inputs) == expected.total
    assert expected.attention > 0 and expected.linear > 0


@pytest.mark.parametrize("cfg,batch,f,h,w,txt", WAN_CASES)
def test_wan_flops_match_flop_counter(cfg, batch, f, h, w, txt):
    torch.manual_seed(0)
    model = WanTransformer3DModel(cfg).eval()
    inputs = dict(hidden_states=torch.randn(batch, cfg.in_channels, f, h, w), timestep=torch.full((batch,), 500),
                  encoder_hidden_states=torch.randn(batch, txt, cfg.text_dim))
    assert counted(model, **inputs) == wan_dit_flops(cfg, batch, f, h, w, txt).total


def test_real_sizes_match_published_figures():
    # DESIGN.md: FLUX.1-dev 1024² (4096 + 512 tokens) 74.4 TFLOP; Wan2.1-1.3B 832x480x81 (32,760 tokens) 283 TFLOP
    assert flux_dit_flops(SPECS["flux-dev"].transformer, 1, 4096, 512).total / 1e12 == pytest.approx(74.4, abs=0.05)
    assert wan_dit_flops(SPECS["wan-1.3b"].transformer, 1, 21, 60, 104, 512).total / 1e12 == pytest.approx(283.0, abs=0.05)
