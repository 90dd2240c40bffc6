"""FLOPs of one DiT forward, counted from the architecture: linear layers (and the Wan patch-embedding
convolution, a linear over patches) as ``2*M*N*K``, attention as ``4*B*H*S_q*S_kv*D`` (``Q K^T`` plus
``P V``). Element-wise work (norms, RoPE, activations, softmax) is not counted, as
``torch.utils.flop_counter`` does not count it either.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class Flops:
    """A FLOP count split into linear-layer and attention matmuls."""

    linear: int = 0
    attention: int = 0

    @property
    def total(self) -> int:
        return self.linear + self.attention

    def add_linear(self, tokens: int, d_in: int, d_out: int, count: int = 1) -> None:
        self.linear += 2 * tokens * d_in * d_out * count

    def add_attention(self, batch: int, heads: int, s_q: int, s_kv: int, head_dim: int, count: int = 1) -> None:
        self.attention += 4 * batch * heads * s_q * s_kv * head_dim * count

    def to_dict(self) -> dict[str, float]:
        return {"total_tflop": self.total / 1e12, "linear_tflop": self.linear / 1e12,
                "attention_tflop": self.attention / 1e12}


def flux_dit_flops(cfg, batch: int, seq_img: int, seq_txt: int) -> Flops:
    """FLUX.1 transformer (``FluxTransformerConfig``) on ``seq_img`` packed latent and ``seq_txt`` T5 tokens."""
    f = Flops()
    dim, heads, head_dim = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
    inner, mlp, seq = heads * head_dim, 4 * dim, seq_img + seq_txt
    time_proj = 256  # sinusoidal timestep features fed to the timestep and guidance embedders

    f.add_linear(batch * seq_img, cfg.in_channels, dim)  # x_embedder
    f.add_linear(batch * seq_txt, cfg.joint_attention_dim, dim)  # context_embedder
    embedders = 2 if cfg.guidance_embeds else 1
    f.add_linear(batch, time_proj, dim, embedders)
    f.add_linear(batch, dim, dim, embedders)
    f.add_linear(batch, cfg.pooled_projection_dim, dim)
    f.add_linear(batch, dim, dim)

    for _ in range(cfg.num_layers):  # double-stream blocks
        f.add_linear(batch, dim, 6 * dim, 2)  # norm1, norm1_context
        f.add_linear(batch * seq_img, dim, inner, 3)  # to_q, to_k, to_v
        f.add_linear(batch * seq_txt, dim, inner, 3)  # add_{q,k,v}_proj
        f.add_attention(batch, heads, seq, seq, head_dim)
        f.add_linear(batch * seq_img, inner, dim)  # to_out
        f.add_linear(batch * seq_txt, inner, dim)  # to_add_out
        for tokens in (seq_img, seq_txt):  # ff, ff_context
            f.add_linear(batch * tokens, dim, mlp)
            f.add_linear(batch * tokens, mlp, dim)

    for _ in range(cfg.num_single_layers):  # single-stream blocks over [text, image]
        f.add_linear(batch, dim, 3 * dim)  # norm
        f.add_linear(batch * seq, dim, inner, 3)  # to_q, to_k, to_v
        f.add_attention(batch, heads, seq, seq, head_dim)
        f.add_linear(batch * seq, dim, mlp)  # proj_mlp
        f.add_linear(batch * seq, inner + mlp, dim)  # proj_out

    f.add_linear(batch, dim, 2 * dim)  # norm_out
    f.add_linear(batch * seq_img, dim, cfg.patch_size**2 * cfg.output_channels)  # proj_out
    return f


def wan_dit_flops(cfg, batch: int, latent_frames: int, latent_height: int, latent_width: int, seq_txt: int,
                  timestep_tokens: int = 1) -> Flops:
    """Wan2.1 T2V transformer (``WanTransformerConfig``) on a (frames, height, width) latent grid.

    ``timestep_tokens`` is 1 for one timestep per sample (Wan2.1) or the token count for per-token
    timesteps.
    """
    f = Flops()
    dim, heads, head_dim = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
    pt, ph, pw = cfg.patch_size
    seq = (latent_frames // pt) * (latent_height // ph) * (latent_width // pw)
    patch = pt * ph * pw

    f.add_linear(batch * seq, cfg.in_channels * patch, dim)  # patch_embedding (stride = kernel)
    f.add_linear(batch * timestep_tokens, cfg.freq_dim, dim)  # time_embedder.linear_1
    f.add_linear(batch * timestep_tokens, dim, dim)  # time_embedder.linear_2
    f.add_linear(batch * timestep_tokens, dim, 6 * dim)  # time_proj
    f.add_linear(batch * seq_txt, cfg.text_dim, dim)  # text_embedder.linear_1
    f.add_linear(batch * seq_txt, dim, dim)  # text_embedder.linear_2

    for _ in range(cfg.num_layers):
        f.add_linear(batch * seq, dim, dim, 4)  # attn1: q, k, v, out
        f.add_attention(batch, heads, seq, seq, head_dim)
        f.add_linear(batch * seq, dim, dim, 2)  # attn2: q, out
        f.add_linear(batch * seq_txt, dim, dim, 2)  # attn2: k, v on the text
        f.add_attention(batch, heads, seq, seq_txt, head_dim)
        f.add_linear(batch * seq, dim, cfg.ffn_dim)
        f.add_linear(batch * seq, cfg.ffn_dim, dim)

    f.add_linear(batch * seq, dim, (cfg.out_channels or cfg.in_channels) * patch)  # proj_out
    return f


def matmul_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def tflops_per_s(flop: int | float, ms: float | None) -> float | None:
    if not ms or not math.isfinite(ms) or ms <= 0:
        return None
    return flop / (ms * 1e-3) / 1e12


def sd3_dit_flops(cfg, batch: int, seq_img: int, seq_txt: int) -> Flops:
    """SD3 / SD3.5 ``SD3Transformer2DModel`` on ``seq_img`` patches and ``seq_txt`` (CLIP + T5) tokens.
    The last joint block is ``context_pre_only``: no text output projection and no text feed-forward."""
    f = Flops()
    dim, heads, head_dim = cfg.num_attention_heads * cfg.attention_head_dim, cfg.num_attention_heads, cfg.attention_head_dim
    seq, p = seq_img + seq_txt, cfg.patch_size
    f.add_linear(batch * seq_img, cfg.in_channels * p * p, dim)  # pos_embed.proj (stride = kernel)
    f.add_linear(batch * seq_txt, cfg.joint_attention_dim, cfg.caption_projection_dim)  # context_embedder
    f.add_linear(batch, 256, dim)
    f.add_linear(batch, dim, dim)
    f.add_linear(batch, cfg.pooled_projection_dim, dim)
    f.add_linear(batch, dim, dim)
    for i in range(cfg.num_layers):
        last = i == cfg.num_layers - 1
        f.add_linear(batch, dim, 6 * dim)  # norm1
        f.add_linear(batch, dim, 2 * dim if last else 6 * dim)  # norm1_context
        f.add_linear(batch * seq_img, dim, dim, 3)
        f.add_linear(batch * seq_txt, dim, dim, 3)
        f.add_attention(batch, heads, seq, seq, head_dim)
        f.add_linear(batch * seq_img, dim, dim)  # to_out
        f.add_linear(batch * seq_img, dim, 4 * dim)  # ff
        f.add_linear(batch * seq_img, 4 * dim, dim)
        if not last:
            f.add_linear(batch * seq_txt, dim, dim)  # to_add_out
            f.add_linear(batch * seq_txt, dim, 4 * dim)  # ff_context
            f.add_linear(batch * seq_txt, 4 * dim, dim)
    f.add_linear(batch, dim, 2 * dim)  # norm_out
    f.add_linear(batch * seq_img, dim, p * p * cfg.out_channels)  # proj_out
    return f


def hunyuan_video_dit_flops(cfg, batch: int, latent_frames: int, latent_height: int, latent_width: int,
                            seq_txt: int) -> Flops:
    """HunyuanVideo ``HunyuanVideoTransformer3DModel``: token refiner over the text, dual-stream blocks, then
    single-stream blocks over [video, text]."""
    f = Flops()
    heads, head_dim = cfg.num_attention_heads, cfg.attention_head_dim
    dim, mlp = heads * head_dim, int(heads * head_dim * cfg.mlp_ratio)
    pt, p = cfg.patch_size_t, cfg.patch_size
    seq_img = (latent_frames // pt) * (latent_height // p) * (latent_width // p)
    seq = seq_img + seq_txt
    f.add_linear(batch * seq_img, cfg.in_channels * pt * p * p, dim)  # x_embedder (stride = kernel)
    f.add_linear(batch * seq_txt, cfg.text_embed_dim, dim)  # context_embedder.proj_in
    for _ in range(cfg.num_refiner_layers):  # token refiner: self-attention and MLP over the text
        f.add_linear(batch * seq_txt, dim, dim, 4)
        f.add_attention(batch, heads, seq_txt, seq_txt, head_dim)
        f.add_linear(batch * seq_txt, dim, mlp)
        f.add_linear(batch * seq_txt, mlp, dim)
    for _ in range(cfg.num_layers):
        f.add_linear(batch, dim, 6 * dim, 2)  # norm1, norm1_context
        f.add_linear(batch * seq_img, dim, dim, 4)  # q, k, v, out
        f.add_linear(batch * seq_txt, dim, dim, 4)  # added q, k, v, out
        f.add_attention(batch, heads, seq, seq, head_dim)
        for tokens in (seq_img, seq_txt):  # ff, ff_context
            f.add_linear(batch * tokens, dim, mlp)
            f.add_linear(batch * tokens, mlp, dim)
    for _ in range(cfg.num_single_layers):
        f.add_linear(batch, dim, 3 * dim)  # norm
        f.add_linear(batch * seq, dim, dim, 3)  # q, k, v
        f.add_linear(batch * seq, dim, mlp)  # proj_mlp
        f.add_attention(batch, heads, seq, seq, head_dim)
        f.add_linear(batch * seq, dim + mlp, dim)  # proj_out
    f.add_linear(batch, dim, 2 * dim)  # norm_out
    f.add_linear(batch * seq_img, dim, pt * p * p * cfg.out_channels)  # proj_out
    return f


def zimage_dit_flops(cfg, batch: int, seq_img: int, seq_txt: int) -> Flops:
    """Z-Image transformer (``ZImageTransformerConfig``) on ``seq_img`` patch tokens and ``seq_txt`` caption
    tokens (both already padded to a multiple of 32, as the model pads them)."""
    f = Flops()
    dim, heads = cfg.dim, cfg.n_heads
    head_dim, hidden, seq = dim // heads, int(dim / 3 * 8), seq_img + seq_txt
    patch = cfg.patch_size**2 * cfg.f_patch_size * cfg.in_channels
    adaln = min(dim, 256)

    def block(tokens: int, modulated: bool) -> None:
        if modulated:
            f.add_linear(batch, adaln, 4 * dim)  # adaLN_modulation
        f.add_linear(batch * tokens, dim, dim, 4)  # to_q, to_k, to_v, to_out
        f.add_attention(batch, heads, tokens, tokens, head_dim)
        f.add_linear(batch * tokens, dim, hidden, 2)  # w1, w3
        f.add_linear(batch * tokens, hidden, dim)  # w2

    f.add_linear(batch, 256, 1024)  # t_embedder
    f.add_linear(batch, 1024, adaln)
    f.add_linear(batch * seq_img, patch, dim)  # x_embedder
    f.add_linear(batch * seq_txt, cfg.cap_feat_dim, dim)  # cap_embedder
    for _ in range(cfg.n_refiner_layers):
        block(seq_img, True)  # noise_refiner
        block(seq_txt, False)  # context_refiner
    for _ in range(cfg.n_layers):
        block(seq, True)
    f.add_linear(batch, adaln, dim)  # final adaLN
    f.add_linear(batch * seq_img, dim, patch)  # final linear
    return f


def qwen_image_dit_flops(cfg, batch: int, seq_img: int, seq_txt: int) -> Flops:
    """Qwen-Image transformer (``QwenImageTransformerConfig``) on ``seq_img`` packed latent tokens (the generated
    image's plus any input images') and ``seq_txt`` Qwen2.5-VL tokens: FLUX's double-stream block, 4x MLPs."""
    f = Flops()
    dim, heads, head_dim = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
    inner, mlp, seq = heads * head_dim, 4 * dim, seq_img + seq_txt
    f.add_linear(batch * seq_img, cfg.in_channels, dim)  # img_in
    f.add_linear(batch * seq_txt, cfg.joint_attention_dim, dim)  # txt_in
    f.add_linear(batch, 256, dim)  # timestep embedder
    f.add_linear(batch, dim, dim)
    for _ in range(cfg.num_layers):
        f.add_linear(batch, dim, 6 * dim, 2)  # img_mod, txt_mod
        f.add_linear(batch * seq_img, dim, inner, 3)  # to_q, to_k, to_v
        f.add_linear(batch * seq_txt, dim, inner, 3)  # add_{q,k,v}_proj
        f.add_attention(batch, heads, seq, seq, head_dim)
        f.add_linear(batch * seq_img, inner, dim)  # to_out
        f.add_linear(batch * seq_txt, inner, dim)  # to_add_out
        for tokens in (seq_img, seq_txt):  # img_mlp, txt_mlp
            f.add_linear(batch * tokens, dim, mlp)
            f.add_linear(batch * tokens, mlp, dim)
    f.add_linear(batch, dim, 2 * dim)  # norm_out
    f.add_linear(batch * seq_img, dim, cfg.patch_size**2 * cfg.output_channels)  # proj_out
    return f
