"""``diffc run --lora-path ...``: the LoRA's image, per-path strengths and nicknames, config keys, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import diffc
from diffc.cli.main import main
from tests.lora import writers as W

ARGS = ["--prompt", "a red fox", "--height", "32", "--width", "32", "--steps", "2", "--seed", "4",
        "--max-sequence-length", "16", "--no-progress"]


@pytest.fixture(scope="module")
def setup(flux_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-lora")
    ckpt = flux_checkpoint("dev-tiny")
    dit = diffc.load(ckpt, device="cpu").components["transformer"]
    a = W.write_flux_kohya(W.random_lora(dit, W.linear_modules(dit), seed=11, magnitude=0.3), 1, 2,
                           root / "style.safetensors")
    b = W.write_keys(W.diffusers_with_alpha_keys(W.random_lora(dit, W.linear_modules(dit), seed=12, magnitude=0.3)),
                     root / "b" / "style.safetensors")
    return ckpt, a, b


def _image(path):
    return np.asarray(Image.open(path))


def _python(ckpt, **lora):
    pipe = diffc.load(ckpt, device="cpu")
    pipe.set_lora(**lora)
    return np.asarray(pipe.generate("a red fox", height=32, width=32, num_inference_steps=2, seed=4,
                                    max_sequence_length=16, progress=False).images[0])


def test_run_with_two_loras_matches_the_python_api(setup, tmp_path, capsys):
    ckpt, a, b = setup
    out, perf = tmp_path / "lora.png", tmp_path / "perf.json"
    code = main(["run", "--model", str(ckpt), *ARGS, "--output", str(out), "--perf-dump-path", str(perf),
                 "--lora-path", str(a), "--lora-path", str(b), "--lora-strength", "0.8", "--lora-strength", "-0.5",
                 "--lora-nickname", "one", "--lora-nickname", "two"])
    assert code == 0, capsys.readouterr().err
    want = _python(ckpt, nickname=["one", "two"], path=[a, b], strength=[0.8, -0.5])
    assert np.array_equal(_image(out), want)
    assert json.loads(perf.read_text())["lora"]["transformer"] == [
        {"nickname": "one", "path": str(a), "strength": 0.8, "merged": True},
        {"nickname": "two", "path": str(b), "strength": -0.5, "merged": True}]


def test_lora_options_from_a_config_file(setup, tmp_path, capsys):
    ckpt, a, _ = setup
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"lora_path": str(a), "lora-strength": 1.5}))
    out = tmp_path / "cfg.png"
    assert main(["run", "--model", str(ckpt), *ARGS, "--config", str(cfg), "--output", str(out)]) == 0
    assert np.array_equal(_image(out), _python(ckpt, nickname="style", path=a, strength=1.5))


@pytest.mark.parametrize("extra,message", [
    (["--lora-strength", "0.5"], "--lora-strength: applies to the adapters of --lora-path"),
    (["--lora-path", "A", "--lora-path", "B"], "the files' names repeat"),
    (["--lora-path", "A", "--lora-strength", "x"], "--lora-strength: must be a number, got 'x'"),
    (["--lora-path", "A", "--lora-path", "B", "--lora-nickname", "n"], "one nickname per --lora-path"),
    (["--lora-path", "A", "--lora-path", "B", "--lora-nickname", "n", "--lora-nickname", "m",
      "--lora-strength", "1", "--lora-strength", "2", "--lora-strength", "3"], "one value for all 2 --lora-path"),
    (["--lora-path", "A", "--lora-target", "transformer_2"], "--lora-target: this pipeline has no 'transformer_2'"),
    (["--lora-path", "missing.safetensors"], "--lora-path: file not found: missing.safetensors"),
    (["--lora-path", ""], "--lora-path: must be a LoRA .safetensors file or folder, got ''"),
    (["--lora-path", "A", "--lora-path", " "], "--lora-path: must be a LoRA .safetensors file or folder, got ' '"),
])
def test_lora_flag_errors(setup, tmp_path, capsys, extra, message):
    ckpt, a, b = setup
    extra = [str(a) if x == "A" else str(b) if x == "B" else x for x in extra]
    code = main(["run", "--model", str(ckpt), *ARGS, "--output", str(tmp_path / "x.png"), *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "lora_nickname" not in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("name,message", [
    ("missing.safetensors", "--lora-path: file not found: "),
    ("lora.bin", "pickled checkpoints (.bin) are never loaded"),
    ("empty", "the folder holds no .safetensors file"),
])
def test_lora_paths_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch, name, message):
    """Found by an audit: a missing or pickled --lora-path was found only after the model had loaded (and, for serve,
    after the port was bound)."""
    from diffc.loader import pipeline as pipeline_loader

    (tmp_path / "lora.bin").write_bytes(b"\x80\x04K\x01.")
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(pipeline_loader, "load", lambda *a, **k: pytest.fail("the model loaded first"))
    code = main(["run", *ARGS, "--output", str(tmp_path / "x.png"), "--lora-path", str(tmp_path / name)])
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--lora-strength", "nan"], "--lora-strength: must be a finite number from -1000 to 1000, got nan"),
    (["--lora-strength", "1e400"], "--lora-strength: must be a finite number from -1000 to 1000, got inf"),
    (["--lora-strength", "1e6"], "--lora-strength: must be a finite number from -1000 to 1000, got 1000000.0"),
    (["--lora-nickname", ""], "--lora-nickname: must be a non-empty string, got ''"),
    (["--lora-nickname", "a\nb"], "--lora-nickname: must be at most 128 printable characters"),
    (["--lora-target", "dit"], "--lora-target: must be one of all, transformer, transformer_2, got 'dit'"),
])
def test_lora_values_are_checked_before_the_model_loads(setup, tmp_path, capsys, monkeypatch, extra, message):
    """Found by an audit: a strength of nan or 1e6 was refused only after loading, as 'strength: ...' (set_lora's
    field, not the flag); a bad nickname or target was found after loading too."""
    from diffc.loader import pipeline as pipeline_loader

    _, a, _ = setup
    monkeypatch.setattr(pipeline_loader, "load", lambda *a, **k: pytest.fail("the model loaded first"))
    code = main(["run", *ARGS, "--output", str(tmp_path / "x.png"), "--lora-path", str(a), *extra])
    err = capsys.readouterr().err
    assert code == 2 and f"diffc run: error: {message}\n" in err, err


def test_bad_lora_metadata_is_one_line_naming_the_file_and_key(setup, tmp_path, capsys):
    ckpt, _, _ = setup
    path = W.write_keys({"transformer.proj_out.lora_A.weight": torch.zeros(4, 32),
                         "transformer.proj_out.lora_B.weight": torch.zeros(64, 4)}, tmp_path / "alpha_str.safetensors",
                        {"transformer.lora_alpha": "abc"})
    code = main(["run", "--model", str(ckpt), *ARGS, "--output", str(tmp_path / "x.png"), "--lora-path", str(path)])
    assert code == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert line == (f"diffc run: error: {path}: 'transformer.lora_alpha' in its 'lora_adapter_metadata' metadata "
                    "must be a finite number, got 'abc'")
    assert not (tmp_path / "x.png").exists()
