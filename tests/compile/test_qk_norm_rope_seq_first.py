"""QK RMSNorm + RoPE in diffusers' heads-after-tokens form (HunyuanVideo's attention): diffusers' ``RMSNorm``
modules and ``apply_rotary_emb(x, (cos, sin), sequence_dim=1)``, fused after :mod:`rms_norm`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffc.compile.manager import PassManager
from diffc.compile.passes import QKNormRopePass, RMSNormPass
from diffc.compile.trace import trace_module
from tests.helpers import REL_TOL, rel_err

OP = "diffc.qk_norm_rope_per_head.default"


class Attention(nn.Module):
    """q/k of diffusers' attention processors that keep (B, S, H, D): project, unflatten, RMSNorm, RoPE."""

    def __init__(self, heads: int, head_dim: int):
        from diffusers.models.normalization import RMSNorm

        super().__init__()
        self.heads = heads
        self.to_q, self.to_k = nn.Linear(heads * head_dim, heads * head_dim), nn.Linear(heads * head_dim, heads * head_dim)
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps=1e-6), RMSNorm(head_dim, eps=1e-6)
        for norm in (self.norm_q, self.norm_k):
            nn.init.normal_(norm.weight, 1.0, 0.3)

    def forward(self, x, cos, sin, k_cos, k_sin):
        from diffusers.models.embeddings import apply_rotary_emb

        q = self.norm_q(self.to_q(x).unflatten(2, (self.heads, -1)))
        k = self.norm_k(self.to_k(x).unflatten(2, (self.heads, -1)))
        return apply_rotary_emb(q, (cos, sin), sequence_dim=1), apply_rotary_emb(k, (k_cos, k_sin), sequence_dim=1)


def _tables(seq: int, head_dim: int, seed: int):
    angles = torch.randn(seq, head_dim // 2, generator=torch.Generator().manual_seed(seed))
    return angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)  # (S, D) float32


def _compile(dtype, shared_tables: bool):
    torch.manual_seed(0)
    model = Attention(3, 8).to(dtype).eval()
    cos, sin = _tables(7, 8, 0)
    k_cos, k_sin = (cos, sin) if shared_tables else _tables(7, 8, 1)
    kwargs = {"x": torch.randn(2, 7, 24).to(dtype), "cos": cos, "sin": sin, "k_cos": k_cos, "k_sin": k_sin}
    with torch.no_grad():
        program = trace_module(model, kwargs)
        counters = PassManager(passes=[RMSNormPass(), QKNormRopePass()]).run(program)
        outs, refs = program.module()(**kwargs), model(**kwargs)
    return counters.matches, program, outs, refs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_into_one_call(dtype):
    matches, program, outs, refs = _compile(dtype, shared_tables=True)
    assert matches == {"canonicalize_casts": matches["canonicalize_casts"], "rms_norm": 2, "qk_norm_rope": 1}
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(OP) == 1 and "aten.rms_norm.default" not in targets and "aten.stack.default" not in targets
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else REL_TOL[torch.bfloat16])


def test_different_tables_for_k_are_not_fused():
    matches, _program, outs, refs = _compile(torch.float32, shared_tables=False)
    assert matches["qk_norm_rope"] == 0 and matches["rms_norm"] == 2
    assert all(rel_err(o, r) < 1e-6 for o, r in zip(outs, refs))


class OneTableAttention(nn.Module):
    """Heads after the tokens with one (1, S, 1, D) table node read by q and k (Z-Image's block)."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        from diffc.models.zimage.blocks import ZImageAttention

        self.attn = ZImageAttention(heads * head_dim, heads)
        for norm in (self.attn.norm_q, self.attn.norm_k):
            nn.init.normal_(norm.weight, 1.0, 0.3)

    def forward(self, x, cos, sin):
        from diffc.models.zimage.blocks import apply_rope

        a = self.attn
        q = a.norm_q(a.to_q(x).unflatten(2, (a.heads, -1)))
        k = a.norm_k(a.to_k(x).unflatten(2, (a.heads, -1)))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_table_node_for_q_and_k_is_fused(dtype):
    torch.manual_seed(0)
    model = OneTableAttention(3, 8).to(dtype).eval()
    cos, sin = _tables(7, 8, 0)
    kwargs = {"x": torch.randn(2, 7, 24).to(dtype), "cos": cos[None, :, None, :].contiguous(),
              "sin": sin[None, :, None, :].contiguous()}
    with torch.no_grad():
        program = trace_module(model, kwargs)
        counters = PassManager(passes=[RMSNormPass(), QKNormRopePass()]).run(program)
        outs, refs = program.module()(**kwargs), model(**kwargs)
    assert counters.matches["qk_norm_rope"] == 1 and counters.matches["rms_norm"] == 0
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(OP) == 1 and "aten.rms_norm.default" not in targets and "aten.stack.default" not in targets
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else REL_TOL[torch.bfloat16])
