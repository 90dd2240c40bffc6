"""Building blocks of the 2D KL autoencoder (the FLUX.1 / Stable Diffusion VAE).

Module and parameter names follow diffusers' checkpoint layout exactly (``resnets``, ``attentions``,
``downsamplers.0.conv``, ``upsamplers.0.conv``, ``to_out.0``, ...) so that checkpoints load by name.
Every block works on NCHW tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..ops.channel_norm import channel_bias_residual, channel_bias_residual_ref, same_layout
from ..ops.group_norm import group_norm
from ..ops.registry import kernel_runs_on

# act_fn name in config.json -> activation module (diffusers' accepted names).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}

# The VAE uses one epsilon for every GroupNorm in its blocks.
VAE_NORM_EPS = 1e-6


class FusedKernels:
    """Blocks with a fused path: ``fused_kernels`` (set by ``AutoencoderKL.set_fused_kernels``) switches them to
    diffc's group norm (``diffc::group_norm``, SiLU and the producing convolution's bias folded in) on
    channels-last maps, where its Triton kernels run (a GPU, or Triton's interpreter)."""

    fused_kernels = False

    def fuses(self, x: torch.Tensor) -> bool:
        return self.fused_kernels and kernel_runs_on(x.device)


class FusedGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` through ``diffc::group_norm`` where its kernels run on the input's device (else torch's).

    :func:`fuse_group_norms` gives a model's own ``nn.GroupNorm`` modules this class (same parameters, same
    state dict): the fused path for VAEs diffc runs as their authors wrote them (the generic backend's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() >= 2 and x.shape[1] == self.num_channels and x.is_floating_point() and kernel_runs_on(x.device)
                and all(p is None or p.dtype == x.dtype for p in (self.weight, self.bias))):
            return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)  # (torch's checks and mixed dtypes: float32 weights of a bf16 map)


def fuse_group_norms(module: nn.Module, enabled: bool) -> int:
    """Switch every plain ``nn.GroupNorm`` of ``module`` to :class:`FusedGroupNorm` (or back); returns how many
    modules are fused afterwards. Subclasses of ``nn.GroupNorm`` (their own forward) are left as they are."""
    fused = 0
    for m in module.modules():
        if enabled and type(m) is nn.GroupNorm:
            m.__class__ = FusedGroupNorm
        elif not enabled and type(m) is FusedGroupNorm:
            m.__class__ = nn.GroupNorm
        fused += type(m) is FusedGroupNorm
    return fused


def replicate_pad(x: torch.Tensor, pad: tuple[int, ...]) -> torch.Tensor:
    """``F.pad(x, pad, mode="replicate")``, the same values, as one copy of ``x`` into the padded tensor and a copy
    of each edge slab into its border (innermost dimension first, each over the inner part of the dimensions
    padded after it, so corners take the clamped value in every dimension). Torch's replication-pad kernel ran
    800 ms of a 2,980 ms HunyuanVideo decode at 544x960x61 (H100, 2026-12-06). The output keeps a channels-last
    input's layout. What ``F.pad`` refuses or crops (a negative pad, an empty padded dimension, other than the last
    one to three dimensions of a map with one or two dimensions before them) goes to ``F.pad``, for its answer."""
    dims = len(pad) // 2
    if len(pad) % 2 or dims not in (1, 2, 3) or x.dim() - dims not in (1, 2) or any(p < 0 for p in pad) or any(
            x.shape[x.dim() - 1 - i] == 0 for i in range(dims) if pad[2 * i] or pad[2 * i + 1]):
        return F.pad(x, list(pad), mode="replicate")
    shape = list(x.shape)
    for i in range(dims):
        shape[x.dim() - 1 - i] += pad[2 * i] + pad[2 * i + 1]
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    fmt = layout if layout is not None and x.is_contiguous(memory_format=layout) and not x.is_contiguous() \
        else torch.contiguous_format
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)

    def inner(t: torch.Tensor, start: int) -> torch.Tensor:
        """``t`` narrowed to ``x``'s extent along the padded dimensions from ``start`` (innermost = 0) outwards."""
        for j in range(start, dims):
            d = x.dim() - 1 - j
            t = t.narrow(d, pad[2 * j], x.shape[d])
        return t

    inner(out, 0).copy_(x)
    for i in range(dims):
        d, left, right = x.dim() - 1 - i, pad[2 * i], pad[2 * i + 1]
        view, size = inner(out, i + 1), x.shape[x.dim() - 1 - i]
        if left:
            view.narrow(d, 0, left).copy_(view.narrow(d, left, 1).expand_as(view.narrow(d, 0, left)))
        if right:
            view.narrow(d, left + size, right).copy_(
                view.narrow(d, left + size - 1, 1).expand_as(view.narrow(d, left + size, right)))
    return out


# diffusers' causal 3-D convolutions whose forward is ``self.conv(F.pad(x, self.time_causal_padding,
# mode=self.pad_mode))`` (the generic backend's HunyuanVideo and HunyuanVideo 1.5 VAEs)
CAUSAL_CONVS = frozenset({"HunyuanVideoCausalConv3d", "HunyuanVideo15CausalConv3d"})
_FUSED_CONV_CLASSES: dict[type, type] = {}


def _fused_causal_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if self.pad_mode == "replicate":
        return self.conv(replicate_pad(hidden_states, tuple(self.time_causal_padding)))
    return super(type(self), self).forward(hidden_states)


def _fused_conv_class(cls: type) -> type:
    """The subclass of a :data:`CAUSAL_CONVS` class whose forward pads with :func:`replicate_pad` (made once)."""
    if cls not in _FUSED_CONV_CLASSES:
        name = f"Fused{cls.__name__}"
        fused = type(name, (cls,), {"forward": _fused_causal_forward, "__module__": __name__, "__qualname__": name,
                                    "__doc__": f"{cls.__name__} padding with diffc's replicate_pad."})
        globals()[name] = fused  # found by name here: a fused module pickles and copies in the process that fused it
        _FUSED_CONV_CLASSES[cls] = fused
    return _FUSED_CONV_CLASSES[cls]


def _is_causal_conv(m: nn.Module) -> bool:
    pad = getattr(m, "time_causal_padding", None)
    return (type(m).__name__ in CAUSAL_CONVS and isinstance(getattr(m, "conv", None), nn.Conv3d)
            and isinstance(pad, (tuple, list)) and len(pad) == 6 and all(isinstance(p, int) for p in pad))


def _is_fused_conv(m: nn.Module) -> bool:
    return type(m) in _FUSED_CONV_CLASSES.values()


def fuse_causal_convs(module: nn.Module, enabled: bool) -> int:
    """Give each :data:`CAUSAL_CONVS` module of ``module`` the subclass padding with :func:`replicate_pad` (or its
    own class back); returns how many are fused afterwards. Same parameters, same state dict, same values."""
    fused = 0
    for m in module.modules():
        if enabled and _is_causal_conv(m) and not _is_fused_conv(m):
            m.__class__ = _fused_conv_class(type(m))
        elif not enabled and _is_fused_conv(m):
            m.__class__ = type(m).__bases__[0]
        fused += _is_fused_conv(m)
    return fused


def _generic_fusable(m: nn.Module) -> bool:
    return type(m) in (nn.GroupNorm, FusedGroupNorm) or _is_causal_conv(m)


def has_fused_path(vae) -> bool:
    """Whether :func:`set_fused_vae` changes ``vae``: diffc's native VAEs (``set_fused_kernels``), and the other
    autoencoders (diffusers classes the generic backend runs) that have plain group norms or the causal
    convolutions of :data:`CAUSAL_CONVS`."""
    if hasattr(vae, "set_fused_kernels"):
        return True
    return (isinstance(vae, nn.Module) and type(vae).__name__.startswith("Autoencoder")
            and any(_generic_fusable(m) for m in vae.modules()))


def set_fused_vae(vae: nn.Module, enabled: bool) -> None:
    """A VAE's fused path on (or off): its own ``set_fused_kernels`` (diffc's native VAEs), else its group norms
    (:func:`fuse_group_norms`) and causal convolutions' padding (:func:`fuse_causal_convs`) where
    :func:`has_fused_path` says it has them."""
    if hasattr(vae, "set_fused_kernels"):
        vae.set_fused_kernels(enabled)
    elif has_fused_path(vae):
        fuse_group_norms(vae, enabled)
        fuse_causal_convs(vae, enabled)


def uses_fused_vae(vae: nn.Module | None) -> bool:
    """Whether ``vae``'s fused path (:func:`set_fused_vae`) is on."""
    if vae is None:
        return False
    if hasattr(vae, "uses_fused_kernels"):
        return bool(vae.uses_fused_kernels)
    return isinstance(vae, nn.Module) and any(type(m) is FusedGroupNorm or _is_fused_conv(m) for m in vae.modules())


def norm_act(norm: nn.GroupNorm, act: nn.Module | None, x: torch.Tensor,
             in_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``act(norm(x + in_bias))`` through ``diffc::group_norm``: a SiLU runs inside it, another activation after."""
    silu = isinstance(act, nn.SiLU)
    y = group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=silu, in_bias=in_bias)
    return y if silu or act is None else act(y)


def conv_without_bias(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv`` without its bias (the caller adds it inside the next fused op)."""
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def bias_residual(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
    """``(x + bias) + residual`` (bias per channel, dim 1) in one pass (``diffc::channel_bias_residual``) where the
    two share a layout, else as torch's two adds; a conv's output, its bias and a residual branch (2-D and Wan's
    3-D VAE blocks)."""
    if bias is None:
        return x + residual
    if same_layout(x, residual):
        return channel_bias_residual(x, bias, residual)
    return channel_bias_residual_ref(x, bias, residual)  # the branches' layouts differ


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """2x nearest-neighbour upsampling of a (N, C, H, W) map. A channels-last map is upsampled as one copy of a
    broadcast view, each pixel's channels written to its four targets (torch's channels-last nearest kernel ran
    2.7 ms of a FLUX.1 1024² decode against 1.0 ms for the contiguous one: H100, 2026-12-06). At scale 2 the
    source pixel of target ``i`` is ``i // 2`` for ``nearest`` and ``nearest-exact`` alike."""
    if x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = x.shape
        pixels = x.permute(0, 2, 3, 1)[:, :, None, :, None, :]  # (N, H, 1, W, 1, C), a view
        return pixels.expand(n, h, 2, w, 2, c).reshape(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def activation(name: str) -> nn.Module:
    """Activation module for a config's ``act_fn`` name."""
    if name not in ACTIVATIONS:
        raise CheckpointError(f"act_fn: unknown activation {name!r}; accepted: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class ResnetBlock2D(FusedKernels, nn.Module):
    """Pre-norm residual block: GroupNorm -> act -> conv3x3 -> GroupNorm -> act -> conv3x3, plus skip.

    The skip path gets a 1x1 ``conv_shortcut`` when the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, act_fn: str):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=VAE_NORM_EPS, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=VAE_NORM_EPS, affine=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nonlinearity = activation(act_fn)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
            if in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, H, W) -> (B, C_out, H, W)
        if self.fuses(x):  # conv1's bias goes into norm2, conv2's into the residual add
            h = conv_without_bias(self.conv1, norm_act(self.norm1, self.nonlinearity, x))
            h = conv_without_bias(self.conv2, norm_act(self.norm2, self.nonlinearity, h, in_bias=self.conv1.bias))
            return bias_residual(h, self.conv2.bias, x if self.conv_shortcut is None else self.conv_shortcut(x))
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = self.conv2(self.nonlinearity(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(FusedKernels, nn.Module):
    """Spatial self-attention over all H*W positions, with a GroupNorm on its input and a residual.

    In the VAE mid block the head dimension equals the channel count, so there is a single head.
    """

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        if channels % heads:
            raise CheckpointError(f"attention heads: {heads} does not divide {channels} channels")
        self.heads = heads
        self.group_norm = nn.GroupNorm(groups, channels, eps=VAE_NORM_EPS, affine=True)
        self.to_q = nn.Linear(channels, channels, bias=True)
        self.to_k = nn.Linear(channels, channels, bias=True)
        self.to_v = nn.Linear(channels, channels, bias=True)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels, bias=True)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W)
        b, c, h, w = x.shape
        head_dim = c // self.heads
        fused = self.fuses(x)
        if fused:  # a channels-last map is (B, H, W, C) in memory: its tokens are a view
            tokens = norm_act(self.group_norm, None, x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        else:
            tokens = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        # q, k, v: (B, heads, HW, head_dim)
        q = self.to_q(tokens).view(b, -1, self.heads, head_dim).transpose(1, 2)
        k = self.to_k(tokens).view(b, -1, self.heads, head_dim).transpose(1, 2)
        v = self.to_v(tokens).view(b, -1, self.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, c).to(q.dtype)  # (B, HW, C)
        out = self.to_out[0](out)
        out = out.view(b, h, w, c).permute(0, 3, 1, 2) if fused else out.transpose(1, 2).reshape(b, c, h, w)
        return out + x


class Downsample2D(nn.Module):
    """Halves H and W: zero-pad one row/column at the bottom/right, then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample2D(nn.Module):
    """Doubles H and W: nearest-neighbour interpolation, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(upsample_nearest2x(x))


class DownEncoderBlock2D(nn.Module):
    """``num_layers`` residual blocks, then an optional 2x downsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str,
                 add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn)
            for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    """``num_layers`` residual blocks, then an optional 2x upsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str,
                 add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn)
            for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet -> [attention] -> resnet at the lowest resolution (channel count unchanged)."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool):
        super().__init__()
        self.add_attention = add_attention
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, groups, act_fn) for _ in range(2))
        # Without attention the list is empty: it holds no weights in the checkpoint either.
        self.attentions = nn.ModuleList([Attention(channels, heads=1, groups=groups)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.add_attention:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(FusedKernels, nn.Module):
    """Image (B, in_channels, H, W) -> Gaussian parameters (B, 2 * latent_channels, H/f, W/f).

    ``f = 2 ** (len(block_out_channels) - 1)``; every block but the last halves the resolution.
    """

    def __init__(self, in_channels: int, latent_channels: int, block_out_channels: tuple[int, ...],
                 layers_per_block: int, groups: int, act_fn: str, mid_block_add_attention: bool):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, stride=1, padding=1)
        n = len(block_out_channels)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(
                block_out_channels[max(i - 1, 0)], block_out_channels[i], layers_per_block, groups, act_fn,
                add_downsample=i < n - 1,
            )
            for i in range(n)
        )
        top = block_out_channels[-1]
        self.mid_block = UNetMidBlock2D(top, groups, act_fn, mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, top, eps=VAE_NORM_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(top, 2 * latent_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        if self.fuses(x):
            return self.conv_out(norm_act(self.conv_norm_out, self.conv_act, x))
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(FusedKernels, nn.Module):
    """Latents (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f).

    Up blocks run from the widest channel count down to ``block_out_channels[0]`` and hold
    ``layers_per_block + 1`` residual blocks each; every block but the last doubles the resolution.
    """

    def __init__(self, latent_channels: int, out_channels: int, block_out_channels: tuple[int, ...],
                 layers_per_block: int, groups: int, act_fn: str, mid_block_add_attention: bool):
        super().__init__()
        widths = tuple(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(latent_channels, widths[0], kernel_size=3, stride=1, padding=1)
        self.mid_block = UNetMidBlock2D(widths[0], groups, act_fn, mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(
                widths[max(i - 1, 0)], widths[i], layers_per_block + 1, groups, act_fn,
                add_upsample=i < len(widths) - 1,
            )
            for i in range(len(widths))
        )
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=VAE_NORM_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[-1], out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        if self.fuses(x):
            return self.conv_out(norm_act(self.conv_norm_out, self.conv_act, x))
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))
