"""Wan2.1 video VAE (diffusers ``AutoencoderKLWan``), native implementation.

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
from .vae_blocks import CausalConv3d, Decoder3d, Encoder3d, FeatureCache

_WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
_WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
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
    # 8x spatial, 4x temporal like Wan2.1, 16 latent channels, about 0.3 M parameters
    "tiny": AutoencoderKLWanConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
}


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
    """Causal 3-D VAE of Wan2.1: video (B, 3, 1 + 4k, H, W) <-> latents (B, z_dim, 1 + k, H/8, W/8).

    Only the Wan2.1 layout is supported (``is_residual`` False, ``patch_size`` None); the Wan2.2 VAE
    config is refused with a ``CheckpointError``. Latents in and out of this module are raw (not
    normalised); ``denormalize``/``normalize`` convert to and from the DiT's latent space.
    """

    config_class = AutoencoderKLWanConfig
    _repeated_blocks: tuple[str, ...] = ()
    _keep_in_fp32_modules: tuple[str, ...] = ()

    def __init__(self, config: AutoencoderKLWanConfig) -> None:
        super().__init__()
        if config.is_residual or config.patch_size is not None:
            raise CheckpointError(
                "AutoencoderKLWan: the Wan2.2 VAE variant (is_residual=true or patch_size set, got "
                f"is_residual={config.is_residual}, patch_size={config.patch_size}) is not supported yet; "
                "only the Wan2.1 VAE (is_residual=false, patch_size=null) is"
            )
        if len(config.temperal_downsample) < len(config.dim_mult) - 1:
            raise CheckpointError(
                f"AutoencoderKLWan: temperal_downsample needs {len(config.dim_mult) - 1} entries "
                f"(one per downsampling stage of dim_mult={list(config.dim_mult)}), "
                f"got {len(config.temperal_downsample)}"
            )
        self.config = config
        c = config
        self.encoder = Encoder3d(
            c.in_channels, c.base_dim, c.z_dim * 2, c.dim_mult, c.num_res_blocks, c.attn_scales,
            c.temperal_downsample, c.dropout,
        )  # fmt: skip
        self.quant_conv = CausalConv3d(c.z_dim * 2, c.z_dim * 2, 1)
        self.post_quant_conv = CausalConv3d(c.z_dim, c.z_dim, 1)
        self.decoder = Decoder3d(
            c.decoder_base_dim or c.base_dim, c.z_dim, c.dim_mult, c.num_res_blocks,
            c.temperal_downsample[::-1], c.dropout, c.out_channels,
        )  # fmt: skip

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
        return values

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
        """Video (B, in_channels, 1 + 4k, H, W) in [-1, 1] -> posterior (mean, logvar), raw latent space.

        Both are (B, z_dim, T_lat, H / 8, W / 8) for Wan2.1 (T_lat = 1 + k); logvar is clamped to
        [-30, 20] like diffusers' ``DiagonalGaussianDistribution``.
        """
        if x.dim() != 5 or x.shape[1] != self.config.in_channels:
            raise InvalidArgumentError(
                "x", f"expected a video (batch, {self.config.in_channels}, frames, height, width), got {tuple(x.shape)}"
            )
        frames = x.shape[2]
        if (frames - 1) % 4 != 0:
            raise InvalidArgumentError("x", f"the number of frames must be 1 + 4k (1, 5, 9, ..., 81), got {frames}")
        cache = FeatureCache()
        chunks = [x[:, :, :1]] + [x[:, :, i : i + 4] for i in range(1, frames, 4)]
        outs = []
        for chunk in chunks:
            cache.next_chunk()
            outs.append(self.encoder(chunk, cache))
        h = self.quant_conv(torch.cat(outs, dim=2))
        mean, logvar = h.chunk(2, dim=1)
        return mean, torch.clamp(logvar, -30.0, 20.0)

    # ---- decode ---------------------------------------------------------------------------------

    def _decode_frames(self, z: torch.Tensor, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        # z: (b, z_dim, t, h, w) -> (b, out_channels, 1 + 4(t-1), 8h, 8w), unclamped
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
        """Raw latents (B, z_dim, T_lat, h, w) -> video (B, out_channels, 1 + 4(T_lat-1), 8h, 8w) in [-1, 1].

        ``progress(done, total)`` is called after each latent frame is decoded (of every tile, when tiled).

        ``z`` must already be de-normalised (see ``denormalize``). With ``tiled=True`` and a frame
        larger than one tile, the frame is decoded in overlapping tiles of ``tile_sample_min_*``
        pixels placed every ``tile_sample_stride_*`` pixels and blended linearly across the overlap,
        as diffusers does after ``enable_tiling(...)`` with the same four values.
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
                return torch.clamp(self._tiled_decode(z, *tile, progress=progress), min=-1.0, max=1.0)
        return torch.clamp(self._decode_frames(z, progress), min=-1.0, max=1.0)

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
        # z: (b, z_dim, t, h, w) -> (b, out_channels, t', h * ratio, w * ratio), unclamped
        ratio = self.spatial_compression_ratio
        height, width = z.shape[3], z.shape[4]
        lat_h, lat_w = min_h // ratio, min_w // ratio
        lat_stride_h, lat_stride_w = stride_h // ratio, stride_w // ratio
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
        return torch.cat(out_rows, dim=3)[:, :, :, : height * ratio, : width * ratio]
