"""Timestep-embedding fusion: tiny FLUX and Wan (numerics, exact counts, ops left and entered), diffusers'
own ``Timesteps`` spellings, and the sequences the op does not compute, which must stay."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffc.compile import trace_module
from diffc.compile.passes import CanonicalizeCasts, graph_targets
from diffc.compile.passes.timestep_embedding import (
    SPELLINGS,
    Sinusoid,
    Spelling,
    TimestepEmbeddingPass,
)
from diffc.errors import InvalidArgumentError
from diffc.models.flux.blocks import timestep_sinusoid
from diffc.models.wan.blocks import timestep_sinusoids
from tests.compile.common import GRAPH_TOL, check_pass, check_variant
from tests.compile.conftest import DTYPES, MODELS
from tests.helpers import rel_err

PASS = TimestepEmbeddingPass
OP = "diffc.timestep_embedding.default"
# Sites: FLUX tiny is guidance-distilled (FLUX.1-dev): the timestep and the guidance projections; Wan: the
# condition embedder's one projection.
EXPECTED = {"flux": 2, "wan": 1}
# Per match: arange, its scaling (mul, div), exp, the two unsqueezes, the angles' mul, cos, sin, cat.
LEFT = {
    "aten.arange.default": 1,
    "aten.mul.Tensor": 2,
    "aten.div.Tensor": 1,
    "aten.exp.default": 1,
    "aten.unsqueeze.default": 2,
    "aten.cos.default": 1,
    "aten.sin.default": 1,
    "aten.cat.default": 1,
}
# FLUX in bf16 also loses the timestep's upcast and the embedding's downcast (both go into the op);
# Wan keeps its time embedder in float32 with float32 timesteps: no casts there.
CASTS = {("flux", torch.bfloat16): 2}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", MODELS)
def test_fuses_every_site(traced, model, dtype):
    n = EXPECTED[model]
    left = {k: v * n for k, v in LEFT.items()}
    left["aten.to.dtype"] = CASTS.get((model, dtype), 0) * n
    t = traced(model, dtype)
    after = check_pass(t, PASS(), n, dtype, left, OP)
    assert after["aten.new_empty.default"] == n and "aten.arange.default" not in after  # RoPE's cos/sin stay

    embedders = ("timestep_embedder", "guidance_embedder") if model == "flux" else ("time_embedder",)
    for node in (n for n in t.program.graph_module.graph.nodes if str(n.target) == OP):
        t_arg, flip, shift, scale, period, out = node.args
        assert (flip, shift, scale, period) == (True, 0.0, 1.0, 10000.0)
        if model == "flux":  # the model's * 1000 stays before the op
            assert t_arg.target == torch.ops.aten.mul.Tensor and t_arg.args[1] == 1000
        assert out.meta["val"].dtype == (dtype if model == "flux" else torch.float32)
        (consumer,) = [u for u in out.users if u is not node]
        if model == "wan":
            consumer = next(iter(consumer.users))  # (B*T, C) -> (B, T, C)
        assert consumer.target == torch.ops.aten.linear.default  # the embedder's MLP is not part of the op
        assert any(e in consumer.args[1].name for e in embedders)


@pytest.mark.parametrize("variant", PASS.patterns, ids=lambda v: v.name)
def test_replacement_equals_pattern(variant):
    check_variant(variant)


class Embedder(nn.Module):
    """``linear(proj(t).to(dtype))``: a projection spelled by ``proj`` feeding an embedder's first linear."""

    def __init__(self, proj, width: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.proj = proj
        self.linear = nn.Linear(width, 8).to(dtype)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear(self.proj(t).to(self.linear.weight.dtype))


def _rewrite(model: nn.Module, t: torch.Tensor) -> tuple[int, dict, dict, torch.Tensor, torch.Tensor, list]:
    """Trace, canonicalise, fuse; returns (matches, targets before, after, unfused output, fused output, op args)."""
    program = trace_module(model, {"t": t})
    with torch.no_grad():
        unfused = program.module()(t=t)
    gm = program.graph_module
    CanonicalizeCasts()(gm)
    before = graph_targets(gm)
    n = PASS()(gm)
    with torch.no_grad():
        fused = program.module()(t=t)
    calls = [node.args[1:5] for node in gm.graph.nodes if str(node.target) == OP]
    return n, before, graph_targets(gm), unfused, fused, calls


TIMESTEPS = torch.tensor([0.0, 3.0, 250.5, 999.0])
# diffusers' Timesteps: (dim, flip_sin_to_cos, downscale_freq_shift, scale, timestep dtype, embedder dtype)
DIFFUSERS = {
    "flux": (256, True, 0, 1, torch.float32, torch.float32),
    "flux-bf16": (256, True, 0, 1, torch.bfloat16, torch.bfloat16),
    "sine-first-shift-1": (32, False, 1, 1, torch.float32, torch.float32),
    "scale-1000-fp32-timesteps-bf16-mlp": (32, True, 0, 1000, torch.float32, torch.bfloat16),
}


@pytest.mark.parametrize("case", DIFFUSERS)
def test_diffusers_timesteps(case):
    from diffusers.models.embeddings import Timesteps

    dim, flip, shift, scale, t_dtype, dtype = DIFFUSERS[case]
    n, before, after, unfused, fused, calls = _rewrite(
        Embedder(Timesteps(dim, flip, shift, scale), dim, dtype), TIMESTEPS.to(t_dtype)
    )
    assert n == 1 and after[OP] == 1
    assert calls == [(flip, float(shift), float(scale), 10000.0)]
    assert after.get("aten.slice.Tensor", 0) == 0 and "aten.sin.default" not in after
    assert before["aten.cat.default"] - after.get("aten.cat.default", 0) == (2 if flip else 1)
    assert rel_err(fused, unfused) < GRAPH_TOL[dtype]


def test_other_max_period_is_passed_to_the_op():
    model = Embedder(lambda t: timestep_sinusoid(t, 64, max_period=1000.0), 64)
    n, _, _, unfused, fused, calls = _rewrite(model, TIMESTEPS)
    assert n == 1 and calls == [(True, 0.0, 1.0, 1000.0)]
    assert rel_err(fused, unfused) < GRAPH_TOL[torch.float32]


def test_odd_width_keeps_the_pad():
    """Wan pads an odd width with a zero column: the op writes the even part, the pad stays after it."""
    n, before, after, unfused, fused, _ = _rewrite(Embedder(lambda t: timestep_sinusoids(t, 15), 15), TIMESTEPS)
    assert n == 1 and after["aten.pad.default"] == before["aten.pad.default"] == 1
    assert rel_err(fused, unfused) < GRAPH_TOL[torch.float32]


def _float64_angles(t: torch.Tensor) -> torch.Tensor:
    exponent = -math.log(10000.0) * torch.arange(8, dtype=torch.float32) / 8
    args = t[:, None] * torch.exp(exponent)[None, :]  # float64 t: float64 angles, not the op's float32
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _zero_denominator(t: torch.Tensor) -> torch.Tensor:
    from diffusers.models.embeddings import Timesteps

    return Timesteps(16, True, downscale_freq_shift=8)(t)  # exponent / (half - shift) = exponent / 0


REFUSED = {
    "2-d timesteps": (lambda t: timestep_sinusoid(t[:, None], 16), TIMESTEPS),
    "strided timesteps": (lambda t: timestep_sinusoid(t[::2], 16), TIMESTEPS),
    "float64 angles": (_float64_angles, TIMESTEPS.double()),
    "zero denominator": (_zero_denominator, TIMESTEPS),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refuses_what_the_op_does_not_compute(case):
    proj, t = REFUSED[case]
    program = trace_module(Embedder(proj, 16), {"t": t})
    gm = program.graph_module
    CanonicalizeCasts()(gm)
    before = graph_targets(gm)
    assert PASS()(gm) == 0
    assert graph_targets(gm) == before


def test_spellings_are_the_meaningful_combinations():
    assert len(SPELLINGS) == 12  # (native, diffusers, diffusers flipped) x upcast x downcast
    assert SPELLINGS["native"] == Spelling() and SPELLINGS["diffusers_flipped_upcast_downcast"] == Spelling(
        True, True, True, True
    )
    names = list(SPELLINGS)
    assert names.index("diffusers_flipped") < names.index("diffusers")  # the longer sequence first
    assert names.index("downcast") < names.index("native")


def test_bad_arguments():
    with pytest.raises(InvalidArgumentError, match="flipped"):
        Spelling(flipped=True)
    with pytest.raises(InvalidArgumentError, match="upcast"):
        Spelling(upcast=1)
    with pytest.raises(InvalidArgumentError, match="spelling"):
        Sinusoid("native")
    with pytest.raises(InvalidArgumentError, match="gm"):
        PASS()(nn.Linear(2, 2))

