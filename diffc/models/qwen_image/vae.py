"""Qwen-Image's VAE (diffusers ``AutoencoderKLQwenImage``): the Wan2.1 causal 3-D VAE, same modules and math.

Its checkpoint has the Wan2.1 VAE's tensor names and shapes; only config.json spells the channels
``input_channels`` and leaves the compression factors implicit (8x spatial, ``2 ** sum(temperal_downsample)``
temporal). So this is diffc's Wan VAE with a config that reads Qwen's fields.
"""

from __future__ import annotations

import dataclasses

from ..wan.vae import WAN_VAE_SPECS, AutoencoderKLWan, AutoencoderKLWanConfig


@dataclasses.dataclass(frozen=True)
class AutoencoderKLQwenImageConfig(AutoencoderKLWanConfig):
    """diffusers' ``AutoencoderKLQwenImage`` config fields (defaults: Qwen-Image's, the Wan2.1 latent statistics)."""

    input_channels: int = 3

    def __post_init__(self):
        # Qwen's config has no in/out channels, patch size or scale factors: derive the Wan fields from its own
        set_ = object.__setattr__
        set_(self, "in_channels", self.input_channels)
        set_(self, "out_channels", self.input_channels)
        set_(self, "decoder_base_dim", None)
        set_(self, "is_residual", False)
        set_(self, "patch_size", None)
        set_(self, "scale_factor_spatial", 2 ** len(self.temperal_downsample))
        set_(self, "scale_factor_temporal", 2 ** sum(bool(d) for d in self.temperal_downsample))


class AutoencoderKLQwenImage(AutoencoderKLWan):
    """Image (B, 3, 1, H, W) <-> latents (B, z_dim, 1, H/8, W/8); see :class:`AutoencoderKLWan`."""

    config_class = AutoencoderKLQwenImageConfig


QWEN_IMAGE_VAE_SPECS = {
    "qwen-image": AutoencoderKLQwenImageConfig(),  # Qwen/Qwen-Image vae/config.json
    "tiny": AutoencoderKLQwenImageConfig(**{k: v for k, v in dataclasses.asdict(WAN_VAE_SPECS["tiny"]).items()
                                            if k in ("base_dim", "dim_mult", "num_res_blocks")}),
}
