"""The fp8 tier on a GPU with fp8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell): the fused
fp8 producers compiled by Triton, ``_scaled_mm``'s rowwise mode with a bf16 bias, a tiny DiT compiled fp8
against bf16 eager, the demo pipeline's artifact round trip under CUDA graphs, and one FLUX.1-dev block at
real width (random weights) for the quality figure. Skipped elsewhere.

Run: ``python -m pytest tests/runtime/test_fp8_gpu.py -q``
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a CUDA GPU with fp8 tensor cores (compute capability 8.9 or newer)")

CUDA, BF16 = torch.device("cuda"), torch.bfloat16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _sample(out):
    return out[0] if isinstance(out, tuple) else getattr(out, "sample", out)


def _psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float(((out.float() - ref.float()) ** 2).mean())
    return 10 * np.log10(float(ref.float().abs().max()) ** 2 / max(mse, 1e-20))


def test_producers_on_gpu_match_the_reference():
    from diffc.ops.adaln_modulate import adaln_modulate_fp8, adaln_modulate_ref
    from diffc.ops.fp8 import dequantize_rows, quantize_rows_ref
    from diffc.ops.gated_residual import gated_residual_adaln_ref
    from diffc.ops.gelu_tanh import gelu_tanh_fp8, gelu_tanh_ref
    from diffc.ops.registry import COUNTERS

    g = torch.Generator(device=CUDA).manual_seed(0)
    x = torch.randn(2, 4608, 3072, device=CUDA, generator=g).to(BF16)  # FLUX.1 1024x1024 + 512 text tokens
    scale, shift = ((0.3 * torch.randn(2, 1, 3072, device=CUDA, generator=g)).to(BF16) for _ in range(2))
    COUNTERS.reset()
    q, s = adaln_modulate_fp8(x, scale, shift)
    exact = adaln_modulate_ref(x, scale, shift)
    ref_q, ref_s = quantize_rows_ref(exact)
    torch.testing.assert_close(s, ref_s, rtol=1e-2, atol=0)
    # the fused kernel's rounding may flip values on an fp8 step boundary the reference rounds the other way
    # (the modulation's float order differs): it must be as close to the exact values as the reference is
    err, ref_err = _rel(dequantize_rows(q, s), exact), _rel(dequantize_rows(ref_q, ref_s), exact)
    assert err < 1.1 * ref_err and ref_err < 0.05, (err, ref_err)
    h = torch.randn(4608, 12288, device=CUDA, generator=g).to(BF16)
    bias = torch.randn(12288, device=CUDA, generator=g).to(BF16)
    q, s = gelu_tanh_fp8(h, bias)
    exact = gelu_tanh_ref(h, bias)
    ref_q, ref_s = quantize_rows_ref(exact)
    err, ref_err = _rel(dequantize_rows(q, s), exact), _rel(dequantize_rows(ref_q, ref_s), exact)
    assert err < 1.1 * ref_err and ref_err < 0.05, (err, ref_err)
    y, gate = torch.randn_like(x), scale
    residual = torch.empty_like(x)
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=CUDA)
    out_s = torch.empty(x.shape[0] * x.shape[1], 1, device=CUDA)
    torch.ops.diffc.gated_residual_adaln_fp8(x, y, gate, scale, shift, 1e-6, residual, out, out_s)
    ref_res, ref_mod = gated_residual_adaln_ref(x, y, gate, scale, shift)
    torch.testing.assert_close(residual, ref_res, rtol=8e-3, atol=8e-3)
    ref_q, ref_s = quantize_rows_ref(ref_mod)
    err, ref_err = _rel(dequantize_rows(out, out_s), ref_mod), _rel(dequantize_rows(ref_q, ref_s), ref_mod)
    assert err < 1.1 * ref_err and ref_err < 0.05, (err, ref_err)
    assert COUNTERS.kernel_launches == 3 and COUNTERS.reference_fallbacks == 0


@pytest.mark.parametrize("bias", [True, False])
def test_scaled_mm_rowwise_with_bias(bias):
    """The call the lowering emits, at a FLUX qkv shape: (M, 1) x (1, N) float32 scales, bf16 bias and output."""
    from diffc.ops.fp8 import fp8_linear_ref, quantize_rows_ref, quantize_weight

    g = torch.Generator(device=CUDA).manual_seed(1)
    x = torch.randn(4608, 3072, device=CUDA, generator=g).to(BF16)
    w = (0.02 * torch.randn(9216, 3072, device=CUDA, generator=g)).to(BF16)
    b = torch.randn(9216, device=CUDA, generator=g).to(BF16) if bias else None
    q, qs = quantize_rows_ref(x)
    w8, ws = quantize_weight(w)
    y = torch.ops.aten._scaled_mm.default(q, w8.t(), qs, ws, b, None, BF16, False)
    assert _rel(y, fp8_linear_ref(q, qs, w8, ws, b, torch.float32)) < 1e-2
    assert _rel(y, torch.nn.functional.linear(x, w, b)) < 0.06


def test_tiny_flux_dit_compiled_fp8_on_gpu():
    from diffc.compile.pipeline import _installed, compile_dit
    from diffc.compile.regions import dit_regions
    from diffc.runtime.fp8 import Fp8Weights
    from tests.compile.conftest import build

    net, inputs = build("flux", BF16)
    net = net.to(CUDA)
    inputs = {k: v.to(CUDA) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        eager = net(**inputs)
    Fp8Weights(net).apply()
    graphs: dict = {}
    report = compile_dit(net, inputs, graphs=graphs, device=CUDA, dtype=BF16, tier="fp8")
    assert [r.matches["fp8_linear"] for r in report.regions] == [10, 4]
    with _installed(dit_regions(net), graphs), torch.no_grad():
        out = net(**inputs)
    out, eager = (o[0] if isinstance(o, tuple) else getattr(o, "sample", o) for o in (out, eager))
    assert report.rel_err_vs_eager < 0.05 and _psnr(out, eager) >= 30


def test_flux_dev_block_at_real_width():
    """One FLUX.1-dev double-stream block (dim 3072, 24 heads, FFN 12288, 4,096 + 512 tokens), random weights:
    the per-layer report and the block's error (the issue's quality figure at real size)."""
    import dataclasses

    from diffc.compile.pipeline import compile_dit
    from diffc.models.flux.transformer import FLUX_TRANSFORMER_SPECS, FluxTransformer2DModel
    from diffc.runtime.fp8 import Fp8Weights

    spec = next((s for k, s in FLUX_TRANSFORMER_SPECS.items() if "dev" in k), None)
    if spec is None:
        pytest.skip("no FLUX.1-dev spec")
    torch.manual_seed(0)
    config = dataclasses.replace(spec, num_layers=1, num_single_layers=1)
    net = FluxTransformer2DModel(config).to(CUDA, BF16).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(64, 64, 3)
    ids[..., 1], ids[..., 2] = torch.arange(64)[:, None], torch.arange(64)[None, :]
    inputs = {"hidden_states": torch.randn(1, 4096, config.in_channels, generator=g).to(CUDA, BF16),
              "encoder_hidden_states": torch.randn(1, 512, config.joint_attention_dim, generator=g).to(CUDA, BF16),
              "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=g).to(CUDA, BF16),
              "timestep": torch.tensor([0.5], device=CUDA, dtype=BF16), "img_ids": ids.reshape(-1, 3).to(CUDA, BF16),
              "txt_ids": torch.zeros(512, 3, device=CUDA, dtype=BF16)}
    if config.guidance_embeds:
        inputs["guidance"] = torch.tensor([3.5], device=CUDA, dtype=BF16)
    Fp8Weights(net).apply()
    # attention="sdpa": the bf16 attention left (none here) is not measured, so no optional kernel is built
    report = compile_dit(net, inputs, graphs={}, device=CUDA, dtype=BF16, tier="fp8", attention="sdpa")
    print(json.dumps({r.region: r.fp8 for r in report.regions}, indent=1), "\nper forward", report.rel_err_vs_eager)
    assert report.rel_err_vs_eager < 0.05
    assert all(r.fp8["max_rel_err"] < 0.08 for r in report.regions)
    # the attention output projection over 4,096 image tokens and the single block's proj_out pay for their
    # own quantization pass; the text tokens' to_add_out does not
    double, single = report.regions
    assert "attn.to_out.0.weight" in double.fp8["rel_err"] and "attn.to_add_out.weight" in double.fp8["kept_bf16"]
    assert "proj_out.weight" in single.fp8["rel_err"]
    from diffc.compile.fp8_attention import fp8_attention_unavailable

    if fp8_attention_unavailable(CUDA) is None:  # flashinfer on a Hopper GPU: both blocks' attention in fp8
        assert [r.fp8["attention_fp8"] for r in report.regions] == [1, 1]
        assert all(0 < e < 0.1 for r in report.regions for e in r.fp8["attention_rel_err"].values())


@pytest.mark.parametrize("source", ["memory", "checkpoint"])
def test_compiled_fp8_dit_keeps_the_unread_bf16_weights_on_the_host(source, tmp_path):
    """FLUX.1-dev's width (one block of each kind, random weights, a small image): once the fp8 graphs are
    installed, the bf16 weights they do not read leave the GPU (the memory drops by their bytes), the output is
    unchanged, an uncompiled shape runs on the fp8 copies, and removing the tier brings the exact weights back.
    Built in memory, the originals are copied to the host; loaded from a bf16 checkpoint, they map its file."""
    import dataclasses

    from diffc.compile.pipeline import _installed, compile_dit
    from diffc.compile.regions import dit_regions
    from diffc.models.flux.transformer import FLUX_TRANSFORMER_SPECS, FluxTransformer2DModel
    from diffc.runtime.compiled import CompiledDiT
    from diffc.runtime.dit_stack import DiTStack

    spec = next((s for k, s in FLUX_TRANSFORMER_SPECS.items() if "dev" in k), None)
    if spec is None:
        pytest.skip("no FLUX.1-dev spec")
    torch.manual_seed(0)
    config = dataclasses.replace(spec, num_layers=2, num_single_layers=2)
    net = FluxTransformer2DModel(config).to(CUDA, BF16).eval().requires_grad_(False)
    if source == "checkpoint":
        from diffc.demo.writer import save_native
        from diffc.loader.components import load_native_model

        save_native(tmp_path / "transformer", "FluxTransformer2DModel", net)
        del net
        net = load_native_model(tmp_path / "transformer", "FluxTransformer2DModel", CUDA, BF16)

    def inputs(side: int, text: int) -> dict:
        g = torch.Generator().manual_seed(side)
        ids = torch.zeros(side, side, 3)
        ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
        out = {"hidden_states": torch.randn(1, side * side, config.in_channels, generator=g).to(CUDA, BF16),
               "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim, generator=g).to(CUDA, BF16),
               "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=g).to(CUDA, BF16),
               "timestep": torch.tensor([0.5], device=CUDA, dtype=BF16),
               "img_ids": ids.reshape(-1, 3).to(CUDA, BF16), "txt_ids": torch.zeros(text, 3, device=CUDA, dtype=BF16)}
        if config.guidance_embeds:
            out["guidance"] = torch.tensor([3.5], device=CUDA, dtype=BF16)
        return out

    small, other = inputs(32, 128), inputs(24, 96)
    stack = DiTStack("transformer", net, CUDA, cuda_graphs=False)
    originals = {k: v.detach().to("cpu", copy=True) for k, v in net.named_parameters()}
    with torch.no_grad():
        eager_other = _sample(stack(**other))
    stack.set_weight_quantization("fp8")
    graphs: dict = {}
    with stack.bare() as eager:
        report = compile_dit(eager, small, graphs=graphs, device=CUDA, dtype=BF16, tier="fp8", attention="sdpa")
    fp8 = stack._fp8()
    with torch.no_grad(), _installed(dit_regions(net), graphs):
        ref = _sample(net(**small))  # the graphs with every weight on the device
    torch.cuda.synchronize()
    full = torch.cuda.memory_allocated()
    stack.set_compiled(CompiledDiT(graphs, [report.key], {"tier": "fp8"}))
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    moved = fp8.host_bytes() + fp8.host_bytes(mapped=True)
    assert fp8.mapped == (fp8.released if source == "checkpoint" else set())
    linear_bytes = sum(m.weight.numel() * 2 for m in fp8.linears.values())
    assert moved > 0.8 * linear_bytes and full - resident >= moved, (moved, linear_bytes, full - resident)
    assert fp8.describe()["originals_on_host"] == len(fp8.released) and all(
        fp8.linears[n].weight.device.type == "cpu" for n in fp8.released)
    with torch.no_grad():
        again = _sample(stack(**small))
        fell_back = _sample(stack(**other))  # no graph for this shape: the blocks run eagerly on the fp8 copies
    assert torch.equal(again, ref)
    assert stack.compiled.counters.eager_fallbacks == 1
    assert _psnr(fell_back, eager_other) >= 30 and not torch.equal(fell_back, eager_other)
    stack.set_weight_quantization(None)
    assert not fp8.released
    assert all(torch.equal(v.to("cpu"), originals[k]) and v.device.type == "cuda" for k, v in net.named_parameters())


def test_demo_artifact_round_trip_with_cuda_graphs(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from diffc.cli.main import main

    monkeypatch.setenv("DIFFC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "fp8.diffc"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["compile", "--out", str(out), "--device", "cuda", "--height", "256", "--width", "256",
                     "--quality", "fp8"]) == 0
    run = ["--prompt", "a kite", "--steps", "4", "--seed", "3", "--no-progress"]
    perf = tmp_path / "perf.json"
    assert main(["run", "--compiled", str(out), *run, "-o", str(tmp_path / "fp8.png"), "--perf-dump-path", str(perf)]) == 0
    assert main(["run", *run, "--device", "cuda", "--height", "256", "--width", "256",
                 "-o", str(tmp_path / "bf16.png")]) == 0
    capsys.readouterr()
    dump = json.loads(perf.read_text())
    dit = dump["runtime"]["dit"]["transformer"]
    assert "weights: fp8" in dit["layers"] and dit["cuda_graphs"].get("enabled", True) is not False
    (fp8,) = [t for t in dit["transforms"] if t.get("kind") == "fp8"]
    # the bf16 weights the graphs do not read; the demo checkpoint is float32, so they are converted copies
    assert fp8["originals_on_host"] > 0 and fp8["host_bytes"] > 0 and fp8["originals_mapped"] == 0
    assert dit["compiled"]["eager_fallbacks"] == 0 and dit["compiled"]["compiled_calls"] == 4
    assert dump["warmup"]["dit_calls"] == 1  # the CUDA graph was captured at load
    print("step ms (first step after a warmed-up load first):", dump.get("step_ms"))
    a = np.asarray(Image.open(tmp_path / "fp8.png")).astype(np.float64)
    b = np.asarray(Image.open(tmp_path / "bf16.png")).astype(np.float64)
    assert 10 * np.log10(255 ** 2 / max(((a - b) ** 2).mean(), 1e-12)) >= 30
