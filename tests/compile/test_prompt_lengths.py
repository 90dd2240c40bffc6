"""Compiling every prompt length of a model whose DiT holds the prompt at its own padded length (Z-Image).

Z-Image pads each caption to a multiple of 32 tokens, so one compiled shape serves the prompts of one padded
length. ``prompt_lengths: "all"`` (``diffc compile``'s default without ``--prompt``) compiles one shape per
length up to ``max_sequence_length``; ``diffc run --compile`` compiles its own prompt's length and finds it again
for any prompt of that length.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import diffc
from diffc.cli.main import main
from diffc.compile import prompt_lengths
from diffc.compile.examples import example_request, expand_prompt_lengths
from diffc.errors import InvalidArgumentError
from diffc.runtime.warmup import warm_up_compiled
from tests.helpers import psnr_uint8

SIZE = {"height": 32, "width": 32}
SAILOR = "portrait of an old sailor with a white beard, oil painting, golden hour light, dramatic clouds"


@pytest.fixture(scope="module")
def zimage(zimage_checkpoint):
    path = zimage_checkpoint("tiny")
    return path, diffc.load(path)


@pytest.mark.parametrize("max_len", [24, 100, 128, 512])
def test_every_length_has_an_example_prompt(zimage, max_len):
    _, pipe = zimage
    lengths = prompt_lengths.lengths(pipe, max_len)
    top = -(-max_len // 32) * 32
    assert lengths == list(range(32, top + 1, 32))
    for length in lengths:
        text = prompt_lengths.example_prompt(pipe, length, max_len)
        assert prompt_lengths.prompt_length(pipe, text, max_len) == length
        # the fewest words: one word fewer falls into the length below (or is a single word)
        shorter = " ".join(text.split()[:-1])
        assert not shorter or prompt_lengths.prompt_length(pipe, shorter, max_len) == length - 32
    # a prompt's padded length agrees with what the pipeline hands the DiT
    captured = pipe.executor.stacks["transformer"]
    from diffc.compile.pipeline import capture_inputs

    inputs = capture_inputs(pipe, {**SIZE, "max_sequence_length": max_len, "prompt": [SAILOR]})
    assert inputs["transformer"]["padded_caption_lengths"] == (prompt_lengths.prompt_length(pipe, SAILOR, max_len),)
    assert captured is pipe.executor.stacks["transformer"]


def test_expanding_and_refusing_prompt_lengths(zimage, flux_checkpoint):
    _, pipe = zimage
    requests = expand_prompt_lengths(pipe, [{**SIZE, "max_sequence_length": 64, "prompt_lengths": "all",
                                             "prompt": ["x", "y"]}])
    assert [r["prompt_length"] for r in requests] == [32, 64] and all("prompt_lengths" not in r for r in requests)
    example = example_request(pipe, requests[1])
    assert len(example["prompt"]) == 2 and example["prompt"][0] == example["prompt"][1]
    assert prompt_lengths.prompt_length(pipe, example["prompt"][0], 64) == 64
    assert [r["prompt_length"] for r in expand_prompt_lengths(pipe, [{**SIZE, "prompt_lengths": [64, 32, 64]}])] == [64, 32]
    for bad in ("most", [], [64, 40], [True], 64):
        with pytest.raises(InvalidArgumentError) as err:
            expand_prompt_lengths(pipe, [{**SIZE, "max_sequence_length": 64, "prompt_lengths": bad}])
        assert err.value.field == "prompt_lengths" and "from 32, 64" in str(err.value), bad
    for bad in (40, 544, "64", True):
        with pytest.raises(InvalidArgumentError) as err:
            example_request(pipe, {**SIZE, "max_sequence_length": 512, "prompt_length": bad})
        assert err.value.field == "prompt_length", bad
    with pytest.raises(InvalidArgumentError) as err:  # validated before any token is counted
        expand_prompt_lengths(pipe, [{**SIZE, "max_sequence_length": 0, "prompt_lengths": "all"}])
    assert err.value.field == "max_sequence_length"
    # FLUX pads T5 to max_sequence_length: one shape serves every prompt, so nothing expands
    flux = diffc.load(flux_checkpoint("dev-tiny"))
    assert expand_prompt_lengths(flux, [{**SIZE, "prompt_lengths": "all"}]) == [SIZE]


def test_compiling_every_length_serves_any_prompt(zimage_checkpoint, tmp_path):
    """One artifact, every prompt: each length compiled once (the image-only region once for all), prompts of
    each length run compiled, as eager does; the warm-up runs one length of the shape."""
    path = zimage_checkpoint("tiny")
    pipe = diffc.load(path)
    lines: list[str] = []
    size = {**SIZE, "max_sequence_length": 96}
    report = pipe.compile([{**size, "prompt_lengths": "all"}], out=str(tmp_path / "art"), log=lines.append)
    assert [b.request["prompt_length"] for b in report.buckets] == [32, 64, 96]
    assert [b.reused for b in report.buckets] == [[], ["noise_refiner"], ["noise_refiner"]]
    assert sum("the graph of an earlier bucket" in line for line in lines) == 2
    counters = pipe.executor.compiled().counters
    kw = dict(num_inference_steps=2, seed=3, progress=False, **size)
    for prompt in ("a fox", SAILOR, SAILOR + " " + SAILOR):
        before = counters.compiled_calls
        out = pipe.generate(prompt, **kw)
        assert counters.compiled_calls == before + 2 and counters.eager_fallbacks == 0, prompt
        with pipe.executor.bare():
            eager = np.asarray(pipe.generate(prompt, **kw).images[0])
        assert eager.std() > 1.0 and psnr_uint8(out.images[0], eager) >= 40.0
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert [b["request"]["prompt_length"] for b in manifest["stages"]["transformer"]["buckets"]] == [32, 64, 96]
    fresh = diffc.load(path)
    fresh.load_compiled(str(tmp_path / "art"), warmup=False)
    assert warm_up_compiled(fresh, manifest, force=True)["buckets"] == 1
    fresh.generate(SAILOR, **kw)
    assert fresh.executor.compiled().counters.eager_fallbacks == 0


def test_compile_cli_covers_every_length_by_default(zimage_checkpoint, tmp_path, capsys):
    model = str(zimage_checkpoint("tiny"))
    base = ["compile", "--model", model, "--height", "32", "--width", "32", "--max-sequence-length", "64"]
    assert main([*base, "--out", str(tmp_path / "all")]) == 0
    assert "2 shape(s)" in capsys.readouterr().out
    assert main([*base, "--out", str(tmp_path / "one"), "--prompt", "a fox"]) == 0
    assert "1 shape(s)" in capsys.readouterr().out
    assert main([*base, "--out", str(tmp_path / "bad"), "--prompt", "a fox", "--prompt-lengths", "all"]) == 2
    assert "--prompt-lengths: all compiles every prompt length" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_run_compile_keys_its_cache_by_the_prompt_length(zimage_checkpoint, tmp_path, capsys, monkeypatch):
    """``run --compile`` compiles the length of its own prompt; another prompt of that length loads it, one of
    another length compiles its own."""
    monkeypatch.setenv("DIFFC_CACHE", str(tmp_path / "cache"))
    model = str(zimage_checkpoint("tiny"))

    def run(prompt: str, name: str) -> str:
        perf = tmp_path / f"{name}.json"
        assert main(["run", "--model", model, "--compile", "--prompt", prompt, "--height", "32", "--width", "32",
                     "--steps", "2", "--max-sequence-length", "96", "--no-progress", "-o", str(tmp_path / f"{name}.png"),
                     "--perf-dump-path", str(perf)]) == 0
        dump = json.loads(perf.read_text())
        assert dump["runtime"]["compiled"]["eager_fallbacks"] == 0, dump["runtime"]["compiled"]
        return capsys.readouterr().err

    assert "compiling the DiT" in run("a fox", "first")
    assert "using the compiled DiT cached" in run("a red fox", "second")  # the same padded length
    assert "compiling the DiT" in run(SAILOR, "third")
    assert len(list((tmp_path / "cache" / "compiled").iterdir())) == 2
