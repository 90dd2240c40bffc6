"""Building blocks of the Wan2.1 and Wan2.2 video VAEs: resampling, residual and attention blocks, the encoder
and decoder, over the causal convolutions of :mod:`.vae_causal` (which explains the per-chunk feature cache).

The Wan2.2 VAE adds parameter-free shortcuts around each resolution stage (``AvgDown3d`` in the
encoder, ``DupUp3d`` in the decoder) and folds 2x2 pixel patches into channels around the whole model
(``patchify``/``unpatchify``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..vae_blocks import bias_residual, upsample_nearest2x
from .vae_causal import (CACHE_T, CausalConv3d, FeatureCache, NormSiluConv, RMSNorm, cached_conv, channels_last,
                         norm_silu_conv)

# Marks an upsample3d slot whose first chunk passed through without temporal upsampling.
_FIRST_CHUNK = object()


def fold_space_time(x: torch.Tensor, factor_t: int, factor_s: int) -> torch.Tensor:
    """(b, c, t * ft, h * fs, w * fs) -> (b, c * ft * fs * fs, t, h, w); channel = (c, dt, dy, dx) row-major."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // factor_t, factor_t, h // factor_s, factor_s, w // factor_s, factor_s)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * factor_t * factor_s * factor_s, t // factor_t, h // factor_s, w // factor_s)


def unfold_space_time(x: torch.Tensor, factor_t: int, factor_s: int) -> torch.Tensor:
    """Inverse of :func:`fold_space_time`."""
    b, c, t, h, w = x.shape
    c_out = c // (factor_t * factor_s * factor_s)
    x = x.reshape(b, c_out, factor_t, factor_s, factor_s, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c_out, t * factor_t, h * factor_s, w * factor_s)


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(b, c, t, h * p, w * p) -> (b, c * p * p, t, h, w); channel = (c, dx, dy), the Wan2.2 VAE's order."""
    if patch_size == 1:
        return x
    b, c, t, h, w, p = *x.shape, patch_size
    x = x.reshape(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)  # (b, c, dx, dy, t, h', w')
    return x.reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    if patch_size == 1:
        return x
    b, c, t, h, w, p = *x.shape, patch_size
    x = x.reshape(b, c // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)  # (b, c', t, h, dy, w, dx)
    return x.reshape(b, c // (p * p), t, h * p, w * p)


def _exact_ratio(total: int, parts: int, what: str) -> int:
    if total % parts != 0:
        raise ValueError(f"{what}, which needs {total} to be a multiple of {parts}")
    return total // parts


class AvgDown3d(nn.Module):
    """Wan2.2 encoder shortcut: fold ft x fs x fs blocks into channels, then average channel groups down to
    ``out_channels``. A chunk whose frame count is not a multiple of ``factor_t`` is zero-padded in front."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        factor = factor_t * factor_s * factor_s
        what = f"the down-block shortcut averages {in_channels} channels x {factor} (time x space) into {out_channels}"
        self.group = _exact_ratio(in_channels * factor, out_channels, what)
        self.factor_t, self.factor_s = factor_t, factor_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (b, c, t, h, w) -> (b, out_channels, ceil(t / ft), h / fs, w / fs)
        x = F.pad(x, (0, 0, 0, 0, -x.shape[2] % self.factor_t, 0))  # front-pad t to a multiple of ft
        x = fold_space_time(x, self.factor_t, self.factor_s)
        return x.unflatten(1, (-1, self.group)).mean(dim=2)


class DupUp3d(nn.Module):
    """Wan2.2 decoder shortcut: repeat each channel, then unfold channels into ft x fs x fs blocks.

    On the first chunk the first ``factor_t - 1`` output frames are dropped, as the decoder's temporal
    upsampler leaves the first chunk's single frame single.
    """

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        factor = factor_t * factor_s * factor_s
        what = f"the up-block shortcut spreads {in_channels} channels over {out_channels} x {factor} (time x space)"
        self.repeats = _exact_ratio(out_channels * factor, in_channels, what)
        self.factor_t, self.factor_s = factor_t, factor_s

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        # (b, c, t, h, w) -> (b, out_channels, t * ft, h * fs, w * fs), minus ft - 1 frames on the first chunk
        x = unfold_space_time(x.repeat_interleave(self.repeats, dim=1), self.factor_t, self.factor_s)
        return x[:, :, self.factor_t - 1 :] if first_chunk else x


class NearestUpsample2x(nn.Module):
    """2x nearest-exact spatial upsampling (diffusers computes it in float32; copying values, it is the same).

    A channels-last map (the fused path's layout) is upsampled as one copy of a broadcast view, each pixel's
    channels written to its four targets, instead of torch's channels-last nearest kernel (67.8 ms of the
    fused Wan2.1-1.3B decode on an H200, against 24.7 ms for the contiguous kernel on the eager path; the copy
    is not measured yet). At scale 2, nearest-exact's source pixel is ``target // 2``: the same values.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last):
            return upsample_nearest2x(x)
        # nearest-neighbour copies values: interpolating in x's dtype gives the float32 round trip's result
        return F.interpolate(x, scale_factor=(2.0, 2.0), mode="nearest-exact")


class Resample(nn.Module):
    """Spatial 2x up/down sampling per frame, optionally with causal 2x temporal up/down sampling.

    ``mode`` is one of "upsample2d", "upsample3d", "downsample2d", "downsample3d". Upsampling maps to
    ``up_dim`` channels, by default half of ``dim`` (Wan2.1; Wan2.2 keeps ``dim``). The temporal part
    needs a ``FeatureCache``; without one only the spatial part runs. The first chunk is never
    resampled in time (1 frame stays 1 frame).
    """

    def __init__(self, dim: int, mode: str, up_dim: int | None = None) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            up_dim = dim // 2 if up_dim is None else up_dim
            self.resample = nn.Sequential(NearestUpsample2x(), nn.Conv2d(dim, up_dim, 3, padding=1))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def _upsample_time(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        # (b, c, t, h, w) -> (b, c, 2t, h, w)
        prev = cache.peek()
        if prev is None:
            cache.push(_FIRST_CHUNK)
            return x
        keep = x[:, :, -CACHE_T:].clone()
        if keep.shape[2] < CACHE_T:
            past = torch.zeros_like(keep) if prev is _FIRST_CHUNK else prev[:, :, -1:].to(keep.device)
            keep = torch.cat([past, keep], dim=2)
        x = self.time_conv(x, None if prev is _FIRST_CHUNK else prev)
        cache.push(keep)
        b, c2, t, h, w = x.shape
        # channel halves are the two output frames of each input frame; one copy, keeping x's memory layout
        layout = torch.channels_last_3d if channels_last(x) else torch.contiguous_format
        out = torch.empty((b, c2 // 2, 2 * t, h, w), dtype=x.dtype, device=x.device, memory_format=layout)
        out.unflatten(2, (t, 2)).copy_(x.unflatten(1, (2, c2 // 2)).permute(0, 2, 3, 1, 4, 5))
        return out

    def _downsample_time(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        # (b, c, t, h, w) -> (b, c, (t + 1 - 3) // 2 + 1, h, w) using the previous chunk's last frame
        prev = cache.peek()
        keep = x[:, :, -1:].clone()
        if prev is not None:
            x = self.time_conv(torch.cat([prev[:, :, -1:], x], dim=2))
        cache.push(keep)
        return x

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        # x: (b, c, t, h, w)
        if self.mode == "upsample3d" and cache is not None:
            x = self._upsample_time(x, cache)
        b, c, t, h, w = x.shape
        x = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        x = x.view(b, t, x.shape[1], x.shape[2], x.shape[3]).permute(0, 2, 1, 3, 4)
        if self.mode == "downsample3d" and cache is not None:
            x = self._downsample_time(x, cache)
        return x


class ResidualBlock(NormSiluConv, nn.Module):
    """(RMSNorm -> SiLU -> causal conv3d) x 2 plus a 1x1x1 projection shortcut when widths differ."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim, images=False)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim, images=False)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        h = self.conv_shortcut(x)
        if self.fused_path(x):
            # conv1's bias joins norm2's kernel, conv2's the residual add: cuDNN's convolutions add none
            y = norm_silu_conv(self.norm1, self.conv1, x, cache, conv_bias=False)
            y = norm_silu_conv(self.norm2, self.conv2, y, cache, in_bias=self.conv1.bias, conv_bias=False)
            return bias_residual(y, self.conv2.bias, h)
        x = self.norm_silu_conv(self.norm1, self.conv1, x, cache)
        x = self.norm_silu_conv(self.norm2, self.conv2, x, cache, self.dropout)
        return x + h

    def fused_path(self, x: torch.Tensor) -> bool:
        return (self.fuses(x, self.conv1, self.conv2, dropout=self.dropout)
                and self.conv1.bias is not None and self.conv2.bias is not None)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame separately."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b, c, t, h, w)
        identity = x
        b, c, t, h, w = x.shape
        x = self.norm(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        qkv = self.to_qkv(x).reshape(b * t, 1, c * 3, h * w).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)  # each (b*t, 1, h*w, c)
        x = F.scaled_dot_product_attention(q, k, v)
        x = self.proj(x.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w))
        return x.view(b, t, c, h, w).permute(0, 2, 1, 3, 4) + identity


class MidBlock(nn.Module):
    """Residual block, attention, residual block at the lowest resolution."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout), ResidualBlock(dim, dim, dropout)])

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        x = self.resnets[0](x, cache)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x), cache)
        return x


def _resnets(in_dim: int, out_dim: int, count: int, dropout: float) -> nn.ModuleList:
    dims = [in_dim] + [out_dim] * count
    return nn.ModuleList(ResidualBlock(i, o, dropout) for i, o in zip(dims[:-1], dims[1:]))


class UpBlock(nn.Module):
    """``num_res_blocks + 1`` residual blocks followed by an optional upsampler."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float, upsample_mode: str | None):
        super().__init__()
        self.resnets = _resnets(in_dim, out_dim, num_res_blocks + 1, dropout)
        self.upsamplers = nn.ModuleList([Resample(out_dim, upsample_mode)]) if upsample_mode else None

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, cache)
        return x


class ResidualUpBlock(nn.Module):
    """Wan2.2: ``num_res_blocks + 1`` residual blocks and an optional upsampler that keeps the width,
    with a ``DupUp3d`` shortcut from the block's input when it upsamples."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float, upsample_mode: str | None):
        super().__init__()
        factor_t = 2 if upsample_mode == "upsample3d" else 1
        self.avg_shortcut = DupUp3d(in_dim, out_dim, factor_t, 2) if upsample_mode else None
        self.resnets = _resnets(in_dim, out_dim, num_res_blocks + 1, dropout)
        self.upsampler = Resample(out_dim, upsample_mode, up_dim=out_dim) if upsample_mode else None

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        shortcut = x
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsampler is None:
            return x
        first_chunk = cache is None or cache.first_chunk
        return self.upsampler(x, cache) + self.avg_shortcut(shortcut, first_chunk)


class ResidualDownBlock(nn.Module):
    """Wan2.2: ``num_res_blocks`` residual blocks and an optional downsampler, plus an ``AvgDown3d``
    shortcut from the block's input (the identity on the last stage, where nothing is downsampled and
    the width is kept)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float, downsample_mode: str | None):
        super().__init__()
        factor_t = 2 if downsample_mode == "downsample3d" else 1
        self.avg_shortcut = AvgDown3d(in_dim, out_dim, factor_t, 2 if downsample_mode else 1)
        self.resnets = _resnets(in_dim, out_dim, num_res_blocks, dropout)
        self.downsampler = Resample(out_dim, downsample_mode) if downsample_mode else None

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        shortcut = self.avg_shortcut(x)
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.downsampler is not None:
            x = self.downsampler(x, cache)
        return x + shortcut


class Encoder3d(NormSiluConv, nn.Module):
    """Video (b, in_channels, t, H, W) -> (b, z_channels, t', H / 2^n, W / 2^n) for one chunk.

    ``is_residual`` (Wan2.2) builds one ``ResidualDownBlock`` per stage and, like diffusers, ignores
    ``attn_scales``; otherwise (Wan2.1) the stages are a flat list of residual, attention and resample layers.
    """

    def __init__(
        self, in_channels, dim, z_channels, dim_mult, num_res_blocks, attn_scales, temperal_downsample, dropout,
        is_residual=False,
    ):  # fmt: skip
        super().__init__()
        dims = [dim * u for u in (1, *dim_mult)]
        self.conv_in = CausalConv3d(in_channels, dims[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        scale = 1.0
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            mode = None
            if i != len(dim_mult) - 1:
                mode = "downsample3d" if temperal_downsample[i] else "downsample2d"
            if is_residual:
                self.down_blocks.append(ResidualDownBlock(in_dim, out_dim, num_res_blocks, dropout, mode))
                continue
            for _ in range(num_res_blocks):
                self.down_blocks.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    self.down_blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if mode is not None:
                self.down_blocks.append(Resample(out_dim, mode))
                scale /= 2.0
        self.mid_block = MidBlock(dims[-1], dropout)
        self.norm_out = RMSNorm(dims[-1], images=False)
        self.conv_out = CausalConv3d(dims[-1], z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        x = cached_conv(self.conv_in, x, cache)
        for layer in self.down_blocks:
            x = layer(x) if isinstance(layer, AttentionBlock) else layer(x, cache)
        x = self.mid_block(x, cache)
        return self.norm_silu_conv(self.norm_out, self.conv_out, x, cache)


class Decoder3d(NormSiluConv, nn.Module):
    """Latents (b, z_dim, t, h, w) -> video (b, out_channels, t', h * 2^n, w * 2^n) for one chunk.

    ``is_residual`` (Wan2.2) uses ``ResidualUpBlock`` stages, whose upsamplers keep the channel count.
    """

    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temperal_upsample, dropout, out_channels,
                 is_residual=False):  # fmt: skip
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
        self.conv_in = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], dropout)
        self.up_blocks = nn.ModuleList()
        block = ResidualUpBlock if is_residual else UpBlock
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0 and not is_residual:
                in_dim //= 2  # the previous (Wan2.1) upsampler halved the channels
            mode = None
            if i != len(dim_mult) - 1:
                mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
            self.up_blocks.append(block(in_dim, out_dim, num_res_blocks, dropout, mode))
        self.norm_out = RMSNorm(dims[-1], images=False)
        self.conv_out = CausalConv3d(dims[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        x = cached_conv(self.conv_in, x, cache)
        x = self.mid_block(x, cache)
        for up_block in self.up_blocks:
            x = up_block(x, cache)
        return self.norm_silu_conv(self.norm_out, self.conv_out, x, cache)
