"""CPU smoke test of the benchmark harness: bench.compare end to end on tiny specs (no timings asserted)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.report import markdown, summary_text

pytest.importorskip("diffusers")
REPO = Path(__file__).resolve().parents[2]
CONFIG_KEYS = {"engine", "load", "dit_forward_ms", "dit_first_call_s", "dit_peak_gb", "dit_tflops", "dit_ceiling_frac",
               "dit_output_finite", "vae_decode_ms", "text_encode_ms", "e2e_s", "step_ms", "e2e_peak_gb"}


def run_compare(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "bench.compare", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def results(out_dir: Path, model: str) -> tuple[dict, Path]:
    (path,) = out_dir.glob(f"cpu-*-{model}.json")
    return json.loads(path.read_text()), path


@pytest.mark.parametrize("model,steps", [("flux-tiny", 3), ("wan-tiny", 2)])
def test_end_to_end_on_cpu(tmp_path, model, steps):
    out, ckpt = tmp_path / "results", tmp_path / "ckpt" / model
    proc = run_compare("--model", model, "--out-dir", str(out), "--ckpt-dir", str(ckpt), "--steps", str(steps),
                       "--repeats", "2", "--warmup", "1")
    data, path = results(out, model)
    assert {"env", "workload", "flops", "matmul_ceiling", "checkpoint", "configs", "reference"} <= set(data)
    assert data["env"]["gpu"] == "cpu" and data["env"]["torch"] and "bench.compare" in data["env"]["command"]
    # no torch.compile, CUDA graphs or per-pass ablations on a CPU unless asked; diffc's compiler runs
    assert list(data["configs"]) == ["diffusers-eager", "diffc-eager", "diffc-compiled"]
    assert data["reference"] == "diffusers-eager" and data["checkpoint"]["built"]
    for name, r in data["configs"].items():
        assert "error" not in r, r.get("traceback")
        assert CONFIG_KEYS <= set(r), sorted(CONFIG_KEYS - set(r))
        assert r["dit_output_finite"] and r["step_ms"]["n"] == steps
    for name in ("diffc-eager", "diffc-compiled"):
        diffc = data["configs"][name]
        assert float(diffc["psnr_db"]) > 35.0  # fp32 on CPU: the same picture ("inf" when bit-identical)
        assert diffc["dit_rel_err"] < 1e-4 and diffc["vae_rel_err"] < 1e-4
    assert data["configs"]["diffc-compiled"]["setup"].startswith("diffc compile: transformer")
    # what the attention selection measured per shape: its pick and each candidate's time (CPU: torch's kernels)
    selection = data["configs"]["diffc-compiled"]["attention_selection"]
    assert selection and len({str(s["shape"]) for s in selection}) == len(selection)
    for s in selection:
        assert s["backend"] in s["candidates"] and isinstance(s["candidates"]["sdpa"], float)
        assert s["candidates"]["fa4"] == "unavailable"  # no CUDA GPU here
    assert "attention_selection" not in data["configs"]["diffc-eager"]
    table = path.with_suffix(".md").read_text().split("## Attention selection", 1)[1]
    assert f"| diffc-compiled | {selection[0]['shape']['batch']} x " in table and "sdpa " in table
    assert path.with_suffix(".md").read_text().count("| diffc-eager |") >= 2  # main and components tables
    summary = proc.stdout[proc.stdout.index(f"== {model} on cpu"):]
    assert "diffusers-eager" in summary and "diffc-eager" in summary and "wrote " in summary
    pytest.importorskip("matplotlib")
    assert path.with_suffix(".png").stat().st_size > 1000


def test_skip_e2e_shares_weights_and_reuses_nothing_on_disk(tmp_path):
    out = tmp_path / "results"
    run_compare("--model", "flux-tiny", "--skip-e2e", "--out-dir", str(out), "--repeats", "1", "--warmup", "1",
                "--configs", "diffc-compiled-attention-sdpa_flash_cpu,diffc-eager,diffusers-eager")
    data, _ = results(out, "flux-tiny")
    # run order, whatever was asked
    assert list(data["configs"]) == ["diffusers-eager", "diffc-eager", "diffc-compiled-attention-sdpa_flash_cpu"]
    assert "checkpoint" not in data and not data["e2e"]
    diffc = data["configs"]["diffc-eager"]
    assert diffc["dit_rel_err"] < 1e-4 and "e2e_s" not in diffc and "text_encode_ms" not in diffc
    # one backend asked for by name: measured against torch's own only, as `diffc compile --attention NAME`
    forced = data["configs"]["diffc-compiled-attention-sdpa_flash_cpu"]
    assert "error" not in forced, forced.get("traceback")
    assert "--attention sdpa_flash_cpu" in forced["setup"] and forced["dit_rel_err"] < 1e-4
    assert all(set(s["candidates"]) == {"sdpa", "sdpa_flash_cpu"} for s in forced["attention_selection"])


def test_unknown_config_is_refused():
    proc = subprocess.run([sys.executable, "-m", "bench.compare", "--model", "flux-tiny", "--configs", "diffc-fast"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "diffc-fast" in proc.stderr and "diffusers-compile" in proc.stderr


def test_report_ratios_and_errors():
    def cfg(fwd, step, e2e, **extra):
        return {"dit_forward_ms": {"median": fwd}, "step_ms": {"median": step, "all": [step] * 3}, "e2e_s": e2e, **extra}

    result = {
        "model": "m", "source": "s", "dtype": "bfloat16", "reference": "diffusers-eager",
        "env": {"gpu": "NVIDIA H100", "time_utc": "t", "torch": "2", "command": "python3 -m bench.compare"},
        "workload": {"width": 64, "height": 32, "num_frames": None, "steps": 3, "guidance_scale": 1.0,
                     "max_sequence_length": 8, "seed": 0},
        "flops": {"total_tflop": 1.0, "linear_tflop": 0.75, "attention_tflop": 0.25, "forwards_per_step": 1},
        "matmul_ceiling": {"size": 8192, "dtype": "bfloat16", "tflops": 800.0},
        "configs": {"diffusers-eager": cfg(100.0, 110.0, 4.0), "diffusers-compile": cfg(80.0, 90.0, 3.0),
                    "diffc-eager": cfg(50.0, 55.0, 2.0, psnr_db=math.inf, dit_ceiling_frac=0.25),
                    "diffc-broken": {"error": "OutOfMemoryError: CUDA out of memory"}},
    }
    md = markdown(result)
    row = next(line for line in md.splitlines() if line.startswith("| diffc-eager |"))
    assert "2.00×" in row and "1.60×" in row and "25%" in row and "∞" in row
    assert "OutOfMemoryError" in md and "OutOfMemoryError" in summary_text(result)


def test_checkpoint_is_reused_and_foreign_directories_are_refused(tmp_path):
    from bench.build import ensure_checkpoint
    from bench.specs import SPECS

    out, ckpt = tmp_path / "results", tmp_path / "ckpt" / "wan-tiny"
    args = ("--model", "wan-tiny", "--out-dir", str(out), "--ckpt-dir", str(ckpt), "--configs", "diffc-eager",
            "--steps", "1", "--repeats", "1", "--warmup", "1")
    run_compare(*args)
    assert results(out, "wan-tiny")[0]["checkpoint"]["built"]
    proc = run_compare(*args)
    assert not results(out, "wan-tiny")[0]["checkpoint"]["built"] and "reusing checkpoint" in proc.stdout
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not a checkpoint")
    with pytest.raises(RuntimeError, match="not a diffc benchmark checkpoint"):
        ensure_checkpoint(SPECS["wan-tiny"], foreign, torch.device("cpu"), torch.float32)
    assert (foreign / "keep.txt").exists()


def test_step_cache_configurations_on_cpu(tmp_path):
    """Cache configurations: generation only, skip counts, PSNR against the same engine's uncached output (on
    the eager DiT: the compiled one is the same code after diffc-compiled's setup, timed in the test above)."""
    out, ckpt = tmp_path / "results", tmp_path / "ckpt" / "flux-tiny"
    proc = run_compare("--model", "flux-tiny", "--out-dir", str(out), "--ckpt-dir", str(ckpt), "--steps", "4",
                       "--repeats", "1", "--warmup", "1", "--configs",
                       "diffc-eager-dbcache-0,diffc-eager-teacache,diffc-eager-fixed-half")
    data, path = results(out, "flux-tiny")
    configs = data["configs"]
    assert list(configs) == ["diffc-eager-dbcache-0", "diffc-eager-fixed-half", "diffc-eager-teacache"]  # run order
    for name, r in configs.items():
        assert "error" not in r, r.get("traceback")
        assert {"e2e_s", "step_ms", "cache", "psnr_vs_uncached_db", "uncached_e2e_s", "speedup_vs_uncached"} <= set(r)
        assert "dit_forward_ms" not in r and r["step_ms"]["n"] == 4
    never = configs["diffc-eager-dbcache-0"]
    assert never["cache"]["forwards"] == {"computed": 4, "skipped": 0} and never["psnr_vs_uncached_db"] == "inf"
    fixed = configs["diffc-eager-fixed-half"]
    assert fixed["cache"]["skipped_steps"] == [2] and fixed["setup"] == "eager"
    assert fixed["cache"]["middle_blocks"] == {"computed": 6, "skipped": 2}
    assert 20.0 < float(fixed["psnr_vs_uncached_db"]) < math.inf
    assert configs["diffc-eager-teacache"]["cache"]["threshold"] == 0.4  # TeaCache's FLUX recommendation
    assert "## Step cache" in path.with_suffix(".md").read_text() and "step cache:" in proc.stdout


def test_cache_configurations_are_not_run_by_default():
    from bench.compare import CONFIGS, select_configs

    chosen = [c.name for c in select_configs(None, torch.device("cuda"))]
    assert "diffc-compiled" in chosen and not any(CONFIGS[n].cache for n in chosen)
    assert {"diffc-compiled-fixed-half", "diffc-compiled-teacache", "diffc-compiled-dbcache-0.08"} <= set(CONFIGS)


def test_help_names_the_configurations_a_cpu_runs_by_default(monkeypatch):
    from bench.compare import parse_args, select_configs

    monkeypatch.setenv("COLUMNS", "100000")  # argparse wraps at hyphens otherwise

    cpu = [c.name for c in select_configs(None, torch.device("cpu"))]
    assert cpu == ["diffusers-eager", "diffc-eager", "diffc-compiled"]
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
        parse_args(["--help"])
    assert "on a CPU: diffusers-eager, diffc-eager, diffc-compiled)" in out.getvalue()


def test_image_to_video_dit_is_compared_with_image_tokens(tmp_path):
    """The Wan I2V workload has no end-to-end run: the DiT (36 channels, image tokens) and the VAE only."""
    out = tmp_path / "results"
    proc = run_compare("--model", "wan2.1-i2v-tiny", "--out-dir", str(out), "--repeats", "1", "--warmup", "1",
                       "--configs", "diffusers-eager,diffc-eager,diffc-compiled")
    data, _ = results(out, "wan2.1-i2v-tiny")
    assert not data["e2e"] and "no end-to-end run" in proc.stdout
    for name in ("diffc-eager", "diffc-compiled"):
        r = data["configs"][name]
        assert "error" not in r, r.get("traceback")
        assert r["dit_rel_err"] < 1e-4 and r["dit_output_finite"]


def test_ti2v_dit_with_per_token_timesteps_and_the_wan22_vae(tmp_path):
    out = tmp_path / "results"
    run_compare("--model", "wan2.2-ti2v-tiny", "--skip-e2e", "--out-dir", str(out), "--repeats", "1", "--warmup", "1",
                "--configs", "diffusers-eager,diffc-eager,diffc-compiled")
    data, _ = results(out, "wan2.2-ti2v-tiny")
    for name in ("diffc-eager", "diffc-compiled"):
        r = data["configs"][name]
        assert "error" not in r, r.get("traceback")
        assert r["dit_rel_err"] < 1e-4 and r["vae_rel_err"] < 1e-4
    run_compare("--model", "wan2.2-ti2v-tiny", "--skip-e2e", "--skip-vae", "--out-dir", str(out / "dit"),
                "--repeats", "1", "--warmup", "1", "--configs", "diffusers-eager,diffc-eager")
    data, _ = results(out / "dit", "wan2.2-ti2v-tiny")
    assert "vae_decode_ms" not in data["configs"]["diffc-eager"] and data["configs"]["diffc-eager"]["dit_rel_err"] < 1e-4
