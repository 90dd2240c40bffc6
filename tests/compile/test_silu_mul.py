"""SwiGLU fusion: none in tiny FLUX and Wan; on small gated feed-forwards (Llama / Qwen-Image style), every
way of taking the two halves, numerics against the unfused graph, ops left and entered, and the forms
the op cannot compute (second half gated, two projections), which must stay."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffc.compile import trace_module
from diffc.compile.passes import graph_targets
from diffc.compile.passes.silu_mul import HALVES, SiluMul, SiluMulPass
from diffc.errors import InvalidArgumentError
from diffc.ops import COUNTERS, OpCounters, kernel_runs_on
from tests.compile.common import GRAPH_TOL, check_pass, check_variant
from tests.compile.conftest import DTYPES, MODELS
from tests.helpers import rel_err

PASS = SiluMulPass
OP = "diffc.silu_mul.default"
EXPECTED = {"flux": 0, "wan": 0}  # both MLPs are GELU-tanh; their SiLUs (embedders) gate nothing
# Per match: the silu and the gating mul leave, and whatever took the halves.
TAKE = {
    "chunk": {"aten.chunk.default": 1, "<built-in function getitem>": 2},
    "split": {"aten.split.Tensor": 1, "<built-in function getitem>": 2},
    "split_with_sizes": {"aten.split_with_sizes.default": 1, "<built-in function getitem>": 2},
    "slices": {"aten.slice.Tensor": 2},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", MODELS)
def test_no_swiglu_in_flux_or_wan(traced, model, dtype):
    after = check_pass(traced(model, dtype), PASS(), EXPECTED[model], dtype, {"aten.silu.default": 0}, OP)
    assert after["aten.silu.default"] > 0


@pytest.mark.parametrize("variant", PASS.patterns, ids=lambda v: v.name)
def test_replacement_equals_pattern(variant):
    check_variant(variant)


def _halves(h: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = h.shape[-1] // 2
    if how == "chunk":
        return h.chunk(2, dim=-1)
    if how == "split":
        return torch.split(h, n, dim=-1)
    if how == "split_with_sizes":
        return h.split([n, n], dim=-1)
    return h[..., :n], h[..., n:]


class GatedFFN(nn.Module):
    """``down(silu(a) * b)`` with ``a, b = up(x)`` halved by ``how``; ``layers`` of them, residual between."""

    def __init__(self, how: str, gate_first: bool = True, dim: int = 12, hidden: int = 20, layers: int = 2):
        super().__init__()
        self.how, self.gate_first = how, gate_first
        self.up = nn.ModuleList(nn.Linear(dim, 2 * hidden) for _ in range(layers))
        self.down = nn.ModuleList(nn.Linear(hidden, dim) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, S, dim)
        for up, down in zip(self.up, self.down):
            a, b = _halves(up(x), self.how)
            x = x + down(F.silu(a) * b if self.gate_first else b * F.silu(a))
        return x


class TwoProjections(nn.Module):
    """Llama / Qwen2: ``down(silu(gate_proj(x)) * up_proj(x))``, the halves from two GEMMs."""

    def __init__(self, dim: int = 12, hidden: int = 20):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SecondHalfGated(nn.Module):
    """diffusers' ``SwiGLU``: ``h, gate = proj(x).chunk(2); h * silu(gate)``."""

    def __init__(self, dim: int = 12, hidden: int = 20):
        super().__init__()
        from diffusers.models.activations import SwiGLU

        self.act = SwiGLU(dim, hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(x))


def _run(model: nn.Module, dtype: torch.dtype, x: torch.Tensor | None = None):
    """Trace, fuse; returns (matches, targets before, after, unfused output, fused output)."""
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(3)) if x is None else x
    torch.manual_seed(0)
    inputs = {"x": x.to(dtype)}
    program = trace_module(model.to(dtype), inputs)
    with torch.no_grad():
        unfused = program.module()(**inputs)
    before = graph_targets(program.graph_module)
    n = PASS()(program.graph_module)
    COUNTERS.reset()
    with torch.no_grad():
        fused = program.module()(**inputs)
    if kernel_runs_on(torch.device("cpu")):
        assert COUNTERS == OpCounters(kernel_launches=n, reference_fallbacks=0)
    return n, before, graph_targets(program.graph_module), unfused, fused


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gate_first", (True, False), ids=("silu_a*b", "b*silu_a"))
@pytest.mark.parametrize("how", HALVES)
def test_fuses_gated_ffn(how, gate_first, dtype):
    torch.manual_seed(0)
    layers = 2
    n, before, after, unfused, fused = _run(GatedFFN(how, gate_first, layers=layers), dtype)
    assert n == layers and after[OP] == layers and after["aten.new_empty.default"] == layers
    for target, k in {**TAKE[how], "aten.silu.default": 1, "aten.mul.Tensor": 1}.items():
        assert before[target] - after.get(target, 0) == k * layers, target
    assert after["aten.linear.default"] == before["aten.linear.default"] == 2 * layers
    assert fused.dtype == dtype and rel_err(fused, unfused) < GRAPH_TOL[dtype]


@pytest.mark.parametrize("model", (TwoProjections, SecondHalfGated))
def test_leaves_what_the_op_cannot_take(model):
    """The op reads one ``[a | b]`` tensor and gates ``a``: two projections, or ``b`` gated, stay as they are."""
    torch.manual_seed(0)
    n, before, after, unfused, fused = _run(model(), torch.float32)
    assert n == 0 and after == before and torch.equal(fused, unfused)


class Unfusable(nn.Module):
    """Halves the op does not take: along the sequence, of a transposed (non-contiguous) tensor, or a
    three-way chunk's first two parts."""

    def __init__(self, case: str):
        super().__init__()
        self.case = case
        self.up = nn.Linear(12, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)  # (B, S, 24)
        if self.case == "sequence":
            a, b = h.chunk(2, dim=1)  # S = 6: two (B, 3, 24)
        elif self.case == "transposed":
            a, b = h.transpose(1, 2).chunk(2, dim=-1)  # (B, 24, S/2) halves of a non-contiguous tensor
        else:
            a, b, _ = h.chunk(3, dim=-1)
        return F.silu(a) * b


@pytest.mark.parametrize("case", ("sequence", "transposed", "three_chunks"))
def test_refuses_other_halves(case):
    x = torch.randn(2, 6, 12, generator=torch.Generator().manual_seed(4))
    n, before, after, unfused, fused = _run(Unfusable(case), torch.float32, x)
    assert n == 0 and after == before and torch.equal(fused, unfused)


def test_bad_arguments():
    with pytest.raises(InvalidArgumentError, match="halves"):
        SiluMul("unbind")
    with pytest.raises(InvalidArgumentError, match="gate_first"):
        SiluMul("chunk", gate_first="yes")
    with pytest.raises(InvalidArgumentError, match="gm"):
        PASS()(torch.nn.Linear(2, 2))
