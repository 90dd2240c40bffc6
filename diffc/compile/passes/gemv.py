"""Lower linear layers over a few rows (an adaptive norm's projection of the conditioning) onto ``diffc.gemv``.

Unfused (FLUX.1's ``norm1.linear``, ``norm1_context.linear`` and single-block ``norm.linear``; Qwen-Image's
``img_mod``/``txt_mod``)::

    a = aten.silu(temb)                      # temb: (batch, K), batch <= MAX_ROWS
    y = aten.linear(a, W, b)                 # W: (N, K), a block parameter

Fused (one pass over W, the SiLU computed on the fly; ``silu`` stays only where something else reads it)::

    y = aten.new_empty(temb, [batch, N])
    diffc.gemv(temb, W, None, b, "silu", y)

Taken: an input of at most ``MAX_ROWS`` rows (a 2-D one with a unit last stride, or a contiguous one with
more dimensions, viewed as 2-D: Wan's (batch, 1, dim) timestep embedding), a weight that is a lifted parameter
(a block's own, so the fp8 tier can swap it for its fp8 copy: :mod:`diffc.compile.fp8`) of the input's dtype,
and a bias that is a parameter too (or none).
"""

from __future__ import annotations

import torch
from torch import fx

from .base import FusionPass, _propagate_val, linear_bias
from .concat_linear import block_of

aten = torch.ops.aten
# The op takes up to diffc.ops.gemv.MAX_ROWS rows, but measured faster than cuBLAS for one row only (H200,
# bench/results/ops/h200-2026-12-04-gemv.txt: two rows 1.28x slower in bf16); more rows keep their GEMM.
MAX_ROWS = 1
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _parameter(node) -> bool:
    """A lifted parameter or ``get_attr`` node (one that has a block: :func:`.concat_linear.block_of`)."""
    return isinstance(node, fx.Node) and block_of(node) is not None


def _reads_as_2d(val: torch.Tensor) -> bool:
    """What the kernel reads: 2-D with a unit last stride, or contiguous with more dimensions (viewed as 2-D)."""
    return val.stride(-1) == 1 if val.ndim == 2 else val.is_contiguous()


def _taken(node: fx.Node) -> bool:
    x, weight = node.args[0], node.args[1]
    bias = linear_bias(node)
    xv = x.meta.get("val") if isinstance(x, fx.Node) else None
    wv = weight.meta.get("val") if isinstance(weight, fx.Node) else None
    if not isinstance(xv, torch.Tensor) or not isinstance(wv, torch.Tensor) or not _parameter(weight):
        return False
    if bias is not None and not _parameter(bias):
        return False
    rows = xv.numel() // max(1, xv.shape[-1]) if xv.ndim >= 2 else 0
    return (0 < rows <= MAX_ROWS and xv.shape[-1] > 0 and _reads_as_2d(xv) and xv.dtype in DTYPES
            and wv.dtype == xv.dtype and wv.ndim == 2 and wv.stride(1) == 1)


class GemvPass(FusionPass):
    """Before: ``linear([silu(]x[)], W, b)`` over at most ``MAX_ROWS`` rows. After: ``diffc.gemv`` (module doc)."""

    name = "gemv"

    def __call__(self, gm: fx.GraphModule) -> int:
        graph = gm.graph
        changed = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target != aten.linear.default or not _taken(node):
                continue
            x, weight, bias = node.args[0], node.args[1], linear_bias(node)
            act = "none"
            if (x.op == "call_function" and x.target == aten.silu.default and len(x.args) == 1
                    and isinstance(x.args[0], fx.Node) and _same_layout(x.args[0], x)):
                x, act = x.args[0], "silu"
            shape = list(x.meta["val"].shape)
            rows, k, n = x.meta["val"].numel() // shape[-1], shape[-1], weight.meta["val"].shape[0]
            with graph.inserting_before(node):
                new = [graph.call_function(aten.view.default, (x, [rows, k]))] if len(shape) > 2 else []
                x2 = new[-1] if new else x
                out = graph.call_function(aten.new_empty.default, (x2, [rows, n]))
                new += [out, graph.call_function(torch.ops.diffc.gemv.default, (x2, weight, None, bias, act, out))]
                if len(shape) > 2:
                    new.append(graph.call_function(aten.view.default, (out, [*shape[:-1], n])))
            for created in new:
                created.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")})
                _propagate_val(created)
            node.replace_all_uses_with(new[-1] if len(shape) > 2 else out)
            silu = node.args[0]
            graph.erase_node(node)
            if act == "silu" and not silu.users:
                graph.erase_node(silu)
            changed += 1
        graph.lint()
        gm.recompile()
        return changed


def _same_layout(a: fx.Node, b: fx.Node) -> bool:
    """Whether the SiLU's input has its output's shape and dtype and a layout the kernel reads."""
    av, bv = a.meta.get("val"), b.meta.get("val")
    return (isinstance(av, torch.Tensor) and isinstance(bv, torch.Tensor) and av.shape == bv.shape
            and av.dtype == bv.dtype and _reads_as_2d(av))
