"""Native 2D KL autoencoder, loading diffusers ``AutoencoderKL`` checkpoints by name.

This is the FLUX.1 VAE (and the Stable Diffusion family's). ``decode`` takes raw latents: the
pipeline applies ``z / scaling_factor + shift_factor`` before calling it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import CheckpointError, InvalidArgumentError
from .config import ModelConfig
from .vae_blocks import ACTIVATIONS, Decoder, Encoder, FusedKernels

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)

# Bounds diffusers' DiagonalGaussianDistribution clamps the log-variance to.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig(ModelConfig):
    """Fields and defaults of diffusers' ``AutoencoderKL`` config.json.

    Only ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` blocks are supported; ``latents_mean``,
    ``latents_std``, ``force_upcast`` and ``sample_size`` are carried for the pipeline and do not
    change the module.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for name, accepted in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            for value in getattr(self, name):
                if value not in accepted:
                    raise CheckpointError(
                        f"{name}: unsupported block type {value!r} for AutoencoderKL; accepted: {list(accepted)}"
                    )
            if len(getattr(self, name)) != len(self.block_out_channels):
                raise CheckpointError(
                    f"{name}: has {len(getattr(self, name))} entries but block_out_channels has "
                    f"{len(self.block_out_channels)}; they must be the same length"
                )
        if self.act_fn not in ACTIVATIONS:
            raise CheckpointError(f"act_fn: unknown activation {self.act_fn!r}; accepted: {sorted(ACTIVATIONS)}")
        for width in self.block_out_channels:
            if width % self.norm_num_groups:
                raise CheckpointError(
                    f"norm_num_groups: {self.norm_num_groups} does not divide block_out_channels entry {width}"
                )
        if self.layers_per_block < 1:
            raise CheckpointError(f"layers_per_block: must be >= 1, got {self.layers_per_block}")
        if self.scaling_factor == 0:
            raise CheckpointError("scaling_factor: must not be 0 (the pipelines divide the latents by it)")


def _uniform_config(block_out_channels: tuple[int, ...], **kwargs) -> AutoencoderKLConfig:
    n = len(block_out_channels)
    return AutoencoderKLConfig(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=block_out_channels,
        **kwargs,
    )


AUTOENCODER_KL_SPECS: dict[str, AutoencoderKLConfig] = {
    # black-forest-labs/FLUX.1-dev and -schnell vae/config.json: 8x downsampling, 16 latent channels.
    "flux": _uniform_config(
        (128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    # FLUX-shaped miniature for CPU tests: 2x downsampling, 16 latent channels.
    "tiny": _uniform_config(
        (32, 64),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
}


class AutoencoderKL(nn.Module):
    """KL-regularised convolutional autoencoder with diffusers' ``AutoencoderKL`` weight names.

    - ``encode(x)``: image (B, in_channels, H, W) -> ``(mean, logvar)``, each
      (B, latent_channels, H/f, W/f), ``logvar`` clamped to [-30, 20];
    - ``decode(z)``: raw latents (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f);

    with ``f = 2 ** (len(block_out_channels) - 1)`` (8 for FLUX.1). Calling the module decodes.
    """

    config_class = AutoencoderKLConfig
    # The encoder and decoder are ladders of blocks whose widths, resolutions and resnet counts
    # differ from one step to the next, so there is no list of identical blocks to offload or
    # compile one at a time.
    _repeated_blocks: tuple[str, ...] = ()
    _keep_in_fp32_modules: tuple[str, ...] = ()

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        self.config = config
        common = dict(
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            groups=config.norm_num_groups,
            act_fn=config.act_fn,
            mid_block_add_attention=config.mid_block_add_attention,
        )
        self.encoder = Encoder(config.in_channels, config.latent_channels, **common)
        self.decoder = Decoder(config.latent_channels, config.out_channels, **common)
        c = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, kernel_size=1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, kernel_size=1) if config.use_post_quant_conv else None

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        """The config's ``shift_factor``; 0.0 when the checkpoint has none (Stable Diffusion VAEs)."""
        return 0.0 if self.config.shift_factor is None else self.config.shift_factor

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def spatial_compression_ratio(self) -> int:
        """:attr:`spatial_compression`, under the name the video VAEs and diffusers use."""
        return self.spatial_compression

    def set_fused_kernels(self, enabled: bool) -> None:
        """Run every ``act(GroupNorm(x))`` as one fused op (``diffc::group_norm``, the producing convolution's bias
        folded in) on channels-last maps, with the convolutions' weights channels-last too (cuDNN's own layout: no
        transposes), where the kernels run (a GPU, or Triton's interpreter).

        torch's group norm reduces each (sample, group) in one thread block, 32 for a batch-1 decode: 46 of the 89
        ms of a FLUX.1 1024² decode on an H100. The compiled runtime turns this on with the compiled DiT. Off (the
        default), the VAE runs diffusers' op sequence in its layout; on, values can differ from it by a rounding
        where the kernels' float32 sums run in another order or cuDNN picks another algorithm for the layout.
        """
        layout = torch.channels_last if enabled else torch.contiguous_format
        for module in self.modules():
            if isinstance(module, FusedKernels):
                module.fused_kernels = bool(enabled)
            elif isinstance(module, nn.Conv2d):
                module.weight.data = module.weight.data.contiguous(memory_format=layout)

    @property
    def uses_fused_kernels(self) -> bool:
        """Whether ``set_fused_kernels(True)`` is in effect."""
        return self.decoder.fused_kernels

    def _layout(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` channels-last where the fused path runs on it (its layout), else as it is."""
        return t.contiguous(memory_format=torch.channels_last) if self.decoder.fuses(t) else t

    def _check_input(self, name: str, t: torch.Tensor, channels: int) -> None:
        if t.ndim != 4 or t.shape[1] != channels:
            raise InvalidArgumentError(
                name, f"expected shape (batch, {channels}, height, width), got {tuple(t.shape)}"
            )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (B, in_channels, H, W) -> (mean, logvar), each (B, latent_channels, H/f, W/f)."""
        self._check_input("x", x, self.config.in_channels)
        moments = self.encoder(self._layout(x))  # (B, 2 * latent_channels, H/f, W/f)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = torch.chunk(moments.contiguous(), 2, dim=1)
        return mean, torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f), roughly in [-1, 1]."""
        self._check_input("z", z, self.config.latent_channels)
        z = self._layout(z)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).contiguous()  # the fused path's channels-last image, in the usual layout

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)
