"""A modulation table added to a per-token ``temb`` -> the table's rows as biases of the fused ops that read it.

Wan's blocks modulate with ``(scale_shift_table + temb.float()).unbind(2)``: a float32 (1, 6, C) table plus
the projected timestep (B, T, 6, C). With one timestep per token (Wan2.2 TI2V, T = S) eager materialises a
float32 (B, S, 6, C) tensor in every block (2 GB at 1280x704x121) for six reads. After the adaLN and
gated-residual fusions, every read is a fused op's ``scale``/``shift``/``gate``; this pass hands those ops
``temb``'s own chunk (a strided view) and the table's row as a float32 bias they add in the kernel::

    m = aten.add(table, aten._to_copy(temb, float32))      # (B, T, 6, C) float32
    shift, scale, ... = aten.unbind(m, 2)
    diffc.adaln_modulate(x, scale, shift, eps, out)
  ->
    diffc.adaln_modulate(x, select(temb, 2, 1), select(temb, 2, 0), eps, out,
                         scale_bias=table[0, 1], shift_bias=table[0, 0])

The kernel adds the same two float32 values eager adds: the output equals the materialising graph's bit
for bit. A table whose chunks are also read by
anything else is left as it is.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .base import FusionPass, _propagate_val

aten = torch.ops.aten


def _readers() -> dict:
    """fused op -> {argument index: the bias keyword for it}."""
    d = torch.ops.diffc
    adaln = {1: "scale_bias", 2: "shift_bias"}
    # the residual + adaLN pairs: Wan's attn1 residual + norm2 (gate from the table, the norm's own affine),
    # its ungated x + attn2 + norm3 (scale and shift from the table)
    pair = {2: "gate_bias", 3: "scale_bias", 4: "shift_bias"}
    return {d.adaln_modulate.default: adaln, d.adaln_modulate_fp8.default: adaln,
            d.gated_residual.default: {2: "gate_bias"}, d.gated_residual_adaln.default: pair,
            d.gated_residual_adaln_fp8.default: pair}


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _float_cast_source(node) -> fx.Node | None:
    """The tensor ``node`` casts to float32 (``aten._to_copy`` / ``aten.to``), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target == aten._to_copy.default and node.kwargs.get("dtype") == torch.float32 and len(node.args) == 1:
        return node.args[0]
    if node.target == aten.to.dtype and len(node.args) >= 2 and node.args[1] == torch.float32:
        return node.args[0]
    return None


def _plan(add: fx.Node):
    """(table, temb, [(getitem, index)], consumers) for a rewritable table add, else None."""
    if add.op != "call_function" or add.target != aten.add.Tensor or len(add.args) != 2:
        return None
    for table, cast in (add.args, add.args[::-1]):
        temb = _float_cast_source(cast)
        t, e = _val(table), _val(temb)
        if (isinstance(table, fx.Node) and table.op == "placeholder" and isinstance(t, torch.Tensor)
                and isinstance(e, torch.Tensor) and t.dtype == torch.float32 and t.ndim == 3 and t.shape[0] == 1
                and e.ndim == 4 and e.shape[2:] == t.shape[1:] and e.dtype in (torch.bfloat16, torch.float16)
                and e.shape[1] > 1):  # per token: one timestep per sample makes a small (B, 1, K, C) sum
            break
    else:
        return None
    (unbind,) = add.users if len(add.users) == 1 else (None,)
    if unbind is None or unbind.target != aten.unbind.int or unbind.args[1:] not in ((2,), (-2,)):
        return None
    readers, chunks, consumers = _readers(), [], set()
    for item in unbind.users:
        if item.target is not operator.getitem:
            return None
        chunks.append((item, item.args[1]))
        for user in item.users:
            slots = readers.get(user.target)
            if slots is None or any(a is item for i, a in enumerate(user.args) if i not in slots):
                return None
            consumers.add(user)
    items = {item for item, _ in chunks}
    for user in consumers:  # none has a bias yet; scale and shift come from this table together or not at all
        slots = readers[user.target]
        if any(user.kwargs.get(kw) is not None for kw in slots.values()):
            return None
        paired = [user.args[i] in items for i, kw in slots.items() if kw in ("scale_bias", "shift_bias")]
        if len(set(paired)) > 1:
            return None
    return table, temb, chunks, consumers


class ModulationTablePass(FusionPass):
    """Wan's per-block modulation table as biases of the fused ops (module docstring)."""

    name = "modulation_table"
    bit_exact = False  # bit-exact against the fused ops it rewires, which only the fast tiers run

    def __call__(self, gm: fx.GraphModule) -> int:
        readers, rewritten = _readers(), 0
        for add in list(gm.graph.nodes):
            plan = _plan(add)
            if plan is None:
                continue
            table, temb, chunks, consumers = plan
            views = {}
            with gm.graph.inserting_before(next(iter(add.users))):  # before the unbind, in order
                row0 = gm.graph.call_function(aten.select.int, (table, 0, 0))
                new = [row0]
                for item, j in chunks:
                    views[item] = (gm.graph.call_function(aten.select.int, (temb, 2, j)),
                                   gm.graph.call_function(aten.select.int, (row0, 0, j)))
                    new += views[item]
            for n in new:
                _propagate_val(n)
            for user in consumers:
                args, kwargs = list(user.args), dict(user.kwargs)
                for index, kw in readers[user.target].items():
                    if args[index] in views:
                        args[index], kwargs[kw] = views[args[index]]
                user.args, user.kwargs = tuple(args), kwargs
            rewritten += 1
        if rewritten:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
        return rewritten
