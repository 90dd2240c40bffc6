"""Building blocks of the Wan2.1 video transformer: 3-D RoPE, attention, the DiT block, embeddings.

Submodule names follow the diffusers checkpoint (``attn1.to_q``, ``ffn.net.0.proj``,
``condition_embedder.time_embedder.linear_1``, ...) so weights load by name. The dtype handling
follows the reference model: layer norms and the modulation run in float32 and are cast back to the
activation dtype, RoPE tables are computed in float64 on the CPU and used in float32.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from .. import attention_hook

ROPE_THETA = 10000.0
TIME_MAX_PERIOD = 10000


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of one head given to (frames, height, width); each part is even."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _rope_axis_tables(dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of ``pos * theta^(-2i/dim)`` for ``pos < length``: two (length, dim // 2) float32 tables,
    computed in float64 on the CPU as Wan does."""
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


@functools.cache
def _rope_axis_on(dim: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables moved to ``device`` once: later forwards reuse the same device tensors, so they copy
    nothing from the host and a captured CUDA graph stays valid. Never evicted; one small table per
    (axis size, grid length, device)."""
    with torch.inference_mode(False):  # plain tensors, usable inside and outside inference mode
        return tuple(t.to(device) for t in _rope_axis_tables(dim, length))


def _rope_axis(dim: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.compiler.is_dynamo_compiling():  # torch.compile traces the table math into its graph
        return tuple(t.to(device) for t in _rope_axis_tables(dim, length))
    # Built outside any tracing mode: real tensors even while torch.export traces, which lifts them as
    # constants of the program whether or not the cache was warm, and the cache never holds a fake.
    with _disable_current_modes():
        return _rope_axis_on(dim, length, device)


def rope_frequencies(
    head_dim: int, grid: tuple[int, int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D rotary tables for a (frames, height, width) token grid, flattened in that order.

    Returns ``(cos, sin)``, each (1, frames * height * width, 1, head_dim // 2) float32 on ``device``:
    entry ``i`` rotates the interleaved channel pair ``(2i, 2i + 1)`` of every head.
    """
    f, h, w = grid
    tables = [_rope_axis(d, n, torch.device(device)) for d, n in zip(rope_split(head_dim), grid)]
    shapes = ((f, 1, 1, -1), (1, h, 1, -1), (1, 1, w, -1))
    out = []
    for k in range(2):  # 0: cos, 1: sin
        parts = [t[k].view(s).expand(f, h, w, -1) for t, s in zip(tables, shapes)]
        out.append(torch.cat(parts, dim=-1).reshape(1, f * h * w, 1, head_dim // 2))
    return out[0], out[1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs: x (B, S, H, D), cos/sin (1, S, 1, D/2) -> (B, S, H, D), x's dtype."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cross: bool = False) -> torch.Tensor:
    """Softmax attention, no mask: q (B, H, Sq, D), k/v (B, H, Sk, D) -> (B, H, Sq, D).

    Torch's SDPA unless a sequence-parallel runtime fills the slot (``models/attention_hook.py``);
    ``cross``: keys and values are the (replicated) text."""
    return attention_hook.attention(q, k, v, cross)


def timestep_sinusoids(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of 1-D timesteps (N,) -> (N, dim) float32, cosines first."""
    half = dim // 2
    exponent = -math.log(TIME_MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    args = timestep[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (weights upcast), result in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class WanAttention(nn.Module):
    """Multi-head attention with RMSNorm over all heads on Q and K (``rms_norm_across_heads``).

    Self-attention when ``context`` is None (with RoPE), cross-attention to ``context`` otherwise.
    With ``added_kv_dim`` (image-to-video cross-attention), the queries also attend, separately, to
    ``image_context`` through their own key/value projections (``add_k_proj``/``add_v_proj``, RMSNorm
    ``norm_added_k``), and the two attention outputs are summed before ``to_out``.
    """

    def __init__(self, dim: int, heads: int, eps: float, added_kv_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        if added_kv_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        image_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x: (B, S, dim); context: (B, L, dim); image_context: (B, L_img, dim)
        kv = x if context is None else context
        q = self.norm_q(self.to_q(x)).unflatten(2, (self.heads, -1))  # (B, S, H, D)
        k = self.norm_k(self.to_k(kv)).unflatten(2, (self.heads, -1))  # (B, L, H, D)
        v = self.to_v(kv).unflatten(2, (self.heads, -1))
        if rope is not None:
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        q = q.transpose(1, 2)  # (B, H, S, D)
        image_out = None
        if image_context is not None:
            k_img = self.norm_added_k(self.add_k_proj(image_context)).unflatten(2, (self.heads, -1))
            v_img = self.add_v_proj(image_context).unflatten(2, (self.heads, -1))
            image_out = attention(q, k_img.transpose(1, 2), v_img.transpose(1, 2), cross=True)
            image_out = image_out.transpose(1, 2).flatten(2, 3).type_as(x)  # (B, S, dim)
        out = attention(q, k.transpose(1, 2), v.transpose(1, 2), cross=context is not None)  # (B, H, S, D)
        out = out.transpose(1, 2).flatten(2, 3).type_as(x)  # (B, S, dim)
        if image_out is not None:
            out = out + image_out
        return self.to_out[0](out)


class GELUProjection(nn.Module):
    """Linear then tanh-approximated GELU (named ``proj`` as in the checkpoint)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """dim -> ffn_dim (GELU-tanh) -> dim; ``net`` indices match the checkpoint (1 is a no-op dropout)."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProjection(dim, ffn_dim), nn.Identity(), nn.Linear(ffn_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class WanTransformerBlock(nn.Module):
    """Modulated self-attention (RoPE), cross-attention to text, modulated GELU-tanh feed-forward.

    ``temb`` is the projected timestep, (B, T, 6, dim) with T = 1 (one timestep per sample) or
    T = S (one per token); with the learned ``scale_shift_table`` it gives, in float32, shift, scale
    and gate for the attention and for the feed-forward.
    """

    def __init__(self, dim: int, ffn_dim: int, heads: int, cross_attn_norm: bool, eps: float,
                 added_kv_dim: int | None = None):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, heads, eps)
        self.attn2 = WanAttention(dim, heads, eps, added_kv_dim)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, ffn_dim)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        temb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        image_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x: (B, S, dim); context: (B, L, dim); temb: (B, T, 6, dim); each modulation: (B, T, dim)
        # image_context: (B, L_img, dim) image tokens (image-to-video with an image encoder), else None
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + temb.float()).unbind(2)

        h = (self.norm1(x.float()) * (1 + scale) + shift).type_as(x)
        x = (x.float() + self.attn1(h, None, rope) * gate).type_as(x)

        h = self.norm2(x.float()).type_as(x)
        x = x + self.attn2(h, context, None, image_context)

        h = (self.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + self.ffn(h).float() * c_gate).type_as(x)


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear on the timestep sinusoids."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TextProjection(nn.Module):
    """Linear -> GELU-tanh -> Linear from the text encoder's width to the model width."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class GELUErfProjection(nn.Module):
    """Linear then exact (erf) GELU, named ``proj`` as in the checkpoint."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class ImageEmbedding(nn.Module):
    """Image-encoder states (B, L_img, image_dim) -> image tokens (B, L_img, dim):
    LayerNorm -> Linear -> GELU -> Linear -> LayerNorm, both norms affine and in float32.

    ``pos_embed`` (first-last-frame checkpoints, ``pos_embed_seq_len``): a learned position table added
    after pairing each sample's two images' states into one sequence of ``2 * L_img`` tokens.
    """

    def __init__(self, image_dim: int, dim: int, pos_embed_seq_len: int | None = None):
        super().__init__()
        self.norm1 = FP32LayerNorm(image_dim)
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([GELUErfProjection(image_dim, image_dim), nn.Identity(), nn.Linear(image_dim, dim)])
        self.norm2 = FP32LayerNorm(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, image_dim)) if pos_embed_seq_len else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            x = x.view(-1, 2 * x.shape[1], x.shape[2]) + self.pos_embed
        h = self.norm1(x)
        h = self.ff.net[2](self.ff.net[0](h))
        return self.norm2(h)


class WanConditionEmbedder(nn.Module):
    """Timestep embedding, its six-way modulation projection, the text projection and (image-to-video
    with an image encoder) the image embedding."""

    def __init__(self, dim: int, freq_dim: int, text_dim: int, image_dim: int | None = None,
                 pos_embed_seq_len: int | None = None):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = TimestepEmbedding(freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TextProjection(text_dim, dim)
        if image_dim is not None:
            self.image_embedder = ImageEmbedding(image_dim, dim, pos_embed_seq_len)

    def forward(self, timestep: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """timestep (B, T), text (B, L, text_dim) -> temb (B, T, dim), temb_proj (B, T, 6*dim), context (B, L, dim)."""
        t = timestep_sinusoids(timestep.flatten(), self.freq_dim).unflatten(0, timestep.shape)
        t = t.to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(t).type_as(text)
        temb_proj = self.time_proj(F.silu(temb))
        return temb, temb_proj, self.text_embedder(text)
