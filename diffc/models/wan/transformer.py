"""Wan2.1 text-to-video diffusion transformer (diffusers ``WanTransformer3DModel``)."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ...errors import CheckpointError, InvalidArgumentError
from ..config import ModelConfig
from ..structure import BlockStreams, TeaCacheFit, TeaCacheSpec
from .blocks import FP32LayerNorm, WanConditionEmbedder, WanTransformerBlock, rope_frequencies


@dataclasses.dataclass(frozen=True)
class WanTransformerConfig(ModelConfig):
    """Fields and defaults of diffusers' ``WanTransformer3DModel`` config.json.

    ``image_dim`` (with ``added_kv_proj_dim``, Wan2.1 I2V) adds the image embedder and the image
    key/value projections of the cross-attention; ``pos_embed_seq_len`` is the first-last-frame
    variant's image position table. ``qk_norm`` must be ``"rms_norm_across_heads"``.
    """

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    def __post_init__(self):
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise CheckpointError(
                f"WanTransformer3DModel: image_dim ({self.image_dim}) and added_kv_proj_dim "
                f"({self.added_kv_proj_dim}) must be set together (image-to-video) or both unset"
            )
        if self.added_kv_proj_dim is not None and self.added_kv_proj_dim != self.inner_dim:
            raise CheckpointError(
                f"WanTransformer3DModel: added_kv_proj_dim must equal the model width "
                f"({self.inner_dim}, the image embedder's output), got {self.added_kv_proj_dim}"
            )
        if self.qk_norm != "rms_norm_across_heads":
            raise CheckpointError(
                f"WanTransformer3DModel: qk_norm={self.qk_norm!r} is not supported; "
                "accepted: 'rms_norm_across_heads'"
            )
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise CheckpointError(f"WanTransformer3DModel: patch_size must be 3 positive ints, got {self.patch_size}")
        if self.attention_head_dim % 2 or self.attention_head_dim < 6:
            raise CheckpointError(
                f"WanTransformer3DModel: attention_head_dim must be even and >= 6 for the 3-D RoPE, "
                f"got {self.attention_head_dim}"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


# Published transformer configs (Wan-AI/Wan2.1-T2V-*-Diffusers) plus a tiny one for tests.
WAN_TRANSFORMER_SPECS: dict[str, WanTransformerConfig] = {
    "wan2.1-t2v-1.3b": WanTransformerConfig(
        num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096
    ),
    "wan2.1-t2v-14b": WanTransformerConfig(
        num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096
    ),
    # Wan-AI/Wan2.1-I2V-14B-{480P,720P}-Diffusers: latents + mask + first-frame latents in, CLIP ViT-H image tokens
    "wan2.1-i2v-14b": WanTransformerConfig(
        num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096, in_channels=36,
        out_channels=16, image_dim=1280, added_kv_proj_dim=5120,
    ),
    # Wan-AI/Wan2.2-TI2V-5B-Diffusers (48-channel Wan2.2 VAE latents, per-token timesteps)
    "wan2.2-ti2v-5b": WanTransformerConfig(
        num_attention_heads=24, attention_head_dim=128, ffn_dim=14336, num_layers=30, text_dim=4096, in_channels=48,
        out_channels=48,
    ),
    # Wan-AI/Wan2.2-T2V-A14B-Diffusers: two experts (transformer, transformer_2) of this config each
    "wan2.2-t2v-a14b": WanTransformerConfig(
        num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096
    ),
    # Wan-AI/Wan2.2-I2V-A14B-Diffusers: two experts, first-frame conditioning by channels only (no image encoder)
    "wan2.2-i2v-a14b": WanTransformerConfig(
        num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096, in_channels=36,
        out_channels=16,
    ),
    "tiny": WanTransformerConfig(
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=37,
        num_layers=2,
    ),
}


class WanTransformer3DModel(nn.Module):
    """Wan2.1 / Wan2.2 DiT: 3-D patch embedding, ``num_layers`` modulated blocks with 3-D RoPE, unpatchify.

    ``forward(hidden_states, timestep, encoder_hidden_states)``:

    - ``hidden_states``: (B, in_channels, F, H, W) latents; F, H, W divisible by ``patch_size``;
    - ``timestep``: (B,) one timestep per sample, or (B, S) one per patch token (S = F*H*W / prod(patch));
    - ``encoder_hidden_states``: (B, L, text_dim) text-encoder states;
    - ``encoder_hidden_states_image``: (B, L_img, image_dim) image-encoder states (image-to-video
      checkpoints with ``image_dim``), else None;
    - returns (B, out_channels, F, H, W) in ``hidden_states``' dtype.
    """

    config_class = WanTransformerConfig
    _repeated_blocks = ("blocks",)
    _keep_in_fp32_modules = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
    _block_streams = {"blocks": BlockStreams(inputs=("x",), outputs="x")}
    # TeaCache's "retention steps" variant for Wan2.1 T2V: the signal is the blocks' timestep modulation e0
    # (the `temb` argument), the first 5 steps are computed, with the polynomials its authors fitted per size:
    # ali-vilab/TeaCache, TeaCache4Wan2.1/teacache_generate.py (use_ret_steps, commit 7c10efc). Thresholds in
    # its README: 1.3B 0.05 (slow) / 0.10 (fast), 14B 0.10 / 0.20.
    _teacache = TeaCacheSpec(
        module=None, args=("temb",), output=None, warmup_steps=5, final_steps=0,
        fits=(
            TeaCacheFit(match=(("num_layers", 30), ("num_attention_heads", 12)),
                        coefficients=(-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
                        threshold=0.1, name="Wan2.1-T2V-1.3B"),
            TeaCacheFit(match=(("num_layers", 40), ("num_attention_heads", 40)),
                        coefficients=(-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
                        threshold=0.2, name="Wan2.1-T2V-14B"),
        ),
    )

    def __init__(self, config: WanTransformerConfig):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        out_channels = config.out_channels or config.in_channels

        self.patch_embedding = nn.Conv3d(
            config.in_channels, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.condition_embedder = WanConditionEmbedder(dim, config.freq_dim, config.text_dim, config.image_dim,
                                                       config.pos_embed_seq_len)
        self.blocks = nn.ModuleList(
            [
                WanTransformerBlock(dim, config.ffn_dim, config.num_attention_heads, config.cross_attn_norm, config.eps,
                                    config.added_kv_proj_dim)
                for _ in range(config.num_layers)
            ]
        )
        self.norm_out = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, out_channels * math.prod(config.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def _check_inputs(self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> tuple[int, int, int]:
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise InvalidArgumentError(
                "hidden_states", f"expected (batch, {cfg.in_channels}, frames, height, width), got {tuple(x.shape)}"
            )
        batch, sizes = x.shape[0], x.shape[2:]
        if any(n % p for n, p in zip(sizes, cfg.patch_size)):
            raise InvalidArgumentError(
                "hidden_states",
                f"frames, height, width {tuple(sizes)} must be divisible by patch_size {cfg.patch_size}",
            )
        grid = tuple(n // p for n, p in zip(sizes, cfg.patch_size))
        if max(grid) > cfg.rope_max_seq_len:
            raise InvalidArgumentError(
                "hidden_states",
                f"latent grid {grid} exceeds rope_max_seq_len={cfg.rope_max_seq_len} along an axis",
            )
        tokens = math.prod(grid)
        if not (timestep.shape == (batch,) or timestep.shape == (batch, tokens)):
            raise InvalidArgumentError(
                "timestep", f"expected shape ({batch},) or ({batch}, {tokens}), got {tuple(timestep.shape)}"
            )
        if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != cfg.text_dim:
            raise InvalidArgumentError(
                "encoder_hidden_states", f"expected ({batch}, seq_len, {cfg.text_dim}), got {tuple(text.shape)}"
            )
        return grid

    def _check_image(self, image: torch.Tensor | None, batch: int) -> None:
        cfg = self.config
        if cfg.image_dim is None:
            if image is not None:
                raise InvalidArgumentError("encoder_hidden_states_image", "this checkpoint has no image embedder "
                                           "(image_dim is unset); pass None")
            return
        if image is None:
            raise InvalidArgumentError("encoder_hidden_states_image", "this image-to-video checkpoint needs the "
                                       f"image encoder's states, (batch, tokens, {cfg.image_dim})")
        per_sample = 2 if cfg.pos_embed_seq_len else 1
        if image.ndim != 3 or image.shape[0] != batch * per_sample or image.shape[2] != cfg.image_dim:
            raise InvalidArgumentError("encoder_hidden_states_image", f"expected ({batch * per_sample}, tokens, "
                                       f"{cfg.image_dim}), got {tuple(image.shape)}")
        if cfg.pos_embed_seq_len and 2 * image.shape[1] != cfg.pos_embed_seq_len:
            raise InvalidArgumentError("encoder_hidden_states_image", f"pos_embed_seq_len={cfg.pos_embed_seq_len} "
                                       f"needs {cfg.pos_embed_seq_len // 2} tokens per image, got {image.shape[1]}")

    def forward(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow for latents (B, C, F, H, W) at ``timestep`` given text states (and, for
        image-to-video checkpoints with an image encoder, its states (B, L_img, image_dim)); see the class doc."""
        f, h, w = self._check_inputs(hidden_states, timestep, encoder_hidden_states)
        self._check_image(encoder_hidden_states_image, hidden_states.shape[0])
        batch = hidden_states.shape[0]
        pt, ph, pw = self.config.patch_size
        rope = rope_frequencies(self.config.attention_head_dim, (f, h, w), hidden_states.device)

        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()  # (B, S, dim)

        timestep = timestep if timestep.ndim == 2 else timestep[:, None]  # (B, T), T = 1 or S
        temb, temb_proj, context = self.condition_embedder(timestep, encoder_hidden_states)
        temb_proj = temb_proj.unflatten(2, (6, -1))  # (B, T, 6, dim)

        if encoder_hidden_states_image is None:
            for block in self.blocks:
                x = block(x, context, temb_proj, rope)
        else:
            image_context = self.condition_embedder.image_embedder(encoder_hidden_states_image)  # (B, L_img, dim)
            for block in self.blocks:
                x = block(x, context, temb_proj, rope, image_context)

        shift, scale = (self.scale_shift_table + temb.unsqueeze(2)).unbind(2)  # (B, T, dim) each
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)  # (B, S, pt * ph * pw * C)

        x = x.reshape(batch, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C, F, H, W)
