"""The compiler on the generic backend's whole diffusers transformer: ``diffc compile`` writes an artifact that
``diffc run --compiled`` loads; lossless gives the eager pixels, fast fuses every pass the model contains."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import diffc
from diffc.cli.main import main
from tests.generic_pipelines import REQUESTS
from tests.helpers import psnr_uint8

# Whole tiny HunyuanVideo DiT (1 dual + 1 single block, 1 token-refiner block), float32: the per-block
# counts of tests/compile/test_diffusers_blocks.py summed, plus the head: RMSNorm 4 + 2, QK-norm + RoPE 1,
# adaLN 4 + 1 (the single block), gated residuals 4 + 1 + 2 (refiner) - 2 taken by the 2 residual+norm pairs
# = 5, GELU-tanh 2 + 1, sinusoids: the timestep, the guidance and the refiner's timestep = 3.
HUNYUAN_WHOLE = {"rms_norm": 6, "qk_norm_rope": 1, "adaln_modulate": 4, "gated_residual": 5, "gelu_tanh": 3,
                 "timestep_embedding": 3, "silu_mul": 0, "gated_residual_adaln": 2}


def test_compile_cli_then_run_compiled_is_lossless(generic_checkpoint, tmp_path, capsys):
    ckpt, art = generic_checkpoint("sd3"), tmp_path / "sd3.diffc"
    assert main(["compile", "--model", str(ckpt), "--height", "32", "--width", "32", "--guidance", "4.0",
                 "--max-sequence-length", "16", "--quality", "lossless", "--device", "cpu", "--out", str(art)]) == 0
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["model"]["pipeline_class"] == "StableDiffusion3Pipeline"
    assert manifest["passes"]["tier"] == "lossless"
    outs = []
    for extra in ([], ["--compiled", str(art)]):
        out, perf = tmp_path / f"cat{len(outs)}.png", tmp_path / f"perf{len(outs)}.json"
        assert main(["run", "--model", str(ckpt), "--prompt", "a calico cat", "--height", "32", "--width", "32",
                     "--steps", "2", "--guidance", "4.0", "--seed", "3", "--max-sequence-length", "16", "--no-progress",
                     "--device", "cpu", "--output", str(out), "--perf-dump-path", str(perf), *extra]) == 0
        outs.append((np.asarray(Image.open(out)), json.loads(perf.read_text())))
    (eager, _), (compiled, dump) = outs
    assert np.array_equal(eager, compiled)
    assert dump["runtime"]["compiled"]["compiled_calls"] == 2 and dump["runtime"]["compiled"]["eager_fallbacks"] == 0
    capsys.readouterr()


def test_fast_tier_fuses_the_whole_diffusers_dit(generic_checkpoint):
    pipe = diffc.load(generic_checkpoint("hunyuan"), device="cpu")
    request = {k: v for k, v in REQUESTS["hunyuan"].items() if k != "num_inference_steps"}
    eager = pipe.generate("waves at sunset", seed=5, progress=False, **REQUESTS["hunyuan"]).frames
    report = pipe.compile([request], log=lambda line: None)
    (bucket,) = report.buckets
    assert {k: bucket.matches[k] for k in HUNYUAN_WHOLE} == HUNYUAN_WHOLE
    assert bucket.rel_err_vs_eager < 1e-4
    out = pipe.generate("waves at sunset", seed=5, progress=False, **REQUESTS["hunyuan"])
    assert out.timings.runtime["compiled"]["compiled_calls"] == REQUESTS["hunyuan"]["num_inference_steps"]
    assert psnr_uint8(out.frames, eager) >= 35.0


@pytest.mark.parametrize("flag", ["--offload", "--cuda-graphs"])
def test_runtime_flags_the_generic_backend_lacks(generic_checkpoint, flag, capsys):
    value = "layerwise" if flag == "--offload" else "on"
    code = main(["run", "--model", str(generic_checkpoint("sd3")), "--prompt", "a cat", "--device", "cpu", flag, value])
    assert code == 2 and "generic (diffusers) backend" in capsys.readouterr().err
