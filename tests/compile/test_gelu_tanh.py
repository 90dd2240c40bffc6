"""Bias + GELU-tanh fusion on tiny FLUX and Wan graphs: numerics, exact match count, ops left and entered."""

from __future__ import annotations

import pytest
import torch

from diffc.compile.passes import GeluTanhPass
from tests.compile.common import EXPECTED, check_pass, check_variant
from tests.compile.conftest import DTYPES, MODELS

PASS = GeluTanhPass
OP = "diffc.gelu_tanh.default"
LEFT = {"aten.gelu.default": 1, "aten.linear.default": 0}  # the linear stays, without its bias


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", MODELS)
def test_fuses_every_site(traced, model, dtype):
    n = EXPECTED[model][PASS.name]
    after = check_pass(traced(model, dtype), PASS(), n, dtype, {k: v * n for k, v in LEFT.items()}, OP)
    assert "aten.gelu.default" not in after


@pytest.mark.parametrize("variant", PASS.patterns, ids=lambda v: v.name)
def test_replacement_equals_pattern(variant):
    check_variant(variant)


def test_bias_moves_out_of_the_linear(traced):
    t = traced("flux")
    PASS()(t.program.graph_module)
    graph = t.program.graph_module.graph
    fused = [n for n in graph.nodes if n.target == torch.ops.diffc.gelu_tanh.default]
    assert len(fused) == EXPECTED["flux"][PASS.name]
    for node in fused:
        h, bias = node.args[0], node.args[1]
        assert h.target == torch.ops.aten.linear.default and len(h.args) == 2  # linear(x, weight): no bias
        assert bias.op == "placeholder" and bias.name.endswith("_bias")
