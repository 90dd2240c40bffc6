"""Gated-residual fusion on tiny FLUX and Wan graphs: numerics, exact match count, ops left and entered."""

from __future__ import annotations

import pytest

from diffc.compile.passes import GatedResidualPass
from tests.compile.common import EXPECTED, check_pass, check_variant
from tests.compile.conftest import DTYPES, MODELS

PASS = GatedResidualPass
OP = "diffc.gated_residual.default"
LEFT = {"aten.add.Tensor": 1, "aten.mul.Tensor": 1}  # per match


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", MODELS)
def test_fuses_every_site(traced, model, dtype):
    # The exact count also says what stays: RoPE's 4-D ``x * cos + x_rot * sin`` (an add of products)
    # and Wan's ungated ``x + attn2(h)`` are not gated residuals.
    n = EXPECTED[model][PASS.name]
    check_pass(traced(model, dtype), PASS(), n, dtype, {k: v * n for k, v in LEFT.items()}, OP)


@pytest.mark.parametrize("variant", PASS.patterns, ids=lambda v: v.name)
def test_replacement_equals_pattern(variant):
    check_variant(variant)

