"""Gated residual + adaLN fusion after the default passes on tiny FLUX and Wan: the exact sites, ops left and
entered, numerics against the unfused graph, save/load, and the reader-order rule on a small module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffc.compile import PassManager, trace_module
from diffc.compile.manager import default_passes
from diffc.compile.passes import graph_targets
from diffc.compile.passes.gated_residual_adaln import GatedResidualAdaLNPass
from diffc.errors import InvalidArgumentError
from diffc.ops import COUNTERS, OpCounters, kernel_runs_on
from tests.compile.common import GRAPH_TOL, UNGATED_PAIRS, save_and_load
from tests.compile.conftest import DTYPES, MODELS
from tests.helpers import rel_err
from tests.ops.common import round_interpreter_bf16_to_nearest

PASS = GatedResidualAdaLNPass
OP = "diffc.gated_residual_adaln.default"
RESIDUAL, NORM = "diffc.gated_residual.default", "diffc.adaln_modulate.default"
# Sites after the default passes, by the projection whose output is the residual's y:
# FLUX (1 double + 2 single blocks): the double block's image and text residuals after attention feed
#   their MLP norms (norm2, norm2_context) = 2. The MLP residuals go into the single blocks' cat, and
#   each single block's output is sliced into text and image before the next norm: not fused.
# Wan (2 blocks), per block: the attention residual feeds the affine norm2 (an adaln_modulate with
#   scale w - 1), the ungated ``x + attn2`` (an aten.add the pass turns into the op's gate=None form)
#   feeds norm3, and the feed-forward residual feeds the next block's norm1, the last one norm_out = 6.
SITES = {
    "flux": ("transformer_blocks_0_attn_to_out_0", "transformer_blocks_0_attn_to_add_out"),
    "wan": tuple(f"blocks_{i}_{p}" for i in range(2) for p in ("attn1_to_out_0", "attn2_to_out_0", "ffn_net_2")),
}
EXPECTED = {model: len(sites) for model, sites in SITES.items()}
UNGATED = UNGATED_PAIRS  # sites whose residual was an aten.add before the pass


def _default_passes() -> list:
    return [p for p in default_passes() if not isinstance(p, PASS)]


def _diffc_calls(gm) -> int:
    return sum(n for k, n in graph_targets(gm).items() if k.startswith("diffc."))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", MODELS)
def test_fuses_every_site(traced, model, dtype):
    # an ungated site replaces aten.add's round-to-nearest sum by the kernel's: the interpreter must round alike
    round_interpreter_bf16_to_nearest()
    t = traced(model, dtype)
    gm = t.program.graph_module
    PassManager(passes=_default_passes()).run(gm)
    with torch.no_grad():
        unpaired = t.run()
    before = graph_targets(gm)

    n, ungated = EXPECTED[model], UNGATED[model]
    assert PASS()(gm) == n
    after = graph_targets(gm)
    assert after[OP] == n and OP not in before
    assert before[RESIDUAL] - after.get(RESIDUAL, 0) == n - ungated
    assert before[NORM] - after.get(NORM, 0) == n
    add, empty = "aten.add.Tensor", "aten.empty_like.default"
    assert before[add] - after[add] == ungated and after[empty] - before[empty] == ungated
    changed = (OP, RESIDUAL, NORM, add, empty)
    assert {k: v for k, v in after.items() if k not in changed} == {
        k: v for k, v in before.items() if k not in changed
    }
    fused = [node for node in gm.graph.nodes if str(node.target) == OP]
    assert tuple(node.args[1].args[1].name for node in fused) == tuple(f"p_{s}_weight" for s in SITES[model])

    COUNTERS.reset()
    out = t.run()
    if kernel_runs_on(torch.device("cpu")):
        assert COUNTERS == OpCounters(kernel_launches=_diffc_calls(gm), reference_fallbacks=0)
    assert out.dtype == t.unfused.dtype and rel_err(out, t.unfused) < GRAPH_TOL[dtype]
    assert rel_err(out, unpaired) < GRAPH_TOL[torch.float32]  # the same kernel rows, one launch


@pytest.mark.parametrize("model", MODELS)
def test_needs_the_default_passes_first(traced, model):
    t = traced(model)
    PassManager(passes=[]).run(t.program)  # canonicalisation only: no diffc calls to pair
    assert PASS()(t.program.graph_module) == 0


def test_fused_program_saves_and_loads(traced, tmp_path):
    t = traced("flux", torch.bfloat16)
    PassManager(passes=[*_default_passes(), PASS()]).run(t.program)
    loaded, module = save_and_load(t.program, tmp_path)
    targets = graph_targets(loaded.graph_module)
    assert targets[OP] == EXPECTED["flux"]
    with torch.no_grad():
        assert torch.equal(module(**t.inputs), t.run())


class ResidualThenNorm(nn.Module):
    """``res = x + gate * y``, then the modulated norm of ``res``, and another reader of ``res`` placed
    before (``early``) or after the modulation's ``scale`` is computed."""

    def __init__(self, early: bool):
        super().__init__()
        self.early = early

    def forward(self, x, y, gate, emb):  # x, y: (B, S, C); gate, emb: (B, 1, C)
        res = x + gate * y
        if self.early:
            other = torch.tanh(res)
        scale = emb * 0.5
        h = F.layer_norm(res, res.shape[-1:], eps=1e-6) * (1 + scale) + emb
        if not self.early:
            other = torch.tanh(res)
        return h + other


@pytest.mark.parametrize("early", (False, True), ids=("reader-after", "reader-before-scale"))
def test_other_readers_must_follow_the_fused_op(early):
    g = torch.Generator().manual_seed(5)
    inputs = {k: torch.randn(s, generator=g) for k, s in
              (("x", (2, 4, 8)), ("y", (2, 4, 8)), ("gate", (2, 1, 8)), ("emb", (2, 1, 8)))}
    program = trace_module(ResidualThenNorm(early), inputs)
    with torch.no_grad():
        unfused = program.module()(**inputs)
    counters = PassManager(passes=[*_default_passes(), PASS()]).run(program)
    assert counters.matches["gated_residual"] == counters.matches["adaln_modulate"] == 1
    assert counters.matches[PASS.name] == (0 if early else 1)
    targets = graph_targets(program.graph_module)
    assert targets.get(OP, 0) == (0 if early else 1) and targets.get(RESIDUAL, 0) == (1 if early else 0)
    with torch.no_grad():
        assert rel_err(program.module()(**inputs), unfused) < GRAPH_TOL[torch.float32]


def test_bad_arguments():
    with pytest.raises(InvalidArgumentError, match="gm"):
        PASS()(torch.nn.Linear(2, 2))
