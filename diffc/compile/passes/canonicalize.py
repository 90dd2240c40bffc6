"""Strip export's metadata checks and no-op casts so that fusion patterns see one spelling per op.

Export records every ``.to(dtype)`` / ``.float()`` / ``.type_as(t)``, even where the dtype does not
change (all of Wan's float32 casts in a float32 model), each behind an
``aten._assert_tensor_metadata`` check. This pass, run before any fusion:

- removes ``aten._assert_tensor_metadata`` nodes (checks of metadata the graph is specialised to);
- rewrites ``aten.type_as(a, b)`` into ``aten.to.dtype(a, b.dtype)``;
- removes ``aten.to.dtype`` / ``aten.to.dtype_layout`` / ``aten.type_as`` whose result has its input's
  dtype, device and layout (eager returns the input itself there), using the input instead.

Every change is bit-exact; the count is the number of nodes removed or rewritten.
"""

from __future__ import annotations

import torch
from torch import fx

from .base import FusionPass, _propagate_val

aten = torch.ops.aten
CASTS = (aten.to.dtype, aten.to.dtype_layout, aten.type_as.default)


def _same_tensor_kind(a, b) -> bool:
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.dtype == b.dtype
        and a.device == b.device
        and a.layout == b.layout
    )


class CanonicalizeCasts(FusionPass):
    """Before: ``to.dtype(x, float32)`` on a float32 ``x``, ``type_as(y, x)``, ``_assert_tensor_metadata(x)``.
    After: ``x``, ``to.dtype(y, x.dtype)`` (or ``y`` where dtypes agree), nothing."""

    name = "canonicalize_casts"
    bit_exact = True

    def __call__(self, gm: fx.GraphModule) -> int:
        changed = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target == aten._assert_tensor_metadata.default:
                gm.graph.erase_node(node)
                changed += 1
            elif node.target in CASTS:
                source = node.args[0]
                if not isinstance(source, fx.Node):
                    continue
                if _same_tensor_kind(source.meta.get("val"), node.meta.get("val")):
                    node.replace_all_uses_with(source)
                    gm.graph.erase_node(node)
                    changed += 1
                elif node.target == aten.type_as.default and isinstance(node.meta.get("val"), torch.Tensor):
                    with gm.graph.inserting_before(node):
                        cast = gm.graph.call_function(aten.to.dtype, (source, node.meta["val"].dtype))
                    cast.meta = dict(node.meta)
                    node.replace_all_uses_with(cast)
                    gm.graph.erase_node(node)
                    _propagate_val(cast)
                    changed += 1
        gm.graph.lint()
        gm.recompile()
        return changed
