"""Fuse self-attention's RMSNorm + RoPE on q and k into ``torch.ops.diffc.qk_norm_rope_*``.

Wan (``qk_norm_rope_across_heads``), unfused, for q and for k, after :mod:`.canonicalize`::

    x  = aten.unflatten(aten.rms_norm(x_lin, [H*D], weight, eps), 2, [H, -1])     # (B, S, H, D)
    x1, x2 = aten.unbind(aten.unflatten(x, -1, [-1, 2]), -1)
    x  = aten.flatten(aten.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1), -2)  # [to(x, bf16)]

FLUX single-stream block (``qk_norm_rope_per_head``), for q and for k::

    x  = aten.transpose(aten.rms_norm(aten.unflatten(x_lin, -1, [-1, D]), [D], weight, eps), 1, 2)
    x0, x1 = aten.unbind(aten.reshape(x, [B, H, S, -1, 2]), -1)
    rot = aten.flatten(aten.stack([-x1, x0], -1), 3)
    x  = x * cos + rot * sin                  # bf16: to(to(x, f32) * cos + to(rot, f32) * sin, bf16)

Fused, one launch for q and k::

    q_out, k_out = empty(...), empty(...)
    diffc.qk_norm_rope_<layout>(unflatten(q_lin), unflatten(k_lin), q_weight, k_weight, cos, sin, eps,
                                [0,] q_out, k_out)

diffusers' attention processors that keep heads after the tokens (``unflatten(2, (H, -1))``, a per-head
``RMSNorm`` module, which :mod:`.rms_norm` turns into ``aten.rms_norm``, and ``apply_rotary_emb(x, (cos, sin),
sequence_dim=1)``, e.g. HunyuanVideo) are the FLUX form without the transpose, on (1, S, 1, D) tables,
fused into the same op writing a (B, H, S, D)-strided view of a (B, S, H, D) buffer.

FLUX's double-stream block normalises text and image tokens with their own weights and concatenates
them before RoPE: two ``qk_norm_rope_per_head`` calls write the text rows (offset 0) and the image rows
(offset S_txt) of one (B, H, S_txt + S_img, D) buffer each for q and k, so the ``cat`` goes too.
"""

from __future__ import annotations

import inspect
import operator

import torch

from .adaln_modulate import REDUCED
from .base import FusionPass, Pattern

aten = torch.ops.aten


def _wan_rope(x, cos, sin, pairs, downcast):
    parts = aten.unbind.int(aten.unflatten.int(x, -1, pairs), -1)
    x1, x2 = operator.getitem(parts, 0), operator.getitem(parts, 1)
    even = aten.sub.Tensor(aten.mul.Tensor(x1, cos), aten.mul.Tensor(x2, sin))
    odd = aten.add.Tensor(aten.mul.Tensor(x1, sin), aten.mul.Tensor(x2, cos))
    out = aten.flatten.using_ints(aten.stack.default([even, odd], -1), -2)
    return out if downcast is None else aten.to.dtype(out, downcast)


def _flux_rope(x, cos, sin, pair_shape, upcast, downcast):
    parts = aten.unbind.int(aten.reshape.default(x, pair_shape), -1)
    x0, x1 = operator.getitem(parts, 0), operator.getitem(parts, 1)
    rot = aten.flatten.using_ints(aten.stack.default([aten.neg.default(x1), x0], -1), 3)
    if upcast is not None:
        x, rot = aten.to.dtype(x, upcast), aten.to.dtype(rot, upcast)
    out = aten.add.Tensor(aten.mul.Tensor(x, cos), aten.mul.Tensor(rot, sin))
    return out if downcast is None else aten.to.dtype(out, downcast)


def _tables_ok(cos, sin) -> bool:
    return (
        isinstance(cos, torch.Tensor)
        and isinstance(sin, torch.Tensor)
        and cos.shape == sin.shape
        and cos.dtype == sin.dtype == torch.float32
        and cos.stride(-1) == 1
        and sin.stride(-1) == 1
    )


def _projections_ok(q_lin, k_lin, q_weight, k_weight) -> bool:
    return (
        isinstance(q_lin, torch.Tensor)
        and q_lin.ndim == 3
        and isinstance(k_lin, torch.Tensor)
        and k_lin.shape == q_lin.shape
        and k_lin.dtype == q_lin.dtype
        and q_lin.dtype.is_floating_point
        and q_lin.stride(-1) == 1
        and k_lin.stride(-1) == 1
        and q_weight.dtype == k_weight.dtype == q_lin.dtype
        and q_weight.shape == k_weight.shape
    )


def _example(heads: int, head_dim: int, dtype: torch.dtype, full_table: bool) -> tuple:
    g = torch.Generator().manual_seed(0)
    q_lin, k_lin = (torch.randn(2, 5, heads * head_dim, generator=g).to(dtype) for _ in range(2))
    n = heads * head_dim if not full_table else head_dim
    q_w, k_w = (1 + 0.3 * torch.randn(n, generator=g)).to(dtype), (1 + 0.3 * torch.randn(n, generator=g)).to(dtype)
    angles = torch.randn(5, head_dim // 2, generator=g)
    if full_table:
        cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)  # (S, D)
    else:
        cos, sin = angles.cos().reshape(1, 5, 1, -1), angles.sin().reshape(1, 5, 1, -1)  # (1, S, 1, D/2)
    return q_lin, k_lin, q_w, k_w, cos, sin


class AcrossHeads(Pattern):
    """Wan's self-attention in float32: RMSNorm over all heads, RoPE on interleaved pairs, (B, S, H, D)."""

    downcast = False

    def example_inputs(self) -> tuple:
        dtype = torch.bfloat16 if self.downcast else torch.float32
        q_lin, k_lin, q_w, k_w, cos, sin = _example(2, 12, dtype, full_table=False)
        extra = (dtype,) if self.downcast else ()
        return (q_lin, k_lin, q_w, k_w, cos, sin, [24], 1e-6, [2, -1], [-1, 2], *extra)

    @staticmethod
    def pattern(q_lin, k_lin, q_weight, k_weight, cos, sin, norm_shape, eps, split, pairs):
        q = aten.unflatten.int(aten.rms_norm.default(q_lin, norm_shape, q_weight, eps), 2, split)
        k = aten.unflatten.int(aten.rms_norm.default(k_lin, norm_shape, k_weight, eps), 2, split)
        return _wan_rope(q, cos, sin, pairs, None), _wan_rope(k, cos, sin, pairs, None)

    @staticmethod
    def replacement(q_lin, k_lin, q_weight, k_weight, cos, sin, norm_shape, eps, split, pairs):
        q, k = aten.unflatten.int(q_lin, 2, split), aten.unflatten.int(k_lin, 2, split)
        q_out, k_out = aten.empty_like.default(q), aten.empty_like.default(k)
        torch.ops.diffc.qk_norm_rope_across_heads.default(q, k, q_weight, k_weight, cos, sin, eps, q_out, k_out)
        return q_out, k_out

    def accepts(self, q_lin, k_lin, q_weight, k_weight, cos, sin, norm_shape, eps, split, pairs, downcast=None):
        if not (_projections_ok(q_lin, k_lin, q_weight, k_weight) and _tables_ok(cos, sin)):
            return False
        _batch, seq, inner = q_lin.shape
        if list(norm_shape) != [inner] or tuple(q_weight.shape) != (inner,) or list(pairs) != [-1, 2]:
            return False
        if len(split) != 2 or split[1] != -1 or split[0] <= 0 or inner % (2 * split[0]):
            return False
        head_dim = inner // split[0]
        if cos.numel() != seq * head_dim // 2 or cos.shape[-1] != head_dim // 2:
            return False
        if downcast is None:
            return q_lin.dtype == torch.float32
        return q_lin.dtype in REDUCED and downcast == q_lin.dtype


class AcrossHeadsDowncast(AcrossHeads):
    """Wan in bf16/fp16: the same, RoPE in float32 and the result cast back to the activations' dtype."""

    downcast = True

    @staticmethod
    def pattern(q_lin, k_lin, q_weight, k_weight, cos, sin, norm_shape, eps, split, pairs, downcast):
        q = aten.unflatten.int(aten.rms_norm.default(q_lin, norm_shape, q_weight, eps), 2, split)
        k = aten.unflatten.int(aten.rms_norm.default(k_lin, norm_shape, k_weight, eps), 2, split)
        return _wan_rope(q, cos, sin, pairs, downcast), _wan_rope(k, cos, sin, pairs, downcast)

    @staticmethod
    def replacement(q_lin, k_lin, q_weight, k_weight, cos, sin, norm_shape, eps, split, pairs, downcast):
        q, k = aten.unflatten.int(q_lin, 2, split), aten.unflatten.int(k_lin, 2, split)
        q_out, k_out = aten.empty_like.default(q), aten.empty_like.default(k)
        torch.ops.diffc.qk_norm_rope_across_heads.default(q, k, q_weight, k_weight, cos, sin, eps, q_out, k_out)
        return q_out, k_out


def _heads_first(x_lin, split, norm_shape, weight, eps):
    """(B, S, H*D) -> per-head RMSNorm -> (B, H, S, D), as FLUX's attention does it."""
    x = aten.rms_norm.default(aten.unflatten.int(x_lin, -1, split), norm_shape, weight, eps)
    return aten.transpose.int(x, 1, 2)


class PerHead(Pattern):
    """FLUX's single-stream block in float32: per-head RMSNorm, heads before tokens, RoPE, (B, H, S, D)."""

    cast = False

    def example_inputs(self) -> tuple:
        dtype = torch.bfloat16 if self.cast else torch.float32
        q_lin, k_lin, q_w, k_w, cos, sin = _example(2, 16, dtype, full_table=True)
        casts = (torch.float32, dtype) if self.cast else ()
        return (q_lin, k_lin, q_w, k_w, cos, sin, [-1, 16], [16], 1e-6, [2, 2, 5, -1, 2], *casts)

    @staticmethod
    def pattern(q_lin, k_lin, q_weight, k_weight, cos, sin, split, norm_shape, eps, pair_shape):
        q = _heads_first(q_lin, split, norm_shape, q_weight, eps)
        k = _heads_first(k_lin, split, norm_shape, k_weight, eps)
        return _flux_rope(q, cos, sin, pair_shape, None, None), _flux_rope(k, cos, sin, pair_shape, None, None)

    @staticmethod
    def replacement(q_lin, k_lin, q_weight, k_weight, cos, sin, split, norm_shape, eps, pair_shape):
        q, k = aten.unflatten.int(q_lin, -1, split), aten.unflatten.int(k_lin, -1, split)  # (B, S, H, D)
        q_out = aten.transpose.int(aten.empty_like.default(q), 1, 2)  # (B, H, S, D)
        k_out = aten.transpose.int(aten.empty_like.default(k), 1, 2)
        torch.ops.diffc.qk_norm_rope_per_head.default(q, k, q_weight, k_weight, cos, sin, eps, 0, q_out, k_out)
        return q_out, k_out

    def accepts(self, q_lin, k_lin, q_weight, k_weight, cos, sin, split, norm_shape, eps, pair_shape,
                upcast=None, downcast=None):
        return (
            _projections_ok(q_lin, k_lin, q_weight, k_weight)
            and _per_head_ok(
                *q_lin.shape, q_lin.dtype, q_weight, cos, sin, split, norm_shape, pair_shape, upcast, downcast
            )
        )


def _per_head_ok(batch, seq, inner, dtype, q_weight, cos, sin, split, norm_shape, pair_shape, upcast, downcast) -> bool:
    """FLUX's layout: ``split == [-1, D]``, weights (D,), pairs ``[B, H, S, -1, 2]``, tables (S, D) float32."""
    if not _tables_ok(cos, sin):
        return False
    if len(split) != 2 or split[0] != -1 or split[1] <= 0 or split[1] % 2 or inner % split[1]:
        return False
    head_dim = split[1]
    if list(norm_shape) != [head_dim] or tuple(q_weight.shape) != (head_dim,):
        return False
    if list(pair_shape) != [batch, inner // head_dim, seq, -1, 2] or tuple(cos.shape) != (seq, head_dim):
        return False
    if upcast is None:
        return dtype == torch.float32
    return dtype in REDUCED and upcast == torch.float32 and downcast == dtype


class PerHeadCast(PerHead):
    """FLUX in bf16/fp16: RoPE on float32 upcasts, the result cast back to the activations' dtype."""

    cast = True

    @staticmethod
    def pattern(q_lin, k_lin, q_weight, k_weight, cos, sin, split, norm_shape, eps, pair_shape, upcast, downcast):
        q = _heads_first(q_lin, split, norm_shape, q_weight, eps)
        k = _heads_first(k_lin, split, norm_shape, k_weight, eps)
        return (
            _flux_rope(q, cos, sin, pair_shape, upcast, downcast),
            _flux_rope(k, cos, sin, pair_shape, upcast, downcast),
        )

    @staticmethod
    def replacement(q_lin, k_lin, q_weight, k_weight, cos, sin, split, norm_shape, eps, pair_shape, upcast, downcast):
        q, k = aten.unflatten.int(q_lin, -1, split), aten.unflatten.int(k_lin, -1, split)
        q_out = aten.transpose.int(aten.empty_like.default(q), 1, 2)
        k_out = aten.transpose.int(aten.empty_like.default(k), 1, 2)
        torch.ops.diffc.qk_norm_rope_per_head.default(q, k, q_weight, k_weight, cos, sin, eps, 0, q_out, k_out)
        return q_out, k_out


class PerHeadJoint(PerHead):
    """FLUX's double-stream block: text and image q/k normalised with their own weights, concatenated
    ``[text, image]`` along the sequence, RoPE over the joint sequence. Two op calls fill one
    (B, H, S_txt + S_img, D) buffer each for q and k, the text rows at offset 0, the image rows after."""

    def example_inputs(self) -> tuple:
        dtype = torch.bfloat16 if self.cast else torch.float32
        g = torch.Generator().manual_seed(1)
        q_txt, k_txt = (torch.randn(2, 3, 32, generator=g).to(dtype) for _ in range(2))
        q_img, k_img, q_w, k_w, *_ = _example(2, 16, dtype, full_table=True)
        qa_w, ka_w = ((1 + 0.3 * torch.randn(16, generator=g)).to(dtype) for _ in range(2))
        angles = torch.randn(8, 8, generator=g)
        cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)  # (S_txt + S_img, D)
        casts = (torch.float32, dtype) if self.cast else ()
        return (q_txt, k_txt, q_img, k_img, qa_w, ka_w, q_w, k_w, cos, sin, [-1, 16], [16], 1e-6,
                [2, 2, 8, -1, 2], *casts)

    @staticmethod
    def pattern(q_txt, k_txt, q_img, k_img, qa_weight, ka_weight, q_weight, k_weight, cos, sin,
                split, norm_shape, eps, pair_shape):
        q = aten.cat.default([_heads_first(q_txt, split, norm_shape, qa_weight, eps),
                              _heads_first(q_img, split, norm_shape, q_weight, eps)], 2)
        k = aten.cat.default([_heads_first(k_txt, split, norm_shape, ka_weight, eps),
                              _heads_first(k_img, split, norm_shape, k_weight, eps)], 2)
        return _flux_rope(q, cos, sin, pair_shape, None, None), _flux_rope(k, cos, sin, pair_shape, None, None)

    def build_replacement(self, **values):
        batch, seq_txt, inner = values["q_txt"].shape
        seq_img, head_dim = values["q_img"].shape[1], values["split"][1]
        size = [batch, seq_txt + seq_img, inner // head_dim, head_dim]  # (B, S, H, D), used transposed

        def fill(q_txt, k_txt, q_img, k_img, qa_weight, ka_weight, q_weight, k_weight, cos, sin, split, eps):
            q_out = aten.transpose.int(aten.new_empty.default(q_img, size), 1, 2)  # (B, H, S_txt + S_img, D)
            k_out = aten.transpose.int(aten.new_empty.default(k_img, size), 1, 2)
            q_t, k_t = aten.unflatten.int(q_txt, -1, split), aten.unflatten.int(k_txt, -1, split)
            q_i, k_i = aten.unflatten.int(q_img, -1, split), aten.unflatten.int(k_img, -1, split)
            torch.ops.diffc.qk_norm_rope_per_head.default(
                q_t, k_t, qa_weight, ka_weight, cos, sin, eps, 0, q_out, k_out
            )
            torch.ops.diffc.qk_norm_rope_per_head.default(
                q_i, k_i, q_weight, k_weight, cos, sin, eps, seq_txt, q_out, k_out
            )
            return q_out, k_out

        if self.cast:
            def replacement(q_txt, k_txt, q_img, k_img, qa_weight, ka_weight, q_weight, k_weight, cos, sin,
                            split, norm_shape, eps, pair_shape, upcast, downcast):
                return fill(q_txt, k_txt, q_img, k_img, qa_weight, ka_weight, q_weight, k_weight, cos, sin, split, eps)
        else:
            def replacement(q_txt, k_txt, q_img, k_img, qa_weight, ka_weight, q_weight, k_weight, cos, sin,
                            split, norm_shape, eps, pair_shape):
                return fill(q_txt, k_txt, q_img, k_img, qa_weight, ka_weight, q_weight, k_weight, cos, sin, split, eps)
        return replacement

    @property
    def replacement(self):
        """The replacement at the example inputs' sizes (the pass builds one per match)."""
        names = inspect.signature(self.pattern).parameters
        return self.build_replacement(**dict(zip(names, self.example_inputs())))

    def accepts(self, q_txt, k_txt, q_img, k_img, qa_weight, ka_weight, q_weight, k_weight, cos, sin,
                split, norm_shape, eps, pair_shape, upcast=None, downcast=None):
        if not _projections_ok(q_txt, k_txt, qa_weight, ka_weight):
            return False
        if not _projections_ok(q_img, k_img, q_weight, k_weight):
            return False
        if q_txt.dtype != q_img.dtype or q_txt.shape[0] != q_img.shape[0] or q_txt.shape[2] != q_img.shape[2]:
            return False
        batch, seq_img, inner = q_img.shape
        seq = q_txt.shape[1] + seq_img
        return _per_head_ok(batch, seq, inner, q_img.dtype, q_weight, cos, sin, split, norm_shape, pair_shape,
                            upcast, downcast) and tuple(qa_weight.shape) == tuple(q_weight.shape)


class PerHeadJointCast(PerHeadJoint):
    """FLUX's double-stream block in bf16/fp16: the joint RoPE on float32 upcasts, cast back."""

    cast = True

    @staticmethod
    def pattern(q_txt, k_txt, q_img, k_img, qa_weight, ka_weight, q_weight, k_weight, cos, sin,
                split, norm_shape, eps, pair_shape, upcast, downcast):
        q = aten.cat.default([_heads_first(q_txt, split, norm_shape, qa_weight, eps),
                              _heads_first(q_img, split, norm_shape, q_weight, eps)], 2)
        k = aten.cat.default([_heads_first(k_txt, split, norm_shape, ka_weight, eps),
                              _heads_first(k_img, split, norm_shape, k_weight, eps)], 2)
        return (
            _flux_rope(q, cos, sin, pair_shape, upcast, downcast),
            _flux_rope(k, cos, sin, pair_shape, upcast, downcast),
        )


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
        q_lin, k_lin, q_w, k_w, cos, sin = _example(2, 16, dtype, full_table=True)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, S, 1, D)
        casts = (torch.float32, dtype) if self.cast else ()
        return (q_lin, k_lin, q_w, k_w, cos, sin, cos, sin, 2, [2, -1], [16], 1e-6, [2, 5, 2, -1, 2], *casts)

    @staticmethod
    def pattern(q_lin, k_lin, q_weight, k_weight, q_cos, q_sin, k_cos, k_sin, dim, split, norm_shape, eps,
                pair_shape):
        q = _seq_first(q_lin, dim, split, norm_shape, q_weight, eps)
        k = _seq_first(k_lin, dim, split, norm_shape, k_weight, eps)
        return _flux_rope(q, q_cos, q_sin, pair_shape, None, None), _flux_rope(k, k_cos, k_sin, pair_shape, None, None)

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
        if not (_projections_ok(q_lin, k_lin, q_weight, k_weight) and same_view(q_cos, k_cos)
                and same_view(q_sin, k_sin) and _tables_ok(q_cos, q_sin)):
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
            _flux_rope(q, q_cos, q_sin, pair_shape, upcast, downcast),
            _flux_rope(k, k_cos, k_sin, pair_shape, upcast, downcast),
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
        return _flux_rope(q, cos, sin, pair_shape, None, None), _flux_rope(k, cos, sin, pair_shape, None, None)

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
        return (_flux_rope(q, cos, sin, pair_shape, upcast, downcast),
                _flux_rope(k, cos, sin, pair_shape, upcast, downcast))

    def build_replacement(self, **values):
        shared = PerHeadSeqFirst.build_replacement(self, **self._both(values))

        def replacement(q_lin, k_lin, q_weight, k_weight, cos, sin, dim, split, norm_shape, eps, pair_shape,
                        upcast, downcast):
            return shared(q_lin, k_lin, q_weight, k_weight, cos, sin, cos, sin, dim, split, norm_shape, eps,
                          pair_shape, upcast, downcast)
        return replacement


class QKNormRopePass(FusionPass):
    """Self-attention's q/k RMSNorm + RoPE -> ``diffc.qk_norm_rope_across_heads`` (Wan) and
    ``diffc.qk_norm_rope_per_head`` (FLUX; diffusers' attention with heads after the tokens, e.g.
    HunyuanVideo's image stream). Not bit-exact: the RMS reduction order differs."""

    name = "qk_norm_rope"
    bit_exact = False
    patterns = (AcrossHeadsDowncast(), AcrossHeads(), PerHeadJointCast(), PerHeadJoint(), PerHeadCast(), PerHead(),
                PerHeadSeqFirstCast(), PerHeadSeqFirst(), PerHeadSeqFirstSharedCast(), PerHeadSeqFirstShared())
