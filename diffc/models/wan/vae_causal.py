"""Causal 3-D convolutions of the Wan VAEs, their per-chunk feature cache, the channel RMSNorm before them, and
the fused ``silu(RMSNorm(x))`` -> convolution path.

Video is processed in temporal chunks (the encoder takes 1 frame, then 4 at a time; the decoder one
latent frame at a time). Every causal convolution keeps the last ``CACHE_T`` input frames of the
previous chunk in a ``FeatureCache`` so that chunked processing equals a causal pass over the whole
clip while memory stays bounded by one chunk. Slots are addressed by call order, which is the same
for every chunk; a cache lives for one encode/decode call only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.channel_norm import channel_rms_norm_silu
from ...ops.registry import kernel_runs_on

CACHE_T = 2


class FeatureCache:
    """Per-call store of trailing frames, one slot per cached convolution in call order."""

    def __init__(self) -> None:
        self._slots: list = []
        self._pos = 0
        self._chunks = 0

    def next_chunk(self) -> None:
        self._pos = 0
        self._chunks += 1

    @property
    def first_chunk(self) -> bool:
        return self._chunks <= 1

    def peek(self):
        return self._slots[self._pos] if self._pos < len(self._slots) else None

    def push(self, value) -> None:
        if self._pos < len(self._slots):
            self._slots[self._pos] = value
        else:
            self._slots.append(value)
        self._pos += 1


class CausalConv3d(nn.Conv3d):
    """Conv3d padded only on the past side in time; ``cache`` supplies real past frames instead."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        # F.pad order: (w_left, w_right, h_top, h_bottom, t_past, t_future)
        self._causal_padding = (pw, pw, ph, ph, 2 * pt, 0)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> torch.Tensor:
        # x: (b, c, t, h, w); cache: (b, c, t_cache, h, w) frames preceding x
        padding = list(self._causal_padding)
        if cache is not None and padding[4] > 0:
            x = torch.cat([cache.to(x.device), x], dim=2)
            padding[4] -= cache.shape[2]
        return super().forward(F.pad(x, padding))


def cached_conv(conv: CausalConv3d, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
    """Run ``conv`` on one chunk, feeding it the previous chunk's trailing frames and saving this one's."""
    if cache is None:
        return conv(x)
    prev = cache.peek()
    keep = x[:, :, -CACHE_T:].clone()
    if keep.shape[2] < CACHE_T and prev is not None:
        keep = torch.cat([prev[:, :, -1:].to(keep.device), keep], dim=2)
    out = conv(x, prev)
    cache.push(keep)
    return out


def norm_silu_conv(norm: RMSNorm, conv: CausalConv3d, x: torch.Tensor, cache: FeatureCache | None, *,
                   in_bias: torch.Tensor | None = None, conv_bias: bool = True) -> torch.Tensor:
    """``cached_conv(conv, F.silu(norm(x + in_bias)), cache)`` through the fused ``diffc::channel_rms_norm_silu``
    op; with ``conv_bias=False`` the convolution's bias is left for the caller to fuse into what comes next.

    The op writes the normalised chunk straight into the convolution's padded input (the cached past frames
    in front, a zero border in space), so no float32 copy, concatenation or pad is made. The input is
    channels-last (NTHWC in memory), the layout cuDNN's convolutions run in, so they transpose nothing when the
    weights are channels-last too (``AutoencoderKLWan.set_fused_kernels`` makes them so). The cache keeps the
    input's last ``CACHE_T`` frames with their border: the previous chunk's (or a zero) frame before a
    one-frame chunk is among them, which is what the unfused path keeps too. Use it for every chunk of a
    call or for none (the two keep their cache entries in different shapes).
    """
    pw, _, ph, _, past, _ = conv._causal_padding
    b, c, t, h, w = x.shape
    buf = torch.empty((b, c, past + t, h + 2 * ph, w + 2 * pw), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last_3d)
    prev = cache.peek() if cache is not None else None
    if prev is None:
        buf[:, :, :past].zero_()
    else:
        buf[:, :, :past].copy_(prev)
    channel_rms_norm_silu(x, norm.gamma.view(-1), norm.scale, 1e-12, ph, pw, out=buf[:, :, past:], bias=in_bias)
    if cache is not None:
        cache.push(buf[:, :, past + t - CACHE_T :].clone())
    return F.conv3d(buf, conv.weight, conv.bias if conv_bias else None, conv.stride, 0, conv.dilation, conv.groups)


def channels_last(x: torch.Tensor) -> bool:
    """Whether a 5-D map is stored channels-last (NTHWC), as the fused path keeps its maps."""
    return x.dim() == 5 and x.shape[1] > 1 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last_3d)


def fusable(conv: CausalConv3d) -> bool:
    """Whether :func:`norm_silu_conv` can stand in for ``conv``: it pads CACHE_T past frames, symmetric in space."""
    pw, pw2, ph, ph2, past, future = conv._causal_padding
    return past == CACHE_T and future == 0 and pw == pw2 and ph == ph2


class NormSiluConv:
    """Modules that run ``silu(norm(x))`` into a cached causal conv: ``fused_kernels`` switches them to the
    fused op (:func:`norm_silu_conv`) where its Triton kernel runs (set by ``AutoencoderKLWan.set_fused_kernels``)."""

    fused_kernels = False

    def fuses(self, x: torch.Tensor, *convs: CausalConv3d, dropout: nn.Dropout | None = None) -> bool:
        """Whether ``convs`` (and the norms before them) take the fused path for ``x``: switched on, no active
        dropout in between, each conv :func:`fusable`, and the kernel runs on ``x``'s device."""
        return (self.fused_kernels and not _drops(dropout) and all(fusable(conv) for conv in convs)
                and kernel_runs_on(x.device))

    def norm_silu_conv(self, norm: RMSNorm, conv: CausalConv3d, x: torch.Tensor, cache: FeatureCache | None,
                       dropout: nn.Dropout | None = None):
        if self.fuses(x, conv, dropout=dropout):
            return norm_silu_conv(norm, conv, x, cache)
        y = F.silu(norm(x))
        return cached_conv(conv, dropout(y) if _drops(dropout) else y, cache)


def _drops(dropout: nn.Dropout | None) -> bool:
    return dropout is not None and dropout.training and dropout.p > 0


class RMSNorm(nn.Module):
    """L2-normalise over channels (dim 1) times sqrt(dim) and a learned gain; 2-D or 3-D maps."""

    def __init__(self, dim: int, images: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float() if x.element_size() < 4 else x
        return F.normalize(x32, dim=1).to(x.dtype) * self.scale * self.gamma
