"""Tracing native DiTs into one exported ATen graph, and the error when a module cannot be traced."""

from __future__ import annotations

import pytest
import torch

from diffc.compile import trace_module
from diffc.compile.passes import graph_targets
from diffc.compile.trace import TraceError
from diffc.errors import DiffcError
from tests.compile.conftest import MODELS, build


@pytest.mark.parametrize("model", MODELS)
def test_traced_graph_equals_eager(traced, model):
    t = traced(model)
    net, inputs = build(model, torch.float32)
    with torch.no_grad():
        eager = net(**inputs)
    assert torch.equal(t.unfused, eager)  # same ATen ops in the same order
    targets = graph_targets(t.program.graph_module)
    assert not any(k.startswith("diffc.") for k in targets)  # eager models never call fused ops
    assert targets["aten.scaled_dot_product_attention.default"] > 0


class DataDependent(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum().item() > 0:  # Python control flow on a tensor's value: no single graph
            return x * 2
        return x


def test_untraceable_module_names_itself():
    with pytest.raises(TraceError, match=r"could not trace DataDependent into one graph") as info:
        trace_module(DataDependent(), {"x": torch.randn(3)})
    assert isinstance(info.value, DiffcError)
    assert info.value.__cause__ is not None  # torch's own error stays attached


def test_not_a_module():
    with pytest.raises(TraceError, match=r"expected a torch.nn.Module, got function"):
        trace_module(lambda x: x, {"x": torch.randn(3)})
