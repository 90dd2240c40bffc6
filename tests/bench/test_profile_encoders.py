"""``python -m bench.profile_encoders`` on the tiny FLUX.1 spec on the CPU: each text encoder timed, both files
written; the contiguous-masks variant through ``EncoderGraphs`` on a T5. (On a GPU it replays the encoders' CUDA
graphs and adds their top kernels; the real-size command is in bench/README.md.)"""

from __future__ import annotations

import json

import pytest
import torch

from bench.profile_encoders import build_encoder, main, measure, prompt_ids
from bench.specs import SPECS


@pytest.fixture(autouse=True)
def keep_library_logging(monkeypatch):
    """The tool quiets diffc's, diffusers' and transformers' loggers for the process; not for the tests after."""
    monkeypatch.setattr("bench.profile_encoders.quiet_libraries", lambda: None)


def test_profile_encoders_times_each_encoder_and_writes_its_files(tmp_path, capsys):
    assert main(["--model", "flux-tiny", "--device", "cpu", "--variants", "eager", "--repeats", "2",
                 "--out-dir", str(tmp_path)]) == 0
    (written,) = tmp_path.glob("cpu-*-flux-tiny-encoders.json")
    result = json.loads(written.read_text())
    encoders = result["encoders"]
    assert set(encoders) == {"text_encoder", "text_encoder_2"}
    assert encoders["text_encoder"]["tokens"] == 77 and encoders["text_encoder_2"]["tokens"] == 16  # CLIP, T5
    assert all(e["variants"]["eager"]["ms"] > 0 for e in encoders.values())
    assert written.with_suffix(".md").exists() and "median of 2 encodes" in capsys.readouterr().out


def test_the_graph_variants_need_a_gpu_and_known_names(tmp_path):
    with pytest.raises(SystemExit):
        main(["--model", "flux-tiny", "--device", "cpu", "--variants", "eager,graphs", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--model", "flux-tiny", "--device", "cpu", "--variants", "eager,compiled", "--out-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_measure_runs_the_masks_variant_on_the_same_weights():
    """The contiguous-masks variant switches the mode on and off around its runs; its output is eager's (the
    installed transformers hands the mode nothing to copy, or the copy's values)."""
    spec = next(e for e in SPECS["flux-tiny"].text_encoders if e.model_class == "T5EncoderModel")
    model = build_encoder(spec, torch.device("cpu"), torch.float32)
    ids = prompt_ids(spec, model, 16, torch.device("cpu"))
    measured = measure(model, ids, ["eager", "graphs+masks"], 1, torch.device("cpu"))
    assert measured["graphs+masks"]["rel_diff_vs_first"] < 1e-5 and measured["eager"]["ms"] > 0
    assert not model._forward_pre_hooks and not model._forward_hooks
