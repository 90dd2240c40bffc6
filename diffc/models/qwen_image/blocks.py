"""Qwen-Image building blocks: timestep embedding, 3-axis RoPE tables, the double-stream (MMDiT) block.

Parameter names follow diffusers' ``QwenImageTransformer2DModel`` checkpoints (``img_mod.1``,
``attn.add_q_proj``, ``img_mlp.net.2``, ...). The math is FLUX's double-stream block with separate
image/text modulation and a text padding mask, so the FLUX pieces are reused where the math is the
same (joint attention projections, tanh-GELU feed-forward, RoPE on interleaved pairs); the op order
matches diffusers so outputs agree to float rounding, and the compile passes see the FLUX spellings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..flux.blocks import FeedForward, FluxAttention, SiLUMLP, apply_rope
from ..modulation import precomputed

TIME_PROJ_DIM = 256
ROPE_THETA = 10000
ROPE_TABLE_LEN = 4096  # diffusers' QwenEmbedRope precomputes 4096 positions per sign
NORM_EPS = 1e-6


def timestep_proj(t: torch.Tensor, dim: int = TIME_PROJ_DIM, scale: float = 1000.0,
                  max_period: float = 10000.0) -> torch.Tensor:
    """diffusers' ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)``.

    t: (batch,) sigma in [0, 1] in the activations' dtype -> (batch, dim) float32 ``[cos | sin]``. The
    frequencies are rounded to ``t``'s dtype first, as diffusers does.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=t.device)
    exponent = exponent / half
    freqs = torch.exp(exponent).to(t.dtype)
    args = t[:, None].float() * freqs[None, :]
    args = args * scale
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    return torch.cat([emb[:, half:], emb[:, :half]], dim=-1)


class QwenTimestepEmbedding(nn.Module):
    """``time_text_embed``: sinusoid of the timestep, then ``linear_2(silu(linear_1(.)))``."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = SiLUMLP(TIME_PROJ_DIM, dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep_proj(timestep).to(dtype))


def _axis_positions(size: int, centered: bool) -> torch.Tensor:
    # Qwen's scale_rope: rows/columns get positions -(size - size//2) .. size//2 - 1, centred on zero
    start = -(size - size // 2) if centered else 0
    return torch.arange(start, start + size)


def rope_positions(img_shapes, txt_len: int) -> torch.Tensor:
    """(txt_len + sum(f*h*w), 3) integer positions (frame, row, column): text tokens first, then each latent
    image in order, the n-th image at frame n (Qwen-Image-Edit's condition images are frames 1, 2, ...).

    Text tokens sit on the diagonal after the largest image half-extent, as ``QwenEmbedRope`` places them.
    """
    parts, max_index = [], 0
    for idx, (frames, height, width) in enumerate(img_shapes):
        f = torch.arange(idx, idx + frames)
        h, w = _axis_positions(height, True), _axis_positions(width, True)
        grid = torch.stack(torch.meshgrid(f, h, w, indexing="ij"), dim=-1)  # (f, h, w, 3)
        parts.append(grid.reshape(-1, 3))
        max_index = max(max_index, height // 2, width // 2)
    txt = torch.arange(max_index, max_index + txt_len)[:, None].expand(txt_len, 3)
    return torch.cat([txt] + parts, dim=0)


def rope_tables(positions: torch.Tensor, axes_dim: tuple[int, ...], theta: int = ROPE_THETA):
    """Per-token cos/sin tables (seq, sum(axes_dim)) float32 for interleaved channel pairs.

    Frequencies and angles are float32, as ``QwenEmbedRope.rope_params`` computes them (unlike FLUX's float64).
    """
    cos_parts, sin_parts = [], []
    for axis, dim in enumerate(axes_dim):
        inv_freq = 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float32).div(dim))
        angles = positions[:, axis].to(torch.float32)[:, None] * inv_freq[None, :]  # (seq, dim // 2)
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1))
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)


class QwenJointAttention(FluxAttention):
    """FLUX's joint attention (text tokens first) with an optional key mask for text padding.

    ``attention_mask``: None, or (batch, 1, 1, seq_txt + seq_img) bool, True where a key may be attended.
    """

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__(dim, heads, head_dim, context=True)

    def forward(self, x, rope, context=None, attention_mask: torch.Tensor | None = None):
        q = torch.cat([self._heads(self.add_q_proj(context), self.norm_added_q), self._heads(self.to_q(x), self.norm_q)],
                      dim=2)
        k = torch.cat([self._heads(self.add_k_proj(context), self.norm_added_k), self._heads(self.to_k(x), self.norm_k)],
                      dim=2)
        v = torch.cat([self._heads(self.add_v_proj(context)), self._heads(self.to_v(x))], dim=2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)  # (batch, seq, inner)
        txt, img = out.split_with_sizes([context.shape[1], x.shape[1]], dim=1)
        img = self.to_out[1](self.to_out[0](img.contiguous()))
        return img, self.to_add_out(txt.contiguous())


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x: (batch, seq, dim); shift, scale: (batch, dim)
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS) * (1 + scale[:, None]) + shift[:, None]


class QwenImageTransformerBlock(nn.Module):
    """Double-stream block: image and text streams with their own modulation, norms and MLPs, one joint attention."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int):
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = QwenJointAttention(dim, num_attention_heads, attention_head_dim)
        self.img_mlp = FeedForward(dim)
        self.txt_mlp = FeedForward(dim)

    def modulation(self, temb: torch.Tensor) -> torch.Tensor | None:
        """This block's precomputed modulation (``forward``'s ``temb`` form), (batch, 12 * dim), from the (batch,
        dim) conditioning; None when ``temb`` is not the conditioning (a modulation already)."""
        if temb.shape[-1] != self.img_mod[1].in_features:
            return None
        return torch.cat([self.img_mod(temb), self.txt_mod(temb)], dim=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states: (batch, seq_img, dim); encoder_hidden_states: (batch, seq_txt, dim); temb: (batch, dim),
        or this block's precomputed modulation (batch, 12 * dim): ``img_mod``'s projection, then ``txt_mod``'s.

        Returns ``(encoder_hidden_states, hidden_states)`` with the input shapes.
        """
        img_mod = precomputed(self.img_mod[1], temb)
        if img_mod is None:
            img_mod, txt_mod = self.img_mod(temb), self.txt_mod(temb)
        else:
            txt_mod = precomputed(self.txt_mod[1], temb[:, img_mod.shape[1]:])
        shift1, scale1, gate1, shift2, scale2, gate2 = img_mod.chunk(6, dim=-1)
        c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = txt_mod.chunk(6, dim=-1)
        x = _modulate(hidden_states, shift1, scale1)
        c = _modulate(encoder_hidden_states, c_shift1, c_scale1)
        attn_img, attn_txt = self.attn(x, rope, context=c, attention_mask=attention_mask)
        hidden_states = hidden_states + gate1.unsqueeze(1) * attn_img
        encoder_hidden_states = encoder_hidden_states + c_gate1.unsqueeze(1) * attn_txt

        x = _modulate(hidden_states, shift2, scale2)
        hidden_states = hidden_states + gate2.unsqueeze(1) * self.img_mlp(x)
        c = _modulate(encoder_hidden_states, c_shift2, c_scale2)
        encoder_hidden_states = encoder_hidden_states + c_gate2.unsqueeze(1) * self.txt_mlp(c)
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states
