"""QK RMSNorm + RoPE fusion on tiny FLUX and Wan graphs: numerics, exact match count, ops left and entered."""

from __future__ import annotations

import pytest

from diffc.compile.passes import QKNormRopePass
from tests.compile.common import (
    EXPECTED,
    FLUX_BLOCKS,
    FLUX_SINGLE,
    WAN_BLOCKS,
    check_pass,
    check_variant,
)
from tests.compile.conftest import DTYPES, MODELS

PASS = QKNormRopePass
OPS = {"flux": "diffc.qk_norm_rope_per_head.default", "wan": "diffc.qk_norm_rope_across_heads.default"}
# What leaves: q and k each lose their rms_norm(s), the pair split and the stack of rotated halves;
# FLUX's double block also its two text+image cats (q, k). Op calls: FLUX's double block makes two.
LEFT = {
    "flux": {
        "aten.rms_norm.default": 2 * FLUX_SINGLE + 4 * FLUX_BLOCKS,
        "aten.unbind.int": 2 * (FLUX_SINGLE + FLUX_BLOCKS),
        "aten.stack.default": 2 * (FLUX_SINGLE + FLUX_BLOCKS),
        "aten.cat.default": 2 * FLUX_BLOCKS,
    },
    "wan": {
        "aten.rms_norm.default": 2 * WAN_BLOCKS,
        "aten.unbind.int": 2 * WAN_BLOCKS,
        "aten.stack.default": 2 * WAN_BLOCKS,
    },
}
CALLS = {"flux": FLUX_SINGLE + 2 * FLUX_BLOCKS, "wan": WAN_BLOCKS}
# rms_norm left: none in FLUX; Wan's cross-attention normalises q and k without RoPE, per block
UNFUSED_NORMS = {"flux": 0, "wan": 2 * WAN_BLOCKS}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", MODELS)
def test_fuses_every_site(traced, model, dtype):
    t = traced(model, dtype)
    after = check_pass(t, PASS(), EXPECTED[model][PASS.name], dtype, LEFT[model], OPS[model], CALLS[model])
    assert after.get("aten.rms_norm.default", 0) == UNFUSED_NORMS[model]


@pytest.mark.parametrize("variant", PASS.patterns, ids=lambda v: v.name)
def test_replacement_equals_pattern(variant):
    check_variant(variant)

