"""The modulation-table bias of the adaLN and gated-residual ops: Wan2.2's per-token ``temb`` (B, S, 6, C) plus
the block's float32 ``scale_shift_table`` row, added in the kernel (float32) instead of materialised, against
the models' own math on the materialised ``table + temb.float()``."""

from __future__ import annotations

import pytest
import torch

from diffc.errors import InvalidArgumentError
from diffc.ops.adaln_modulate import adaln_modulate_ref
from diffc.ops.fp8 import FP8
from diffc.ops.gated_residual import gated_residual_ref
from tests.fp8_interpreter import round_interpreter_fp8_to_nearest
from tests.ops.common import assert_kernel_ran, assert_matches, poisoned, randn
from tests.ops.test_fp8_quant import assert_quantized_like

round_interpreter_fp8_to_nearest()
EPS = 1e-6


def table_and_temb(batch: int, seq: int, dim: int, tokens: int):
    """Wan's block modulation: a float32 (1, 6, C) table and a bf16 (B, T, 6, C) temb, T = 1 or S."""
    table = randn(1, 6, dim, seed=4) * 0.3
    temb = randn(batch, tokens, 6, dim, dtype=torch.bfloat16, seed=5)
    return table, temb


@pytest.mark.parametrize("tokens", ["per_token", "per_sample"])
@pytest.mark.parametrize("shape", [(2, 5, 96), (1, 7, 1100)], ids=["b2s5c96", "s7c1100"])
def test_adaln_modulate_with_table_rows_matches_the_materialised_sum(counters, shape, tokens):
    batch, seq, dim = shape
    table, temb = table_and_temb(batch, seq, dim, seq if tokens == "per_token" else 1)
    x = randn(*shape, dtype=torch.bfloat16, seed=1, scale=2.0)
    shift, scale = (table + temb.float()).unbind(2)[:2]  # what eager materialises
    want = adaln_modulate_ref(x, scale, shift, EPS)
    out = poisoned(*shape, dtype=torch.bfloat16)
    torch.ops.diffc.adaln_modulate(x, temb[:, :, 1], temb[:, :, 0], EPS, out, table[0, 1], table[0, 0])
    assert_kernel_ran()
    assert_matches(out, want)
    q, qs = torch.zeros(shape, dtype=FP8), torch.full((batch * seq, 1), float("nan"))
    torch.ops.diffc.adaln_modulate_fp8(x, temb[:, :, 1], temb[:, :, 0], EPS, q, qs, table[0, 1], table[0, 0])
    assert_quantized_like(q, qs, want)


@pytest.mark.parametrize("shape", [(2, 5, 96), (1, 3, 1100)], ids=["b2s5c96", "s3c1100"])
def test_gated_residual_with_a_table_row_matches_the_materialised_sum(counters, shape):
    batch, seq, dim = shape
    table, temb = table_and_temb(batch, seq, dim, seq)
    x, y = randn(*shape, dtype=torch.bfloat16, seed=1), randn(*shape, dtype=torch.bfloat16, seed=2)
    gate = (table + temb.float()).unbind(2)[2]
    out = poisoned(*shape, dtype=torch.bfloat16)
    torch.ops.diffc.gated_residual(x, y, temb[:, :, 2], out, table[0, 2])
    assert_kernel_ran()
    assert_matches(out, gated_residual_ref(x, y, gate))  # float32 product, as eager's float32 gate gives


def test_bad_biases_are_refused():
    x = randn(1, 3, 16, dtype=torch.bfloat16)
    out, row = torch.empty_like(x), torch.zeros(16)
    with pytest.raises(InvalidArgumentError) as exc:
        torch.ops.diffc.adaln_modulate(x, x[:, :1], x[:, :1], EPS, out, row, None)
    assert exc.value.field == "shift_bias" and "both" in str(exc.value)
    with pytest.raises(InvalidArgumentError) as exc:
        torch.ops.diffc.adaln_modulate(x, x[:, :1], x[:, :1], EPS, out, row.bfloat16(), row)
    assert exc.value.field == "scale_bias" and "float32" in str(exc.value)
    with pytest.raises(InvalidArgumentError) as exc:
        torch.ops.diffc.adaln_modulate(x, x[:, :1], x[:, :1], EPS, out, torch.zeros(8), torch.zeros(8))
    assert exc.value.field == "scale_bias" and "(16,)" in str(exc.value)
    with pytest.raises(InvalidArgumentError) as exc:
        torch.ops.diffc.gated_residual(x, x, None, out, row)
    assert exc.value.field == "gate_bias" and "no gate" in str(exc.value)


def test_gated_residual_adaln_with_table_rows_matches_the_materialised_sum(counters):
    """Wan's ungated ``x + attn2`` then ``norm3`` with the table's c_shift / c_scale rows."""
    batch, seq, dim = 2, 5, 96
    table, temb = table_and_temb(batch, seq, dim, seq)
    x, y = randn(batch, seq, dim, dtype=torch.bfloat16, seed=1), randn(batch, seq, dim, dtype=torch.bfloat16, seed=2)
    c_shift, c_scale = (table + temb.float()).unbind(2)[3:5]
    residual, out = poisoned(batch, seq, dim, dtype=torch.bfloat16), poisoned(batch, seq, dim, dtype=torch.bfloat16)
    torch.ops.diffc.gated_residual_adaln(x, y, None, temb[:, :, 4], temb[:, :, 3], EPS, residual, out,
                                         table[0, 4], table[0, 3])
    assert_kernel_ran()
    want_residual = gated_residual_ref(x, y, None)
    assert_matches(residual, want_residual)
    assert_matches(out, adaln_modulate_ref(want_residual, c_scale, c_shift, EPS))


def test_opcheck_with_table_rows(counters):
    """The bias arguments (optional tensors after the destinations) through torch's op checks."""
    table, temb = table_and_temb(2, 5, 32, 5)
    x, y = randn(2, 5, 32, dtype=torch.bfloat16, seed=1), randn(2, 5, 32, dtype=torch.bfloat16, seed=2)
    rows = (table[0, 1].contiguous(), table[0, 0].contiguous())
    torch.library.opcheck(torch.ops.diffc.adaln_modulate.default,
                          (x, temb[:, :, 1], temb[:, :, 0], EPS, torch.empty_like(x), *rows))
    torch.library.opcheck(torch.ops.diffc.gated_residual.default,
                          (x, y, temb[:, :, 2], torch.empty_like(x), table[0, 2].contiguous()))
    torch.library.opcheck(torch.ops.diffc.gated_residual_adaln.default,
                          (x, y, None, temb[:, :, 1], temb[:, :, 0], EPS, torch.empty_like(x), torch.empty_like(x),
                           *rows))


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_gated_residual_adaln_with_a_gate_row_matches_the_materialised_sum(counters, fp8):
    """Wan's attention residual ``x + attn1 * gate`` (gate: the table's row + temb) then the affine ``norm2``,
    which the adaLN op takes as ``scale = w - 1``, ``shift = b``: only the gate gets a table row."""
    batch, seq, dim = 2, 5, 96
    table, temb = table_and_temb(batch, seq, dim, seq)
    x, y = randn(batch, seq, dim, dtype=torch.bfloat16, seed=1), randn(batch, seq, dim, dtype=torch.bfloat16, seed=2)
    w, b = (1 + 0.2 * randn(dim, seed=6)), 0.1 * randn(dim, seed=7)
    scale, shift = (w - 1).view(1, 1, dim), b.view(1, 1, dim)
    gate = (table + temb.float()).unbind(2)[2]
    residual = poisoned(batch, seq, dim, dtype=torch.bfloat16)
    want_residual = gated_residual_ref(x, y, gate)
    want = torch.nn.functional.layer_norm(want_residual.float(), (dim,), w, b, EPS).bfloat16()
    if fp8:
        out, out_scale = torch.zeros(batch, seq, dim, dtype=FP8), torch.full((batch * seq, 1), float("nan"))
        torch.ops.diffc.gated_residual_adaln_fp8(x, y, temb[:, :, 2], scale, shift, EPS, residual, out, out_scale,
                                                 None, None, table[0, 2])
    else:
        out = poisoned(batch, seq, dim, dtype=torch.bfloat16)
        torch.ops.diffc.gated_residual_adaln(x, y, temb[:, :, 2], scale, shift, EPS, residual, out, None, None,
                                             table[0, 2])
    assert_kernel_ran()
    assert_matches(residual, want_residual)
    if fp8:
        assert_quantized_like(out, out_scale, want)
    else:
        assert_matches(out, want)
    with pytest.raises(InvalidArgumentError) as exc:
        torch.ops.diffc.gated_residual_adaln(x, y, None, scale, shift, EPS, residual, x.clone(), None, None,
                                             table[0, 2])
    assert exc.value.field == "gate_bias" and "no gate" in str(exc.value)
