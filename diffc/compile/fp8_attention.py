"""The fp8 tier's attention: self-attention whose q and k come from the fused QK-norm + RoPE kernel runs on
flashinfer's FA3 fp8 kernel, with q and k quantized inside that kernel.

Before (after the fusion passes; FLUX writes text and image rows of one buffer with two calls)::

    qo = aten.empty_like(q); ko = aten.empty_like(k)
    diffc.qk_norm_rope_across_heads(q, k, q_w, k_w, cos, sin, eps, qo, ko)
    o = aten.scaled_dot_product_attention(transpose(qo, 1, 2), transpose(ko, 1, 2), v[, scale=s])

After::

    qs, ks = aten.new_empty(q_w, [H], dtype=float32) x 2
    diffc.qk_fp8_head_scales(q_w, k_w, None, None, H, D, True, qs, ks)    # static: from the norm weights
    qo8 = aten.empty_like(q, dtype=fp8); ko8 = ...
    diffc.qk_norm_rope_across_heads_fp8(q, k, q_w, k_w, cos, sin, eps, qs, ks, qo8, ko8)
    v8 = aten.new_empty(v, [B, S, H, D], dtype=fp8); vs = aten.new_empty(v, [B, H], dtype=float32)
    diffc.quantize_heads(transpose(v, 1, 2), v8, vs)
    o = diffc.attention_flashinfer_fp8(transpose(qo8, 1, 2), transpose(ko8, 1, 2), transpose(v8, 1, 2), qs, ks, vs, s)

q and k need no pass over the data for their scales: an RMSNorm output is bounded by its weight
(:func:`diffc.ops.qk_norm_rope_fp8.qk_fp8_scales`), so the scales are computed from the weights in the graph
(``diffc.qk_fp8_head_scales``: one tiny launch for q and k, from the weights the graph runs with, so a
changed weight changes them) and the kernel that writes q and k writes them in fp8. Two
calls writing one buffer (FLUX's text and image rows) share the larger scale. v is quantized per head by
``diffc.quantize_heads`` (two passes: amax, cast); where v is a joint attention's concatenation of text and
image values read by nothing else, ``diffc.quantize_heads_cat`` reads the two pieces where they are and the
concatenation is never written (in FLUX.1's double-stream blocks, a copy of 4608 x 3072 values a block).
Quantizing q, k, v as separate torch ops costs more than fp8 saves (``GPU-NOTES.md``), so attention whose q/k
no fused kernel writes (cross-attention) stays bf16, as does every site on a GPU without flashinfer or without
Hopper's fp8 FA3 kernel.
"""

from __future__ import annotations

import torch
from torch import fx

from .passes.attention import SDPA, _bound_args, _refusal, replace_node
from .passes.base import _propagate_val

aten = torch.ops.aten
FP8 = torch.float8_e4m3fn
FA3_HEAD_DIMS = (64, 128, 256)  # the head dims flashinfer's FA3 fp8 prefill kernel is built for


def _writers() -> dict:
    """bf16 QK-norm + RoPE op -> (its fp8 variant, index of q_out, across heads)."""
    d = torch.ops.diffc
    return {
        d.qk_norm_rope_per_head.default: (d.qk_norm_rope_per_head_fp8.default, 8, False),
        d.qk_norm_rope_across_heads.default: (d.qk_norm_rope_across_heads_fp8.default, 7, True),
    }


def fp8_attention_unavailable(device: torch.device) -> str | None:
    """Why fp8 attention does not run on ``device``, or None (on the CPU the ops run their references)."""
    from ..ops.attention_fp8 import fp8_kernel_unavailable

    return None if device.type == "cpu" else fp8_kernel_unavailable(device)


def _chain(node) -> list[fx.Node]:
    """The nodes a qk-norm op may have written for this SDPA operand: the operand, or what it transposes."""
    if not isinstance(node, fx.Node):
        return []
    out = [node]
    if node.op == "call_function" and node.target == aten.transpose.int and tuple(node.args[1:]) in ((1, 2), (2, 1)):
        out.append(node.args[0])
    return out


def _allocation(node: fx.Node) -> fx.Node | None:
    """The allocation ``node`` is (or transposes), when it is one the lowering can clone in fp8."""
    for n in _chain(node)[::-1]:
        if n.op == "call_function" and n.target in (aten.empty_like.default, aten.new_empty.default):
            return n
    return None


class Fp8AttentionPass:
    """Lower every self-attention whose q/k a fused QK-norm + RoPE kernel writes onto fp8 attention."""

    name = "fp8_attention"

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, program: torch.export.ExportedProgram, lowering) -> int:
        """Rewrite in place; records sites in ``lowering.attention_sites`` and bf16 ones in ``attention_kept``."""
        gm = program.graph_module
        sdpa = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == SDPA]
        if not sdpa:
            return 0
        why = fp8_attention_unavailable(self.device)
        lowered = 0
        for node in sdpa:
            site = _site_name(node)
            if site in lowering.attention_sites or site in lowering.attention_kept:  # two attentions in one module
                site = f"{site} ({node.name})"
            plan = why or self._plan(node)
            if isinstance(plan, str):
                lowering.attention_kept[site] = plan
                continue
            out = self._lower(gm.graph, node, plan)
            lowering.attention_sites[site] = (node.name, out.name)
            lowered += 1
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        return lowered

    def _plan(self, node: fx.Node):
        """(writers, q operand, k operand, across heads) or a reason string."""
        bound = _bound_args(node)
        refusal = _refusal(bound)
        if refusal is not None:
            return f"not lowerable attention ({refusal})"
        q, k = bound["query"], bound["key"]
        if q.meta["val"].dtype != torch.bfloat16:
            return "fp8 attention writes bf16; q is not bf16"
        head_dim = q.meta["val"].shape[-1]
        if self.device.type == "cuda" and head_dim not in FA3_HEAD_DIMS:
            return f"head_dim {head_dim}: flashinfer's FA3 fp8 kernel takes {', '.join(map(str, FA3_HEAD_DIMS))}"
        writers = _writers()
        q_nodes, k_nodes = _chain(q), _chain(k)
        found = [u for n in q_nodes for u in n.users if u.op == "call_function" and u.target in writers]
        found = [w for w in found if w.args[writers[w.target][1]] in q_nodes]
        if not found:
            return "q and k are not written by the fused QK-norm + RoPE kernel"
        order = {n: i for i, n in enumerate(node.graph.nodes)}
        found.sort(key=order.__getitem__)
        if any(w.args[writers[w.target][1] + 1] not in k_nodes for w in found):
            return "q and k are written by different kernels"
        if len(found) > 2:
            return f"{len(found)} kernels write q (the scale op takes two norms' weights)"
        kinds = {writers[w.target][2] for w in found}
        if len(kinds) != 1:
            return "q is written by two kinds of QK-norm kernels"
        for operand, nodes in ((q, q_nodes), (k, k_nodes)):
            alloc = _allocation(operand)
            if alloc is None:
                return "q or k is written into a buffer the lowering does not own"
            allowed = set(found) | set(nodes) | {node}
            if any(u not in allowed for n in nodes for u in n.users):
                return "q or k is also read by another op"
        return found, q, k, kinds.pop()

    def _lower(self, graph: fx.Graph, node: fx.Node, plan) -> fx.Node:
        found, q, k, across = plan
        writers = _writers()
        bound = _bound_args(node)
        batch, heads, _seq, head_dim = q.meta["val"].shape
        new: list[fx.Node] = []

        def call(target, *args, **kwargs) -> fx.Node:
            n = graph.call_function(target, args, kwargs)
            new.append(n)
            _propagate_val(n)
            return n

        with graph.inserting_before(found[0]):
            # one launch: the larger bound of the writers' norm weights where two norms write one buffer
            second = found[1] if len(found) == 2 else None
            scales = [call(aten.new_empty.default, found[0].args[2], [heads], dtype=torch.float32) for _ in "qk"]
            call(torch.ops.diffc.qk_fp8_head_scales.default, found[0].args[2], found[0].args[3],
                 second.args[2] if second else None, second.args[3] if second else None, heads, head_dim, across,
                 *scales)
            clones = {}
            for operand in (q, k):
                alloc = _allocation(operand)
                alloc8 = call(alloc.target, *alloc.args, **{**alloc.kwargs, "dtype": FP8})
                clones[alloc] = alloc8
                if operand is not alloc:
                    clones[operand] = call(aten.transpose.int, alloc8, 1, 2)
        for w in found:
            fp8_op, q_index, _ = writers[w.target]
            args = list(w.args)
            q_out, k_out = args[q_index], args[q_index + 1]
            with graph.inserting_before(w):
                call(fp8_op, *args[:q_index], scales[0], scales[1], clones[q_out], clones[k_out])
            graph.erase_node(w)
        v = bound["value"]
        pieces = _joint_pieces(v, node)
        with graph.inserting_before(node):
            v_bshd = call(aten.transpose.int, v, 1, 2)
            like = v if pieces is None else pieces[0]  # nothing may read the concatenation, or it stays
            v8 = call(aten.new_empty.default, like, list(v_bshd.meta["val"].shape), dtype=FP8)
            vs = call(aten.new_empty.default, like, [batch, heads], dtype=torch.float32)
            if pieces is None:
                call(torch.ops.diffc.quantize_heads.default, v_bshd, v8, vs)
            else:  # the concatenation is read by nothing else: the kernel reads its two pieces (it goes dead)
                call(torch.ops.diffc.quantize_heads_cat.default, *pieces, v8, vs)
            q8 = clones[q] if q in clones else call(aten.transpose.int, clones[_allocation(q)], 1, 2)
            k8 = clones[k] if k in clones else call(aten.transpose.int, clones[_allocation(k)], 1, 2)
            v8t = call(aten.transpose.int, v8, 1, 2)
        return replace_node(graph.owning_module, node, torch.ops.diffc.attention_flashinfer_fp8.default,
                            (q8, k8, v8t, scales[0], scales[1], vs, bound.get("scale")))


def _joint_pieces(v: fx.Node, sdpa: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(a, b) where v is ``transpose(cat([a, b], 1), 1, 2)`` (a joint attention's text and image values in
    :mod:`.passes.cat_transposed`'s form: (B, S, H, D) pieces) read by this attention alone, else None."""
    if not (v.op == "call_function" and v.target == aten.transpose.int and tuple(v.args[1:]) in ((1, 2), (2, 1))):
        return None
    cat = v.args[0]
    if not (isinstance(cat, fx.Node) and cat.op == "call_function" and cat.target == aten.cat.default):
        return None
    pieces = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if len(pieces) != 2 or dim not in (1, -3) or set(cat.users) != {v} or set(v.users) != {sdpa}:
        return None
    vals = [p.meta.get("val") if isinstance(p, fx.Node) else None for p in pieces]
    joint = cat.meta.get("val")
    if joint is None or any(x is None or x.ndim != 4 or x.dtype != joint.dtype for x in vals):
        return None  # a piece cat promotes to the joint dtype, or of unknown shape: the concatenation stays
    return pieces[0], pieces[1]


def _site_name(node: fx.Node) -> str:
    """The attention module a node belongs to (``attn1``), from export's module stack, else the node's name."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _cls in reversed(list(stack.values())):
        if path:
            return str(path).removeprefix("L__self___").replace("_modules['", "").replace("']", "")
    return node.name


__all__ = ["Fp8AttentionPass", "fp8_attention_unavailable"]
