"""Load-time folding of weight concatenations: counts, memory shared with the sources, numerics."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from diffc.compile import PassManager, default_passes
from diffc.compile.passes import graph_targets
from diffc.compile.passes.concat_linear import ConcatLinearPass
from diffc.compile.prepack import (
    PACKED_PREFIX,
    fold_weight_concats,
    unfolded_weight_concats,
)
from diffc.errors import InvalidArgumentError
from tests.compile.common import FLUX_BLOCKS, FLUX_SINGLE, GRAPH_TOL, WAN_BLOCKS
from tests.compile.conftest import DTYPES, MODELS, build
from tests.compile.test_concat_linear import mixed_program
from tests.helpers import rel_err

aten = torch.ops.aten
GROUPS = {"flux": 2 * FLUX_BLOCKS + FLUX_SINGLE, "wan": 2 * WAN_BLOCKS}
FOLDED = {model: 2 * n for model, n in GROUPS.items()}  # a weight cat and a bias cat per group
SOURCES = {  # one weight of each model that the pass concatenates, and where it sits in its packed tensor
    "flux": ("transformer_blocks.0.attn.to_k.weight", 1),
    "wan": ("blocks.1.attn2.to_v.weight", 1),
}


def _cats_over_attrs(gm: fx.GraphModule) -> int:
    return sum(
        n.target == aten.cat.default and any(a.op == "get_attr" for a in n.args[0]) for n in gm.graph.nodes
    )


def _span(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def _inside(t: torch.Tensor, packed: torch.Tensor) -> bool:
    (a, b), (lo, hi) = _span(t), _span(packed)
    return lo <= a and b <= hi


def _packed(gm: fx.GraphModule) -> list[torch.Tensor]:
    return [t for name, t in gm.named_buffers() if name.startswith(PACKED_PREFIX)]


def _rewritten(traced, model, dtype, passes=None):
    t = traced(model, dtype)
    PassManager(passes=[ConcatLinearPass()] if passes is None else passes).run(t.program)
    return t, t.program.module()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", MODELS)
def test_fold_packs_every_concat_once(traced, model, dtype):
    t, gm = _rewritten(traced, model, dtype)
    assert unfolded_weight_concats(gm) == _cats_over_attrs(gm) == FOLDED[model]
    names = set(gm.state_dict())
    cats = graph_targets(gm)[str(aten.cat.default)]

    assert fold_weight_concats(gm) == FOLDED[model]

    assert unfolded_weight_concats(gm) == _cats_over_attrs(gm) == 0
    assert graph_targets(gm).get(str(aten.cat.default), 0) == cats - FOLDED[model]
    assert set(gm.state_dict()) == names  # the checkpoint's names, no packed buffers
    packed = _packed(gm)
    assert len(packed) == FOLDED[model]
    name, index = SOURCES[model]
    source = gm.get_parameter(name)
    holders = [p for p in packed if _inside(source, p)]
    assert len(holders) == 1 and source.is_contiguous()
    assert torch.equal(holders[0].narrow(0, index * source.shape[0], source.shape[0]), source)
    with torch.no_grad():
        out = gm(**t.inputs)
    assert rel_err(out, t.unfused) < GRAPH_TOL[dtype]
    assert fold_weight_concats(gm) == 0


def test_eager_model_shares_the_packed_weights(traced):
    """Weights assigned from the native model into gm stay that model's Parameters, now views into the packs."""
    _, gm = _rewritten(traced, "wan", torch.float32)
    net, inputs = build("wan", torch.float32)
    gm.load_state_dict(net.state_dict(keep_vars=True), assign=True)
    with torch.no_grad():
        eager = net(**inputs)
    assert fold_weight_concats(gm) == FOLDED["wan"]
    packed = _packed(gm)
    for i in range(WAN_BLOCKS):
        attn = net.blocks[i].attn1
        for param in (attn.to_q.weight, attn.to_k.weight, attn.to_v.weight, attn.to_v.bias):
            assert isinstance(param, nn.Parameter) and any(_inside(param, p) for p in packed)
    with torch.no_grad():
        assert torch.equal(net(**inputs), eager)
        assert rel_err(gm(**inputs), eager) < GRAPH_TOL[torch.float32]


def test_load_state_dict_after_fold_updates_the_packs(traced):
    t, gm = _rewritten(traced, "flux", torch.float32)
    fold_weight_concats(gm)
    net, inputs = build("flux", torch.float32)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5).add_(0.01)
        gm.load_state_dict(net.state_dict())  # copies into the views, hence into the packs
        assert rel_err(gm(**inputs), net(**inputs)) < GRAPH_TOL[torch.float32]
        assert rel_err(gm(**inputs), t.unfused) > 0.05  # the new weights are in use


@pytest.mark.parametrize("model", MODELS)
def test_fold_after_every_pass(traced, model):
    t, gm = _rewritten(traced, model, torch.bfloat16, passes=[*default_passes(), ConcatLinearPass()])
    assert fold_weight_concats(gm) == FOLDED[model]
    assert _cats_over_attrs(gm) == 0
    with torch.no_grad():
        assert rel_err(gm(**t.inputs), t.unfused) < GRAPH_TOL[torch.bfloat16]


def test_fold_zero_rows_of_unbiased_linears():
    program, x, ref = mixed_program()
    ConcatLinearPass()(program.graph_module)
    gm = program.module()
    assert fold_weight_concats(gm) == 2 * 2  # per block: the weight cat, the bias cat with two zero parts
    targets = graph_targets(gm)
    assert "aten.new_zeros.default" not in targets and _cats_over_attrs(gm) == 0
    assert targets["aten.cat.default"] == 2  # the blocks' own cat of activations stays
    bias = gm.get_parameter("blocks.0.k.bias")
    (holder,) = [p for p in _packed(gm) if _inside(bias, p)]
    assert holder.shape == (15,) and torch.equal(holder[6:10], bias)
    assert not holder[:6].any() and not holder[10:].any()
    with torch.no_grad():
        assert rel_err(gm(x), ref) < GRAPH_TOL[torch.float32]


def test_a_written_buffer_is_not_folded():
    root = nn.Module()
    root.register_buffer("a", torch.arange(3.0))
    root.register_buffer("b", torch.arange(3.0, 5.0))
    graph = fx.Graph()
    a, b = graph.get_attr("a"), graph.get_attr("b")
    graph.call_function(aten.add_.Tensor, (a, 1.0))
    graph.output((graph.call_function(aten.cat.default, ([a, b],)), graph.call_function(aten.cat.default, ([b, b],))))
    gm = fx.GraphModule(root, graph)
    assert unfolded_weight_concats(gm) == 1
    assert fold_weight_concats(gm) == 1
    first, second = gm()
    assert torch.equal(first, torch.tensor([1.0, 2.0, 3.0, 3.0, 4.0]))
    assert torch.equal(second, torch.tensor([3.0, 4.0, 3.0, 4.0]))


def test_bad_arguments(traced):
    program = traced("wan").program
    with pytest.raises(InvalidArgumentError, match=r"^gm: expected the unlifted module, ExportedProgram.module\(\)"):
        fold_weight_concats(program)
    with pytest.raises(InvalidArgumentError, match=r"^gm: expected a torch.fx.GraphModule .*got Linear"):
        unfolded_weight_concats(nn.Linear(2, 2))
