"""Let the GEMMs write a concatenation of their outputs along the rows, instead of copying them into it.

A joint-attention block projects the text and image values apart and concatenates them along the sequence
(after :mod:`.cat_transposed`, in the projections' own (batch, seq, heads, head_dim) layout)::

    v = aten.cat([aten.unflatten(aten.linear(x_txt, w_txt, b_txt), -1, [H, D]),
                  aten.unflatten(aten.linear(x_img, w_img, b_img), -1, [H, D])], 1)

Rewritten (each GEMM writes its rows of one buffer; :mod:`diffc.ops.linear_into`)::

    joint = aten.new_empty(x_txt, [B, S_txt + S_img, N])
    diffc.linear_into(x_txt, w_txt, b_txt, aten.slice(joint, 1, 0, S_txt))
    diffc.linear_into(x_img, w_img, b_img, aten.slice(joint, 1, S_txt, S_txt + S_img))
    v = aten.unflatten(joint, -1, [H, D])

FLUX.1-dev at 1024²: a copy of 4608 x 3072 values in each of its 19 double blocks, the forward's last concatenation
kernels (0.35 ms on an H100, ``bench/results/h100-2026-12-05-flux-dev-graphs-profile-joined-inputs-after.md``);
Qwen-Image's double-stream blocks have the same site.
Applies where every piece is a 3-D linear output (or a split of its last dimension, ``unflatten``), read only by the
concatenation, the concatenation runs along the rows (dimension 1) and the pieces share batch, width, dtype and
device. Not bit-exact in general (at a batch above one each GEMM runs per batch item); not under the fp8 tier, whose
``quantize_heads_cat`` reads the two pieces where they are. Off by default (``--enable cat_linear_rows``): on an
H100, FLUX.1-dev's forward read 120.6 ms without it and 120.2 with it, inside the run's spread
(``bench/results/h100-2026-12-05-flux-dev-cat-linear-rows.md``).
"""

from __future__ import annotations

import torch
from torch import fx

from .base import FusionPass, _propagate_val, linear_bias, tensor_val

aten = torch.ops.aten


def _piece(node: fx.Node) -> tuple[fx.Node, fx.Node | None] | None:
    """(the linear, the ``unflatten`` of its last dimension or None) a concatenation piece is made of."""
    view = None
    if node.op == "call_function" and node.target == aten.unflatten.int:
        val = tensor_val(node.args[0])
        if val is None or node.args[1] % val.ndim != val.ndim - 1 or len(node.users) != 1:
            return None
        view, node = node, node.args[0]
    if node.op != "call_function" or node.target != aten.linear.default or len(node.users) != 1:
        return None
    out, x = tensor_val(node), tensor_val(node.args[0])
    if out is None or x is None or out.ndim != 3 or x.ndim != 3 or out.dtype != x.dtype:
        return None  # the buffer is made like x (new_empty)
    return node, view


def _rows_concatenation(cat: fx.Node) -> list[tuple[fx.Node, fx.Node | None]] | None:
    """The pieces of ``cat`` where the rewrite applies (module docstring), else None."""
    if cat.op != "call_function" or cat.target != aten.cat.default or len(cat.args[0]) < 2:
        return None
    out = tensor_val(cat)
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if out is None or dim % out.ndim != 1:
        return None
    pieces = [_piece(p) if isinstance(p, fx.Node) else None for p in cat.args[0]]
    if any(p is None for p in pieces) or len({id(p[0]) for p in pieces}) != len(pieces):
        return None
    outs = [tensor_val(linear) for linear, _ in pieces]
    first = outs[0]
    if any(o.shape[0] != first.shape[0] or o.shape[2] != first.shape[2] or o.dtype != first.dtype
           or o.device != first.device for o in outs):
        return None
    views = [view for _, view in pieces]
    if any(v is None for v in views) != all(v is None for v in views):
        return None
    if views[0] is not None and len({tuple(v.args[1:]) for v in views}) != 1:
        return None
    return pieces


class CatLinearRowsPass(FusionPass):
    """Before: ``cat([unflatten?(linear(x_i, w_i, b_i)) ...], 1)``. After: one buffer, each GEMM writing its rows
    (``diffc.linear_into``), read through the same ``unflatten``."""

    name = "cat_linear_rows"
    bit_exact = False
    default_enabled = False  # until a GPU measures it
    fp8 = False

    def __call__(self, gm: fx.GraphModule) -> int:
        graph = gm.graph
        changed = 0
        for cat in list(graph.nodes):
            pieces = _rows_concatenation(cat)
            if pieces is None:
                continue
            outs = [tensor_val(linear) for linear, _ in pieces]
            batch, width = int(outs[0].shape[0]), int(outs[0].shape[2])
            made = []
            with graph.inserting_before(cat):
                joint = graph.call_function(aten.new_empty.default,
                                            (pieces[0][0].args[0], [batch, sum(int(o.shape[1]) for o in outs), width]))
                made.append(joint)
                start = 0
                for (linear, _), out in zip(pieces, outs):
                    rows = graph.call_function(aten.slice.Tensor, (joint, 1, start, start + int(out.shape[1])))
                    write = graph.call_function(torch.ops.diffc.linear_into.default,
                                                (linear.args[0], linear.args[1], linear_bias(linear), rows))
                    made += [rows, write]
                    start += int(out.shape[1])
                view = pieces[0][1]
                result = joint if view is None else graph.call_function(aten.unflatten.int, (joint, *view.args[1:]))
                if result is not joint:
                    made.append(result)
            for new in made:
                new.meta.update({k: v for k, v in cat.meta.items() if k not in ("val", "tensor_meta")})
                _propagate_val(new)
            cat.replace_all_uses_with(result)
            graph.erase_node(cat)
            for linear, view in pieces:
                if view is not None:
                    graph.erase_node(view)
                graph.erase_node(linear)
            changed += 1
        graph.lint()
        gm.recompile()
        return changed
