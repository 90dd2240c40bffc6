"""Fuse a gated residual and the adaptive LayerNorm that reads it into ``torch.ops.diffc.gated_residual_adaln``.

Runs after :mod:`.gated_residual` and :mod:`.adaln_modulate`, over their destination-passing calls
(an ``empty_like`` buffer, then the op writing it). Unfused::

    res = aten.empty_like(x)
    diffc.gated_residual(x, y, gate, res)                 # FLUX double block: hidden + gate_msa * attn
    h   = aten.empty_like(res)
    diffc.adaln_modulate(res, scale, shift, eps, h)       # ... then its MLP norm (norm2)
    ...   readers of res (the next residual add), of h (the MLP)

Fused, one pass over each token writing both the residual stream and its modulated norm::

    res = aten.empty_like(x)
    h   = aten.empty_like(res)
    diffc.gated_residual_adaln(x, y, gate, scale, shift, eps, res, h)

Sites in the models: FLUX's double-stream block, image and text streams each (the residual after
attention feeds the MLP's norm); Wan, every block's feed-forward residual feeds the next block's
``norm1`` and the last one ``norm_out``. FLUX's single-stream output is sliced into text and image
before the next norm: not these ops. Wan's attention residual feeds the affine ``norm2`` (an
``adaln_modulate`` with ``scale = w - 1``, ``shift = b`` since :mod:`.adaln_modulate`'s
``AffineLayerNormUpcast``), and its ungated ``x + attn2`` feeds ``norm3``: a plain ``aten.add`` of two
activations of one shape and dtype read by the norm becomes the op's ``gate=None`` form first (the
same sum, rounded once to the activations' dtype as eager rounds it), then pairs like the others.

A pair is fused where ``res`` has one writer (the gated residual), ``x`` and ``res`` agree in shape and
dtype, and every other reader of ``res`` comes after the point where all the fused op's inputs exist
(the op is placed there, so the readers still see the residual written).
"""

from __future__ import annotations

import torch
from torch import fx

from ...errors import InvalidArgumentError
from .base import FusionPass, _propagate_val

aten = torch.ops.aten
diffc = torch.ops.diffc


def _written(node: fx.Node) -> list[fx.Node]:
    """The nodes a call mutates, by its schema (``Tensor(a!)`` arguments)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return []
    out = []
    for i, arg in enumerate(target._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if isinstance(value, fx.Node):
            out.append(value)
    return out


def _writers(node: fx.Node) -> list[fx.Node]:
    return [user for user in node.users if node in _written(user)]


def _same_rows(a, b) -> bool:
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.shape == b.shape
        and a.dtype == b.dtype
        and a.ndim == 3
    )


def _ungated_residual(graph: fx.Graph, norm: fx.Node) -> None:
    """``res = aten.add(x, y)`` read by ``norm`` (x, y, res of one shape and dtype) -> ``diffc.gated_residual(x,
    y, None, res)`` into a new buffer, which the pairing below takes like a gated one."""
    res = norm.args[0] if norm.args else None
    if not (isinstance(res, fx.Node) and res.op == "call_function" and res.target == aten.add.Tensor
            and len(res.args) == 2 and not res.kwargs):
        return
    val = res.meta.get("val")
    if not all(isinstance(n, fx.Node) and _same_rows(n.meta.get("val"), val) for n in res.args):
        return
    x, y = res.args
    with graph.inserting_before(res):
        buf = graph.call_function(aten.empty_like.default, (x,))
        call = graph.call_function(diffc.gated_residual.default, (x, y, None, buf))
    buf.meta = {k: v for k, v in res.meta.items() if k != "val"}
    call.meta = dict(buf.meta)
    _propagate_val(buf)
    _propagate_val(call)
    res.replace_all_uses_with(buf)
    graph.erase_node(res)


class GatedResidualAdaLNPass(FusionPass):
    """``diffc.gated_residual`` feeding ``diffc.adaln_modulate`` -> ``diffc.gated_residual_adaln``.
    Not bit-exact: it inherits the LayerNorm reduction order of ``adaln_modulate``'s kernel."""

    name = "gated_residual_adaln"
    bit_exact = False

    def __call__(self, gm: fx.GraphModule) -> int:
        """Rewrite ``gm`` in place; returns the number of pairs fused."""
        if not isinstance(gm, fx.GraphModule):
            raise InvalidArgumentError("gm", f"expected a torch.fx.GraphModule, got {type(gm).__name__}")
        fused = 0
        for norm in [n for n in gm.graph.nodes if n.target == diffc.adaln_modulate.default]:
            _ungated_residual(gm.graph, norm)
            fused += self._fuse(gm.graph, norm)
        if fused:
            gm.graph.lint()
            gm.recompile()
        return fused

    def _fuse(self, graph: fx.Graph, norm: fx.Node) -> bool:
        if len(norm.args) != 5 or norm.kwargs:
            return False
        res, scale, shift, eps, out = norm.args
        if not isinstance(res, fx.Node) or not isinstance(out, fx.Node):
            return False
        writers = _writers(res)
        if len(writers) != 1 or writers[0].target != diffc.gated_residual.default:
            return False
        residual = writers[0]
        if len(residual.args) != 4 or residual.kwargs or residual.args[3] is not res:
            return False
        x, y, gate = residual.args[:3]
        if not (isinstance(x, fx.Node) and _same_rows(x.meta.get("val"), res.meta.get("val"))):
            return False
        if _writers(out) != [norm]:
            return False

        order = {n: i for i, n in enumerate(graph.nodes)}
        if any(order[w] > order[residual] for n in (x, y, gate) if isinstance(n, fx.Node) for w in _writers(n)):
            return False  # an input rewritten after the residual read it: keep the two calls
        inputs = [n for n in (x, y, gate, scale, shift, res) if isinstance(n, fx.Node)]
        ready = max(order[w] for n in inputs for w in (n, *_writers(n)) if w not in (residual, norm))
        # out's allocation (empty_like(res)) moves down to the fused op when nothing uses it before
        move_out = (
            out.target == aten.empty_like.default
            and out.args[:1] == (res,)
            and order[out] > ready
            and all(order[u] > ready for u in out.users)
        )
        if not move_out:
            ready = max(ready, order[out])
        for reader in res.users:
            if reader in (residual, norm) or reader.target == aten.empty_like.default:
                continue  # empty_like reads only the buffer's metadata
            if order[reader] <= ready:
                return False

        anchor = list(graph.nodes)[ready]
        with graph.inserting_after(anchor):
            call = graph.call_function(
                diffc.gated_residual_adaln.default, (x, y, gate, scale, shift, eps, res, out)
            )
        call.meta = {k: v for k, v in norm.meta.items() if k != "val"}
        if move_out:
            call.prepend(out)
        graph.erase_node(norm)
        graph.erase_node(residual)
        _propagate_val(call)
        return True
