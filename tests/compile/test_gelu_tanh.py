"""Bias + GELU-tanh fusion on tiny FLUX and Wan graphs: numerics, exact match count, ops left and entered."""

from __future__ import annotations

import pytest
import torch

from diffc.compile.passes import GeluTanhPass
from diffc.compile.passes import CanonicalizeCasts, graph_targets
from tests.compile.common import EXPECTED, GRAPH_TOL, check_pass, check_variant
from tests.helpers import rel_err
from tests.compile.conftest import DTYPES, MODELS

PASS = GeluTanhPass
OP = "diffc.gelu_tanh.default"
LEFT = {"aten.gelu.default": 1, "aten.linear.default": 0}  # the linear stays, without its bias


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", MODELS)
def test_fuses_every_site(traced, model, dtype):
    n = EXPECTED[model][PASS.name]
    after = check_pass(traced(model, dtype), PASS(), n, dtype, {k: v * n for k, v in LEFT.items()}, OP)
    assert "aten.gelu.default" not in after


@pytest.mark.parametrize("variant", PASS.patterns[1:], ids=lambda v: v.name)
def test_replacement_equals_pattern(variant):
    check_variant(variant)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt's GELU epilogue needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_epilogue_is_tanh_gelu_on_gpu(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(0)
    x, w, b = (torch.randn(s, generator=g, device="cuda").to(dtype) for s in ((3, 257, 256), (384, 256), (384,)))
    w = w / 16
    variant = PASS.patterns[0]
    assert variant.accepts(x, w, b)
    out = variant.build_replacement(x, w, b)(x, w, b)
    tanh = torch.nn.functional.gelu(torch.nn.functional.linear(x.float(), w.float(), b.float()), approximate="tanh")
    erf = torch.nn.functional.gelu(torch.nn.functional.linear(x.float(), w.float(), b.float()))
    assert out.shape == tanh.shape and out.dtype == dtype
    assert rel_err(out, tanh) < (1e-5 if dtype == torch.float32 else GRAPH_TOL[dtype])
    if dtype == torch.float32:
        assert (out.float() - tanh).abs().max() < (out.float() - erf).abs().max() / 10


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", MODELS)
def test_gemm_epilogue_form(traced, model, dtype):
    # What the pass does on a GPU: every biased site goes into the GEMM (cuBLASLt's GELU epilogue).
    # Forced here on the CPU to check the rewrite; there aten._addmm_activation applies the erf GELU
    # (tanh is CUDA-only, as torch's own decomposition says), so the bound is that difference (<5e-4).
    n = EXPECTED[model][PASS.name]
    t = traced(model, dtype)
    gm = t.program.graph_module
    CanonicalizeCasts()(gm)
    before = graph_targets(gm)
    assert PASS(epilogue_anywhere=True)(gm) == n
    after = graph_targets(gm)
    assert "aten.gelu.default" not in after and OP not in after
    assert after["aten._addmm_activation.default"] == n
    assert before["aten.linear.default"] - after.get("aten.linear.default", 0) == n
    assert rel_err(t.run(), t.unfused) < max(GRAPH_TOL[dtype], 1e-3)


def test_epilogue_form_is_gpu_only_by_default():
    (variant,) = [v for v in PASS.patterns if v.name == "LinearBiasGeluEpilogue"]
    x, w, b = variant.example_inputs()
    assert not variant.accepts(x, w, b)  # CPU tensors: the Triton form is used
    assert PASS(epilogue_anywhere=True).patterns[0].accepts(x, w, b)
    assert [v.name for v in PASS(epilogue=False).patterns] == ["LinearBiasGelu", "Gelu"]  # for measuring the forms


def test_bias_moves_out_of_the_linear(traced):
    t = traced("flux")
    PASS()(t.program.graph_module)
    graph = t.program.graph_module.graph
    fused = [n for n in graph.nodes if n.target == torch.ops.diffc.gelu_tanh.default]
    assert len(fused) == EXPECTED["flux"][PASS.name]
    for node in fused:
        h, bias = node.args[0], node.args[1]
        assert h.target == torch.ops.aten.linear.default and len(h.args) == 2  # linear(x, weight): no bias
        assert bias.op == "placeholder" and bias.name.endswith("_bias")
