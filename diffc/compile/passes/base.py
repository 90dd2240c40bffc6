"""What every fusion pass is made of: pattern variants, a pass that applies them, a match count.

Passes rewrite the graph of an ``ExportedProgram`` in place (``ep.graph_module``), not the unlifted
``ep.module()``: parameters stay lifted placeholders, the graph signature (inputs, outputs,
parameter names) is untouched because only interior nodes are replaced, so the rewritten program
is still the object the artifact will ``torch.export.save``; ``ep.module()`` afterwards gives the
callable rewritten model. The passes work on any ``torch.fx.GraphModule`` whose nodes carry
export's ``meta["val"]`` (fake tensors), which the filters read.

Matching uses torch's own subgraph rewriter (``torch.fx.subgraph_rewriter.replace_pattern_with_filters``).
A pattern is a Python function of ATen overloads traced by ``torch.fx.symbolic_trace``; its
arguments are wildcards that match a graph value or a literal (an ``eps``, a ``normalized_shape``, a
dtype), which the replacement receives, so one pattern covers every width and eps and a filter
decides what the fused op accepts. (Inductor's ``pattern_matcher`` would retrace patterns with its
own decompositions, made for its post-grad graphs, not for export's ATen IR.)
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.fx.subgraph_rewriter import replace_pattern_with_filters
from torch.utils import _pytree as pytree

aten = torch.ops.aten


class Pattern(abc.ABC):
    """One variant of an unfused op sequence and its fused replacement.

    Subclasses define ``pattern`` and ``replacement`` as static methods (``torch.fx.symbolic_trace``
    traces plain functions) with the same arguments (the pattern's wildcards),
    ``example_inputs`` (eager values on which both must agree) and ``accepts``, called with each match's
    values by argument name (fake tensors for graph values, Python values for literals).
    """

    @abc.abstractmethod
    def example_inputs(self) -> tuple: ...

    @staticmethod
    @abc.abstractmethod
    def pattern(*args): ...

    @staticmethod
    @abc.abstractmethod
    def replacement(*args): ...

    def accepts(self, **values: Any) -> bool:
        return True

    def build_replacement(self, **values: Any) -> Callable:
        """The replacement for one accepted match; override where it needs the match's sizes as constants."""
        return self.replacement

    @property
    def name(self) -> str:
        return type(self).__name__


class FusionPass:
    """Applies every variant in ``patterns`` (most specific first) and counts the replacements.

    ``bit_exact`` declares whether the fused result is bit-identical to eager on the same device;
    the ``lossless`` tier runs only passes that declare it.
    """

    name: str = ""
    bit_exact: bool = False
    default_enabled: bool = True  # False: runs only when asked for (``enable``), e.g. where it measured slower
    fp8: bool = True  # False: not under the fp8 tier (whose own steps rewrite what it would)
    patterns: tuple[Pattern, ...] = ()

    def __call__(self, gm: fx.GraphModule) -> int:
        """Rewrite ``gm`` in place; returns the number of matches replaced."""
        total = 0
        for variant in self.patterns:
            total += replace_all(gm, variant)
        return total


def _arg_names(fn: Callable) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _value(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, fx.Node) else arg


def tensor_val(node: Any) -> torch.Tensor | None:
    """The tensor a graph node's value is (its ``meta["val"]``); None for anything else."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def replace_all(gm: fx.GraphModule, variant: Pattern) -> int:
    """Replace every accepted, non-overlapping match of ``variant`` in ``gm``; returns the count."""
    names = _arg_names(variant.pattern)
    if _arg_names(variant.replacement) != names:
        raise TypeError(f"{variant.name}: pattern and replacement must take the same arguments")

    def accept(match, _graph, _pattern_graph) -> bool:
        values = [_value(a) for a in match.placeholder_nodes]
        if any(v is None for v, a in zip(values, match.placeholder_nodes) if isinstance(a, fx.Node)):
            return False  # a node without export's fake value: nothing to check shapes on
        return bool(variant.accepts(**dict(zip(names, values))))

    def build(match, _graph, _pattern_graph) -> fx.Graph:
        values = dict(zip(names, (_value(a) for a in match.placeholder_nodes)))
        return fx.symbolic_trace(variant.build_replacement(**values)).graph

    replaced = replace_pattern_with_filters(
        gm, variant.pattern, match_filters=[accept], replacement_callback=build
    )
    for r in replaced:
        for node in r.replacements:
            _propagate_val(node)
    gm.graph.lint()
    gm.recompile()
    return len(replaced)


def _propagate_val(node: fx.Node) -> None:
    """Give a node created by a replacement export's ``meta["val"]`` by running it on fake values."""
    if node.op != "call_function" or "val" in node.meta:
        return
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
    # the leaves: a list argument (aten.cat's tensors) holds fake tensors too
    mode = detect_fake_mode([v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)])
    if mode is None:
        return
    with mode:
        node.meta["val"] = node.target(*args, **kwargs)


def linear_bias(node: fx.Node) -> Any:
    """An ``aten.linear`` node's bias, given by position or by keyword (None where it has none)."""
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def graph_targets(gm: fx.GraphModule) -> dict[str, int]:
    """How many ``call_function`` nodes of each op the graph holds, e.g. ``{"aten.layer_norm.default": 7}``."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            key = str(node.target)
            counts[key] = counts.get(key, 0) + 1
    return counts
