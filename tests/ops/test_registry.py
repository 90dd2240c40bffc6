"""The registration helper: dispatch between kernel and reference, the counters, schemas, tracing."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import diffc.ops
from diffc.errors import InvalidArgumentError
from diffc.ops import registry
from diffc.ops.gelu_tanh import gelu_tanh, gelu_tanh_ref
from diffc.ops.qk_norm_rope import qk_norm_rope_per_head_ref
from diffc.ops.registry import COUNTERS, OpCounters, kernel_runs_on, register_op
from tests.ops.common import norm_weight, randn

EXPECTED_OPS = {
    "adaln_modulate", "gated_residual", "gated_residual_adaln", "gelu_tanh", "qk_norm_rope_per_head",
    "qk_norm_rope_across_heads", "rms_norm", "silu_mul", "timestep_embedding",
    "adaln_modulate_fp8", "gated_residual_adaln_fp8", "gelu_tanh_fp8",  # the fp8 tier's producers
    "quantize_rows", "quantize_rows_cat", "quantize_rows_cat_gelu",  # the fp8 tier's quantization of an activation no fused kernel produces
    # fp8 attention's inputs
    "qk_norm_rope_per_head_fp8", "qk_norm_rope_across_heads_fp8", "quantize_heads", "quantize_heads_cat", "qk_fp8_head_scales",
    "channel_rms_norm_silu", "channel_bias_residual",  # the Wan VAE's fused path
    "gemv",  # one-row linears (the adaptive norms' projections)
    "linear_accumulate",  # a linear split over a feature concatenation (cuBLAS, beta = 1)
    "linear_into",  # a linear writing its rows of a concatenation (cuBLAS, the output given)
    "group_norm",  # the 2-D KL and generic VAEs' fused path
}
# Ops around external library kernels (torch's SDPA included) that allocate their own output (functional: they
# return it).
EXTERNAL_OPS = {"attention_fa4", "attention_fa4_key_mask", "attention_flashinfer", "attention_flashinfer_fp8",
                "attention_key_padding", "attention_sdpa_flash"}


def test_every_op_is_registered_with_destinations_and_no_return():
    assert set(diffc.ops.OPS) == EXPECTED_OPS | EXTERNAL_OPS
    for name in EXTERNAL_OPS:
        schema = getattr(torch.ops.diffc, name).default._schema
        assert len(schema.returns) == 1 and not any(a.alias_info for a in schema.arguments), name
    for name in EXPECTED_OPS:
        schema = getattr(torch.ops.diffc, name).default._schema
        written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        assert written and all("out" in a for a in written), (name, written)
        assert len(schema.returns) == 0, name


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    COUNTERS.reset()
    x, bias = randn(3, 7), randn(7)
    torch.testing.assert_close(gelu_tanh(x, bias), gelu_tanh_ref(x, bias), rtol=0, atol=0)
    assert COUNTERS == OpCounters(kernel_launches=0, reference_fallbacks=1)


def test_without_triton_everything_runs_the_reference(monkeypatch):
    monkeypatch.setattr(registry, "triton", None)
    assert not kernel_runs_on(torch.device("cuda")) and not kernel_runs_on(torch.device("cpu"))
    COUNTERS.reset()
    x = randn(2, 3, 4, 8)
    w = norm_weight(8, torch.float32)
    cos, sin = torch.rand(3, 8), torch.rand(3, 8)
    q_out, _k_out = diffc.ops.qk_norm_rope.qk_norm_rope_per_head(x, x, w, w, cos, sin)
    q_ref, _ = qk_norm_rope_per_head_ref(x, x, w, w, cos, sin)
    torch.testing.assert_close(q_out, q_ref, rtol=0, atol=0)
    assert COUNTERS == OpCounters(kernel_launches=0, reference_fallbacks=1)


def test_kernel_device_choice(monkeypatch, counters):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernel_runs_on(torch.device("cpu")) and kernel_runs_on(torch.device("cuda"))
    assert not kernel_runs_on(torch.device("meta"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not kernel_runs_on(torch.device("cpu")) and kernel_runs_on(torch.device("cuda"))


def test_fake_checks_shapes_while_tracing():
    with FakeTensorMode():
        x, bias = torch.empty(4, 6), torch.empty(6)
        torch.ops.diffc.gelu_tanh(x, bias, torch.empty(4, 6))  # passes, writes nothing
        with pytest.raises(InvalidArgumentError, match="^bias"):
            torch.ops.diffc.gelu_tanh(x, torch.empty(5), torch.empty(4, 6))


def test_compiles_without_graph_breaks(counters):
    """Two destination-passing calls filling one joint q/k buffer, traced whole by torch.compile."""
    heads, dim = 2, 8
    w_txt, w_img = norm_weight(dim, torch.float32, seed=1), norm_weight(dim, torch.float32, seed=2)
    cos, sin = torch.rand(7, dim), torch.rand(7, dim)

    def joint_qk(q_txt, q_img):
        batch = q_txt.shape[0]
        q_out, k_out = q_txt.new_empty(batch, heads, 7, dim), q_txt.new_empty(batch, heads, 7, dim)
        torch.ops.diffc.qk_norm_rope_per_head(q_txt, q_txt, w_txt, w_txt, cos, sin, 1e-6, 0, q_out, k_out)
        torch.ops.diffc.qk_norm_rope_per_head(q_img, q_img, w_img, w_img, cos, sin, 1e-6, 3, q_out, k_out)
        return gelu_tanh(q_out) + k_out

    q_txt, q_img = randn(2, 3, heads, dim, seed=3), randn(2, 4, heads, dim, seed=4)
    eager = joint_qk(q_txt, q_img)
    compiled = torch.compile(joint_qk, backend="aot_eager", fullgraph=True)(q_txt, q_img)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def _launch(x: torch.Tensor, out: torch.Tensor) -> None: ...


def _fallback(x, out) -> None: ...


def _other_fallback(x, bias, out) -> None: ...


def test_register_op_refuses_incomplete_declarations():
    with pytest.raises(ValueError, match="destination passing"):
        register_op("_bad", mutates_args=(), fake=_fallback, fallback=_fallback)(_launch)
    with pytest.raises(ValueError, match="fake and a torch fallback are required"):
        register_op("_bad", mutates_args=("out",), fake=None, fallback=_fallback)(_launch)
    with pytest.raises(ValueError, match="fallback signature must equal"):
        register_op("_bad", mutates_args=("out",), fake=_fallback, fallback=_other_fallback)(_launch)
    with pytest.raises(ValueError, match=r"mutates_args \['y'\] are not arguments"):
        register_op("_bad", mutates_args=("y",), fake=_fallback, fallback=_fallback)(_launch)
    assert "_bad" not in registry.REGISTERED

