"""Native Z-Image transformer, loading diffusers' ``ZImageTransformer2DModel`` checkpoints by name.

Flow (as diffusers' basic, non-omni mode): patchify the latents into ``p*p*C`` tokens, embed and refine
them (``noise_refiner``, modulated by the timestep); embed and refine the caption (``context_refiner``,
unmodulated); run ``layers`` over the per-sample sequence ``[image, caption]``; final layer; unpatchify.
Each token sequence is padded to a multiple of 32 with a learned pad token (these pad tokens are
attended to, as in Z-Image); samples of one batch whose sequences differ in length (captions of other
lengths, e.g. the two halves of classifier-free guidance) are right-padded and masked out of attention.

A caption's length decides the sequence's shape, so it has to be known on the host. :func:`caption_layout`
reads it once (the pipeline calls it once a generation) and hands the forward ``padded_caption_lengths``;
with them the forward reads nothing back from the device and a CUDA graph can capture it. Without them the
forward reads the mask itself, at every call.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...errors import InvalidArgumentError
from ..config import ModelConfig
from ..structure import BlockStreams
from .blocks import ADALN_EMBED_DIM, FinalLayer, TimestepEmbedder, ZImageTransformerBlock, rope_tables

SEQ_MULTI_OF = 32


@dataclasses.dataclass(frozen=True)
class ZImageTransformerConfig(ModelConfig):
    """The fields of diffusers' ``ZImageTransformer2DModel`` config.json, with diffusers' defaults."""

    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    siglip_feat_dim: int | None = None
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1024, 512, 512)

    def __post_init__(self):
        if self.n_heads == 0 or self.dim % self.n_heads:
            raise InvalidArgumentError("n_heads", f"must divide dim={self.dim}, got {self.n_heads}")
        if sum(self.axes_dims) != self.dim // self.n_heads or any(d % 2 for d in self.axes_dims):
            raise InvalidArgumentError("axes_dims", f"must be even and sum to the head dim {self.dim // self.n_heads}, "
                                       f"got {list(self.axes_dims)}")
        if len(self.axes_dims) != 3 or len(self.axes_lens) != 3:
            raise InvalidArgumentError("axes_dims", "Z-Image uses 3 RoPE axes (frame/caption, row, column)")
        if not self.qk_norm:
            raise InvalidArgumentError("qk_norm", "only qk_norm=true (every published Z-Image) is implemented")
        if self.siglip_feat_dim is not None:
            raise InvalidArgumentError("siglip_feat_dim", "Z-Image-Omni (SigLIP conditioning) is not supported yet")
        if len(self.all_patch_size) != len(self.all_f_patch_size) or not self.all_patch_size:
            raise InvalidArgumentError("all_patch_size", "needs one entry per all_f_patch_size entry")

    @property
    def patch_pairs(self) -> list[tuple[int, int]]:
        """Every (patch, frame patch) pair the checkpoint has an embedder and a final layer for."""
        return list(zip(self.all_patch_size, self.all_f_patch_size))

    @property
    def patch_size(self) -> int:
        """The patch the DiT runs: (2, 1), diffusers' forward default and what ZImagePipeline runs, where the
        checkpoint has it, else its first pair."""
        return self._patch_pair[0]

    @property
    def f_patch_size(self) -> int:
        return self._patch_pair[1]

    @property
    def _patch_pair(self) -> tuple[int, int]:
        return (2, 1) if (2, 1) in self.patch_pairs else self.patch_pairs[0]


ZIMAGE_TRANSFORMER_SPECS: dict[str, ZImageTransformerConfig] = {
    # Tongyi-MAI/Z-Image-Turbo (and Z-Image): 6B parameters, 30 layers of 3840, Qwen3-4B caption features.
    "z-image-turbo": ZImageTransformerConfig(),
}


def _ceil(n: int, multiple: int = SEQ_MULTI_OF) -> int:
    return -(-n // multiple) * multiple


def _prefix_mask(lengths: list[int], total: int, device) -> torch.Tensor | None:
    """(B, total) bool, True before each sample's length; None when every length is ``total``. Built from host
    integers on the device (no host-to-device copy, which a CUDA graph cannot capture)."""
    if all(n == total for n in lengths):
        return None
    positions = torch.arange(total, device=device)
    return torch.stack([positions < n for n in lengths])


def caption_layout(captions: torch.Tensor, mask: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
    """``(captions, mask, padded lengths)`` for a forward that reads nothing back from the device.

    ``captions`` (B, L, ...) and ``mask`` (B, L) bool (None: every token kept) become: each sample's kept tokens
    first, in their order; the mask then keeps a prefix of each row (None when it keeps every token); and each
    sample's kept-token count rounded up to a multiple of 32 (the forward's ``padded_caption_lengths``).
    Reads the mask on the host.
    """
    b, length = captions.shape[:2]
    if mask is None:
        return captions, None, (_ceil(length),) * b
    counts = [int(n) for n in mask.sum(dim=1).tolist()]
    padded = tuple(_ceil(n) for n in counts)
    prefix = _prefix_mask(counts, length, mask.device)  # (B, L); None when every token is kept
    if prefix is None:
        return captions, None, padded
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # kept tokens first, in order
    captions = torch.gather(captions, 1, order.reshape(b, length, *[1] * (captions.ndim - 2)).expand_as(captions))
    return captions, prefix, padded


class ZImageTransformer2DModel(nn.Module):
    """Z-Image single-stream DiT.

    ``forward(hidden_states (B, C, H, W), timestep (B,) in [0, 1] (0 = noise), encoder_hidden_states
    (B, L, cap_feat_dim), encoder_attention_mask (B, L) bool or None)`` returns (B, C, H, W): the model's
    output as Z-Image defines it (the pipeline negates it into the flow velocity).
    """

    config_class = ZImageTransformerConfig
    _repeated_blocks = ("noise_refiner", "context_refiner", "layers")
    _keep_in_fp32_modules = ()
    # One stream a region, each block's first argument, returned bare: the image tokens (noise refiner), the
    # caption tokens (context refiner; the same at every step, so a cached residual is exact) and both joined
    # (main layers). A step cache keeps each region's residual on its own.
    _block_streams = {name: BlockStreams(inputs=("x",), outputs="x")
                      for name in ("noise_refiner", "context_refiner", "layers")}

    def __init__(self, config: ZImageTransformerConfig):
        super().__init__()
        self.config = config
        dim, c = config.dim, config.in_channels
        # one embedder and final layer per pair, as the checkpoint holds them; the forward runs config.patch_size's
        pairs = config.patch_pairs
        self.all_x_embedder = nn.ModuleDict({f"{p}-{pf}": nn.Linear(pf * p * p * c, dim) for p, pf in pairs})
        self.all_final_layer = nn.ModuleDict({f"{p}-{pf}": FinalLayer(dim, pf * p * p * c) for p, pf in pairs})
        self.noise_refiner = nn.ModuleList(
            ZImageTransformerBlock(dim, config.n_heads, config.norm_eps) for _ in range(config.n_refiner_layers))
        self.context_refiner = nn.ModuleList(
            ZImageTransformerBlock(dim, config.n_heads, config.norm_eps, modulation=False)
            for _ in range(config.n_refiner_layers))
        self.t_embedder = TimestepEmbedder(min(dim, ADALN_EMBED_DIM), mid_size=1024)
        self.cap_embedder = nn.Sequential(nn.RMSNorm(config.cap_feat_dim, eps=config.norm_eps),
                                          nn.Linear(config.cap_feat_dim, dim))
        self.x_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.layers = nn.ModuleList(
            ZImageTransformerBlock(dim, config.n_heads, config.norm_eps) for _ in range(config.n_layers))

    # ------------------------------------------------------------------------------------ helpers

    def _tables(self, ids: torch.Tensor, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables of ``ids`` (B, S, 3); ``shared``: every sample's ids are the same (then one table for the
        batch). The caller knows that on the host (the ids follow from the padded caption lengths), so no
        comparison of device tensors stalls the forward (or a CUDA graph capture) on a device-to-host read."""
        cos, sin = rope_tables(ids, self.config.axes_dims, self.config.rope_theta)  # (B, S, head_dim)
        if shared:
            cos, sin = cos[:1], sin[:1]  # one table for the batch
        return cos[:, :, None, :].contiguous(), sin[:, :, None, :].contiguous()  # (B or 1, S, 1, head_dim)

    def _caption_tokens(self, feats: torch.Tensor, keep: torch.Tensor | None, padded: list[int]) -> torch.Tensor:
        """(B, max(padded), dim): each sample's kept features (a prefix: ``keep``), then the pad token up to its
        padded length, then zeros (masked out of attention)."""
        total, length = max(padded), feats.shape[1]
        if length < total:
            feats = torch.nn.functional.pad(feats, (0, 0, 0, total - length))
            keep = (_prefix_mask([length] * feats.shape[0], total, feats.device) if keep is None
                    else torch.nn.functional.pad(keep, (0, total - length), value=False))
        elif length > total:  # every kept token lies in the first ``total`` (a prefix)
            feats, keep = feats[:, :total], keep[:, :total]
        cap = feats
        if keep is not None:
            cap = torch.where(keep[..., None], feats, self.cap_pad_token.to(feats.dtype))
        inside = _prefix_mask(padded, total, feats.device)
        if inside is not None:
            cap = torch.where(inside[..., None], cap, torch.zeros((), dtype=cap.dtype, device=cap.device))
        return cap

    def _patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        # (B, C, H, W) -> (B, F*H/p*W/p, pf*p*p*C), feature order (pf, ph, pw, C) as Z-Image
        p, pf = self.config.patch_size, self.config.f_patch_size
        b, c, h, w = x.shape
        x = x.view(b, c, 1, 1, h // p, p, w // p, p)  # a 2-D latent is one frame
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, (h // p) * (w // p), pf * p * p * c)
        return x, (1, h // p, w // p)

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        p, c = self.config.patch_size, self.config.in_channels
        _, ht, wt = grid
        b = x.shape[0]
        x = x.view(b, ht, wt, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, ht * p, wt * p)

    # ------------------------------------------------------------------------------------ forward

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None,
                padded_caption_lengths: tuple[int, ...] | None = None) -> torch.Tensor:
        """``padded_caption_lengths`` (from :func:`caption_layout`): the mask then keeps a prefix of each row, and
        the forward reads nothing back from the device. Without them it reads the mask, which may keep any tokens."""
        self._check_inputs(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                           padded_caption_lengths)
        cfg = self.config
        device, b = hidden_states.device, hidden_states.shape[0]
        adaln = self.t_embedder(timestep * cfg.t_scale).type_as(hidden_states)  # (B, 256)

        # image tokens, padded to a multiple of 32 with the pad token
        tokens, grid = self._patchify(hidden_states)
        n_img = tokens.shape[1]
        img_len = _ceil(n_img)
        x = self.all_x_embedder[f"{cfg.patch_size}-{cfg.f_patch_size}"](tokens)  # (B, n_img, dim)
        x = torch.cat([x, self.x_pad_token.to(x.dtype).expand(b, img_len - n_img, -1)], dim=1)

        # caption tokens: each sample's own length, padded to a multiple of 32 with the pad token
        feats = self.cap_embedder(encoder_hidden_states)  # (B, L, dim)
        keep = encoder_attention_mask
        if padded_caption_lengths is None:
            feats, keep, padded_caption_lengths = caption_layout(feats, keep)  # reads the mask on the host
        cap_padded = list(padded_caption_lengths)
        cap_total = max(cap_padded)
        cap = self._caption_tokens(feats, keep, cap_padded)
        cap_ids = torch.zeros(b, cap_total, 3, dtype=torch.int64, device=device)
        img_ids = torch.zeros(b, img_len, 3, dtype=torch.int64, device=device)
        rows = torch.arange(grid[1], device=device).repeat_interleave(grid[2])
        cols = torch.arange(grid[2], device=device).repeat(grid[1])
        for i, padded in enumerate(cap_padded):
            cap_ids[i, :padded, 0] = torch.arange(1, padded + 1, device=device)
            img_ids[i, :n_img, 0].fill_(padded + 1)  # fill_, not setitem: a Python number is no host tensor
            img_ids[i, :n_img, 1], img_ids[i, :n_img, 2] = rows, cols

        shared = len(set(cap_padded)) == 1  # same padded caption length: the same ids in every sample
        img_cos, img_sin = self._tables(img_ids, shared)
        for block in self.noise_refiner:
            x = block(x, None, img_cos, img_sin, adaln)
        cap_mask = _prefix_mask(cap_padded, cap_total, device)
        cap_cos, cap_sin = self._tables(cap_ids, shared)
        for block in self.context_refiner:
            cap = block(cap, cap_mask, cap_cos, cap_sin)

        # one sequence per sample: [image, caption], right-padded across the batch
        lengths = [img_len + n for n in cap_padded]
        unified = torch.cat([x, cap], dim=1)
        ids = torch.cat([img_ids, cap_ids], dim=1)
        mask = _prefix_mask(lengths, max(lengths), device)
        cos, sin = self._tables(ids, shared)
        for block in self.layers:
            unified = block(unified, mask, cos, sin, adaln)

        out = self.all_final_layer[f"{cfg.patch_size}-{cfg.f_patch_size}"](unified[:, :n_img], adaln)
        return self._unpatchify(out, grid)

    def _check_inputs(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                      padded_caption_lengths) -> None:
        cfg = self.config
        p = cfg.patch_size
        if hidden_states.ndim != 4 or hidden_states.shape[1] != cfg.in_channels:
            raise InvalidArgumentError("hidden_states", f"expected (batch, {cfg.in_channels}, height, width), "
                                       f"got {tuple(hidden_states.shape)}")
        b, _, h, w = hidden_states.shape
        if h % p or w % p:
            raise InvalidArgumentError("hidden_states", f"latent height and width must be multiples of the patch "
                                       f"size {p}, got {h}x{w}")
        if h // p > cfg.axes_lens[1] or w // p > cfg.axes_lens[2]:
            raise InvalidArgumentError("hidden_states", f"at most {cfg.axes_lens[1] * p}x{cfg.axes_lens[2] * p} "
                                       f"latent pixels for this checkpoint's RoPE (axes_lens), got {h}x{w}")
        if timestep.ndim != 1 or timestep.shape[0] not in (1, b):
            raise InvalidArgumentError("timestep", f"expected shape ({b},), got {tuple(timestep.shape)}")
        if (encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b
                or encoder_hidden_states.shape[2] != cfg.cap_feat_dim):
            raise InvalidArgumentError("encoder_hidden_states", f"expected ({b}, seq, {cfg.cap_feat_dim}), "
                                       f"got {tuple(encoder_hidden_states.shape)}")
        if encoder_attention_mask is not None:
            if tuple(encoder_attention_mask.shape) != tuple(encoder_hidden_states.shape[:2]):
                raise InvalidArgumentError("encoder_attention_mask", f"expected shape "
                                           f"{tuple(encoder_hidden_states.shape[:2])}, got "
                                           f"{tuple(encoder_attention_mask.shape)}")
            if encoder_attention_mask.dtype != torch.bool:
                raise InvalidArgumentError("encoder_attention_mask", f"must be bool, got {encoder_attention_mask.dtype}")
            if padded_caption_lengths is None and not encoder_attention_mask.any(dim=1).all():  # a host read
                raise InvalidArgumentError("encoder_attention_mask", "must keep at least one token per sample")
        if padded_caption_lengths is not None:
            most = _ceil(encoder_hidden_states.shape[1])
            if (not isinstance(padded_caption_lengths, (tuple, list)) or len(padded_caption_lengths) != b
                    or any(isinstance(n, bool) or not isinstance(n, int) or n < SEQ_MULTI_OF or n > most
                           or n % SEQ_MULTI_OF for n in padded_caption_lengths)):
                raise InvalidArgumentError("padded_caption_lengths", f"expected {b} multiple(s) of {SEQ_MULTI_OF} "
                                           f"from {SEQ_MULTI_OF} to {most} (caption_layout gives them), "
                                           f"got {padded_caption_lengths!r}")
            if encoder_attention_mask is None and any(n != most for n in padded_caption_lengths):
                raise InvalidArgumentError("padded_caption_lengths", f"without a mask every caption keeps its "
                                           f"{encoder_hidden_states.shape[1]} tokens: expected {most} each, "
                                           f"got {padded_caption_lengths!r}")
        if _ceil(encoder_hidden_states.shape[1]) + 1 >= cfg.axes_lens[0]:
            raise InvalidArgumentError("encoder_hidden_states", f"at most {cfg.axes_lens[0] - SEQ_MULTI_OF - 1} "
                                       f"caption tokens for this checkpoint's RoPE, got {encoder_hidden_states.shape[1]}")
