"""Concatenate the weights of linears that read one input into one wider GEMM.

Unfused (FLUX double block ``to_q/to_k/to_v`` and ``add_{q,k,v}_proj``, FLUX single block
``proj_mlp`` + ``to_q/to_k/to_v``, Wan ``attn1.to_{q,k,v}`` and ``attn2.to_{k,v}``)::

    q = aten.linear(x, w_q, b_q)          # x: (..., K), w_i: (N_i, K), b_i: (N_i,)
    k = aten.linear(x, w_k, b_k)
    v = aten.linear(x, w_v, None)

Fused (one GEMM of width N_q + N_k + N_v; the pieces are column views of its output)::

    w = aten.cat([w_q, w_k, w_v], 0)                                   # (N, K)
    b = aten.cat([b_q, b_k, aten.new_zeros(b_q, [N_v])], 0)             # (N,), absent if no member has a bias
    parts = aten.split_with_sizes(aten.linear(x, w, b), [N_q, N_k, N_v], -1)
    q, k, v = parts[0], parts[1], parts[2]

The ``cat`` over parameters runs at every call of the rewritten program until
:func:`diffc.compile.prepack.fold_weight_concats` computes it once at load time.

Who groups with whom: ``aten.linear`` nodes with the same input node whose weights are parameters
(lifted placeholders ``p_*`` / ``b_*`` / ``c_*``, or ``get_attr`` nodes) of one dtype, device and
``in_features``, with biases that are parameters too (or none), and that belong to the same block.
The block is read from the weight's name, the one thing every pass keeps (rewritten nodes lose
``nn_module_stack``): the name cut after its last all-digit component, i.e. the innermost
``ModuleList``/``Sequential`` element that owns the weight (``p_blocks_3_attn2_to_k_weight`` ->
``blocks_3``; no digit: the root). So linears of different blocks never share a GEMM, even where they
read one node (Wan's cross-attention ``to_k``/``to_v`` in every block read the text embedding).

The pieces are column slices, not contiguous tensors. Every consumer is re-run on its fake values; a
member whose consumers refuse a slice stays out of its group (``diffc.gelu_tanh`` requires a
contiguous input, so after the ``gelu_tanh`` pass FLUX's ``proj_mlp`` keeps its own GEMM: a contiguous
copy of its (tokens, 4 * hidden) output would cost more than the merged launch saves).
"""

from __future__ import annotations

import dataclasses
import heapq
import operator
import re
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode

from ...errors import InvalidArgumentError
from .base import FusionPass, linear_bias

aten = torch.ops.aten
LIFTED_PARAMETER_PREFIXES = ("p_", "b_", "c_")  # torch.export's names for lifted parameters, buffers, constants


class _Refused(Exception):
    """A consumer's fake implementation rejected a column slice in place of a full linear output."""


@dataclasses.dataclass
class _Member:
    node: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    rows: int


def block_of(weight: fx.Node) -> str | None:
    """The block key of a parameter node (see the module docstring); ``None`` for a non-parameter."""
    if not isinstance(weight, fx.Node):
        raise InvalidArgumentError("weight", f"expected a torch.fx.Node, got {type(weight).__name__}")
    if weight.op == "get_attr":
        name = str(weight.target)
    elif weight.op == "placeholder" and weight.name.startswith(LIFTED_PARAMETER_PREFIXES):
        name = weight.name[2:]
    else:
        return None
    tokens = re.split(r"[._]", name)
    digits = [i for i, t in enumerate(tokens) if t.isdigit()]
    return "_".join(tokens[: digits[-1] + 1]) if digits else ""


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def _member(node: fx.Node) -> tuple[tuple, _Member] | None:
    """The grouping key and member record of a linear that may join a group, else ``None``."""
    if node.op != "call_function" or node.target != aten.linear.default or len(node.args) < 2:
        return None
    x, weight = node.args[0], node.args[1]
    bias = linear_bias(node)
    if not isinstance(x, fx.Node) or not isinstance(weight, fx.Node):
        return None
    block = block_of(weight)
    x_val, w_val = _val(x), _val(weight)
    if block is None or not isinstance(x_val, torch.Tensor) or not isinstance(w_val, torch.Tensor):
        return None
    if w_val.ndim != 2 or x_val.ndim < 1 or x_val.shape[-1] != w_val.shape[1]:
        return None
    if bias is not None:
        b_val = _val(bias)
        if not isinstance(bias, fx.Node) or block_of(bias) is None or not isinstance(b_val, torch.Tensor):
            return None
        if tuple(b_val.shape) != (w_val.shape[0],) or b_val.dtype != w_val.dtype or b_val.device != w_val.device:
            return None
    key = (x, block, w_val.dtype, w_val.device, w_val.shape[1])
    return key, _Member(node, weight, bias, int(w_val.shape[0]))


def _candidate_groups(gm: fx.GraphModule) -> list[list[_Member]]:
    """Linears sharing input, block and weight kind, in graph order; a weight appears once per group."""
    groups: dict[tuple, list[_Member]] = {}
    for node in gm.graph.nodes:
        found = _member(node)
        if found is None:
            continue
        key, member = found
        group = groups.setdefault(key, [])
        if all(m.weight is not member.weight for m in group):
            group.append(member)
    return [g for g in groups.values() if len(g) >= 2]


def _same_val(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.stride() == b.stride()
            and a.dtype == b.dtype
            and a.device == b.device
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_val(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _restride(start: dict[fx.Node, Any], mode, position: dict[fx.Node, int]) -> dict[fx.Node, Any]:
    """New fake values downstream of ``start`` (node -> its new value), as far as they change.

    Consumers run in graph order on the new values; propagation stops where a result has the shape,
    strides and dtype it had (a norm or GEMM after the views). Raises :class:`_Refused` where a
    consumer rejects its new input.
    """
    vals = dict(start)
    heap: list[tuple[int, str, fx.Node]] = []
    queued: set[fx.Node] = set()

    def push(node: fx.Node) -> None:
        for user in node.users:
            if user not in queued and user not in start:
                queued.add(user)
                heapq.heappush(heap, (position[user], user.name, user))

    for node in start:
        push(node)
    while heap:
        _, _, node = heapq.heappop(heap)
        if node.op == "output":
            continue
        if node.op != "call_function":
            raise _Refused(node.name)
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: vals.get(n, n.meta.get("val")))
        try:
            with mode:
                new = node.target(*args, **kwargs)
        except Exception as exc:  # a fake's own check (InvalidArgumentError, RuntimeError from ATen, ...)
            raise _Refused(node.name) from exc
        if not _same_val(new, node.meta.get("val")):
            vals[node] = new
            push(node)
    return vals


def _fake_pieces(members: list[_Member], x: fx.Node, mode) -> list[torch.Tensor]:
    with mode:
        weight = torch.cat([m.weight.meta["val"] for m in members], 0)
        out = aten.linear.default(x.meta["val"], weight)
        return list(aten.split_with_sizes.default(out, [m.rows for m in members], -1))


def _accepted(members: list[_Member], mode) -> tuple[list[_Member], dict[fx.Node, Any]]:
    """The members whose consumers take a column slice, and the new fake values downstream of them.

    Each member is checked alone (a refusal drops that member); the values come from one propagation
    of all kept pieces together, so a node reading two pieces sees both.
    """
    position = {n: i for i, n in enumerate(members[0].node.graph.nodes)}
    kept = members
    for member, piece in zip(members, _fake_pieces(members, members[0].node.args[0], mode)):
        try:
            _restride({member.node: piece}, mode, position)
        except _Refused:
            kept = [m for m in kept if m is not member]
    if len(kept) < 2:
        return kept, {}
    pieces = _fake_pieces(kept, kept[0].node.args[0], mode)
    try:
        return kept, _restride({m.node: p for m, p in zip(kept, pieces)}, mode, position)
    except _Refused:
        return [], {}


def _common_module_stack(members: list[_Member]) -> dict | None:
    stacks = [m.node.meta.get("nn_module_stack") for m in members]
    if any(s is None for s in stacks):
        return None
    return {k: v for k, v in stacks[0].items() if all(s.get(k) == v for s in stacks[1:])}


def _rewrite(gm: fx.GraphModule, members: list[_Member], vals: dict[fx.Node, Any], mode) -> None:
    graph, first, x = gm.graph, members[0].node, members[0].node.args[0]
    stack = _common_module_stack(members)
    new_nodes: list[fx.Node] = []

    def call(target, *args) -> fx.Node:
        node = graph.call_function(target, args)
        in_vals = fx.node.map_arg(args, lambda n: n.meta["val"])
        with mode:
            node.meta["val"] = target(*in_vals)
        new_nodes.append(node)
        return node

    with graph.inserting_before(first):
        weight = call(aten.cat.default, [m.weight for m in members], 0)
        ref = next((m.bias for m in members if m.bias is not None), None)
        if ref is None:
            out = call(aten.linear.default, x, weight)
        else:
            parts = [m.bias if m.bias is not None else call(aten.new_zeros.default, ref, [m.rows]) for m in members]
            out = call(aten.linear.default, x, weight, call(aten.cat.default, parts, 0))
        split = call(aten.split_with_sizes.default, out, [m.rows for m in members], -1)
        pieces = [call(operator.getitem, split, i) for i in range(len(members))]
    if stack is not None:
        for node in new_nodes:
            node.meta["nn_module_stack"] = dict(stack)
    for member, piece in zip(members, pieces):
        member.node.replace_all_uses_with(piece)
        graph.erase_node(member.node)
    gone = {m.node for m in members}  # their values are the pieces' now
    for node, val in vals.items():
        if node not in gone:
            node.meta["val"] = val
            node.meta.pop("tensor_meta", None)


class ConcatLinearPass(FusionPass):
    """Linears of one block reading one input -> one ``aten.linear`` over concatenated weights.

    The count is the number of groups formed. ``groups`` lists, after each call, the weight node names
    of every group in graph order. Not bit-exact: a wider GEMM may take another kernel and blocking
    (cuBLAS picks by N). On CPU (torch 2.13, x86) it measured bit-identical: the tiny FLUX and Wan
    graphs in float32 and bf16, and three 3072x3072 projections of 257 tokens against their merged GEMM.
    """

    name = "concat_linear"
    bit_exact = False
    # Opt-in (``enable=("concat_linear",)``): on an H200 it measured neutral on FLUX.1-dev and 1% slower
    # on Wan2.1-1.3B (bench/results/h200-2026-11-22-*-ablation*): the merged GEMM saves little at these
    # sizes, and the value projection becomes a strided column slice that cuDNN attention reads slower.
    default_enabled = False

    def __init__(self) -> None:
        self.groups: list[tuple[str, ...]] = []

    def __call__(self, gm: fx.GraphModule) -> int:
        """Rewrite ``gm`` (an ExportedProgram's ``graph_module``) in place; returns the number of groups."""
        if not isinstance(gm, fx.GraphModule):
            raise InvalidArgumentError(
                "gm", f"expected a torch.fx.GraphModule (ExportedProgram.graph_module), got {type(gm).__name__}"
            )
        self.groups = []
        for members in _candidate_groups(gm):
            x = members[0].node.args[0]
            mode = detect_fake_mode([x.meta["val"]])
            if mode is None:
                continue
            members, vals = _accepted(members, mode)
            if len(members) < 2:
                continue
            _rewrite(gm, members, vals, mode)
            self.groups.append(tuple(m.weight.name for m in members))
        gm.graph.lint()
        gm.recompile()
        return len(self.groups)
