"""Native FLUX.1 transformer, loading diffusers' ``FluxTransformer2DModel`` checkpoints by name."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...errors import InvalidArgumentError
from ..config import ModelConfig
from ..modulation import check_modulation
from ..structure import BlockStreams, TeaCacheFit, TeaCacheSpec
from .blocks import (
    AdaNormContinuous,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
    TimeTextEmbedding,
    rope_tables,
)


@dataclasses.dataclass(frozen=True)
class FluxTransformerConfig(ModelConfig):
    """The fields of diffusers' ``FluxTransformer2DModel`` config.json, with diffusers' defaults."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise InvalidArgumentError(
                "axes_dims_rope",
                f"must sum to attention_head_dim={self.attention_head_dim}, got {list(self.axes_dims_rope)}",
            )
        if any(d <= 0 or d % 2 for d in self.axes_dims_rope):
            raise InvalidArgumentError(
                "axes_dims_rope", f"every entry must be a positive even number, got {list(self.axes_dims_rope)}"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels


FLUX_TRANSFORMER_SPECS: dict[str, FluxTransformerConfig] = {
    # black-forest-labs/FLUX.1-dev: guidance-distilled, 12B parameters.
    "flux-dev": FluxTransformerConfig(guidance_embeds=True),
    # black-forest-labs/FLUX.1-schnell: timestep-distilled, no guidance embedding.
    "flux-schnell": FluxTransformerConfig(guidance_embeds=False),
    "tiny": FluxTransformerConfig(
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=24,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
}


class FluxTransformer2DModel(nn.Module):
    """FLUX.1 rectified-flow transformer: 19 double-stream blocks then 38 single-stream blocks (dev/schnell).

    Built as ``FluxTransformer2DModel(config)``. ``forward`` takes packed latents, T5 and pooled CLIP
    embeddings, the timestep (as the pipeline passes it, in [0, 1]), per-token 3-axis position ids
    and, for guidance-distilled models, the guidance scale; it returns the predicted velocity.
    """

    config_class = FluxTransformerConfig
    _repeated_blocks = ("transformer_blocks", "single_transformer_blocks")
    _keep_in_fp32_modules = ()
    _block_streams = {
        name: BlockStreams(inputs=("hidden_states", "encoder_hidden_states"),
                           outputs=("encoder_hidden_states", "hidden_states"))
        for name in ("transformer_blocks", "single_transformer_blocks")
    }
    # TeaCache reads the first block's modulated image input (norm1's first output) and always computes the
    # first and the last step, with the polynomial its authors fitted on FLUX.1-dev: ali-vilab/TeaCache,
    # TeaCache4FLUX/teacache_flux.py (commit 7c10efc). Thresholds there: 0.25 (1.5x), 0.4 (1.8x), 0.6, 0.8.
    _teacache = TeaCacheSpec(
        module="norm1", args=("hidden_states", "temb"), output=0, warmup_steps=1, final_steps=1,
        fits=(TeaCacheFit(match=(), coefficients=(4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00,
                                                  2.64230861e-01), threshold=0.4, name="FLUX.1-dev"),),
    )

    def __init__(self, config: FluxTransformerConfig):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        heads, head_dim = config.num_attention_heads, config.attention_head_dim
        self.out_channels = config.output_channels

        self.time_text_embed = TimeTextEmbedding(dim, config.pooled_projection_dim, config.guidance_embeds)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(config.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            FluxTransformerBlock(dim, heads, head_dim) for _ in range(config.num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleTransformerBlock(dim, heads, head_dim) for _ in range(config.num_single_layers)
        )
        self.norm_out = AdaNormContinuous(dim, dim)
        self.proj_out = nn.Linear(dim, config.patch_size**2 * self.out_channels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
        modulation: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity for packed image latents.

        Args:
            hidden_states: (batch, seq_img, in_channels) packed latents.
            encoder_hidden_states: (batch, seq_txt, joint_attention_dim) T5 embeddings.
            pooled_projections: (batch, pooled_projection_dim) pooled CLIP embedding.
            timestep: (batch,) sigma in [0, 1]; scaled by 1000 here, as diffusers does.
            img_ids: (seq_img, n_axes) position ids of the image tokens.
            txt_ids: (seq_txt, n_axes) position ids of the text tokens.
            guidance: (batch,) guidance scale, required iff ``config.guidance_embeds``; scaled by 1000 here.
            modulation: (batch, modulation_width) every adaptive norm's projection of this call's conditioning,
                precomputed by :meth:`modulation` (from the same timestep, guidance and pooled embedding); the
                blocks then read their columns instead of projecting the conditioning themselves.

        Returns:
            (batch, seq_img, patch_size**2 * out_channels) in the activations' dtype.
        """
        self._check_inputs(
            hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance
        )
        check_modulation(modulation, hidden_states.shape[0], self.modulation_width, type(self).__name__)
        hidden_states = self.x_embedder(hidden_states)  # (batch, seq_img, dim)
        if modulation is None:
            temb = self._conditioning(timestep, guidance, pooled_projections, hidden_states.dtype)  # (batch, dim)
            block_temb = [temb] * (len(self.transformer_blocks) + len(self.single_transformer_blocks) + 1)
        else:
            block_temb = modulation.split(self._modulation_widths(), dim=1)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)  # (batch, seq_txt, dim)

        cos, sin = rope_tables(torch.cat([txt_ids, img_ids], dim=0), self.config.axes_dims_rope)
        rope = (cos.to(hidden_states.device), sin.to(hidden_states.device))  # (seq_txt + seq_img, head_dim)

        blocks = [*self.transformer_blocks, *self.single_transformer_blocks]
        for block, temb in zip(blocks, block_temb):
            encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, temb, rope)

        return self.proj_out(self.norm_out(hidden_states, block_temb[-1]))

    def _conditioning(self, timestep, guidance, pooled_projections, dtype: torch.dtype) -> torch.Tensor:
        """The (batch, dim) conditioning vector every adaptive norm projects (timestep and guidance scaled here)."""
        timestep = timestep.to(dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(dtype) * 1000
        return self.time_text_embed(timestep, guidance, pooled_projections)

    def _modulation_widths(self) -> list[int]:
        dim = self.config.inner_dim
        return [12 * dim] * len(self.transformer_blocks) + [3 * dim] * len(self.single_transformer_blocks) + [2 * dim]

    @property
    def modulation_width(self) -> int:
        """Columns of :meth:`modulation`: 12 * dim a double block, 3 * dim a single block, 2 * dim the final norm."""
        return sum(self._modulation_widths())

    @torch.no_grad()
    def modulation(self, timestep: torch.Tensor, pooled_projections: torch.Tensor,
                   guidance: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Every adaptive norm's projection of the conditioning, for ``forward(..., modulation=...)``.

        The projections (``linear(silu(temb))`` of each block's norms and of the final norm, ~3.2B of FLUX.1's
        12B weights) depend on the timestep, guidance and pooled text embedding only, so a pipeline computes
        them for all of a generation's steps at once: rows of ``timestep`` (and ``guidance``,
        ``pooled_projections``) are (step, sample) pairs, and each weight is read once for all of them
        instead of once a step. Inputs as :meth:`forward` takes them; ``dtype``: the activations' (the
        weights' by default). Returns (rows, :attr:`modulation_width`), blocks in order, then the final norm.
        """
        dtype = dtype or self.x_embedder.weight.dtype
        rows = timestep.shape[0]
        if timestep.ndim != 1 or pooled_projections.shape[0] != rows:
            raise InvalidArgumentError("timestep", f"expected (rows,) timesteps and (rows, "
                                       f"{self.config.pooled_projection_dim}) pooled projections, got "
                                       f"{tuple(timestep.shape)} and {tuple(pooled_projections.shape)}")
        if (guidance is None) == self.config.guidance_embeds:
            raise InvalidArgumentError("guidance", "required exactly when the model has guidance_embeds "
                                       f"({self.config.guidance_embeds})")
        temb = self._conditioning(timestep, guidance, pooled_projections, dtype)
        parts = [block.modulation(temb) for block in [*self.transformer_blocks, *self.single_transformer_blocks]]
        parts.append(self.norm_out.project(temb, dtype))
        return torch.cat(parts, dim=1)

    def _check_inputs(
        self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance
    ) -> None:
        cfg = self.config
        n_axes = len(cfg.axes_dims_rope)

        def expect(field: str, tensor: torch.Tensor, shape: tuple, what: str) -> None:
            if tensor.ndim != len(shape) or any(s is not None and t != s for t, s in zip(tensor.shape, shape)):
                raise InvalidArgumentError(field, f"expected shape {what}, got {tuple(tensor.shape)}")

        expect("hidden_states", hidden_states, (None, None, cfg.in_channels), f"(batch, seq_img, {cfg.in_channels})")
        batch, seq_img = hidden_states.shape[:2]
        expect(
            "encoder_hidden_states",
            encoder_hidden_states,
            (batch, None, cfg.joint_attention_dim),
            f"({batch}, seq_txt, {cfg.joint_attention_dim})",
        )
        seq_txt = encoder_hidden_states.shape[1]
        pooled_dim = cfg.pooled_projection_dim
        expect("pooled_projections", pooled_projections, (batch, pooled_dim), f"({batch}, {pooled_dim})")
        if timestep.ndim != 1 or (timestep.shape[0] != batch and timestep.shape[0] != 1):
            raise InvalidArgumentError("timestep", f"expected shape ({batch},), got {tuple(timestep.shape)}")
        expect("img_ids", img_ids, (seq_img, n_axes), f"({seq_img}, {n_axes}) (2-D, no batch dimension)")
        expect("txt_ids", txt_ids, (seq_txt, n_axes), f"({seq_txt}, {n_axes}) (2-D, no batch dimension)")
        if cfg.guidance_embeds:
            if guidance is None:
                raise InvalidArgumentError(
                    "guidance",
                    "this model has guidance_embeds=True (a guidance-distilled model such as FLUX.1-dev) "
                    f"and needs a ({batch},) tensor of guidance scales, got None",
                )
            if guidance.ndim != 1 or (guidance.shape[0] != batch and guidance.shape[0] != 1):
                raise InvalidArgumentError("guidance", f"expected shape ({batch},), got {tuple(guidance.shape)}")
        elif guidance is not None:
            raise InvalidArgumentError(
                "guidance",
                "this model has guidance_embeds=False (such as FLUX.1-schnell) and takes no guidance; pass None",
            )
