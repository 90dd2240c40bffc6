"""Project a feature concatenation without making it: one GEMM per input, accumulating into one output.

A single-stream DiT block (FLUX.1's ``proj_out``, HunyuanVideo's single blocks) projects the attention output
and the MLP's activation concatenated along the features::

    out = aten.linear(aten.cat([attn, mlp], -1), w, b)          # attn: (..., K_a), mlp: (..., K_m)

Rewritten (the weight's column slices are views)::

    out = aten.linear(attn, aten.slice(w, 1, 0, K_a), b)
    diffc.linear_accumulate(mlp, aten.slice(w, 1, K_a, K_a + K_m), out)     # out += mlp @ w[:, K_a:]^T

The concatenation's copy of both inputs goes; the accumulating GEMM reads and writes the output once more
(:mod:`diffc.ops.linear_accumulate`). Only where the concatenation has no other reader, runs along the last
dimension, and its inputs and the weight share one dtype. Not bit-exact (the output is rounded once per
GEMM); not under the fp8 tier, whose ``fp8_quantize_concat`` step quantizes the concatenation in one kernel
for an fp8 GEMM. On by default in the ``fast`` tier (FLUX.1-dev on an H200: 120.2 -> 118.3 ms a forward, peak
34.0 -> 31.9 GB); ``--disable split_cat_linear`` leaves it out.
"""

from __future__ import annotations

import torch
from torch import fx

from .base import FusionPass, _propagate_val, linear_bias, tensor_val

aten = torch.ops.aten


def _split(node: fx.Node) -> tuple[fx.Node, list[fx.Node], list[int]] | None:
    """For ``linear(cat(parts, -1), w, b)``: (the cat, its parts, their widths); None where it does not apply."""
    if node.op != "call_function" or node.target != aten.linear.default or not isinstance(node.args[0], fx.Node):
        return None
    cat, weight = node.args[0], node.args[1]
    if cat.op != "call_function" or cat.target != aten.cat.default or len(cat.users) != 1:
        return None
    parts = cat.args[0]
    out, w = tensor_val(cat), tensor_val(weight)
    if out is None or w is None or w.ndim != 2 or w.stride(-1) != 1 or len(parts) < 2:
        return None
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if dim % out.ndim != out.ndim - 1:
        return None
    values = [tensor_val(p) for p in parts]
    if any(v is None or v.dtype != w.dtype or v.ndim != out.ndim or v.shape[-1] == 0 for v in values):
        return None
    bias = tensor_val(linear_bias(node))
    if linear_bias(node) is not None and (bias is None or bias.dtype != w.dtype):
        return None
    widths = [int(v.shape[-1]) for v in values]
    if sum(widths) != w.shape[1]:
        return None
    return cat, list(parts), widths


class SplitCatLinearPass(FusionPass):
    """Before: ``linear(cat([x_0, x_1, ...], -1), w, b)``. After: ``linear(x_0, w[:, :K_0], b)``, then
    ``diffc.linear_accumulate(x_i, w[:, K_i-range], out)`` for each later input."""

    name = "split_cat_linear"
    bit_exact = False
    default_enabled = True
    fp8 = False  # the fp8 tier quantizes the concatenation for its fp8 GEMM instead

    def __call__(self, gm: fx.GraphModule) -> int:
        changed = 0
        for node in list(gm.graph.nodes):
            found = _split(node)
            if found is None:
                continue
            cat, parts, widths = found
            weight, bias = node.args[1], linear_bias(node)
            made = []
            with gm.graph.inserting_before(node):
                start = 0
                slices = []
                for width in widths:
                    slices.append(gm.graph.call_function(aten.slice.Tensor, (weight, 1, start, start + width)))
                    start += width
                out = gm.graph.call_function(aten.linear.default, (parts[0], slices[0], bias))
                made += [*slices, out]
                for part, piece in zip(parts[1:], slices[1:]):
                    made.append(gm.graph.call_function(torch.ops.diffc.linear_accumulate.default, (part, piece, out)))
            for new in made:
                new.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")})
                _propagate_val(new)
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            gm.graph.erase_node(cat)
            changed += 1
        gm.graph.lint()
        gm.recompile()
        return changed
