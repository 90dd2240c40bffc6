"""Wan2.1 and Wan2.2 video VAEs (diffusers ``AutoencoderKLWan``), native implementation.

Decoding runs one latent frame at a time through a causal feature cache, so memory is bounded by one
chunk whatever the clip length; optional spatial tiling with linear blending bounds it further for
large frames. Numerics follow diffusers' ``decode`` and ``enable_tiling()`` + ``tiled_decode``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from ...errors import CheckpointError, InvalidArgumentError
from ..config import ModelConfig
from .vae_blocks import Decoder3d, Encoder3d, patchify, unpatchify
from .vae_causal import CausalConv3d, FeatureCache, NormSiluConv

_WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
_WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
_WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
_WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class AutoencoderKLWanConfig(ModelConfig):
    """Fields and defaults of diffusers' ``AutoencoderKLWan`` config (``temperal`` is its spelling)."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = _WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = _WAN21_LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8


WAN_VAE_SPECS: dict[str, AutoencoderKLWanConfig] = {
    # Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers vae/config.json
    "wan2.1": AutoencoderKLWanConfig(),
    # Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json: residual stages, 2x2 patches, 16x spatial, 48 channels
    "wan2.2": AutoencoderKLWanConfig(
        base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
        patch_size=2, scale_factor_spatial=16, latents_mean=_WAN22_LATENTS_MEAN, latents_std=_WAN22_LATENTS_STD,
    ),
    # 8x spatial, 4x temporal like Wan2.1, 16 latent channels, about 0.3 M parameters
    "tiny": AutoencoderKLWanConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
}


def _check_patch(config: AutoencoderKLWanConfig) -> None:
    """``patch_size`` is null or positive; ``in_channels``/``out_channels`` count whole p x p pixel patches."""
    p = config.patch_size
    if p is None:
        return
    if p < 1:
        raise CheckpointError(f"AutoencoderKLWan: patch_size must be null or a positive integer, got {p}")
    if config.scale_factor_spatial is not None and config.scale_factor_spatial % p != 0:
        raise CheckpointError(
            f"AutoencoderKLWan: scale_factor_spatial={config.scale_factor_spatial} must be a multiple of "
            f"patch_size={p} (the patches are part of the spatial compression)"
        )
    for name in ("in_channels", "out_channels"):
        if getattr(config, name) % (p * p) != 0:
            raise CheckpointError(
                f"AutoencoderKLWan: {name}={getattr(config, name)} counts the channels of {p}x{p} pixel patches "
                f"(patch_size={p}), so it must be a multiple of {p * p}"
            )


def _blend(prev: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> None:
    """Cross-fade the first ``extent`` rows/columns of ``tile`` (in place) with the last of ``prev``."""
    extent = min(prev.shape[dim], tile.shape[dim], extent)
    if extent <= 0:
        return
    ramp = torch.arange(extent, dtype=torch.float64) / extent  # weight of ``tile`` at each offset
    shape = [1] * tile.dim()
    shape[dim] = extent
    w_tile = ramp.to(device=tile.device, dtype=torch.float32).view(shape)
    w_prev = (1 - ramp).to(device=tile.device, dtype=torch.float32).view(shape)
    head = tile.narrow(dim, 0, extent)
    tail = prev.narrow(dim, prev.shape[dim] - extent, extent)
    head.copy_((tail.float() * w_prev).to(tile.dtype) + (head.float() * w_tile).to(tile.dtype))


class AutoencoderKLWan(nn.Module):
    """Causal 3-D VAE of Wan: video (B, 3, 1 + 4k, H, W) <-> latents (B, z_dim, 1 + k, H/s, W/s).

    Wan2.1 (``is_residual`` false, no ``patch_size``): s = 8, 16 channels. Wan2.2 (``is_residual``
    true, ``patch_size`` 2): 2x2 pixel patches are folded into channels before the encoder and
    unfolded after the decoder, and each stage has a parameter-free shortcut; s = 16, 48 channels.
    Latents in and out of this module are raw (not normalised); ``denormalize``/``normalize``
    convert to and from the DiT's latent space.
    """

    config_class = AutoencoderKLWanConfig
    _repeated_blocks: tuple[str, ...] = ()
    _keep_in_fp32_modules: tuple[str, ...] = ()

    def __init__(self, config: AutoencoderKLWanConfig) -> None:
        super().__init__()
        _check_patch(config)
        if len(config.temperal_downsample) < len(config.dim_mult) - 1:
            raise CheckpointError(
                f"AutoencoderKLWan: temperal_downsample needs {len(config.dim_mult) - 1} entries "
                f"(one per downsampling stage of dim_mult={list(config.dim_mult)}), "
                f"got {len(config.temperal_downsample)}"
            )
        self.config = config
        c = config
        try:
            self.encoder = Encoder3d(
                c.in_channels, c.base_dim, c.z_dim * 2, c.dim_mult, c.num_res_blocks, c.attn_scales,
                c.temperal_downsample, c.dropout, c.is_residual,
            )  # fmt: skip
            self.quant_conv = CausalConv3d(c.z_dim * 2, c.z_dim * 2, 1)
            self.post_quant_conv = CausalConv3d(c.z_dim, c.z_dim, 1)
            self.decoder = Decoder3d(
                c.decoder_base_dim or c.base_dim, c.z_dim, c.dim_mult, c.num_res_blocks,
                c.temperal_downsample[::-1], c.dropout, c.out_channels, c.is_residual,
            )  # fmt: skip
        except ValueError as exc:
            raise CheckpointError(
                f"AutoencoderKLWan: dim_mult={list(c.dim_mult)} (base_dim={c.base_dim}, "
                f"decoder_base_dim={c.decoder_base_dim}) does not fit the residual (Wan2.2) stages: {exc}"
            ) from None

    def set_fused_kernels(self, enabled: bool) -> None:
        """Run every ``silu(RMSNorm(x))`` before a cached causal conv as one fused kernel writing the conv's
        padded input (``diffc::channel_rms_norm_silu``) where the kernel runs (a GPU, or Triton's interpreter),
        with the convolutions' weights and activations channels-last (cuDNN's own layout: no transposes).

        The compiled runtime turns this on with the compiled DiT. Off (the default), the VAE runs diffusers'
        op sequence in its layout; on, values can differ from it by a rounding where the kernel's float32
        norm sums in another order or cuDNN picks another algorithm for the other layout.
        """
        conv3d, conv2d = ((torch.channels_last_3d, torch.channels_last) if enabled else
                          (torch.contiguous_format, torch.contiguous_format))
        for module in self.modules():
            if isinstance(module, NormSiluConv):
                module.fused_kernels = bool(enabled)
            elif isinstance(module, (nn.Conv3d, nn.Conv2d)):
                layout = conv3d if isinstance(module, nn.Conv3d) else conv2d
                module.weight.data = module.weight.data.contiguous(memory_format=layout)

    @property
    def uses_fused_kernels(self) -> bool:
        """Whether ``set_fused_kernels(True)`` is in effect."""
        return any(m.fused_kernels for m in self.modules() if isinstance(m, NormSiluConv))

    @property
    def patch_size(self) -> int:
        return self.config.patch_size or 1

    @property
    def video_channels(self) -> int:
        """Channels of the pixel video (3 for both Wan VAEs; ``in_channels`` counts patched channels)."""
        return self.config.in_channels // self.patch_size**2

    @property
    def spatial_compression_ratio(self) -> int:
        return self.config.scale_factor_spatial

    @property
    def temporal_compression_ratio(self) -> int:
        return self.config.scale_factor_temporal

    # ---- latent normalisation -------------------------------------------------------------------

    @property
    def latents_mean(self) -> tuple[float, ...]:
        return self._latent_stat("latents_mean")

    @property
    def latents_std(self) -> tuple[float, ...]:
        return self._latent_stat("latents_std")

    def _latent_stat(self, name: str) -> tuple[float, ...]:
        values = getattr(self.config, name)
        if len(values) != self.config.z_dim:
            raise CheckpointError(f"AutoencoderKLWan: {name} has {len(values)} values, z_dim is {self.config.z_dim}")
        if name == "latents_std" and 0 in values:
            raise CheckpointError(f"AutoencoderKLWan: latents_std holds 0 (channel {values.index(0)}); the latents "
                                  "are scaled by 1 / latents_std")
        return values

    def check_latent_stats(self) -> None:
        """Raise ``CheckpointError`` unless ``latents_mean``/``latents_std`` fit ``z_dim`` (and no std is 0): a
        pipeline checks it before any work, since it is read only when the latents are (de)normalised."""
        self._latent_stat("latents_mean")
        self._latent_stat("latents_std")

    def _stats_like(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.latents_mean).view(shape).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(self.latents_std).view(shape).to(latents.device, latents.dtype)
        return mean, inv_std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """DiT-space latents -> VAE latents, ``latents / (1 / std) + mean`` as the Wan pipeline does."""
        mean, inv_std = self._stats_like(latents)
        return latents / inv_std + mean

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents -> DiT-space latents, ``(latents - mean) * (1 / std)`` as the Wan I2V pipeline does."""
        mean, inv_std = self._stats_like(latents)
        return (latents - mean) * inv_std

    # ---- encode ---------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Video (B, 3, 1 + 4k, H, W) in [-1, 1] -> posterior (mean, logvar), raw latent space.

        Both are (B, z_dim, T_lat, H / s, W / s) (T_lat = 1 + k, s = 8 for Wan2.1, 16 for Wan2.2); logvar
        is clamped to [-30, 20] like diffusers' ``DiagonalGaussianDistribution``. The Wan2.2 VAE needs H
        and W divisible by 16 (its shortcuts fold whole 2x2 blocks at every stage).
        """
        channels = self.video_channels
        if x.dim() != 5 or x.shape[1] != channels:
            raise InvalidArgumentError(
                "x", f"expected a video (batch, {channels}, frames, height, width), got {tuple(x.shape)}"
            )
        frames = x.shape[2]
        if (frames - 1) % 4 != 0:
            raise InvalidArgumentError("x", f"the number of frames must be 1 + 4k (1, 5, 9, ..., 81), got {frames}")
        multiple = self.patch_size * (2 ** (len(self.config.dim_mult) - 1) if self.config.is_residual else 1)
        if x.shape[3] % multiple or x.shape[4] % multiple:
            raise InvalidArgumentError(
                "x", f"height and width must be multiples of {multiple} for this VAE, got {x.shape[3]}x{x.shape[4]}"
            )
        x = patchify(x, self.patch_size)
        cache = FeatureCache()
        chunks = [x[:, :, :1]] + [x[:, :, i : i + 4] for i in range(1, frames, 4)]
        outs = []
        for chunk in chunks:
            cache.next_chunk()
            outs.append(self.encoder(chunk, cache))
        h = self.quant_conv(torch.cat(outs, dim=2))
        mean, logvar = h.chunk(2, dim=1)
        return mean.contiguous(), torch.clamp(logvar, -30.0, 20.0).contiguous()

    # ---- decode ---------------------------------------------------------------------------------

    def _decode_frames(self, z: torch.Tensor, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        # z: (b, z_dim, t, h, w) -> (b, out_channels, 1 + 4(t-1), h * s / p, w * s / p), patched and unclamped
        x = self.post_quant_conv(z)
        cache = FeatureCache()
        outs = []
        for i in range(x.shape[2]):
            cache.next_chunk()
            outs.append(self.decoder(x[:, :, i : i + 1], cache))
            if progress is not None:
                progress(i + 1, x.shape[2])
        return torch.cat(outs, dim=2)

    def decode(
        self,
        z: torch.Tensor,
        tiled: bool = False,
        tile_sample_min_height: int = 256,
        tile_sample_min_width: int = 256,
        tile_sample_stride_height: int = 192,
        tile_sample_stride_width: int = 192,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Raw latents (B, z_dim, T_lat, h, w) -> video (B, 3, 1 + 4(T_lat-1), s * h, s * w) in [-1, 1].

        ``progress(done, total)`` is called after each latent frame is decoded (of every tile, when tiled).

        ``z`` must already be de-normalised (see ``denormalize``). With ``tiled=True`` and a frame
        larger than one tile, the frame is decoded in overlapping tiles of ``tile_sample_min_*``
        pixels placed every ``tile_sample_stride_*`` pixels and blended linearly across the overlap,
        as diffusers does after ``enable_tiling(...)`` with the same four values (for the Wan2.2 VAE
        the blending happens on the decoder's patched output, before ``unpatchify``, as there).
        """
        if z.dim() != 5 or z.shape[1] != self.config.z_dim:
            raise InvalidArgumentError(
                "z", f"expected latents (batch, {self.config.z_dim}, frames, height, width), got {tuple(z.shape)}"
            )
        if tiled:
            tile = (tile_sample_min_height, tile_sample_min_width, tile_sample_stride_height, tile_sample_stride_width)
            self._check_tiles(*tile)
            ratio = self.spatial_compression_ratio
            if z.shape[3] > tile_sample_min_height // ratio or z.shape[4] > tile_sample_min_width // ratio:
                out = self._tiled_decode(z, *tile, progress=progress)
                return torch.clamp(unpatchify(out, self.patch_size), min=-1.0, max=1.0).contiguous()
        out = torch.clamp(unpatchify(self._decode_frames(z, progress), self.patch_size), min=-1.0, max=1.0)
        return out.contiguous()  # the fused kernels' channels-last chunks: returned in the usual layout

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Same as ``decode(z)`` (untiled): the VAE's job in a text-to-video pipeline."""
        return self.decode(z)

    def _check_tiles(self, min_h: int, min_w: int, stride_h: int, stride_w: int) -> None:
        ratio = self.spatial_compression_ratio
        values = {
            "tile_sample_min_height": min_h,
            "tile_sample_min_width": min_w,
            "tile_sample_stride_height": stride_h,
            "tile_sample_stride_width": stride_w,
        }
        for name, value in values.items():
            if not isinstance(value, int) or value <= 0 or value % ratio != 0:
                raise InvalidArgumentError(name, f"must be a positive multiple of {ratio} pixels, got {value!r}")
        if stride_h > min_h or stride_w > min_w:
            raise InvalidArgumentError(
                "tile_sample_stride_height" if stride_h > min_h else "tile_sample_stride_width",
                f"the stride must not exceed the tile size ({min_h}x{min_w}), got {stride_h}x{stride_w}",
            )

    def _tiled_decode(self, z: torch.Tensor, min_h: int, min_w: int, stride_h: int, stride_w: int,
                      progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        # z: (b, z_dim, t, h, w) -> (b, out_channels, t', h * ratio / p, w * ratio / p), patched and unclamped
        ratio = self.spatial_compression_ratio
        height, width = z.shape[3], z.shape[4]
        lat_h, lat_w = min_h // ratio, min_w // ratio
        lat_stride_h, lat_stride_w = stride_h // ratio, stride_w // ratio
        # Tiles are blended before unpatchify, in the decoder's output grid (patch_size times coarser).
        p = self.patch_size
        min_h, min_w, stride_h, stride_w = min_h // p, min_w // p, stride_h // p, stride_w // p
        starts = [(i, j) for i in range(0, height, lat_stride_h) for j in range(0, width, lat_stride_w)]

        def tile_progress(k: int):
            if progress is None:
                return None
            return lambda done, total: progress(k * total + done, len(starts) * total)

        tiles = [self._decode_frames(z[:, :, :, i : i + lat_h, j : j + lat_w], tile_progress(k))
                 for k, (i, j) in enumerate(starts)]
        per_row = len(range(0, width, lat_stride_w))
        rows = [tiles[r : r + per_row] for r in range(0, len(tiles), per_row)]
        # Tiles are blended in place, so a tile's lower neighbour sees its already blended pixels.
        out_rows = []
        for i, row in enumerate(rows):
            for j, tile in enumerate(row):
                if i > 0:
                    _blend(rows[i - 1][j], tile, min_h - stride_h, dim=3)
                if j > 0:
                    _blend(row[j - 1], tile, min_w - stride_w, dim=4)
            out_rows.append(torch.cat([tile[:, :, :, :stride_h, :stride_w] for tile in row], dim=4))
        return torch.cat(out_rows, dim=3)[:, :, :, : height * ratio // p, : width * ratio // p]
