"""QK RMSNorm + RoPE fusion on tiny FLUX and Wan graphs: numerics, exact match count, ops left and entered."""

from __future__ import annotations

import pytest

from diffc.compile.passes import QKNormRopePass
from tests.compile.common import EXPECTED, check_pass, check_variant
from tests.compile.conftest import DTYPES, MODELS

PASS = QKNormRopePass
OPS = {"flux": "diffc.qk_norm_rope_per_head.default", "wan": "diffc.qk_norm_rope_across_heads.default"}
# per match: q and k each lose their rms_norm, the pair split and the stack of rotated halves
LEFT = {"aten.rms_norm.default": 2, "aten.unbind.int": 2, "aten.stack.default": 2}
# rms_norm left: FLUX's double block (q, k, added q, added k); Wan's cross-attention (q, k) per block
UNFUSED_NORMS = {"flux": 4, "wan": 4}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", MODELS)
def test_fuses_every_site(traced, model, dtype):
    after = check_pass(traced(model, dtype), PASS(), EXPECTED[model][PASS.name], dtype, LEFT, OPS[model])
    assert after["aten.rms_norm.default"] == UNFUSED_NORMS[model]


@pytest.mark.parametrize("variant", PASS.patterns, ids=lambda v: v.name)
def test_replacement_equals_pattern(variant):
    check_variant(variant)

