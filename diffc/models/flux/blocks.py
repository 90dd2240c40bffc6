"""FLUX.1 building blocks: embeddings, adaptive norms, joint attention and the two block kinds.

Module and parameter names follow the diffusers checkpoint layout (``norm1.linear``,
``attn.to_out.0``, ``ff.net.2``, ...) so the state dict loads by name. The op order and the dtype
casts follow diffusers' ``FluxTransformer2DModel`` so outputs match it to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import attention_hook
from ..modulation import precomputed

TIME_PROJ_DIM = 256
ROPE_THETA = 10000
NORM_EPS = 1e-6
_NO_FLOAT64_DEVICES = frozenset({"mps", "npu", "neuron"})


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------


def timestep_sinusoid(t: torch.Tensor, dim: int = TIME_PROJ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos | sin]`` of a (batch,) tensor of (fractional) timesteps -> (batch, dim) fp32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class SiLUMLP(nn.Module):
    """``linear_2(silu(linear_1(x)))``: the timestep, guidance and pooled-text embedders."""

    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbedding(nn.Module):
    """Conditioning vector from timestep, optional guidance scale and pooled CLIP embedding.

    Inputs are already scaled by 1000. Output: (batch, dim) in the pooled embedding's dtype.
    """

    def __init__(self, dim: int, pooled_projection_dim: int, guidance_embeds: bool):
        super().__init__()
        self.timestep_embedder = SiLUMLP(TIME_PROJ_DIM, dim)
        if guidance_embeds:
            self.guidance_embedder = SiLUMLP(TIME_PROJ_DIM, dim)
        self.text_embedder = SiLUMLP(pooled_projection_dim, dim)

    def forward(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        emb = self.timestep_embedder(timestep_sinusoid(timestep).to(pooled.dtype))
        if guidance is not None:
            emb = emb + self.guidance_embedder(timestep_sinusoid(guidance).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


def rope_tables(
    ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int = ROPE_THETA
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token RoPE cos/sin tables from (seq, n_axes) position ids -> two (seq, sum(axes_dim)) fp32 tensors.

    Each axis contributes ``axes_dim[i]`` channels whose frequencies are computed in float64 (float32
    where the device has no float64), each value repeated twice for the interleaved pair layout.
    """
    freqs_dtype = torch.float32 if ids.device.type in _NO_FLOAT64_DEVICES else torch.float64
    pos = ids.float()
    cos_parts, sin_parts = [], []
    for axis, dim in enumerate(axes_dim):
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=freqs_dtype, device=ids.device) / dim))
        angles = torch.outer(pos[:, axis], inv_freq)  # (seq, dim // 2)
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs ``(x[2i], x[2i+1])``.

    x: (batch, heads, seq, head_dim); cos, sin: (seq, head_dim) fp32. Returns x's shape and dtype.
    """
    x_even, x_odd = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)  # (batch, heads, seq, head_dim // 2)
    x_rot = torch.stack([-x_odd, x_even], dim=-1).flatten(3)
    return (x.float() * cos + x_rot.float() * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Adaptive norms
# ---------------------------------------------------------------------------------------------


class AdaNormZero(nn.Module):
    """Affine-free LayerNorm modulated by ``chunks * dim`` values projected from the conditioning.

    ``chunks=6`` (double-stream) returns ``(x, gate_msa, shift_mlp, scale_mlp, gate_mlp)``;
    ``chunks=3`` (single-stream) returns ``(x, gate)``.
    """

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)

    def project(self, temb: torch.Tensor) -> torch.Tensor:
        """The modulation ``linear(silu(temb))``: (batch, chunks * dim) from the (batch, dim) conditioning."""
        return self.linear(F.silu(temb))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # x: (batch, seq, dim); temb: the (batch, dim) conditioning, or a precomputed modulation (batch, >= chunks
        # * dim) whose first chunks * dim columns are this norm's projection (FluxTransformer2DModel.modulation)
        emb = precomputed(self.linear, temb)
        emb = self.project(temb) if emb is None else emb
        shift, scale, gate, *rest = emb.chunk(self.chunks, dim=1)
        x = F.layer_norm(x, x.shape[-1:], eps=NORM_EPS) * (1 + scale[:, None]) + shift[:, None]
        return (x, gate, *rest)


class AdaNormContinuous(nn.Module):
    """Final affine-free LayerNorm with ``(scale, shift)`` projected from the conditioning."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 2 * dim)

    def project(self, temb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``linear(silu(temb))`` in the activations' ``dtype``: (batch, 2 * dim)."""
        return self.linear(F.silu(temb).to(dtype))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # temb: the conditioning, or its precomputed projection (as AdaNormZero takes it)
        emb = precomputed(self.linear, temb)
        scale, shift = (self.project(temb, x.dtype) if emb is None else emb).chunk(2, dim=1)
        return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS) * (1 + scale)[:, None, :] + shift[:, None, :]


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (non-causal, unmasked) softmax attention. q, k, v, out: (batch, heads, seq, head_dim).

    Torch's SDPA unless a sequence-parallel runtime fills the slot (``models/attention_hook.py``)."""
    return attention_hook.attention(q, k, v)


class FluxAttention(nn.Module):
    """Multi-head attention with per-head RMSNorm on q/k and RoPE.

    With ``context=True`` (double-stream) the text tokens get their own projections and norms, are
    placed before the image tokens for one joint attention, and are split back out afterwards.
    With ``context=False`` (single-stream) there is no output projection: the caller fuses it.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_q = nn.RMSNorm(head_dim, eps=NORM_EPS)
        self.norm_k = nn.RMSNorm(head_dim, eps=NORM_EPS)
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.context = context
        if context:
            self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Identity()])
            self.norm_added_q = nn.RMSNorm(head_dim, eps=NORM_EPS)
            self.norm_added_k = nn.RMSNorm(head_dim, eps=NORM_EPS)
            self.add_q_proj = nn.Linear(dim, inner)
            self.add_k_proj = nn.Linear(dim, inner)
            self.add_v_proj = nn.Linear(dim, inner)
            self.to_add_out = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        x = x.unflatten(-1, (-1, self.head_dim))  # (batch, seq, heads, head_dim)
        if norm is not None:
            x = norm(x)
        return x.transpose(1, 2)  # (batch, heads, seq, head_dim)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        context: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: (batch, seq_img, dim); context: (batch, seq_txt, dim); rope cos/sin: (seq_txt + seq_img, head_dim).

        Returns (batch, seq, heads * head_dim) without context, else ``(img_out, txt_out)`` projected to dim.
        """
        q = self._heads(self.to_q(x), self.norm_q)
        k = self._heads(self.to_k(x), self.norm_k)
        v = self._heads(self.to_v(x))
        if self.context:
            q = torch.cat([self._heads(self.add_q_proj(context), self.norm_added_q), q], dim=2)
            k = torch.cat([self._heads(self.add_k_proj(context), self.norm_added_k), k], dim=2)
            v = torch.cat([self._heads(self.add_v_proj(context)), v], dim=2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, k, v).transpose(1, 2).flatten(2, 3).to(q.dtype)  # (batch, seq, inner)
        if not self.context:
            return out
        txt, img = out.split_with_sizes([context.shape[1], x.shape[1]], dim=1)
        img = self.to_out[1](self.to_out[0](img.contiguous()))
        return img, self.to_add_out(txt.contiguous())


# ---------------------------------------------------------------------------------------------
# Transformer blocks
# ---------------------------------------------------------------------------------------------


class GELUProj(nn.Module):
    """``gelu_tanh(proj(x))``, named like the checkpoint's ``ff.net.0``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Two-layer tanh-GELU MLP, ``dim -> 4 * dim -> dim``."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class FluxTransformerBlock(nn.Module):
    """Double-stream (MMDiT) block: image and text streams with separate weights, joint attention."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int):
        super().__init__()
        self.norm1 = AdaNormZero(dim, chunks=6)
        self.norm1_context = AdaNormZero(dim, chunks=6)
        self.attn = FluxAttention(dim, num_attention_heads, attention_head_dim, context=True)
        self.ff = FeedForward(dim)
        self.ff_context = FeedForward(dim)

    def modulation(self, temb: torch.Tensor) -> torch.Tensor | None:
        """This block's precomputed modulation (``forward``'s ``temb`` form), (batch, 12 * dim), from the (batch,
        dim) conditioning; None when ``temb`` is not the conditioning (a modulation already)."""
        if temb.shape[-1] != self.norm1.linear.in_features:
            return None
        return torch.cat([self.norm1.project(temb), self.norm1_context.project(temb)], dim=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states: (batch, seq_img, dim); encoder_hidden_states: (batch, seq_txt, dim); temb: (batch, dim),
        or this block's precomputed modulation (batch, 12 * dim): ``norm1``'s projection, then ``norm1_context``'s.

        Returns ``(encoder_hidden_states, hidden_states)`` with the input shapes.
        """
        x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, temb)
        c_temb = temb if precomputed(self.norm1.linear, temb) is None else temb[:, self.norm1.linear.out_features:]
        c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, c_temb)
        attn_img, attn_txt = self.attn(x, rope, context=c)

        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_img
        x = F.layer_norm(hidden_states, hidden_states.shape[-1:], eps=NORM_EPS)
        x = x * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * self.ff(x)

        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * attn_txt
        c = F.layer_norm(encoder_hidden_states, encoder_hidden_states.shape[-1:], eps=NORM_EPS)
        c = c * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * self.ff_context(c)
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block over the concatenated ``[text, image]`` tokens: parallel attention and MLP
    whose outputs are concatenated and projected by one ``proj_out``."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        mlp_hidden = int(dim * mlp_ratio)
        self.norm = AdaNormZero(dim, chunks=3)
        self.proj_mlp = nn.Linear(dim, mlp_hidden)
        self.proj_out = nn.Linear(dim + mlp_hidden, dim)
        self.attn = FluxAttention(dim, num_attention_heads, attention_head_dim, context=False)

    def modulation(self, temb: torch.Tensor) -> torch.Tensor | None:
        """This block's precomputed modulation: ``norm``'s projection, (batch, 3 * dim); None when ``temb`` is not
        the conditioning."""
        return self.norm.project(temb) if temb.shape[-1] == self.norm.linear.in_features else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same contract as ``FluxTransformerBlock.forward`` (a precomputed modulation: ``norm``'s, (batch, 3 * dim))."""
        seq_txt = encoder_hidden_states.shape[1]
        residual = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # (batch, seq_txt + seq_img, dim)
        x, gate = self.norm(residual, temb)
        mlp = F.gelu(self.proj_mlp(x), approximate="tanh")
        out = self.proj_out(torch.cat([self.attn(x, rope), mlp], dim=2))
        out = residual + gate.unsqueeze(1) * out
        if out.dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out[:, :seq_txt], out[:, seq_txt:]
