"""The fused-op micro-benchmark modules: every ``bench/ops/bench_<op>.py`` with cases is in the pytest-benchmark
run, and the fp8 quantization cases agree with their references (small sizes, on the CPU)."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

import bench.ops
from bench.ops import test_ops_benchmark


def test_every_op_module_is_benchmarked():
    found = {p.stem for p in Path(bench.ops.__file__).parent.glob("bench_*.py")
             if hasattr(importlib.import_module(f"bench.ops.{p.stem}"), "cases")}
    assert found == set(test_ops_benchmark.MODULES)


def test_fp8_quant_cases_match_their_references(monkeypatch):
    from bench.ops import bench_fp8_quant as b

    monkeypatch.setattr(b, "ROWS", {"small": (6, 40)})
    monkeypatch.setattr(b, "HEADS", {"small": (5, 3)})
    monkeypatch.setattr(b, "GELU", {"small": (6, 48)})
    monkeypatch.setattr(b, "CATS", {"small": (6, 16, 40)})
    monkeypatch.setattr(b, "HEAD_CATS", {"small": (3, 4, 2)})
    for case in b.cases(torch.bfloat16, device="cpu"):
        case.fused()
        for out, ref in zip(case.outs, case.ref(*case.args)):
            assert out.shape == ref.shape and out.dtype == ref.dtype, case.name
            if out.dtype == torch.float32 and "gelu" in case.name:  # GELU values may round differently (tanh vs exp)
                torch.testing.assert_close(out, ref, rtol=2 ** -7, atol=0)
            elif out.dtype == torch.float32:  # scales: the same reduction, exactly
                assert torch.equal(out, ref), case.name


def test_channel_norm_cases_match_their_references(monkeypatch):
    from bench.ops import bench_channel_norm as b

    monkeypatch.setattr(b, "SIZES", {"small": (40, 2, 3, 70)})
    for case in b.cases(torch.float32, device="cpu"):
        case.fused()
        (out,), ref = case.outs, case.ref(*case.args)
        assert out.shape == ref.shape, case.name
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_gemv_cases_match_their_references(monkeypatch):
    from bench.ops import bench_gemv as b

    monkeypatch.setattr(b, "SHAPES", {"small": (1, 64, 40), "two rows": (2, 64, 40)})
    cases = b.cases(torch.bfloat16, device="cpu")
    assert [c.name for c in cases] == ["small weights", "small fp8 weights"]  # one row only, both weights
    for case in cases:
        case.fused()
        (out,), ref = case.outs, case.ref(*case.args)
        torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=1e-2)


def test_compare_csrc_sources_names_a_bad_old_folder(tmp_path, monkeypatch):
    import pytest

    from bench.ops import compare_csrc_sources

    monkeypatch.setattr("sys.argv", ["compare_csrc_sources", "--old", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"^--old: .* holds no common\.cuh; expected a csrc/ folder"):
        compare_csrc_sources.main()
