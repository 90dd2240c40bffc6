"""The gemv pass: one-row linears (an adaptive norm's projection of the conditioning) onto ``diffc.gemv`` with the
SiLU before them folded in; everything else keeps its GEMM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffc.compile.passes import GemvPass, graph_targets
from diffc.compile.trace import trace_module

GEMV, LINEAR, SILU = "diffc.gemv.default", "aten.linear.default", "aten.silu.default"


class Modulation(nn.Module):
    """``linear(silu(temb))`` as FLUX.1's and Qwen-Image's adaptive norms project the conditioning."""

    def __init__(self, dim: int = 24, silu_read_twice: bool = False, computed_weight: bool = False):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)
        self.silu_read_twice, self.computed_weight = silu_read_twice, computed_weight

    def forward(self, temb):
        a = F.silu(temb)
        weight = self.linear.weight * 2.0 if self.computed_weight else self.linear.weight
        y = F.linear(a, weight, self.linear.bias)
        return y + a.sum() if self.silu_read_twice else y


def _rewritten(shape, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    net = Modulation(**kw).to(dtype).eval()
    inputs = {"temb": torch.randn(*shape).to(dtype)}
    program = trace_module(net, inputs)
    with torch.no_grad():
        ref = program.module()(**inputs)
    taken = GemvPass()(program.graph_module)
    with torch.no_grad():
        out = program.module()(**inputs)
    return taken, graph_targets(program.graph_module), out, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 24), (1, 1, 24)], ids=["2d", "3d"])
def test_one_row_takes_gemv_with_the_silu_folded(shape, dtype):
    taken, targets, out, ref = _rewritten(shape, dtype)
    assert taken == 1 and targets.get(GEMV) == 1 and LINEAR not in targets and SILU not in targets
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, **({"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}))


def test_two_rows_keep_the_gemm():
    taken, targets, _, _ = _rewritten((2, 24))
    assert taken == 0 and targets.get(LINEAR) == 1 and GEMV not in targets


def test_silu_read_elsewhere_stays():
    taken, targets, out, ref = _rewritten((1, 24), silu_read_twice=True)
    assert taken == 1 and targets.get(SILU) == 1 and targets.get(GEMV) == 1
    torch.testing.assert_close(out, ref)


def test_a_computed_weight_keeps_the_gemm():
    taken, targets, _, _ = _rewritten((1, 24), computed_weight=True)
    assert taken == 0 and targets.get(LINEAR) == 1


def test_a_bias_given_by_keyword_is_kept():
    torch.manual_seed(0)
    net = Modulation().eval()
    inputs = {"temb": torch.randn(1, 24)}
    program = trace_module(net, inputs)
    (linear,) = [n for n in program.graph_module.graph.nodes if str(n.target) == LINEAR]
    linear.args, linear.kwargs = linear.args[:2], {"bias": linear.args[2]}
    program.graph_module.recompile()
    with torch.no_grad():
        ref = program.module()(**inputs)
    assert GemvPass()(program.graph_module) == 1
    with torch.no_grad():
        torch.testing.assert_close(program.module()(**inputs), ref)
