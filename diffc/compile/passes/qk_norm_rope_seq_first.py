"""diffusers' attention with heads after the tokens (``unflatten(2, (H, -1))``, a per-head RMSNorm, then
``apply_rotary_emb(x, (cos, sin), sequence_dim=1)``, e.g. HunyuanVideo's image stream): the forms of
:mod:`.qk_norm_rope`'s pass that keep the result (B, S, H, D), with q's and k's tables as one node or as
two index nodes of the same view."""

from __future__ import annotations

import inspect

import torch

from .adaln_modulate import REDUCED
from .base import Pattern
from .qk_norm_rope_forms import example_qk, flux_rope, projections_ok, tables_ok

aten = torch.ops.aten


def same_view(a, b) -> bool:
    """``a`` and ``b`` are the same view of one tensor (storage, offset, sizes, strides, dtype): two
    ``cos[None, :, None, :]`` taken one for q and one for k read the same values."""
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.untyped_storage()._cdata == b.untyped_storage()._cdata
        and a.storage_offset() == b.storage_offset()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def _seq_first(x_lin, dim, split, norm_shape, weight, eps):
    """(B, S, H*D) -> (B, S, H, D) -> per-head RMSNorm, heads left after the tokens."""
    return aten.rms_norm.default(aten.unflatten.int(x_lin, dim, split), norm_shape, weight, eps)


class PerHeadSeqFirst(Pattern):
    """diffusers' attention with heads after the tokens in float32: ``unflatten(x, 2, (H, -1))``, a per-head
    RMSNorm, then ``apply_rotary_emb(x, (cos, sin), sequence_dim=1)`` (real tables (S, D) indexed
    ``[None, :, None, :]``, interleaved pairs) on q and k; the result stays (B, S, H, D). q's and k's
    tables may be separate index nodes, provided they are the same view of one table."""

    cast = False

    def example_inputs(self) -> tuple:
        dtype = torch.bfloat16 if self.cast else torch.float32
        q_lin, k_lin, q_w, k_w, cos, sin = example_qk(2, 16, dtype, full_table=True)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, S, 1, D)
        casts = (torch.float32, dtype) if self.cast else ()
        return (q_lin, k_lin, q_w, k_w, cos, sin, cos, sin, 2, [2, -1], [16], 1e-6, [2, 5, 2, -1, 2], *casts)

    @staticmethod
    def pattern(q_lin, k_lin, q_weight, k_weight, q_cos, q_sin, k_cos, k_sin, dim, split, norm_shape, eps,
                pair_shape):
        q = _seq_first(q_lin, dim, split, norm_shape, q_weight, eps)
        k = _seq_first(k_lin, dim, split, norm_shape, k_weight, eps)
        return flux_rope(q, q_cos, q_sin, pair_shape, None, None), flux_rope(k, k_cos, k_sin, pair_shape, None, None)

    @property
    def replacement(self):
        """The replacement at the example inputs' sizes (the pass builds one per match)."""
        names = inspect.signature(self.pattern).parameters
        return self.build_replacement(**dict(zip(names, self.example_inputs())))

    def build_replacement(self, **values):
        seq, head_dim = values["q_lin"].shape[1], values["norm_shape"][0]
        table = [seq, head_dim]

        def fused(q_lin, k_lin, q_weight, k_weight, q_cos, q_sin, dim, split, eps):
            q, k = aten.unflatten.int(q_lin, dim, split), aten.unflatten.int(k_lin, dim, split)  # (B, S, H, D)
            q_out = aten.transpose.int(aten.empty_like.default(q), 1, 2)  # (B, H, S, D) over (B, S, H, D) memory
            k_out = aten.transpose.int(aten.empty_like.default(k), 1, 2)
            cos, sin = aten.reshape.default(q_cos, table), aten.reshape.default(q_sin, table)  # (S, D)
            torch.ops.diffc.qk_norm_rope_per_head.default(q, k, q_weight, k_weight, cos, sin, eps, 0, q_out, k_out)
            return aten.transpose.int(q_out, 1, 2), aten.transpose.int(k_out, 1, 2)

        if self.cast:
            def replacement(q_lin, k_lin, q_weight, k_weight, q_cos, q_sin, k_cos, k_sin, dim, split, norm_shape,
                            eps, pair_shape, upcast, downcast):
                return fused(q_lin, k_lin, q_weight, k_weight, q_cos, q_sin, dim, split, eps)
        else:
            def replacement(q_lin, k_lin, q_weight, k_weight, q_cos, q_sin, k_cos, k_sin, dim, split, norm_shape,
                            eps, pair_shape):
                return fused(q_lin, k_lin, q_weight, k_weight, q_cos, q_sin, dim, split, eps)
        return replacement

    def accepts(self, q_lin, k_lin, q_weight, k_weight, q_cos, q_sin, k_cos, k_sin, dim, split, norm_shape, eps,
                pair_shape, upcast=None, downcast=None) -> bool:
        if not (projections_ok(q_lin, k_lin, q_weight, k_weight) and same_view(q_cos, k_cos)
                and same_view(q_sin, k_sin) and tables_ok(q_cos, q_sin)):
            return False
        batch, seq, inner = q_lin.shape
        if dim not in (2, -1) or len(split) != 2 or list(norm_shape) != [norm_shape[0]] or norm_shape[0] <= 0:
            return False
        head_dim = norm_shape[0]
        if head_dim % 2 or inner % head_dim or list(split) not in ([inner // head_dim, -1], [-1, head_dim],
                                                                  [inner // head_dim, head_dim]):
            return False
        heads = inner // head_dim
        if tuple(q_weight.shape) != (head_dim,) or list(pair_shape) != [batch, seq, heads, -1, 2]:
            return False
        if tuple(q_cos.shape) not in ((1, seq, 1, head_dim), (seq, head_dim)):
            return False
        if upcast is None:
            return q_lin.dtype == torch.float32
        return q_lin.dtype in REDUCED and upcast == torch.float32 and downcast == q_lin.dtype


class PerHeadSeqFirstCast(PerHeadSeqFirst):
    """The same in bf16/fp16: RoPE on float32 upcasts, cast back (``(x.float() * cos + ...).to(x.dtype)``)."""

    cast = True

    @staticmethod
    def pattern(q_lin, k_lin, q_weight, k_weight, q_cos, q_sin, k_cos, k_sin, dim, split, norm_shape, eps,
                pair_shape, upcast, downcast):
        q = _seq_first(q_lin, dim, split, norm_shape, q_weight, eps)
        k = _seq_first(k_lin, dim, split, norm_shape, k_weight, eps)
        return (
            flux_rope(q, q_cos, q_sin, pair_shape, upcast, downcast),
            flux_rope(k, k_cos, k_sin, pair_shape, upcast, downcast),
        )


class PerHeadSeqFirstShared(PerHeadSeqFirst):
    """The heads-after-tokens form where q and k read one table node (a model passing ``cos``/``sin`` of shape
    (1, S, 1, D) into the block, e.g. Z-Image, instead of indexing a table once for q and once for k)."""

    def example_inputs(self) -> tuple:
        q_lin, k_lin, q_w, k_w, cos, sin, _, _, *rest = super().example_inputs()
        return (q_lin, k_lin, q_w, k_w, cos, sin, *rest)

    @staticmethod
    def pattern(q_lin, k_lin, q_weight, k_weight, cos, sin, dim, split, norm_shape, eps, pair_shape):
        q = _seq_first(q_lin, dim, split, norm_shape, q_weight, eps)
        k = _seq_first(k_lin, dim, split, norm_shape, k_weight, eps)
        return flux_rope(q, cos, sin, pair_shape, None, None), flux_rope(k, cos, sin, pair_shape, None, None)

    def build_replacement(self, **values):
        shared = super().build_replacement(**self._both(values))

        def replacement(q_lin, k_lin, q_weight, k_weight, cos, sin, dim, split, norm_shape, eps, pair_shape):
            return shared(q_lin, k_lin, q_weight, k_weight, cos, sin, cos, sin, dim, split, norm_shape, eps,
                          pair_shape)
        return replacement

    def accepts(self, **values) -> bool:
        return super().accepts(**self._both(values))

    @staticmethod
    def _both(values: dict) -> dict:
        values = dict(values)
        cos, sin = values.pop("cos"), values.pop("sin")
        return {**values, "q_cos": cos, "q_sin": sin, "k_cos": cos, "k_sin": sin}


class PerHeadSeqFirstSharedCast(PerHeadSeqFirstShared):
    """The same in bf16/fp16 (RoPE on float32 upcasts, cast back)."""

    cast = True

    @staticmethod
    def pattern(q_lin, k_lin, q_weight, k_weight, cos, sin, dim, split, norm_shape, eps, pair_shape, upcast,
                downcast):
        q = _seq_first(q_lin, dim, split, norm_shape, q_weight, eps)
        k = _seq_first(k_lin, dim, split, norm_shape, k_weight, eps)
        return (flux_rope(q, cos, sin, pair_shape, upcast, downcast),
                flux_rope(k, cos, sin, pair_shape, upcast, downcast))

    def build_replacement(self, **values):
        shared = PerHeadSeqFirst.build_replacement(self, **self._both(values))

        def replacement(q_lin, k_lin, q_weight, k_weight, cos, sin, dim, split, norm_shape, eps, pair_shape,
                        upcast, downcast):
            return shared(q_lin, k_lin, q_weight, k_weight, cos, sin, cos, sin, dim, split, norm_shape, eps,
                          pair_shape, upcast, downcast)
        return replacement
