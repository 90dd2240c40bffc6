"""The cat_transposed pass: a joint attention's operand concatenated in its producers' (B, S, H, D) layout and
transposed once, instead of concatenating two transposed views; only where attention alone reads it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffc.compile.passes import CatTransposedPass, graph_targets
from diffc.compile.trace import trace_module

CAT, TRANSPOSE = "aten.cat.default", "aten.transpose.int"


class JointAttention(nn.Module):
    """Text and image streams projected apart, heads split, joined along the sequence for one attention."""

    def __init__(self, dim: int = 16, heads: int = 2, extra_reader: bool = False, mixed: bool = False):
        super().__init__()
        self.heads, self.extra_reader, self.mixed = heads, extra_reader, mixed
        self.qkv_txt, self.qkv_img = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)

    def _split(self, x):  # (B, S, 3 * dim) -> three (B, H, S, D) transposed views
        return [t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in x.chunk(3, dim=-1)]

    def forward(self, txt, img):
        (qt, kt, vt), (qi, ki, vi) = self._split(self.qkv_txt(txt)), self._split(self.qkv_img(img))
        q, k = torch.cat([qt, qi], dim=2) * 1.0, torch.cat([kt, ki], dim=2) * 1.0  # read by a multiply, not attention
        if self.mixed:
            vt = vt.transpose(2, 3).transpose(2, 3).contiguous()  # a part that is not a transpose
        v = torch.cat([vt, vi], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        return out + v.sum() if self.extra_reader else out


def _traced(**kw):
    torch.manual_seed(0)
    net = JointAttention(**kw).eval()
    inputs = dict(txt=torch.randn(2, 3, 16), img=torch.randn(2, 5, 16))
    program = trace_module(net, inputs)
    with torch.no_grad():
        ref = program.module()(**inputs)
    return program, inputs, ref


def test_value_concatenated_in_producer_layout():
    program, inputs, ref = _traced()
    gm = program.graph_module
    before = graph_targets(gm)
    assert CatTransposedPass()(gm) == 1  # v only: q and k have another reader
    after = graph_targets(gm)
    assert after[CAT] == before[CAT] and after[TRANSPOSE] == before[TRANSPOSE] - 1  # two transposes became one
    (sdpa,) = [n for n in gm.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    v = sdpa.args[2]
    assert str(v.target) == TRANSPOSE
    cat = v.args[0]
    assert str(cat.target) == CAT and cat.args[1] == 1  # joined along the (B, S, H, D) sequence dimension
    assert v.meta["val"].shape == (2, 2, 8, 8) and v.meta["val"].stride() == (128, 8, 16, 1)
    with torch.no_grad():
        out = program.module()(**inputs)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_left_alone_where_another_op_reads_the_concatenation():
    program, _, _ = _traced(extra_reader=True)
    assert CatTransposedPass()(program.graph_module) == 0


def test_left_alone_where_a_part_is_not_a_transpose():
    program, _, _ = _traced(mixed=True)
    assert CatTransposedPass()(program.graph_module) == 0
