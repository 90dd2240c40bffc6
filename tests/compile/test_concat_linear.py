"""Weight concatenation of same-input linears on tiny FLUX and Wan graphs: groups, ops left and entered, numerics."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from diffc.compile import PassManager, default_passes
from diffc.compile.passes import CanonicalizeCasts, graph_targets
from diffc.compile.passes.concat_linear import ConcatLinearPass, block_of
from diffc.errors import InvalidArgumentError
from tests.compile.common import (
    EXPECTED,
    FLUX_BLOCKS,
    FLUX_SINGLE,
    GRAPH_TOL,
    OPT_IN,
    WAN_BLOCKS,
    count_delta,
    save_and_load,
)
from tests.compile.conftest import DTYPES, MODELS
from tests.helpers import rel_err

LINEAR, CAT, SPLIT = "aten.linear.default", "aten.cat.default", "aten.split_with_sizes.default"

# Linears per group, in graph order. FLUX double block: image to_q/k/v, text add_{q,k,v}_proj; single
# block: proj_mlp + to_q/k/v. Wan block: self-attention q/k/v, cross-attention k/v (the text embedding
# feeds every block's k/v, but a group stays inside its block).
GROUP_SIZES = {
    "flux": [3, 3] * FLUX_BLOCKS + [4] * FLUX_SINGLE,
    "wan": [3, 2] * WAN_BLOCKS,
}
# After the gelu_tanh pass, proj_mlp feeds diffc.gelu_tanh, which takes only a contiguous input:
# it keeps its own GEMM.
GROUP_SIZES_AFTER_DEFAULTS = {"flux": [3, 3] * FLUX_BLOCKS + [3] * FLUX_SINGLE, "wan": GROUP_SIZES["wan"]}
# Before gelu_tanh, proj_mlp's output is a column slice; gelu_tanh's contiguous-only variant then leaves
# the single blocks' aten.gelu (the bias already rides in the GEMM).
EXPECTED_AFTER_CONCAT = {
    "flux": {**EXPECTED["flux"], "gelu_tanh": EXPECTED["flux"]["gelu_tanh"] - FLUX_SINGLE},
    "wan": EXPECTED["wan"],
}


def _check_rewrite(gm: fx.GraphModule, fusion: ConcatLinearPass, sizes: list[int], before: dict[str, int]) -> None:
    assert [len(g) for g in fusion.groups] == sizes
    after = graph_targets(gm)
    assert count_delta(before, after, LINEAR) == -sum(n - 1 for n in sizes)
    assert count_delta(before, after, CAT) == 2 * len(sizes)  # weights and biases: every tiny linear has one
    assert count_delta(before, after, SPLIT) == len(sizes)
    assert after.get("aten.new_zeros.default", 0) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", MODELS)
def test_groups_every_block(traced, model, dtype):
    t = traced(model, dtype)
    gm = t.program.graph_module
    CanonicalizeCasts()(gm)
    before = graph_targets(gm)
    fusion = ConcatLinearPass()
    assert fusion(gm) == len(GROUP_SIZES[model])
    _check_rewrite(gm, fusion, GROUP_SIZES[model], before)
    for group in fusion.groups:
        assert len({block_of(gm.graph.find_nodes(op="placeholder", target=n)[0]) for n in group}) == 1
    out = t.run()
    assert out.dtype == t.unfused.dtype
    assert rel_err(out, t.unfused) < GRAPH_TOL[dtype]
    assert fusion(gm) == 0  # nothing left to group


def test_wan_cross_attention_groups_stay_in_their_block(traced):
    gm = traced("wan").program.graph_module
    fusion = ConcatLinearPass()
    fusion(gm)
    cross = [g for g in fusion.groups if "attn2" in g[0]]
    assert cross == [(f"p_blocks_{i}_attn2_to_k_weight", f"p_blocks_{i}_attn2_to_v_weight") for i in range(WAN_BLOCKS)]
    cross_gemms = [
        n for n in gm.graph.nodes
        if n.target == torch.ops.aten.linear.default and n.args[1].op == "call_function"
        and n.args[1].args[0][0].name.endswith("attn2_to_k_weight")
    ]
    assert len(cross_gemms) == WAN_BLOCKS and len({n.args[0] for n in cross_gemms}) == 1  # one text input


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("order", ["concat_last", "concat_first"])
@pytest.mark.parametrize("model", MODELS)
def test_composed_with_default_passes(traced, model, order, dtype):
    t = traced(model, dtype)
    gm = t.program.graph_module
    CanonicalizeCasts()(gm)
    before = graph_targets(gm)
    fusion = ConcatLinearPass()
    others_passes = default_passes()
    passes = [*others_passes, fusion] if order == "concat_last" else [fusion, *others_passes]
    counters = PassManager(passes=passes).run(t.program)
    sizes = (GROUP_SIZES_AFTER_DEFAULTS if order == "concat_last" else GROUP_SIZES)[model]
    others = (EXPECTED if order == "concat_last" else EXPECTED_AFTER_CONCAT)[model]
    others = {k: v for k, v in others.items() if k not in OPT_IN}  # the other opt-in passes do not run here
    assert counters.matches == {"canonicalize_casts": 0, **others, "concat_linear": len(sizes)}
    assert [len(g) for g in fusion.groups] == sizes
    assert count_delta(before, graph_targets(gm), LINEAR) == -sum(n - 1 for n in sizes)
    assert rel_err(t.run(), t.unfused) < GRAPH_TOL[dtype]


def test_rewritten_program_saves_and_loads(traced, tmp_path):
    t = traced("flux")
    ConcatLinearPass()(t.program.graph_module)
    loaded, module = save_and_load(t.program, tmp_path)
    assert graph_targets(loaded.graph_module) == graph_targets(t.program.graph_module)
    with torch.no_grad():
        assert torch.equal(module(**t.inputs), t.run())


class MixedBlock(nn.Module):
    """q without a bias, k with one, v without: one group with zeros in the unbiased rows."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 6, bias=False), nn.Linear(8, 4), nn.Linear(8, 5, bias=False)
        self.out = nn.Linear(15, 8)

    def forward(self, x):
        return x + self.out(torch.cat([torch.tanh(self.q(x)), self.k(x).exp(), self.v(x)], -1))


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([MixedBlock(), MixedBlock()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def mixed_program() -> tuple[torch.export.ExportedProgram, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net, x = Mixed().eval(), torch.randn(2, 3, 8)
    with torch.no_grad():
        return torch.export.export(net, (x,)), x, net(x)


def test_mixed_bias_group_gets_zero_rows():
    program, x, ref = mixed_program()
    gm = program.graph_module
    before = graph_targets(gm)
    fusion = ConcatLinearPass()
    assert fusion(gm) == 2
    assert fusion.groups == [tuple(f"p_blocks_{i}_{p}_weight" for p in "qkv") for i in range(2)]
    after = graph_targets(gm)
    assert count_delta(before, after, LINEAR) == -4
    assert after["aten.new_zeros.default"] == 2 * 2  # q and v rows of each block's bias
    assert count_delta(before, after, CAT) == 2 * 2
    with torch.no_grad():
        assert rel_err(program.module()(x), ref) < GRAPH_TOL[torch.float32]


def _placeholder(name: str) -> fx.Node:
    return fx.Graph().placeholder(name)


@pytest.mark.parametrize(
    ("name", "block"),
    [
        ("p_blocks_3_attn2_to_k_weight", "blocks_3"),
        ("p_single_transformer_blocks_12_proj_mlp_bias", "single_transformer_blocks_12"),
        ("p_transformer_blocks_0_ff_net_0_proj_weight", "transformer_blocks_0_ff_net_0"),
        ("b_stage_1_blocks_2_q_weight", "stage_1_blocks_2"),
        ("p_context_embedder_weight", ""),
        ("hidden_states", None),  # a user input, not a parameter
    ],
)
def test_block_of_a_lifted_name(name, block):
    assert block_of(_placeholder(name)) == block


def test_block_of_a_get_attr():
    assert block_of(fx.Graph().get_attr("blocks.7.attn1.to_q.weight")) == "blocks_7"


def test_bad_arguments():
    with pytest.raises(InvalidArgumentError, match=r"^weight: expected a torch.fx.Node, got str"):
        block_of("p_blocks_0_q_weight")
    with pytest.raises(InvalidArgumentError, match=r"^gm: expected a torch.fx.GraphModule .*got Linear"):
        ConcatLinearPass()(nn.Linear(2, 2))
