"""Concatenate attention operands in their producers' layout, not in the transposed one attention is given.

A double-stream DiT (FLUX.1's and Qwen-Image's joint attention) projects text and image values separately,
transposes each to SDPA's (batch, heads, seq, head_dim) and concatenates them along the sequence::

    v = aten.cat([aten.transpose(v_txt, 1, 2), aten.transpose(v_img, 1, 2)], 2)    # v_*: (B, S_*, H, D)
    o = aten.scaled_dot_product_attention(q, k, v)

The concatenation then writes (B, H, S, D) from two (B, S, H, D) tensors: a strided 4-D gather (on an H200,
FLUX.1's 4608 x 3072 values: ~82 us a block, against ~15 us for a copy of two contiguous blocks).
Rewritten::

    v = aten.transpose(aten.cat([v_txt, v_img], 1), 1, 2)

the same values, now a (B, H, S, D) view of a (B, S, H, D) buffer: the layout the fused QK-norm + RoPE kernel
already gives q and k, and the one FlashAttention-4, flashinfer and the fp8 tier's ``quantize_heads`` read
without a transpose. Every input must be a ``transpose`` of the same two dimensions, and every reader of the
concatenation an attention op (which takes any strides with a unit last one): another reader could need the
contiguous layout the concatenation had. Not marked bit-exact: an attention kernel may take another path for
the new strides.
"""

from __future__ import annotations

import torch
from torch import fx

from .base import FusionPass, _propagate_val

aten = torch.ops.aten


def _attention_ops() -> frozenset:
    """The ops that read a concatenated operand in any layout (unit last stride)."""
    return frozenset({aten.scaled_dot_product_attention.default, torch.ops.diffc.attention_key_padding.default})


def _swap(node: fx.Node) -> tuple[int, int] | None:
    """The (sorted, non-negative) dimensions ``node`` transposes, or None where it is not a transpose."""
    if node.op != "call_function" or node.target != aten.transpose.int:
        return None
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    a, b = (d % val.ndim for d in node.args[1:3])
    return (a, b) if a < b else (b, a) if b < a else None


class CatTransposedPass(FusionPass):
    """Before: ``cat([transpose(x_i, a, b) ...], d)`` read only by attention. After:
    ``transpose(cat([x_i ...], d'), a, b)``, with d' the dimension d was before the transpose."""

    name = "cat_transposed"
    bit_exact = False

    def __call__(self, gm: fx.GraphModule) -> int:
        readers = _attention_ops()
        changed = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target != aten.cat.default:
                continue
            parts = node.args[0]
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor) or len(parts) < 2 or not all(isinstance(p, fx.Node) for p in parts):
                continue
            swaps = {_swap(p) for p in parts}
            if len(swaps) != 1 or None in swaps:
                continue
            if not all(isinstance(p.args[0], fx.Node) and isinstance(p.args[0].meta.get("val"), torch.Tensor)
                       for p in parts):
                continue
            if not node.users or any(u.op != "call_function" or u.target not in readers for u in node.users):
                continue
            a, b = swaps.pop()
            dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % val.ndim
            source_dim = b if dim == a else a if dim == b else dim
            with gm.graph.inserting_before(node):
                cat = gm.graph.call_function(aten.cat.default, ([p.args[0] for p in parts], source_dim))
                out = gm.graph.call_function(aten.transpose.int, (cat, a, b))
            for new in (cat, out):
                new.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")})
                _propagate_val(new)
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            for p in parts:
                if not p.users:
                    gm.graph.erase_node(p)
            changed += 1
        gm.graph.lint()
        gm.recompile()
        return changed
