"""Z-Image building blocks, named like diffusers' ``ZImageTransformer2DModel`` checkpoint.

The block is a pre- and post-normalised (RMSNorm sandwich) single-stream transformer layer; the
modulated variant scales the pre-norms by ``1 + scale`` and gates the residuals by ``tanh(gate)``,
both projected from a 256-wide timestep embedding. Attention keeps heads after the tokens
(``(B, S, H, D)``), RMS-normalises q and k per head and applies 3-axis RoPE to interleaved channel pairs
(diffusers writes it as a complex product; the real form below is the same rotation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ADALN_EMBED_DIM = 256
QK_NORM_EPS = 1e-5
FINAL_NORM_EPS = 1e-6
_NO_FLOAT64_DEVICES = frozenset({"mps", "npu", "neuron"})


def rope_tables(ids: torch.Tensor, axes_dims: tuple[int, ...], theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (..., sum(axes_dims)) fp32 from integer position ids (..., n_axes).

    Per axis, angles ``pos * theta ** (-2i / d)`` are computed in float64 and rounded to float32 (as
    Z-Image's ``precompute_freqs_cis``), each value repeated for the interleaved pair layout.
    """
    f64 = torch.float32 if ids.device.type in _NO_FLOAT64_DEVICES else torch.float64
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=f64, device=ids.device) / dim))
        angles = (ids[..., axis].to(f64)[..., None] * inv_freq).float()  # (..., dim // 2)
        cos.append(angles.cos().repeat_interleave(2, dim=-1))
        sin.append(angles.sin().repeat_interleave(2, dim=-1))
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, S, H, D) by tables (B or 1, S, 1, D) fp32; computed in fp32."""
    x0, x1 = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)  # (B, S, H, D // 2)
    rot = torch.stack([-x1, x0], dim=-1).flatten(3)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)


class TimestepEmbedder(nn.Module):
    """``mlp(sinusoid(t))``: a 256-channel ``[cos | sin]`` embedding through Linear-SiLU-Linear."""

    def __init__(self, out_size: int, mid_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, mid_size), nn.SiLU(),
                                 nn.Linear(mid_size, out_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        from ..flux.blocks import timestep_sinusoid

        return self.mlp(timestep_sinusoid(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class ZImageAttention(nn.Module):
    """Self-attention with per-head q/k RMSNorm and RoPE; ``mask`` (B, S) bool marks the real tokens."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.norm_q = nn.RMSNorm(self.head_dim, eps=QK_NORM_EPS)
        self.norm_k = nn.RMSNorm(self.head_dim, eps=QK_NORM_EPS)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor):
        # x: (B, S, dim) -> q, k, v: (B, S, H, D)
        q = self.norm_q(self.to_q(x).unflatten(2, (self.heads, -1)))
        k = self.norm_k(self.to_k(x).unflatten(2, (self.heads, -1)))
        v = self.to_v(x).unflatten(2, (self.heads, -1))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, S)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attn_mask)
        return self.to_out[0](out.transpose(1, 2).flatten(2, 3).to(q.dtype))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1(x)) * w3(x))``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ZImageTransformerBlock(nn.Module):
    """One layer. ``modulation=False`` (the caption refiner) has no timestep conditioning."""

    def __init__(self, dim: int, heads: int, norm_eps: float, modulation: bool = True):
        super().__init__()
        self.attention = ZImageAttention(dim, heads)
        self.feed_forward = FeedForward(dim, int(dim / 3 * 8))
        self.attention_norm1 = nn.RMSNorm(dim, eps=norm_eps)
        self.ffn_norm1 = nn.RMSNorm(dim, eps=norm_eps)
        self.attention_norm2 = nn.RMSNorm(dim, eps=norm_eps)
        self.ffn_norm2 = nn.RMSNorm(dim, eps=norm_eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.Linear(min(dim, ADALN_EMBED_DIM), 4 * dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                adaln_input: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, S, dim); mask: (B, S) bool or None; cos/sin: (B or 1, S, 1, head_dim); adaln_input: (B, 256)."""
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), mask, cos, sin))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln_input).unsqueeze(1).chunk(4, dim=2)
        attn = self.attention(self.attention_norm1(x) * (1.0 + scale_msa), mask, cos, sin)
        x = x + gate_msa.tanh() * self.attention_norm2(attn)
        ff = self.feed_forward(self.ffn_norm1(x) * (1.0 + scale_mlp))
        return x + gate_mlp.tanh() * self.ffn_norm2(ff)


class FinalLayer(nn.Module):
    """Affine-free LayerNorm scaled by ``1 + linear(silu(c))``, then the output projection."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(dim, ADALN_EMBED_DIM), dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.adaLN_modulation(c)  # (B, dim)
        return self.linear(F.layer_norm(x, x.shape[-1:], eps=FINAL_NORM_EPS) * scale[:, None])
