"""The Wan and FLUX forms of self-attention's q/k RMSNorm + RoPE (:mod:`.qk_norm_rope` has the pass and
the unfused / fused graphs): heads across the whole projection (Wan), per head with heads first (FLUX's
single-stream block), and FLUX's double-stream joint text + image rows. Also the helpers the
sequence-first forms (:mod:`.qk_norm_rope_seq_first`) share: the RoPE spellings and the filters."""

from __future__ import annotations

import inspect
import operator

import torch

from .adaln_modulate import REDUCED
from .base import Pattern

aten = torch.ops.aten


def wan_rope(x, cos, sin, pairs, downcast):
    parts = aten.unbind.int(aten.unflatten.int(x, -1, pairs), -1)
    x1, x2 = operator.getitem(parts, 0), operator.getitem(parts, 1)
    even = aten.sub.Tensor(aten.mul.Tensor(x1, cos), aten.mul.Tensor(x2, sin))
    odd = aten.add.Tensor(aten.mul.Tensor(x1, sin), aten.mul.Tensor(x2, cos))
    out = aten.flatten.using_ints(aten.stack.default([even, odd], -1), -2)
    return out if downcast is None else aten.to.dtype(out, downcast)


def flux_rope(x, cos, sin, pair_shape, upcast, downcast):
    parts = aten.unbind.int(aten.reshape.default(x, pair_shape), -1)
    x0, x1 = operator.getitem(parts, 0), operator.getitem(parts, 1)
    rot = aten.flatten.using_ints(aten.stack.default([aten.neg.default(x1), x0], -1), 3)
    if upcast is not None:
        x, rot = aten.to.dtype(x, upcast), aten.to.dtype(rot, upcast)
    out = aten.add.Tensor(aten.mul.Tensor(x, cos), aten.mul.Tensor(rot, sin))
    return out if downcast is None else aten.to.dtype(out, downcast)


def tables_ok(cos, sin) -> bool:
    return (
        isinstance(cos, torch.Tensor)
        and isinstance(sin, torch.Tensor)
        and cos.shape == sin.shape
        and cos.dtype == sin.dtype == torch.float32
        and cos.stride(-1) == 1
        and sin.stride(-1) == 1
    )


def projections_ok(q_lin, k_lin, q_weight, k_weight) -> bool:
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


def example_qk(heads: int, head_dim: int, dtype: torch.dtype, full_table: bool) -> tuple:
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
        q_lin, k_lin, q_w, k_w, cos, sin = example_qk(2, 12, dtype, full_table=False)
        extra = (dtype,) if self.downcast else ()
        return (q_lin, k_lin, q_w, k_w, cos, sin, [24], 1e-6, [2, -1], [-1, 2], *extra)

    @staticmethod
    def pattern(q_lin, k_lin, q_weight, k_weight, cos, sin, norm_shape, eps, split, pairs):
        q = aten.unflatten.int(aten.rms_norm.default(q_lin, norm_shape, q_weight, eps), 2, split)
        k = aten.unflatten.int(aten.rms_norm.default(k_lin, norm_shape, k_weight, eps), 2, split)
        return wan_rope(q, cos, sin, pairs, None), wan_rope(k, cos, sin, pairs, None)

    @staticmethod
    def replacement(q_lin, k_lin, q_weight, k_weight, cos, sin, norm_shape, eps, split, pairs):
        q, k = aten.unflatten.int(q_lin, 2, split), aten.unflatten.int(k_lin, 2, split)
        q_out, k_out = aten.empty_like.default(q), aten.empty_like.default(k)
        torch.ops.diffc.qk_norm_rope_across_heads.default(q, k, q_weight, k_weight, cos, sin, eps, q_out, k_out)
        return q_out, k_out

    def accepts(self, q_lin, k_lin, q_weight, k_weight, cos, sin, norm_shape, eps, split, pairs, downcast=None):
        if not (projections_ok(q_lin, k_lin, q_weight, k_weight) and tables_ok(cos, sin)):
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
        return wan_rope(q, cos, sin, pairs, downcast), wan_rope(k, cos, sin, pairs, downcast)

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
        q_lin, k_lin, q_w, k_w, cos, sin = example_qk(2, 16, dtype, full_table=True)
        casts = (torch.float32, dtype) if self.cast else ()
        return (q_lin, k_lin, q_w, k_w, cos, sin, [-1, 16], [16], 1e-6, [2, 2, 5, -1, 2], *casts)

    @staticmethod
    def pattern(q_lin, k_lin, q_weight, k_weight, cos, sin, split, norm_shape, eps, pair_shape):
        q = _heads_first(q_lin, split, norm_shape, q_weight, eps)
        k = _heads_first(k_lin, split, norm_shape, k_weight, eps)
        return flux_rope(q, cos, sin, pair_shape, None, None), flux_rope(k, cos, sin, pair_shape, None, None)

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
            projections_ok(q_lin, k_lin, q_weight, k_weight)
            and _per_head_ok(
                *q_lin.shape, q_lin.dtype, q_weight, cos, sin, split, norm_shape, pair_shape, upcast, downcast
            )
        )


def _per_head_ok(batch, seq, inner, dtype, q_weight, cos, sin, split, norm_shape, pair_shape, upcast, downcast) -> bool:
    """FLUX's layout: ``split == [-1, D]``, weights (D,), pairs ``[B, H, S, -1, 2]``, tables (S, D) float32."""
    if not tables_ok(cos, sin):
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
            flux_rope(q, cos, sin, pair_shape, upcast, downcast),
            flux_rope(k, cos, sin, pair_shape, upcast, downcast),
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
        q_img, k_img, q_w, k_w, *_ = example_qk(2, 16, dtype, full_table=True)
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
        return flux_rope(q, cos, sin, pair_shape, None, None), flux_rope(k, cos, sin, pair_shape, None, None)

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
        if not projections_ok(q_txt, k_txt, qa_weight, ka_weight):
            return False
        if not projections_ok(q_img, k_img, q_weight, k_weight):
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
            flux_rope(q, cos, sin, pair_shape, upcast, downcast),
            flux_rope(k, cos, sin, pair_shape, upcast, downcast),
        )
