"""AdaLN fusion on tiny FLUX and Wan graphs: numerics, exact match count, ops left and entered."""

from __future__ import annotations

import pytest
import torch

from diffc.compile import trace_module
from diffc.compile.passes import AdaLNModulatePass, CanonicalizeCasts, graph_targets
from tests.compile.common import EXPECTED, WAN_BLOCKS, check_pass, check_variant
from tests.compile.conftest import DTYPES, MODELS, build

PASS = AdaLNModulatePass
OP = "diffc.adaln_modulate.default"
LEFT = {"aten.layer_norm.default": 1, "aten.mul.Tensor": 1, "aten.add.Tensor": 2}  # per match


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", MODELS)
def test_fuses_every_site(traced, model, dtype):
    n = EXPECTED[model][PASS.name]
    affine = WAN_BLOCKS if model == "wan" else 0  # Wan's norm2: an affine LayerNorm, no modulation
    left = {k: v * (n - affine) for k, v in LEFT.items()}
    left["aten.layer_norm.default"] = n
    after = check_pass(traced(model, dtype), PASS(), n, dtype, left, OP)
    assert after.get("aten.layer_norm.default", 0) == 0


@pytest.mark.parametrize("variant", PASS.patterns, ids=lambda v: v.name)
def test_replacement_equals_pattern(variant):
    check_variant(variant)


def test_reduced_precision_modulation_is_left_alone():
    """Cast entirely to bf16 (``scale_shift_table`` too, unlike the loader), Wan's norm_out multiplies a
    float32 LayerNorm by a bf16 ``1 + scale``, and norm1/norm3 modulate by bf16 tables: no variant computes
    those. Only the blocks' affine norm2 (bf16 weights upcast, no modulation) fuses."""
    net, inputs = build("wan", torch.bfloat16)
    net.to(torch.bfloat16)
    program = trace_module(net, inputs)
    gm = program.graph_module
    CanonicalizeCasts()(gm)
    fused = PASS()(gm)
    assert graph_targets(gm)["aten.layer_norm.default"] == 3 * WAN_BLOCKS + 1 - fused
