"""The fp8 tier's lowering: (fused producer -> linear) into (fused producer + quantization -> ``_scaled_mm``).

After the fusion passes, a block's linear layers read activations that one of diffc's fused kernels
wrote (the adaLN modulation, the gated residual + adaLN pair, the GELU epilogue). Where *every* reader
of such an activation is a linear layer whose weight has fp8 copies (:mod:`diffc.runtime.fp8`), the
producer is swapped for its fp8 variant, which writes float8_e4m3 data and one scale per token in the
same pass, and each linear becomes a rowwise-scaled fp8 GEMM on the weight's fp8 copy::

    out = aten.empty_like(x)                         q  = aten.empty_like(x, dtype=float8_e4m3fn)
    diffc.adaln_modulate(x, scale, shift, eps, out)  qs = aten.new_empty(x, [rows, 1], dtype=float32)
    y = aten.linear(out, W, b)                 ->    diffc.adaln_modulate_fp8(x, scale, shift, eps, q, qs)
                                                     y = view(aten._scaled_mm(view(q, [rows, K]), t(W_fp8),
                                                                              qs, W_scale, b, None, bf16), [..., N])

A linear whose input no fused kernel produces (the attention output, a concatenation, a norm without an
fp8 variant) or whose producer has other readers gets its input quantized by ``diffc.quantize_rows``, one
pass over the activation (``standalone``), where that pays: :func:`standalone_pays` weighs the pass's
memory traffic against the GEMM time fp8 saves, so large GEMMs (FLUX's single-block ``proj_out`` over
its 15,360-wide concatenation, the attention output projections over the image tokens) go fp8 and small
ones (the text tokens' output projection, the modulation MLPs) stay bf16. Where that input is a
concatenation of two activations along the last dimension read by nothing else (FLUX's single block:
attention output and MLP activation), ``diffc.quantize_rows_cat`` quantizes the two parts and the
concatenation is never written (``concat``; ``--disable fp8_quantize_concat`` keeps the copy); where the
second part is a ``diffc.gelu_tanh`` read by nothing else, ``diffc.quantize_rows_cat_gelu`` computes that
GELU in the same pass (``concat_gelu``). (Quantizing as separate torch
ops, ``abs``/``amax``/``div``/``to``, costs as much as fp8 saves: ``GPU-NOTES.md``.) :class:`Fp8Lowering`
lists every bf16 site with the reason. Only bf16 models are lowered (``_scaled_mm``'s rowwise mode writes
bf16). The GEMMs pass ``use_fast_accum``: on Hopper the fp8 MMA then sums in its own precision instead of promoting
to float32 every few k-steps, 0.67-0.96x the time at the DiTs' shapes for 1.7e-3 -> 1.7-3.2e-3 relative error
against float32 on the same operands, beside the 2.3-3.5e-2 the quantization itself costs
(``bench/results/ops/h100-2026-12-08-fp8-fast-accum.txt``); ``--disable fp8_fast_accum`` keeps the plain sums.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import fx
from torch.export.graph_signature import InputKind

from ..ops.fp8 import FP8, fp8_linear_ok
from .numerics import rel_err
from .passes.base import _propagate_val, linear_bias

aten = torch.ops.aten
WEIGHT, SCALE = "weight_fp8", "weight_fp8_scale"  # the buffers diffc.runtime.fp8 adds beside a weight


def _producers() -> dict[Any, tuple[Any, int]]:
    """bf16 producer -> (its fp8 variant, index of its ``out`` argument)."""
    d = torch.ops.diffc
    return {
        d.adaln_modulate.default: (d.adaln_modulate_fp8.default, 4),
        d.gated_residual_adaln.default: (d.gated_residual_adaln_fp8.default, 7),
        d.gelu_tanh.default: (d.gelu_tanh_fp8.default, 2),
    }


# The cost model of a standalone quantization (H200 figures, GPU-NOTES.md): bf16 and rowwise fp8 GEMM rates,
# the memory bandwidth the one-pass kernel reaches, a launch, and how much the saving must exceed the cost.
BF16_FLOPS, FP8_FLOPS = 720e12, 1150e12
BANDWIDTH = 3.0e12
LAUNCH_S = 4e-6
MARGIN = 1.25


def standalone_pays(rows: int, k: int, outs: list[int], in_bytes: int = 2) -> bool:
    """Whether quantizing a (rows, k) activation on its own (read it, write fp8 + scales) costs less than
    running its readers' GEMMs (one per entry of ``outs``, their output widths) in fp8 saves, by ``MARGIN``."""
    saving = 2.0 * rows * k * sum(outs) * (1.0 / BF16_FLOPS - 1.0 / FP8_FLOPS)
    cost = rows * k * (in_bytes + 1) / BANDWIDTH + LAUNCH_S
    return saving > MARGIN * cost


@dataclasses.dataclass
class Fp8Lowering:
    """What the lowering did to one graph: ``sites`` maps each lowered linear (its weight's name) to
    (bf16 linear node name, fp8 output node name); ``kept`` maps each linear left in bf16 to the reason."""

    sites: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    kept: dict[str, str] = dataclasses.field(default_factory=dict)
    producers: int = 0
    standalone: int = 0  # activations quantized by diffc.quantize_rows (their linears are in ``sites``)
    concat: int = 0  # of those, concatenations quantized from their two parts (diffc.quantize_rows_cat[_gelu])
    concat_gelu: int = 0  # of those, with the GELU producing the second part folded in (quantize_rows_cat_gelu)
    gemv: int = 0  # diffc.gemv sites switched to the fp8 weight (their sites' nodes are the buffers they write)
    written: set[str] = dataclasses.field(default_factory=set)  # site nodes that are buffers an op writes later
    before: fx.GraphModule | None = None  # the graph before lowering (for the quality report)
    # fp8 attention (diffc/compile/fp8_attention.py): site -> (bf16 sdpa node, fp8 attention node), or the reason
    attention_sites: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    attention_kept: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def replaced(self) -> int:
        return len(self.sites)


def _state_names(program: torch.export.ExportedProgram) -> tuple[dict[str, str], dict[str, fx.Node]]:
    """(placeholder name -> parameter/buffer name, buffer name -> placeholder node)."""
    sig = program.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    nodes = {n.name: n for n in program.graph_module.graph.nodes if n.op == "placeholder"}
    return names, {fqn: nodes[p] for p, fqn in sig.inputs_to_buffers.items() if p in nodes}


def _weight_name(node: fx.Node, names: dict[str, str]) -> str | None:
    return names.get(node.name) if isinstance(node, fx.Node) and node.op == "placeholder" else None


NO_FP8_WEIGHT = "the layer has no fp8 weight (dimensions not multiples of 16, or not quantized)"


def _fp8_copies(weight: str, buffers: dict[str, fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """The (fp8 weight, scale) buffer nodes beside parameter ``weight`` (``blocks.0.x.weight``), or None."""
    owner = weight.rpartition(".")[0]
    w8, scale = buffers.get(f"{owner}.{WEIGHT}"), buffers.get(f"{owner}.{SCALE}")
    return (w8, scale) if w8 is not None and scale is not None else None


def _linear_problem(user: fx.Node, out: fx.Node, names: dict[str, str], buffers: dict[str, fx.Node]) -> str | None:
    """Why ``user`` (a reader of a producer's ``out``) cannot become an fp8 GEMM, or None."""
    if user.op != "call_function" or user.target != aten.linear.default:
        return f"the activation is also read by {user.target}"
    if user.args[0] is not out or len(user.args) < 2:
        return "the activation is not the linear's input"
    weight = _weight_name(user.args[1], names)
    if weight is None:
        return "the weight is computed in the graph (e.g. concatenated), not a block parameter"
    if _fp8_copies(weight, buffers) is None:
        return NO_FP8_WEIGHT
    val = user.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype != torch.bfloat16:
        return "fp8 GEMMs write bf16; the layer's output is not bf16"
    w = user.args[1].meta.get("val")
    if w is None or not fp8_linear_ok(w.shape[1], w.shape[0]):
        return "dimensions are not multiples of 16"
    return None


def start_lowering(program: torch.export.ExportedProgram) -> Fp8Lowering:
    """An empty :class:`Fp8Lowering` holding a copy of ``program``'s graph before any fp8 rewrite."""
    from .regions import _own_copy

    return Fp8Lowering(before=_own_copy(program.graph_module))


class Fp8LinearPass:
    """Lower every eligible (producer -> linears) site of an ExportedProgram's graph to fp8 (module docstring);
    ``standalone=False`` leaves the linears whose input no fused kernel produces in bf16."""

    name = "fp8_linear"

    def __init__(self, standalone: bool = True, concat: bool = True, gemv: bool = True, fast_accum: bool = True):
        self.standalone, self.concat, self.gemv, self.fast_accum = standalone, concat, gemv, fast_accum

    def __call__(self, program: torch.export.ExportedProgram, result: Fp8Lowering | None = None) -> Fp8Lowering:
        """Lower ``program`` in place, adding to ``result`` (a new one, holding a copy of the graph before, if None)."""
        gm = program.graph_module
        result = result if result is not None else start_lowering(program)
        names, buffers = _state_names(program)
        producers = _producers()
        graph = gm.graph
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in producers:
                continue
            fp8_op, out_index = producers[node.target]
            out = node.args[out_index]
            readers = [u for u in out.users if u is not node] if isinstance(out, fx.Node) else []
            linears = [u for u in readers if u.op == "call_function" and u.target == aten.linear.default]
            if not linears:
                continue
            if out.op != "call_function" or out.target != aten.empty_like.default or len(out.args) != 1:
                problems = {"the producer writes into a buffer the lowering does not own"}
            else:
                problems = {p for p in (_linear_problem(u, out, names, buffers) for u in readers) if p}
            if problems:
                reason = "; ".join(sorted(problems))
                for lin in linears:
                    result.kept[_weight_name(lin.args[1], names) or lin.name] = reason
                continue
            self._lower(graph, node, fp8_op, out_index, out, linears, names, buffers, result, self.fast_accum)
            result.producers += 1
        if self.standalone:
            self._lower_standalone(graph, names, buffers, result, self.concat, self.fast_accum)
        self._lower_gemv(graph, names, buffers, result, self.gemv)
        for node in graph.nodes:  # every other linear with an fp8 weight stays bf16: say why
            if node.op == "call_function" and node.target == aten.linear.default:
                weight = _weight_name(node.args[1], names)
                if weight is not None and f"{weight.rpartition('.')[0]}.{WEIGHT}" in buffers:
                    result.kept.setdefault(weight, _unfused_reason(node.args[0]))
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
        return result

    @staticmethod
    def _lower_standalone(graph, names, buffers, result, concat: bool = True, fast_accum: bool = True) -> None:
        """Quantize the input of each remaining fp8-capable linear with ``diffc.quantize_rows`` where that pays
        (one quantization for the linears that share an input), from the parts of a concatenation only these
        linears read with ``diffc.quantize_rows_cat`` (``concat``)."""
        groups: dict[fx.Node, list[fx.Node]] = {}
        for node in graph.nodes:
            if node.op == "call_function" and node.target == aten.linear.default and isinstance(node.args[0], fx.Node):
                weight = _weight_name(node.args[1], names)
                if weight is not None and weight not in result.sites:
                    groups.setdefault(node.args[0], []).append(node)
        for src, linears in groups.items():
            eligible = [lin for lin in linears if _linear_problem(lin, src, names, buffers) is None]
            val = src.meta.get("val")
            if not eligible or not isinstance(val, torch.Tensor) or val.dtype != torch.bfloat16 or val.ndim < 1:
                continue
            rows = val.numel() // max(1, val.shape[-1])
            outs = [lin.meta["val"].shape[-1] for lin in eligible]
            if not standalone_pays(rows, val.shape[-1], outs):
                for lin in eligible:
                    result.kept[_weight_name(lin.args[1], names)] = (
                        f"{_unfused_reason(src)}; quantizing it on its own ({rows}x{val.shape[-1]}) costs more than "
                        f"its fp8 GEMM saves")
                continue
            parts = _concat_parts(src, eligible) if concat else None
            like = src if parts is None else parts[0]  # not the concatenation, which then has no reader left
            with graph.inserting_before(eligible[0]):  # new_empty: contiguous, on the input's device
                q = graph.call_function(aten.new_empty.default, (like, list(val.shape)), {"dtype": FP8})
                qs = graph.call_function(aten.new_empty.default, (like, [rows, 1]), {"dtype": torch.float32})
                gelu = _gelu_producer(parts[1], src) if parts is not None else None
                if parts is None:
                    fused = graph.call_function(torch.ops.diffc.quantize_rows.default, (src, q, qs))
                elif gelu is None:
                    fused = graph.call_function(torch.ops.diffc.quantize_rows_cat.default, (*parts, q, qs))
                else:
                    h, bias = gelu.args[0], gelu.args[1]
                    fused = graph.call_function(torch.ops.diffc.quantize_rows_cat_gelu.default,
                                                (parts[0], h, bias, q, qs))
                result.concat += parts is not None
                result.concat_gelu += gelu is not None
            for n in (q, qs, fused):
                _propagate_val(n)
            for lin in eligible:
                result.kept.pop(_weight_name(lin.args[1], names), None)
            Fp8LinearPass._replace_linears(graph, q, qs, list(val.shape), eligible, names, buffers, result, fast_accum)
            if gelu is not None:  # its output was read by the concatenation only, which has no reader left
                out = gelu.args[2]
                graph.erase_node(src)
                graph.erase_node(gelu)
                graph.erase_node(out)
            result.standalone += 1

    @staticmethod
    def _lower_gemv(graph, names, buffers, result, enabled: bool = True) -> None:
        """Each ``diffc.gemv`` over a bf16 block weight with fp8 copies reads those instead (weight-only fp8: the
        few rows it multiplies stay bf16; it reads half the bytes, which is all its time). Not ``enabled``
        (``--disable fp8_gemv``): each keeps its bf16 weight, with that reason."""
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target != torch.ops.diffc.gemv.default or node.args[2] is not None:
                continue
            weight = _weight_name(node.args[1], names)
            if weight is None:
                continue
            copies = _fp8_copies(weight, buffers)
            if copies is None:
                result.kept[weight] = NO_FP8_WEIGHT
                continue
            if node.args[0].meta["val"].dtype != torch.bfloat16:
                result.kept[weight] = "the fp8 tier lowers bf16 layers; the input is not bf16"
                continue
            if not enabled:
                result.kept[weight] = "a one-row linear (diffc.gemv) and fp8_gemv is disabled"
                continue
            args = list(node.args)
            args[1], args[2] = copies
            node.args = tuple(args)
            out = args[5]
            result.sites[weight] = (out.name, out.name)  # the same buffer node, recorded after the gemv writes it
            result.written.add(out.name)
            result.gemv += 1

    @staticmethod
    def _lower(graph, producer, fp8_op, out_index, out, linears, names, buffers, result, fast_accum: bool) -> None:
        src = out.args[0]
        shape = list(out.meta["val"].shape)
        rows = 1
        for n in shape[:-1]:
            rows *= n
        with graph.inserting_before(producer):
            q = graph.call_function(aten.empty_like.default, (src,), {"dtype": FP8})
            qs = graph.call_function(aten.new_empty.default, (src, [rows, 1]), {"dtype": torch.float32})
            args = list(producer.args)
            args[out_index] = q
            fused = graph.call_function(fp8_op, (*args, qs), dict(producer.kwargs))  # kwargs: modulation biases
        for n in (q, qs, fused):
            _propagate_val(n)
        Fp8LinearPass._replace_linears(graph, q, qs, shape, linears, names, buffers, result, fast_accum)
        graph.erase_node(producer)
        if not out.users:
            graph.erase_node(out)

    @staticmethod
    def _replace_linears(graph, q, qs, shape, linears, names, buffers, result, fast_accum: bool) -> None:
        """Each linear reading the activation that (q, qs) quantize becomes a rowwise-scaled ``_scaled_mm``,
        accumulating in the fp8 MMA's own precision where ``fast_accum``."""
        rows = 1
        for n in shape[:-1]:
            rows *= n
        new_nodes = []
        for lin in linears:
            weight = _weight_name(lin.args[1], names)
            w8, w_scale = _fp8_copies(weight, buffers)
            bias = linear_bias(lin)
            n_out = lin.meta["val"].shape[-1]
            with graph.inserting_before(lin):
                a = graph.call_function(aten.view.default, (q, [rows, shape[-1]]))
                wt = graph.call_function(aten.t.default, (w8,))
                mm = graph.call_function(aten._scaled_mm.default, (a, wt, qs, w_scale, bias, None, torch.bfloat16,
                                                                          fast_accum))
                y = graph.call_function(aten.view.default, (mm, [*shape[:-1], n_out]))
            new_nodes += [a, wt, mm, y]
            y.meta.update({k: v for k, v in lin.meta.items() if k != "val"})
            lin.replace_all_uses_with(y)
            result.sites[weight] = (lin.name, y.name)
            graph.erase_node(lin)
        for n in new_nodes:
            _propagate_val(n)


def _concat_parts(src: fx.Node, readers: list[fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """The two parts of ``src = aten.cat([a, b], -1)`` when only ``readers`` read it and both parts have its
    dtype, its leading dimensions and a unit last stride (what ``diffc.quantize_rows_cat`` reads), else None."""
    if src.op != "call_function" or src.target != aten.cat.default or set(src.users) != set(readers):
        return None
    tensors = src.args[0]
    dim = src.args[1] if len(src.args) > 1 else src.kwargs.get("dim", 0)
    val = src.meta.get("val")
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or not isinstance(val, torch.Tensor):
        return None
    if dim not in (-1, val.ndim - 1):
        return None
    for part in tensors:
        p = part.meta.get("val") if isinstance(part, fx.Node) else None
        if (not isinstance(p, torch.Tensor) or p.dtype != val.dtype or tuple(p.shape[:-1]) != tuple(val.shape[:-1])
                or (p.shape[-1] > 1 and p.stride(-1) != 1)):
            return None
    return tensors[0], tensors[1]


def _gelu_producer(part: fx.Node, concat: fx.Node) -> fx.Node | None:
    """The ``diffc.gelu_tanh(h, bias, part)`` node that writes ``part``, when ``part`` is its own ``empty_like``
    buffer read by nothing but that op and ``concat``; else None."""
    writers = [u for u in part.users if u is not concat]
    if (part.op != "call_function" or part.target != aten.empty_like.default or len(writers) != 1
            or writers[0].target != torch.ops.diffc.gelu_tanh.default or writers[0].args[2] is not part
            or writers[0].users):
        return None
    h = writers[0].args[0]
    val, h_val = part.meta.get("val"), getattr(h, "meta", {}).get("val")
    if (not isinstance(h_val, torch.Tensor) or h_val.shape != val.shape or h_val.dtype != val.dtype
            or (h_val.shape[-1] > 1 and h_val.stride(-1) != 1)):
        return None
    return writers[0]


_RESHAPES = ("view", "reshape", "flatten", "contiguous", "transpose", "permute", "clone", "_unsafe_view", "to.dtype",
             "slice", "split", "getitem", "narrow")


def _unfused_reason(source: Any) -> str:
    """Why a linear's input has no fp8 producer, looking through reshapes to the op that computed it."""
    for _ in range(8):
        if not isinstance(source, fx.Node):
            return "the input is not a graph value"
        if source.op == "placeholder":
            return "the input is a block input (no kernel here produces it)"
        target = str(source.target)
        if any(k in target for k in ("attention", "sdpa", "flash")):
            return "the input is the attention output (its kernel has no fp8 epilogue here)"
        if not any(k in target for k in _RESHAPES) or not source.args:
            return f"the input comes from {target}, which has no fused fp8 variant"
        source = source.args[0]
    return "the input comes from a chain of reshapes"


# ---------------------------------------------------------------------------------------- quality report


def placeholder_values(program: torch.export.ExportedProgram, block: torch.nn.Module, args: tuple,
                       kwargs: dict[str, Any]) -> list:
    """The graph's inputs for running ``program.graph_module`` on ``block`` with ``(args, kwargs)``."""
    from torch.utils import _pytree as pytree

    from .regions import _tensor_of

    flat, _ = pytree.tree_flatten((tuple(args), dict(kwargs)))
    flat = [v.contiguous() if isinstance(v, torch.Tensor) else v for v in flat]
    values, user = [], 0
    for spec in program.graph_signature.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            values.append(_tensor_of(block, spec.target))
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            values.append(program.constants[spec.target])
        else:
            values.append(flat[user])
            user += 1
    return values


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps the values of the nodes named in ``keep``; a node named in ``written`` is a buffer
    an op writes after it is allocated: its value is taken again after each op that takes it."""

    def __init__(self, gm: fx.GraphModule, keep: set[str], written: set[str] = frozenset()):
        super().__init__(gm)
        self.keep, self.written, self.seen = keep, written, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.keep:
            self.seen[n.name] = out.detach().clone()
        for arg in n.all_input_nodes:
            if arg.name in self.written and arg.name in self.keep:
                self.seen[arg.name] = self.env[arg].detach().clone()
        return out


def site_errors(lowering: Fp8Lowering, program: torch.export.ExportedProgram, values: list) -> dict[str, float]:
    """Relative L2 error of each lowered linear's output vs the bf16 graph's, on the same block inputs
    (the fp8 graph's value includes the error of fp8 sites earlier in the block)."""
    sites = {**lowering.sites, **{f"{site} (attention)": pair for site, pair in lowering.attention_sites.items()}}
    if not sites or lowering.before is None:
        return {}
    with torch.no_grad():
        bf16 = _Recorder(lowering.before, {old for old, _ in sites.values()}, lowering.written)
        bf16.run(*values)
        fp8 = _Recorder(program.graph_module, {new for _, new in sites.values()}, lowering.written)
        fp8.run(*values)
    return {site: rel_err(fp8.seen[new], bf16.seen[old]) for site, (old, new) in sorted(sites.items())}


def lowering_report(lowering: Fp8Lowering, errors: dict[str, float]) -> dict[str, Any]:
    """The ``fp8`` entry of a region's compile report (and the manifest): ``rel_err`` has the linears' errors,
    ``attention_rel_err`` the attention sites' (their output vs bf16 attention's, on the compile inputs)."""
    attention = {k: v for k, v in errors.items() if k.endswith(" (attention)")}
    linears = {k: v for k, v in errors.items() if k not in attention}
    return {"linears_fp8": lowering.replaced, "producers_fp8": lowering.producers,
            "quantized_standalone": lowering.standalone, "quantized_concat": lowering.concat,
            "quantized_concat_gelu": lowering.concat_gelu, "gemv_fp8": lowering.gemv,
            "linears_bf16": len(lowering.kept), "rel_err": linears, "max_rel_err": max(linears.values(), default=None),
            "kept_bf16": dict(sorted(lowering.kept.items())),
            "attention_fp8": len(lowering.attention_sites),
            "attention_rel_err": {k.removesuffix(" (attention)"): v for k, v in attention.items()},
            "attention_bf16": dict(sorted(lowering.attention_kept.items()))}


__all__ = ["Fp8LinearPass", "Fp8Lowering", "lowering_report", "placeholder_values", "site_errors", "start_lowering"]
