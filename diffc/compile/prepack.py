"""Load-time weight prepacking: compute the graph's concatenations of weights once, in place.

:class:`~diffc.compile.passes.concat_linear.ConcatLinearPass` leaves ``aten.cat`` over parameters in
the graph (the artifact keeps the checkpoint's own tensor names); run as is, every forward would copy
the weights. :func:`fold_weight_concats` runs on the unlifted module (``ExportedProgram.module()``,
where parameters are ``get_attr`` nodes), after the final weights are in place (also after
``gm.load_state_dict(weights, assign=True)``)::

    before:  w = aten.cat([get_attr blocks.0.attn1.to_q.weight, ... to_v.weight], 0)
    after:   w = get_attr _diffc_packed_0                # (N_q + N_k + N_v, K), computed once
             blocks.0.attn1.to_q.weight.data is _diffc_packed_0[0:N_q]   (a view), and so on

Each packed tensor is a non-persistent buffer of ``gm`` (``state_dict`` keeps the checkpoint's names
and sizes). Each source tensor is re-pointed (``.data``) at its rows of the packed tensor, so the
weights are held once and every module sharing those ``Parameter`` objects (the eager model whose
weights were assigned into ``gm``) reads the same memory.

Assumptions: parameters and buffers feeding a folded ``cat`` do not change during a forward (a
``cat`` over a tensor the graph writes is left alone); later weight updates go through
``load_state_dict`` without ``assign`` (copying into the views updates the packed tensor; assigning
new tensors would leave it stale); the module is on its final device (``.to()`` moves parameters and
buffers separately, which keeps values right but holds the weights twice). Only a ``cat`` along dim 0
re-points its sources (other dims would make them strided views); a source already inside a packed
tensor (a parameter shared by two groups), or of another dtype or device than the result, keeps its
own storage.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..errors import InvalidArgumentError

aten = torch.ops.aten
PACKED_PREFIX = "_diffc_packed_"
CONSTANT_FACTORIES = (aten.zeros.default, aten.new_zeros.default, aten.full.default, aten.ones.default)


def _constant(node: fx.Node) -> bool:
    """A ``get_attr``, or a factory call (``zeros``, ``new_zeros``, ...) whose tensor inputs are ``get_attr``s."""
    if node.op == "get_attr":
        return True
    return (
        node.op == "call_function"
        and node.target in CONSTANT_FACTORIES
        and all(a.op == "get_attr" for a in node.all_input_nodes)
    )


def written(node: fx.Node) -> bool:
    """Whether an op writes into ``node``'s value or a view of it (a split's pieces included): a mutated weight
    cannot be packed, a concatenation written in place cannot be another block's output joined (regions.py)."""
    seen, todo = set(), [node]
    while todo:
        value = todo.pop()
        for user in value.users:
            if user.target is operator.getitem and user not in seen:  # a piece of a split's views
                seen.add(user)
                todo.append(user)
                continue
            schema = getattr(user.target, "_schema", None)
            if schema is None:
                continue
            for i, arg in enumerate(schema.arguments):
                given = user.args[i] if i < len(user.args) else user.kwargs.get(arg.name)
                if given is value and arg.alias_info is not None and arg.alias_info.is_write:
                    return True
            if any(r.alias_info is not None for r in schema.returns) and user not in seen:  # a view
                seen.add(user)
                todo.append(user)
    return False


def _foldable(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target != aten.cat.default or not node.args:
        return False
    inputs = node.args[0]
    return (
        isinstance(inputs, (list, tuple))
        and len(inputs) > 0
        and all(isinstance(a, fx.Node) and _constant(a) for a in inputs)
        and not any(written(a) for a in inputs if a.op == "get_attr")
    )


def _check_module(gm) -> None:
    if isinstance(gm, torch.export.ExportedProgram):
        raise InvalidArgumentError(
            "gm", "expected the unlifted module, ExportedProgram.module(), not the ExportedProgram itself"
        )
    if not isinstance(gm, fx.GraphModule):
        raise InvalidArgumentError(
            "gm", f"expected a torch.fx.GraphModule such as ExportedProgram.module(), got {type(gm).__name__}"
        )


def unfolded_weight_concats(gm: fx.GraphModule) -> int:
    """How many ``aten.cat`` nodes over parameters, buffers and constant factories ``gm`` still computes."""
    _check_module(gm)
    return sum(_foldable(node) for node in gm.graph.nodes)


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    return operator.attrgetter(target)(gm)


def _evaluate(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    if node.op == "get_attr":
        return _attr(gm, node.target)
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: _attr(gm, n.target))
    return node.target(*args, **kwargs)


def _packed_buffers(gm: fx.GraphModule) -> list[torch.Tensor]:
    return [t for name, t in gm.named_buffers(recurse=False) if name.startswith(PACKED_PREFIX)]


def _inside(t: torch.Tensor, packed: list[torch.Tensor]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return any(p.untyped_storage().data_ptr() == ptr for p in packed)


def _free_name(gm: fx.GraphModule) -> str:
    i = 0
    while hasattr(gm, f"{PACKED_PREFIX}{i}"):
        i += 1
    return f"{PACKED_PREFIX}{i}"


def _repoint(gm: fx.GraphModule, inputs: list[fx.Node], values: list[torch.Tensor], packed: torch.Tensor) -> None:
    """Point every ``get_attr`` source at its rows of ``packed`` (a dim-0 concatenation of ``values``)."""
    offset = 0
    for node, value in zip(inputs, values):
        rows = value.shape[0]
        same_kind = value.dtype == packed.dtype and value.device == packed.device
        # _inside also skips a tensor listed twice in this cat (re-pointed at its first place)
        if node.op == "get_attr" and same_kind and not _inside(value, _packed_buffers(gm)):
            value.data = packed.narrow(0, offset, rows)
        offset += rows


def _erase_unused(graph: fx.Graph, inputs: list[fx.Node]) -> None:
    """Erase the folded ``cat``'s factory calls, then ``get_attr`` nodes, that nothing reads any more."""
    factories = [n for n in dict.fromkeys(inputs) if n.op == "call_function"]
    attrs = dict.fromkeys([n for n in inputs if n.op == "get_attr"] + [a for f in factories for a in f.all_input_nodes])
    for node in [*factories, *attrs]:
        if not node.users:
            graph.erase_node(node)


def adjacent_view(pieces: list[torch.Tensor], dim: int) -> torch.Tensor | None:
    """``torch.cat(pieces, dim)`` as a view, where the pieces already lie end to end in one storage (slices of one
    contiguous tensor along ``dim``, in order); None where they do not."""
    first = pieces[0]
    if first.dim() == 0:
        return None
    dim %= first.dim()
    offset = first.storage_offset()
    storage = first.untyped_storage().data_ptr()
    for p in pieces:
        if (p.dtype != first.dtype or p.device != first.device or p.dim() != first.dim()
                or p.stride() != first.stride() or p.storage_offset() != offset
                or p.untyped_storage().data_ptr() != storage
                or any(p.shape[d] != first.shape[d] for d in range(first.dim()) if d != dim)):
            return None
        offset += p.shape[dim] * p.stride(dim)
    size = list(first.shape)
    size[dim] = sum(p.shape[dim] for p in pieces)
    view = first.as_strided(size, first.stride(), first.storage_offset())
    return view if view.is_contiguous() else None


def _adjacent_view(values: list[torch.Tensor], dim: int) -> torch.Tensor | None:
    """The dim-0 concatenation of ``values`` as a view (:func:`adjacent_view`), where they already lie back to
    back in one storage (an earlier fold, e.g. another shape bucket's graph over the same weights, packed them):
    the second graph then shares the first one's packed tensor instead of copying it."""
    return adjacent_view(values, dim) if dim in (0, -values[0].ndim) else None


def fold_weight_concats(gm: fx.GraphModule) -> int:
    """Compute every foldable ``aten.cat`` of ``gm`` once into a packed buffer; returns how many were folded.

    Foldable: every input is a ``get_attr`` (parameter or buffer) or a literal factory call such as
    ``aten.new_zeros(bias, [n])``. The ``cat`` becomes a ``get_attr`` of a new non-persistent buffer;
    source tensors become views into it (see the module docstring for what this assumes). Idempotent:
    a second call finds nothing left to fold and returns 0.
    """
    _check_module(gm)
    graph = gm.graph
    folded = 0
    for node in list(graph.nodes):
        if not _foldable(node):
            continue
        inputs = list(node.args[0])
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        with torch.no_grad():
            values = [_evaluate(gm, a) for a in inputs]
            packed = _adjacent_view(values, dim)
            reused = packed is not None
            if packed is None:
                packed = torch.cat(values, dim)
            name = _free_name(gm)
            gm.register_buffer(name, packed, persistent=False)
            if dim in (0, -packed.ndim) and not reused:
                _repoint(gm, inputs, values, packed)
        with graph.inserting_before(node):
            attr = graph.get_attr(name)
        if "val" in node.meta:
            attr.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
        _erase_unused(graph, inputs)
        folded += 1
    if folded:
        graph.lint()
        gm.recompile()
    return folded


def pack_tensors(values: list[torch.Tensor], repoint: list[bool]) -> torch.Tensor:
    """The dim-0 concatenation of ``values``, computed once; the tensors flagged in ``repoint`` (a block's
    own parameters and buffers) become views of it (``.data``), so the weights are held once.

    Values already lying back to back in one storage (packed earlier, e.g. by another shape's graph over
    the same weights) give a view of that storage instead of a copy.
    """
    with torch.no_grad():
        packed = _adjacent_view(values, 0)
        if packed is not None:
            return packed
        packed = torch.cat(values, 0)
        offset, seen = 0, set()
        for value, own in zip(values, repoint):
            rows = value.shape[0]
            if own and id(value) not in seen and value.dtype == packed.dtype and value.device == packed.device:
                seen.add(id(value))
                value.data = packed.narrow(0, offset, rows)
            offset += rows
    return packed
