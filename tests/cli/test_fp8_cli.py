"""``diffc compile --quality fp8`` and ``diffc run --compiled`` of its artifact, on the demo FLUX model in bf16."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from diffc.cli.main import main
from tests.fp8_interpreter import round_interpreter_fp8_to_nearest

round_interpreter_fp8_to_nearest()
SMALL = ["--max-sequence-length", "8", "--dtype", "bf16"]
RUN = ["--prompt", "a kite", "--steps", "2", "--seed", "3", "--no-progress", "--dtype", "bf16"]
MIN_PSNR_DB = 30.0  # measured 47 dB on this model (2 steps, 64x64)


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("diffc-cache")


@pytest.fixture(autouse=True)
def demo_cache(module_cache, monkeypatch):
    monkeypatch.setenv("DIFFC_CACHE", str(module_cache))
    return module_cache


@pytest.fixture(scope="module")
def artifact(module_cache, tmp_path_factory):
    """``diffc compile --quality fp8 --dtype bf16`` of the demo model at 64x64: (path, exit code, stdout)."""
    out = tmp_path_factory.mktemp("compiled") / "demo-fp8.diffc"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setenv("DIFFC_CACHE", str(module_cache))
        code = main(["compile", "--out", str(out), "--height", "64", "--width", "64", "--quality", "fp8", *SMALL])
    return out, code, printed.getvalue()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


def test_compile_fp8_writes_the_quality_report(artifact):
    path, code, out = artifact
    assert code == 0, out
    assert "quality fp8, 1 shape(s)" in out
    # the adaptive norms' projections are not in the block graphs: the pipeline precomputes them for all steps
    assert ("fp8: 10 linear(s) fp8 (0 input(s) quantized on their own), 2 bf16; rel. error "
            "per layer vs bf16: attn.add_k_proj") in out
    assert "fp8: 4 linear(s) fp8 (0 input(s) quantized on their own), 1 bf16" in out
    assert "kept bf16 (not worth quantizing on its own): proj_out" in out
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["passes"]["tier"] == "fp8" and manifest["weights"]["quantization"] == "fp8"
    (bucket,) = manifest["stages"]["transformer"]["buckets"]
    assert bucket["matches"]["fp8_linear"] == 10 + 2 * 4  # one double block, two single blocks
    summary = bucket["fp8"]
    assert (summary["linears_fp8"], summary["linears_bf16"]) == (18, 4)
    assert 0 < summary["per_forward_rel_err"] == bucket["rel_err_vs_eager"] < 0.05
    assert 0 < summary["mean_layer_rel_err"] <= summary["max_layer_rel_err"] < 0.1
    # self-attention on fp8 (the CPU runs the kernel's reference): every block's, with its error
    assert "fp8 attention rel. error vs bf16: attn" in out
    assert summary["attention_fp8"] == 3 and 0 < summary["max_attention_rel_err"] < 0.15
    regions = {r["region"]: r for r in bucket["regions"]}
    graph = (path / regions["single_transformer_blocks"]["file"]).read_text()
    assert "diffc.attention_flashinfer_fp8.default" in graph and "diffc.qk_fp8_head_scales.default" in graph
    assert set(regions["single_transformer_blocks"]["fp8"]["rel_err"]) == {
        "attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight", "proj_mlp.weight"}
    # weights are never stored: the graph records the fp8 buffers' names, shapes and dtypes only
    program = json.loads((path / regions["transformer_blocks"]["file"]).read_text())
    assert program["state"]["attn.to_q.weight_fp8"] == {"shape": [32, 32], "dtype": "float8_e4m3fn", "kind": "buffer"}
    assert not any(p.suffix == ".safetensors" and p.stat().st_size > 200_000 for p in path.rglob("*"))


def test_run_compiled_fp8_is_close_to_bf16_eager(artifact, tmp_path, capsys):
    path = artifact[0]
    image, eager, perf = tmp_path / "fp8.png", tmp_path / "eager.png", tmp_path / "perf.json"
    code = main(["run", "--compiled", str(path), *RUN, "-o", str(image), "--perf-dump-path", str(perf)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "no graph" not in captured.err
    dit = json.loads(perf.read_text())["runtime"]["dit"]["transformer"]
    assert "weights: fp8" in dit["layers"] and dit["transforms"][0]["linears"] == 26
    assert dit["compiled"]["tier"] == "fp8" and (dit["compiled"]["compiled_calls"], dit["compiled"]["eager_fallbacks"]) == (2, 0)
    assert main(["run", *RUN, "--height", "64", "--width", "64", "--max-sequence-length", "8", "-o", str(eager)]) == 0
    a, b = np.asarray(Image.open(image)), np.asarray(Image.open(eager))
    assert a.shape == b.shape == (64, 64, 3) and not np.array_equal(a, b)  # fp8 really ran
    assert _psnr(a, b) >= MIN_PSNR_DB


@pytest.mark.parametrize("argv,fragment", [
    (["--quality", "int4"], "invalid choice: 'int4' (choose from "),  # then the choices, quoted or not
    (["--quality", "fp8", "--dtype", "fp32"], "quality: fp8 compiles bf16 models (its GEMMs write bf16); "
                                              "this pipeline runs in float32"),
])
def test_compile_bad_quality_exits_2(tmp_path, capsys, argv, fragment):
    out = tmp_path / "bad.diffc"
    try:
        code = main(["compile", "--out", str(out), *argv])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and fragment in err, err
    assert "invalid choice" not in fragment or all(name in err for name in ("lossless", "fast", "fp8"))
    assert not out.exists()


def test_api_refuses_an_unknown_quality():
    import diffc
    from diffc.demo import demo_checkpoint

    pipe = diffc.load(demo_checkpoint("flux"), dtype="bf16")
    with pytest.raises(diffc.InvalidArgumentError) as exc:
        pipe.compile([{"height": 64, "width": 64}], quality="fp4")
    assert exc.value.field == "quality" and "lossless, fast, fp8" in str(exc.value)


def test_load_compiled_fp8_through_the_api_with_its_warm_up(artifact):
    """``load_compiled`` applies the fp8 weight transform; its warm-up (on CUDA by default, forced here) runs
    each compiled shape's DiT call once at load and leaves the counters at zero for the first generation."""
    import diffc
    from diffc.demo import demo_checkpoint

    pipe = diffc.load(demo_checkpoint("flux"), dtype="bf16")
    assert pipe.warmup_report is None and pipe.executor.weight_quantization() is None
    pipe.load_compiled(str(artifact[0]))
    assert pipe.warmup_report == {"skipped": "warm-up runs on CUDA devices (here cpu)"}
    assert pipe.executor.weight_quantization() == "fp8"
    pipe.load_compiled(str(artifact[0]), warmup=True)
    assert (pipe.warmup_report["buckets"], pipe.warmup_report["dit_calls"]) == (1, 1)
    compiled = pipe.executor.compiled()
    assert (compiled.counters.compiled_calls, compiled.counters.region_calls) == (0, 0)
    pipe.generate("a kite", height=64, width=64, num_inference_steps=2, max_sequence_length=8, progress=False)
    assert (compiled.counters.compiled_calls, compiled.counters.eager_fallbacks) == (2, 0)


def test_compile_fp8_where_fp8_gemms_cannot_run_exits_2(tmp_path, capsys, monkeypatch):
    """A torch or device without rowwise-scaled fp8 GEMMs (torch < 2.12 on the CPU, a GPU older than sm89):
    one line naming ``quality`` before any work, no artifact, instead of torch's error from inside a GEMM."""
    import torch

    from diffc.ops import fp8

    def refuse(*args, **kwargs):
        raise RuntimeError("Now _scaled_mm only supports per-tensor scaling for CPU backend.")

    fp8._scaled_mm_refusal.cache_clear()
    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    out = tmp_path / "fp8.diffc"
    try:
        code = main(["compile", "--out", str(out), "--height", "64", "--width", "64", "--quality", "fp8", *SMALL])
    finally:
        fp8._scaled_mm_refusal.cache_clear()
    err = capsys.readouterr().err
    assert code == 2 and "quality: the fp8 tier cannot run here: torch" in err and "per-tensor scaling" in err, err
    assert "use --quality fast" in err and "Traceback" not in err
    assert not out.exists()


def test_fp8_gemms_need_sm89_or_newer(monkeypatch):
    import torch

    from diffc.ops.fp8 import fp8_gemm_unavailable

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    why = fp8_gemm_unavailable(torch.device("cuda"))
    assert "compute capability 8.9 or newer" in why and "sm80" in why


def test_a_torch_without_fast_accumulation_is_found_by_the_probe(monkeypatch):
    """The fp8 tier's GEMMs pass use_fast_accum (``--disable fp8_fast_accum``: not): a torch that refuses either form
    is found by the probe, so the tier stops before any work instead of inside a GEMM."""
    import torch

    from diffc.ops import fp8

    real = torch._scaled_mm

    def no_fast(*args, **kwargs):
        if args[7:8] == (True,) or kwargs.get("use_fast_accum"):
            raise RuntimeError("fast accumulation is not supported here")
        return real(*args, **kwargs)

    fp8._scaled_mm_refusal.cache_clear()
    try:
        assert fp8.fp8_gemm_unavailable(torch.device("cpu")) is None  # this torch runs both
        monkeypatch.setattr(torch, "_scaled_mm", no_fast)
        fp8._scaled_mm_refusal.cache_clear()
        why = fp8.fp8_gemm_unavailable(torch.device("cpu"))
    finally:
        fp8._scaled_mm_refusal.cache_clear()
    assert why is not None and "fast accumulation is not supported here" in why
