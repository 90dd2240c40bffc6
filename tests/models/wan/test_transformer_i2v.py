"""Parity of the native Wan transformer's image-to-video parts (image embedder, added key/value
cross-attention, 36-channel input, per-token timesteps) with diffusers' WanTransformer3DModel."""

from __future__ import annotations

import pytest
import torch

from diffc.errors import CheckpointError, InvalidArgumentError
from diffc.models.wan.transformer import WanTransformer3DModel, WanTransformerConfig
from tests.helpers import REL_TOL, rel_err

diffusers = pytest.importorskip("diffusers")

TEXT_LEN = 512  # diffusers' Wan attention splits image tokens from text at 512 text tokens (hard-coded)
I2V = dict(num_attention_heads=2, attention_head_dim=12, in_channels=9, out_channels=4, text_dim=16, freq_dim=16,
           ffn_dim=37, num_layers=2, image_dim=20, added_kv_proj_dim=24)
FLF2V = dict(I2V, pos_embed_seq_len=10)


def _pair(cfg: dict):
    torch.manual_seed(0)
    ref = diffusers.WanTransformer3DModel(**cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name or "pos_embed" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    native = WanTransformer3DModel(WanTransformerConfig.from_dict(dict(ref.config))).eval()
    native.load_state_dict(ref.state_dict(), strict=True)
    return ref, native


@pytest.mark.parametrize("cfg,images,per_token", [(I2V, 1, False), (I2V, 1, True), (FLF2V, 2, False)],
                         ids=["i2v", "i2v-per-token", "flf2v"])
def test_matches_diffusers(cfg, images, per_token):
    ref, native = _pair(cfg)
    g = torch.Generator().manual_seed(1)
    batch, shape = 2, (2, 4, 6)
    x = torch.randn(batch, cfg["in_channels"], *shape, generator=g)
    tokens = shape[0] * shape[1] * shape[2] // 4
    t = torch.rand(batch, tokens if per_token else 1, generator=g).squeeze(-1) * 1000 if per_token else \
        torch.tensor([999.0, 321.0])
    text = torch.randn(batch, TEXT_LEN, cfg["text_dim"], generator=g)
    image = torch.randn(batch * images, 5, cfg["image_dim"], generator=g)
    with torch.no_grad():
        want = ref(hidden_states=x, timestep=t, encoder_hidden_states=text, encoder_hidden_states_image=image,
                   return_dict=False)[0]
        got = native(hidden_states=x, timestep=t, encoder_hidden_states=text, encoder_hidden_states_image=image)
    assert rel_err(got, want) < REL_TOL[torch.float32]
    # the image tokens matter: dropping them changes the prediction
    other = torch.randn_like(image)
    with torch.no_grad():
        moved = native(hidden_states=x, timestep=t, encoder_hidden_states=text, encoder_hidden_states_image=other)
    assert rel_err(moved, want) > 1e-3


def test_image_states_checked():
    _, native = _pair(I2V)
    x = torch.randn(1, 9, 1, 4, 4)
    t, text = torch.tensor([5.0]), torch.randn(1, 3, 16)
    with pytest.raises(InvalidArgumentError, match="encoder_hidden_states_image.*needs"):
        native(hidden_states=x, timestep=t, encoder_hidden_states=text)
    with pytest.raises(InvalidArgumentError, match="encoder_hidden_states_image.*20"):
        native(hidden_states=x, timestep=t, encoder_hidden_states=text, encoder_hidden_states_image=torch.randn(1, 5, 7))


def test_config_needs_both_image_fields():
    with pytest.raises(CheckpointError, match="image_dim.*added_kv_proj_dim"):
        WanTransformerConfig.from_dict(dict(I2V, added_kv_proj_dim=None))
