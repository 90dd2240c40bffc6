"""Native Qwen-Image transformer, loading diffusers' ``QwenImageTransformer2DModel`` checkpoints by name.

Qwen-Image, Qwen-Image-Edit and Qwen-Image-Edit-2509 share this DiT (60 double-stream blocks, 24 heads
of 128, 3584-wide Qwen2.5-VL text states). Editing appends the input images' latents to the image
sequence; their positions are frames 1, 2, ... of the 3-axis RoPE (``img_shapes``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...errors import CheckpointError, InvalidArgumentError
from ..config import ModelConfig
from ..flux.blocks import AdaNormContinuous
from ..modulation import check_modulation
from ..structure import BlockStreams
from .blocks import (
    NORM_EPS,
    ROPE_TABLE_LEN,
    QwenImageTransformerBlock,
    QwenTimestepEmbedding,
    rope_positions,
    rope_tables,
)


@dataclasses.dataclass(frozen=True)
class QwenImageTransformerConfig(ModelConfig):
    """The fields of diffusers' ``QwenImageTransformer2DModel`` config.json, with diffusers' defaults."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False

    def __post_init__(self):
        if len(self.axes_dims_rope) != 3 or sum(self.axes_dims_rope) != self.attention_head_dim:
            raise InvalidArgumentError("axes_dims_rope", f"must be 3 values summing to attention_head_dim="
                                       f"{self.attention_head_dim}, got {list(self.axes_dims_rope)}")
        if any(d <= 0 or d % 2 for d in self.axes_dims_rope):
            raise InvalidArgumentError("axes_dims_rope", f"every entry must be a positive even number, "
                                       f"got {list(self.axes_dims_rope)}")
        unsupported = [f for f in ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")
                       if getattr(self, f)]
        if unsupported:
            raise CheckpointError(f"QwenImageTransformer2DModel: {', '.join(unsupported)}=true is not supported "
                                  "(Qwen-Image, Qwen-Image-Edit and -Edit-2509 have them false)")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels


QWEN_IMAGE_TRANSFORMER_SPECS: dict[str, QwenImageTransformerConfig] = {
    # Qwen/Qwen-Image, Qwen/Qwen-Image-Edit, Qwen/Qwen-Image-Edit-2509 transformer/config.json: 20B parameters
    "qwen-image": QwenImageTransformerConfig(),
    "tiny": QwenImageTransformerConfig(in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                       num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
}


ROPE_CACHE_LAYOUTS = 16  # sequence layouts whose RoPE tables stay on the device (oldest dropped first)


class QwenImageTransformer2DModel(nn.Module):
    """Qwen-Image MMDiT: ``num_layers`` double-stream blocks over packed 2x2 latent patches and text states.

    ``forward`` takes packed latents (the generated image's tokens, then any input images' tokens), the
    text states with their padding mask, the timestep in [0, 1] and ``img_shapes``, the (frames, rows,
    columns) of each packed latent image in sequence order; it returns the velocity for every image token.
    """

    config_class = QwenImageTransformerConfig
    _repeated_blocks = ("transformer_blocks",)
    _keep_in_fp32_modules = ()
    _block_streams = {"transformer_blocks": BlockStreams(inputs=("hidden_states", "encoder_hidden_states"),
                                                         outputs=("encoder_hidden_states", "hidden_states"))}

    def __init__(self, config: QwenImageTransformerConfig):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.out_channels = config.output_channels
        self.time_text_embed = QwenTimestepEmbedding(dim)
        self.txt_norm = nn.RMSNorm(config.joint_attention_dim, eps=NORM_EPS)
        self.img_in = nn.Linear(config.in_channels, dim)
        self.txt_in = nn.Linear(config.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            QwenImageTransformerBlock(dim, config.num_attention_heads, config.attention_head_dim)
            for _ in range(config.num_layers)
        )
        self.norm_out = AdaNormContinuous(dim, dim)
        self.proj_out = nn.Linear(dim, config.patch_size**2 * self.out_channels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        img_shapes: tuple[tuple[int, int, int], ...],
        encoder_hidden_states_mask: torch.Tensor | None = None,
        modulation: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity.

        Args:
            hidden_states: (batch, seq_img, in_channels) packed latents, ``seq_img = sum(f * h * w)``.
            encoder_hidden_states: (batch, seq_txt, joint_attention_dim) Qwen2.5-VL hidden states.
            timestep: (batch,) sigma in [0, 1].
            img_shapes: ((frames, rows, columns), ...) of each packed latent image, in sequence order; or diffusers'
                form, one such list per sample (all alike).
            encoder_hidden_states_mask: None (every text token is real) or (batch, seq_txt), nonzero for real tokens.
            modulation: (batch or 1, modulation_width) every adaptive norm's projection of this call's timestep,
                precomputed by :meth:`modulation`; the blocks then read their columns.

        Returns:
            (batch, seq_img, patch_size**2 * out_channels) in the activations' dtype.
        """
        img_shapes = self._shapes(img_shapes)
        seq_txt = self._check_inputs(hidden_states, encoder_hidden_states, timestep, img_shapes,
                                     encoder_hidden_states_mask)
        check_modulation(modulation, hidden_states.shape[0], self.modulation_width, type(self).__name__)
        hidden_states = self.img_in(hidden_states)  # (batch, seq_img, dim)
        encoder_hidden_states = self.txt_in(self.txt_norm(encoder_hidden_states))  # (batch, seq_txt, dim)
        if modulation is None:
            temb = self.time_text_embed(timestep.to(hidden_states.dtype), hidden_states.dtype)  # (batch, dim)
            block_temb = [temb] * (len(self.transformer_blocks) + 1)
        else:
            block_temb = modulation.split(self._modulation_widths(), dim=1)

        rope = self._rope(img_shapes, seq_txt, hidden_states.device)  # (seq_txt + seq_img, head_dim) each
        mask = None
        if encoder_hidden_states_mask is not None:
            img_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            mask = torch.cat([encoder_hidden_states_mask.to(torch.bool), img_mask], dim=1)[:, None, None, :]

        for block, temb in zip(self.transformer_blocks, block_temb):
            if mask is None:
                encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, temb, rope)
            else:
                encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, temb, rope, mask)
        return self.proj_out(self.norm_out(hidden_states, block_temb[-1]))

    def _modulation_widths(self) -> list[int]:
        dim = self.config.inner_dim
        return [12 * dim] * len(self.transformer_blocks) + [2 * dim]

    @property
    def modulation_width(self) -> int:
        """Columns of :meth:`modulation`: 12 * dim a block (``img_mod``, ``txt_mod``), 2 * dim the final norm."""
        return sum(self._modulation_widths())

    @torch.no_grad()
    def modulation(self, timestep: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Every adaptive norm's projection of the timestep embedding, for ``forward(..., modulation=...)``: the
        blocks' ``img_mod`` / ``txt_mod`` (a third of Qwen-Image's 20B weights) and the final norm's, which depend
        on the timestep only, so a pipeline computes them for many steps at once (each weight read once for all
        of them). ``timestep``: (rows,) as :meth:`forward` takes it; ``dtype``: the activations' (the weights' by
        default). Returns (rows, :attr:`modulation_width`)."""
        dtype = dtype or self.img_in.weight.dtype
        if timestep.ndim != 1:
            raise InvalidArgumentError("timestep", f"expected (rows,) timesteps, got {tuple(timestep.shape)}")
        temb = self.time_text_embed(timestep.to(dtype), dtype)
        parts = [block.modulation(temb) for block in self.transformer_blocks]
        parts.append(self.norm_out.project(temb, dtype))
        return torch.cat(parts, dim=1)

    def _rope(self, img_shapes, seq_txt: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE tables of a sequence layout, built on the host once per layout and kept on ``device``: a
        step then copies nothing from the host (a CUDA graph can capture it, no step waits on a host copy).
        While tracing (compile, export) they are computed in the graph, never baked in from the cache."""
        def build() -> tuple[torch.Tensor, torch.Tensor]:
            cos, sin = rope_tables(rope_positions(img_shapes, seq_txt), self.config.axes_dims_rope)
            return cos.to(device), sin.to(device)

        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return build()
        cache = self.__dict__.setdefault("_rope_cache", {})
        key = (img_shapes, seq_txt, str(device))
        if key not in cache:
            if len(cache) >= ROPE_CACHE_LAYOUTS:
                cache.pop(next(iter(cache)))
            cache[key] = build()
        return cache[key]

    @staticmethod
    def _shapes(img_shapes) -> tuple[tuple[int, int, int], ...]:
        """``img_shapes`` as one tuple of (frames, rows, columns); diffusers' per-sample lists must all agree."""
        if isinstance(img_shapes, (list, tuple)) and img_shapes and isinstance(img_shapes[0], list) \
                and img_shapes[0] and isinstance(img_shapes[0][0], (list, tuple)):
            per_sample = [tuple(tuple(s) for s in sample) for sample in img_shapes]
            if any(p != per_sample[0] for p in per_sample):
                raise InvalidArgumentError("img_shapes", f"every sample of a batch needs the same image shapes, "
                                           f"got {img_shapes!r}")
            return per_sample[0]
        try:
            return tuple(tuple(int(v) for v in s) for s in img_shapes)
        except (TypeError, ValueError):
            raise InvalidArgumentError("img_shapes", f"expected ((frames, rows, columns), ...), got {img_shapes!r}") \
                from None

    def _check_inputs(self, hidden_states, encoder_hidden_states, timestep, img_shapes, mask) -> int:
        cfg = self.config
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.in_channels:
            raise InvalidArgumentError("hidden_states", f"expected shape (batch, seq_img, {cfg.in_channels}), "
                                       f"got {tuple(hidden_states.shape)}")
        batch, seq_img = hidden_states.shape[:2]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch \
                or encoder_hidden_states.shape[-1] != cfg.joint_attention_dim:
            raise InvalidArgumentError("encoder_hidden_states", f"expected shape ({batch}, seq_txt, "
                                       f"{cfg.joint_attention_dim}), got {tuple(encoder_hidden_states.shape)}")
        seq_txt = encoder_hidden_states.shape[1]
        if timestep.ndim != 1 or timestep.shape[0] not in (1, batch):
            raise InvalidArgumentError("timestep", f"expected shape ({batch},), got {tuple(timestep.shape)}")
        shapes = img_shapes
        if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
            raise InvalidArgumentError("img_shapes", f"expected ((frames, rows, columns), ...), got {img_shapes!r}")
        if sum(f * h * w for f, h, w in shapes) != seq_img:
            raise InvalidArgumentError("img_shapes", f"{list(shapes)} give {sum(f * h * w for f, h, w in shapes)} "
                                       f"tokens, hidden_states has {seq_img}")
        reach = max(max(h // 2, w // 2) for _, h, w in shapes) + seq_txt
        if reach > ROPE_TABLE_LEN or len(shapes) + max(f for f, _, _ in shapes) > ROPE_TABLE_LEN:
            raise InvalidArgumentError("img_shapes", f"positions reach {reach}, past Qwen-Image's RoPE table "
                                       f"of {ROPE_TABLE_LEN}")
        if mask is not None and tuple(mask.shape) != (batch, seq_txt):
            raise InvalidArgumentError("encoder_hidden_states_mask", f"expected shape ({batch}, {seq_txt}), "
                                       f"got {tuple(mask.shape)}")
        return seq_txt
