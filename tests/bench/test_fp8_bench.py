"""The bench's fp8 configuration: registered on GPUs, compared with diffc's bf16 output, shown in the table.
(Its numbers come from a GPU run: the command is in bench/README.md.)"""

from __future__ import annotations

import pytest
import torch


def test_fp8_config_runs_on_gpus_against_the_bf16_compiled_output():
    from bench.compare import CONFIGS, select_configs

    config = CONFIGS["diffc-compiled-fp8"]
    assert config.base == "diffc-compiled" and config.cache is None and not config.dit_only
    assert "diffc-compiled-fp8" in [c.name for c in select_configs(None, torch.device("cuda"))]
    assert "diffc-compiled-fp8" not in [c.name for c in select_configs(None, torch.device("cpu"))]
    names = [c.name for c in select_configs("diffc-compiled-fp8,diffc-compiled", torch.device("cpu"))]
    assert names == ["diffc-compiled", "diffc-compiled-fp8"]  # the bf16 base runs first


def test_report_shows_the_psnr_against_bf16():
    from bench.report import _rows

    result = {"reference": "diffusers-eager", "configs": {
        "diffusers-eager": {"engine": "diffusers", "dit_forward_ms": {"median": 100.0}},
        "diffc-compiled": {"engine": "diffc", "dit_forward_ms": {"median": 80.0}, "psnr_db": 48.2},
        "diffc-compiled-fp8": {"engine": "diffc", "dit_forward_ms": {"median": 60.0}, "psnr_db": 33.1,
                               "psnr_vs_base_db": 34.5},
    }}
    rows = {r["config"]: r for r in _rows(result)}
    assert rows["diffc-compiled-fp8"]["PSNR dB"] == "33.1 (34.5 vs bf16)"
    assert rows["diffc-compiled"]["PSNR dB"] == "48.2"


def test_fp8_memory_bench_says_it_needs_a_gpu():
    import torch

    from bench import fp8_memory

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the bench would run")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        fp8_memory.main([])
