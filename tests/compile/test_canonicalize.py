"""Cast canonicalisation: what it removes and rewrites, and that the graph computes the same bits."""

from __future__ import annotations

import pytest
import torch

from diffc.compile.passes import CanonicalizeCasts, graph_targets
from diffc.compile.passes.canonicalize import CASTS
from tests.compile.conftest import DTYPES, MODELS


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", MODELS)
def test_removes_checks_and_no_op_casts(traced, model, dtype):
    t = traced(model, dtype)
    graph = t.program.graph_module.graph
    nodes_before = len(graph.nodes)
    # a type_as that changes the dtype is rewritten into to.dtype (one node for one); the rest are removed
    rewritten = sum(
        1
        for n in graph.nodes
        if n.target == torch.ops.aten.type_as.default and n.args[0].meta["val"].dtype != n.meta["val"].dtype
    )

    changed = CanonicalizeCasts()(t.program.graph_module)

    after = graph_targets(t.program.graph_module)
    assert changed == nodes_before - len(graph.nodes) + rewritten
    assert (rewritten > 0) == (model == "wan" and dtype == torch.bfloat16)  # Wan's .type_as(x) back to bf16
    assert "aten._assert_tensor_metadata.default" not in after
    assert "aten.type_as.default" not in after
    for node in graph.nodes:
        if node.op == "call_function" and node.target in CASTS:
            assert node.args[0].meta["val"].dtype != node.meta["val"].dtype, node.format_node()
    assert torch.equal(t.run(), t.unfused)


@pytest.mark.parametrize("model", MODELS)
def test_float32_graph_count_is_nodes_removed(traced, model):
    """In float32 nothing is rewritten: every change removes a node."""
    t = traced(model)
    nodes_before = len(t.program.graph_module.graph.nodes)
    changed = CanonicalizeCasts()(t.program.graph_module)
    assert changed == nodes_before - len(t.program.graph_module.graph.nodes) > 0
