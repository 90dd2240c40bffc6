"""Hand-written RMSNorm -> ``aten.rms_norm``: diffusers' ``RMSNorm`` module and transformers' weight-first
spelling, with and without an affine, float32 and bf16; what it refuses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffc.compile.passes import CanonicalizeCasts, RMSNormPass, graph_targets
from diffc.compile.trace import trace_module
from tests.compile.common import check_variant
from tests.helpers import REL_TOL, rel_err

SPELLED = ("aten.pow.Tensor_Scalar", "aten.mean.dim", "aten.rsqrt.default")


class DiffusersNorms(nn.Module):
    """Two diffusers RMSNorm modules (q/k-norm style, (B, S, H, D)) and one without an affine."""

    def __init__(self, dim: int):
        from diffusers.models.normalization import RMSNorm

        super().__init__()
        self.q, self.k = RMSNorm(dim, eps=1e-6), RMSNorm(dim, eps=1e-6)
        self.plain = RMSNorm(dim * 3, eps=1e-5, elementwise_affine=False)
        for norm in (self.q, self.k):
            nn.init.normal_(norm.weight, 1.0, 0.3)

    def forward(self, x):  # x: (B, S, 3 * D)
        a, b, c = x.unflatten(-1, (3, -1)).unbind(2)
        return self.q(a), self.k(b), self.plain(x)


class WeightFirst(nn.Module):
    """transformers' Llama/T5 spelling: ``weight * (x * rsqrt(mean(x ** 2) + eps))``."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(dim))

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + 1e-6)).to(x.dtype)


class NotRMS(nn.Module):
    """Look-alikes the op does not compute: statistics over another dimension, a fourth power."""

    def forward(self, x):
        a = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)
        b = x * torch.rsqrt(x.pow(4).mean(-1, keepdim=True) + 1e-6)
        return a, b


class BroadcastWeight(nn.Module):
    """A (1, D) weight is not the op's (D,) weight: the norm is taken without it and the product stays."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(1, dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def _run(module, x, dtype):
    module = module.to(dtype).eval()
    x = x.to(dtype)
    with torch.no_grad():
        program = trace_module(module, {"x": x})
        gm = program.graph_module
        CanonicalizeCasts()(gm)
        before = graph_targets(gm)
        count = RMSNormPass()(gm)
        after = graph_targets(gm)
        out, ref = program.module()(x=x), module(x)
    return count, before, after, out, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_diffusers_rmsnorm_modules(dtype):
    torch.manual_seed(0)
    count, before, after, outs, refs = _run(DiffusersNorms(8), torch.randn(2, 5, 24), dtype)
    assert count == 3
    assert after.get("aten.rms_norm.default", 0) == before.get("aten.rms_norm.default", 0) + 3
    assert all(after.get(t, 0) == 0 for t in SPELLED)
    for out, ref in zip(outs, refs):
        assert out.dtype == ref.dtype == dtype
        assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else REL_TOL[torch.bfloat16])


def test_weight_first_spelling():
    torch.manual_seed(0)
    count, _before, after, out, ref = _run(WeightFirst(16), torch.randn(3, 16), torch.float32)
    assert count == 1 and after.get("aten.rms_norm.default") == 1
    assert rel_err(out, ref) < 1e-6


def test_look_alikes_are_left_alone():
    count, before, after, outs, refs = _run(NotRMS(), torch.randn(2, 5, 8), torch.float32)
    assert count == 0 and before == after
    assert all(rel_err(o, r) < 1e-6 for o, r in zip(outs, refs))


def test_a_weight_the_op_cannot_take_stays_a_multiply():
    torch.manual_seed(0)
    count, before, after, out, ref = _run(BroadcastWeight(8), torch.randn(2, 5, 8), torch.float32)
    assert count == 1 and after.get("aten.rms_norm.default") == 1
    assert after["aten.mul.Tensor"] == before["aten.mul.Tensor"] - 1  # x * rsqrt(...) went, * weight stayed
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("variant", RMSNormPass.patterns, ids=lambda v: v.name)
def test_replacement_equals_pattern(variant):
    check_variant(variant)


# ----------------------------------------------------------------------------------- aten.rms_norm -> diffc


class HeadNorms(nn.Module):
    """SD3 / HunyuanVideo attention: per-head RMSNorm on the transposed (B, H, S, D) view of a projection, a
    norm without an affine on plain rows; then SDPA, which takes the normalised heads."""

    def __init__(self, heads: int = 3, dim: int = 16):
        from diffusers.models.normalization import RMSNorm

        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(heads * dim, heads * dim), nn.Linear(heads * dim, heads * dim)
        self.norm_q, self.norm_k = RMSNorm(dim, eps=1e-6), RMSNorm(dim, eps=1e-6)
        self.plain = RMSNorm(heads * dim, eps=1e-5, elementwise_affine=False)
        for norm in (self.norm_q, self.norm_k):
            nn.init.normal_(norm.weight, 1.0, 0.3)

    def forward(self, x):  # x: (B, S, H * D)
        b, s, _ = x.shape
        q = self.norm_q(self.q_proj(x).view(b, s, self.heads, -1).transpose(1, 2))
        k = self.norm_k(self.k_proj(x).view(b, s, self.heads, -1).transpose(1, 2))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, k)
        return self.plain(out.transpose(1, 2).reshape(b, s, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_norms_run_as_diffc_rms_norm(dtype):
    from diffc.compile.passes import RMSNormKernelPass
    from diffc.compile.passes.rms_norm import RMSNormKernel
    from tests.compile.common import check_variant

    check_variant(RMSNormKernel())
    torch.manual_seed(0)
    module = HeadNorms().to(dtype).eval()
    x = torch.randn(2, 7, 48).to(dtype)
    with torch.no_grad():
        program = trace_module(module, {"x": x})
        gm = program.graph_module
        CanonicalizeCasts()(gm)
        assert RMSNormPass()(gm) == 3
        assert RMSNormKernelPass()(gm) == 3
        targets = graph_targets(gm)
        out, ref = program.module()(x=x), module(x)
    assert targets.get("diffc.rms_norm.default") == 3 and "aten.rms_norm.default" not in targets
    assert rel_err(out, ref) < REL_TOL[dtype]
