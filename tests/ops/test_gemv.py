"""diffc::gemv (a linear layer over a few rows, optional SiLU on the input, bf16 or fp8 weight) against its
reference and against the model's own ``F.linear(F.silu(x), W, b)``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffc.errors import InvalidArgumentError
from diffc.ops.fp8 import FP8, quantize_weight
from diffc.ops.gemv import MAX_ROWS, gemv, gemv_ref
from tests.fp8_interpreter import round_interpreter_fp8_to_nearest
from tests.ops.common import DTYPES, assert_kernel_ran, assert_matches, poisoned, randn

round_interpreter_fp8_to_nearest()

# (rows, in_features, out_features): FLUX.1's norm1.linear is (1, 3072, 18432); odd sizes exercise the masks
SHAPES = {
    "m1k64n48": (1, 64, 48),
    "m2k100n37": (2, 100, 37),  # neither dimension a multiple of the tiles
    "m3k700n20": (3, 700, 20),  # more than one K block, padded rows
    "m8k32n16": (MAX_ROWS, 32, 16),
}


@pytest.mark.parametrize("act", ["none", "silu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference_and_the_model(counters, shape, dtype, act):
    rows, k, n = shape
    x, w, b = randn(rows, k, dtype=dtype, seed=1), randn(n, k, dtype=dtype, seed=2, scale=0.1), randn(n, dtype=dtype)
    out = poisoned(rows, n, dtype=dtype)
    torch.ops.diffc.gemv(x, w, None, b, act, out)
    assert_kernel_ran()
    assert_matches(out, gemv_ref(x, w, None, b, act))
    model = F.linear(F.silu(x) if act == "silu" else x, w, b)
    assert_matches(out, model)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 64, 48), (2, 96, 32)], ids=["m1", "m2"])
def test_fp8_weight_matches_its_dequantized_reference(counters, shape, bias):
    rows, k, n = shape
    x, w = randn(rows, k, dtype=torch.bfloat16, seed=3), randn(n, k, dtype=torch.bfloat16, seed=4, scale=0.1)
    w8, scale = quantize_weight(w)
    b = randn(n, dtype=torch.bfloat16, seed=5) if bias else None
    out = poisoned(rows, n, dtype=torch.bfloat16)
    torch.ops.diffc.gemv(x, w8, scale, b, "silu", out)
    assert_kernel_ran()
    assert_matches(out, gemv_ref(x, w8, scale, b, "silu"))
    exact = F.linear(F.silu(x), w, b).float()  # the bf16 layer: fp8 weights cost a few percent, not more
    err = float((out.float() - exact).norm() / exact.norm())
    assert 0 < err < 0.05


def test_more_rows_than_the_kernel_takes_run_the_reference(counters):
    x, w = randn(MAX_ROWS + 1, 32), randn(16, 32, seed=2)
    out = gemv(x, w)
    assert counters.reference_fallbacks == 0 and counters.kernel_launches == 1  # the op ran; its launcher chose
    assert_matches(out, x @ w.t())


def test_opcheck(counters):
    x, w, b = randn(2, 40), randn(24, 40, seed=1), randn(24, seed=2)
    torch.library.opcheck(torch.ops.diffc.gemv.default, (x, w, None, b, "silu", torch.empty(2, 24)))


def test_bad_arguments_name_the_field():
    op = torch.ops.diffc.gemv
    x, w = randn(2, 8), randn(4, 8)
    with pytest.raises(InvalidArgumentError, match=r"^act: expected one of none, silu, got 'gelu'"):
        op(x, w, None, None, "gelu", torch.empty(2, 4))
    with pytest.raises(InvalidArgumentError, match=r"^weight: expected shape \(out_features, 8\)"):
        op(x, randn(4, 9), None, None, "none", torch.empty(2, 4))
    with pytest.raises(InvalidArgumentError, match=r"^x: expected a 2-D"):
        op(randn(1, 2, 8), w, None, None, "none", torch.empty(2, 4))
    with pytest.raises(InvalidArgumentError, match=r"^weight_scale: a float8_e4m3fn weight needs"):
        op(x.bfloat16(), w.to(FP8), None, None, "none", torch.empty(2, 4, dtype=torch.bfloat16))
    with pytest.raises(InvalidArgumentError, match=r"^weight_scale: is only for a float8_e4m3fn weight"):
        op(x, w, torch.ones(4), None, "none", torch.empty(2, 4))
    with pytest.raises(InvalidArgumentError, match=r"^bias: expected shape \(4,\)"):
        op(x, w, None, randn(5), "none", torch.empty(2, 4))
    with pytest.raises(InvalidArgumentError, match=r"^out: expected shape \(2, 4\)"):
        op(x, w, None, None, "none", torch.empty(4, 2))
    with pytest.raises(InvalidArgumentError, match=r"^weight: expected dtype"):
        op(x, w.bfloat16(), None, None, "none", torch.empty(2, 4))


def test_the_cuda_kernel_serves_only_the_gpus_it_was_measured_faster_on(monkeypatch):
    from diffc.ops import gemv as gemv_mod

    assert gemv_mod.CSRC_GPUS and not gemv_mod._measured_faster_on(torch.device("cpu"))
    for name, served in (("NVIDIA H200", True), ("NVIDIA H100 80GB HBM3", False), ("NVIDIA B200", False)):
        monkeypatch.setattr(gemv_mod, "_device_name", lambda index, name=name: name)
        assert gemv_mod._measured_faster_on(torch.device("cuda", 0)) is served, name
