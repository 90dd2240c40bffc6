"""``diffc compile`` and ``diffc run --compiled / --compile`` through the CLI entry point, on the demo FLUX model."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffc.cli.main import main
from tests.helpers import ServeStopped

# Eight text tokens keep the Triton interpreter's share of each compiled DiT call small.
SMALL = ["--max-sequence-length", "8"]


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("diffc-cache")


@pytest.fixture(autouse=True)
def demo_cache(module_cache, monkeypatch):
    """One ``$DIFFC_CACHE`` per module: the demo checkpoint is built once, compiled artifacts are cached there."""
    monkeypatch.setenv("DIFFC_CACHE", str(module_cache))
    return module_cache


@pytest.fixture(scope="module")
def artifact(module_cache, tmp_path_factory):
    """``diffc compile --out X --height 64 --width 64 --guidance 3 --no-progress`` of the demo model: (path, exit
    code, stdout, stderr)."""
    out = tmp_path_factory.mktemp("compiled") / "demo.diffc"
    printed, errors = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        mp.setenv("DIFFC_CACHE", str(module_cache))  # (capsys is per test)
        code = main(["compile", "--out", str(out), "--height", "64", "--width", "64", "--guidance", "3", *SMALL,
                     "--no-progress"])
    return out, code, printed.getvalue(), errors.getvalue()


def _manifest(path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_compile_writes_an_artifact(artifact):
    path, code, out, err = artifact
    assert code == 0
    assert not any(bar in err for bar in ("it/s", "%|", "\r")), err  # --no-progress: not even transformers' bars
    assert "diffc compile: FluxPipeline from" in out and "quality fast, 1 shape(s)" in out
    assert "traced " in out and " nodes in " in out and "passes " in out
    # one graph per region: the double-stream block's two feed-forwards, the single-stream block's MLP
    assert "transformer_blocks x1: traced" in out and "single_transformer_blocks x2: traced" in out
    assert [line.count("gelu_tanh 2") for line in out.splitlines() if "transformer_blocks x" in line] == [1, 0]
    assert [line.count("gelu_tanh 1") for line in out.splitlines() if "transformer_blocks x" in line] == [0, 1]
    assert f"diffc compile: wrote {path}" in out and "weights not included" in out
    manifest = _manifest(path)
    (bucket,) = manifest["stages"]["transformer"]["buckets"]
    assert (bucket["request"]["height"], bucket["request"]["width"]) == (64, 64)
    assert bucket["request"]["max_sequence_length"] == 8 and bucket["request"]["prompt"] == ["a compile-time example prompt"]
    assert [r["file"] for r in bucket["regions"]] == ["transformer/transformer_blocks/bucket-0.json",
                                                      "transformer/single_transformer_blocks/bucket-1.json"]
    assert all((path / r["file"]).is_file() for r in bucket["regions"])
    assert bucket["matches"]["gelu_tanh"] == 4  # over the whole DiT: 2 + 2 x 1


def test_compile_two_buckets(tmp_path, capsys):
    out = tmp_path / "two.diffc"
    report = tmp_path / "report.json"
    assert main(["compile", "--out", str(out), "--bucket", "64x32", "--bucket", "128x64", *SMALL,
                 "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "2 shape(s)" in printed and printed.count("traced ") == 4  # two regions per shape
    buckets = _manifest(out)["stages"]["transformer"]["buckets"]
    assert [(b["request"]["width"], b["request"]["height"]) for b in buckets] == [(64, 32), (128, 64)]
    assert [[r["file"] for r in b["regions"]] for b in buckets] == [
        ["transformer/transformer_blocks/bucket-0.json", "transformer/single_transformer_blocks/bucket-1.json"],
        ["transformer/transformer_blocks/bucket-2.json", "transformer/single_transformer_blocks/bucket-3.json"]]
    assert len({b["key"] for b in buckets}) == 2
    assert [b["key"] for b in json.loads(report.read_text())["buckets"]] == [b["key"] for b in buckets]


def test_example_prompts_of_one_padded_length_compile_once(tmp_path, capsys):
    """FLUX pads every prompt to --max-sequence-length: two example prompts give one DiT shape, compiled once."""
    out = tmp_path / "prompts.diffc"
    assert main(["compile", "--out", str(out), "--height", "32", "--width", "32", *SMALL, "--prompt", "a fox",
                 "--prompt", "an old lighthouse on a cliff at dusk"]) == 0
    printed = capsys.readouterr().out
    assert "2 shape(s)" in printed and "the same DiT input shapes as an earlier bucket, compiled once" in printed
    (bucket,) = _manifest(out)["stages"]["transformer"]["buckets"]
    assert bucket["request"]["prompt"] == ["a fox"]


@pytest.mark.parametrize("argv,fragment", [
    (["--prompt", " "], "--prompt: expected a non-empty example prompt, got ' '"),
    (["--bucket", "64by32"], "--bucket: expected WIDTHxHEIGHT or WIDTHxHEIGHTxFRAMES, got '64by32'"),
    (["--bucket", "64x32x5"], "--bucket: '64x32x5' gives frames, but this is an image model"),
    (["--num-frames", "5"], "--num-frames: applies to video models only"),
    (["--batch", "0"], "--batch: must be from 1 to 64, got 0"),
    (["--batch", "10000000"], "--batch: must be from 1 to 64, got 10000000"),
    (["--height", "40", "--width", "64"], "height: FLUX needs a multiple of 16, got 40"),
    # found by an audit: a --bucket's size was refused under --height/--width, flags the command never gave
    (["--bucket", "48x40"], "--bucket: '48x40' (height): FLUX needs a multiple of 16, got 40"),
    (["--height", "32", "--width", "32", "--bucket", "40x32"], "--bucket: '40x32' (width): FLUX needs a multiple"),
    (["--disable", "no_such_pass"], "disable: unknown pass 'no_such_pass'"),
    (["--quality", "lossy"], "invalid choice: 'lossy'"),
])
def test_compile_bad_input_exits_2(tmp_path, capsys, argv, fragment):
    out = tmp_path / "bad.diffc"
    try:
        code = main(["compile", "--out", str(out), *argv])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and fragment in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,fragment", [
    (["--enable", "cat_linear_row"], "--enable: unknown pass 'cat_linear_row'; passes: "),
    (["--disable", "gemv,no_such_pass"], "--disable: unknown pass 'no_such_pass'"),
    (["--quality", "fp8", "--enable", "cat_linear_rows"], "--enable: cat_linear_rows does not run under the fp8 tier"),
    (["--attention", "fa5"], "--attention: unknown backend 'fa5'; accepted: auto, sdpa"),
    (["--bucket", "0x0"], "--bucket: '0x0' (height): must be an integer from 1 to 16384, got 0"),
    (["--report", ""], "--report: is empty; give a file name"),  # it compiled and wrote no report
    (["--bucket", "99999999999x32"], "--bucket: '99999999999x32' (width): must be an integer from 1 to 16384"),
    (["--height", "-16"], "--height: must be an integer from 1 to 16384, got -16"),
    (["--guidance", "nan"], "--guidance: must be a number from 0 to 100, got nan"),
])
def test_compile_refuses_a_pass_before_loading_the_model(tmp_path, capsys, monkeypatch, argv, fragment):
    """A misspelt or refused pass or attention backend is named by its flag before the checkpoint loads (minutes
    for a real model)."""
    import diffc.loader.pipeline

    def no_load(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the passes were checked")

    monkeypatch.setattr(diffc.loader.pipeline, "load", no_load)
    out = tmp_path / "bad.diffc"
    assert main(["compile", "--out", str(out), *argv]) == 2
    assert fragment in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_run_compiled_uses_the_artifact_size(artifact, tmp_path, capsys):
    path = artifact[0]
    image, perf = tmp_path / "out.png", tmp_path / "perf.json"
    code = main(["run", "--compiled", str(path), "--prompt", "a kite", "-o", str(image), "--steps", "2",
                 "--seed", "3", "--no-progress", "--perf-dump-path", str(perf)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"wrote {image} (64x64, 2 steps, seed 3)" in captured.out
    assert "no graph" not in captured.err  # the artifact's text length is used too, so no eager fallback
    pixels = np.asarray(Image.open(image))
    assert pixels.shape == (64, 64, 3) and pixels.std() > 1.0
    dump = json.loads(perf.read_text())
    compiled = dump["runtime"]["compiled"]
    assert compiled["artifact"] == str(path) and (compiled["compiled_calls"], compiled["eager_fallbacks"]) == (2, 0)
    assert dump["compiled"] == str(path) and dump["load_s"] > 0 and dump["compile_s"] is None


def test_serve_compiled_defaults_to_the_artifact_shape(artifact, serve_engine_args):
    """``diffc serve --compiled``: requests without a size, guidance or text length (the HTTP API has no field for
    it) get the artifact's, so they replay its graphs."""
    with pytest.raises(ServeStopped):
        main(["serve", "--compiled", str(artifact[0]), "--port", "0", "--device", "cpu"])
    request = _manifest(artifact[0])["stages"]["transformer"]["buckets"][0]["request"]
    defaults = serve_engine_args["engine"]["defaults"]
    assert (defaults["height"], defaults["width"], defaults["max_sequence_length"]) == (64, 64, 8)
    assert defaults["guidance_scale"] == request["guidance_scale"] == 3.0  # FLUX.1-dev's own is 3.5


def test_run_compiled_demo_keeps_the_demo_steps_and_notice(artifact, tmp_path, capsys):
    """An artifact compiled from the built-in demo runs as the demo does: 4 steps, and says its weights are random."""
    image = tmp_path / "demo.png"
    code = main(["run", "--compiled", str(artifact[0]), "--prompt", "a kite", "-o", str(image), "--seed", "3",
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"wrote {image} (64x64, 4 steps, seed 3)" in captured.out
    assert "RANDOM weights" in captured.err and "no graph" not in captured.err


def test_run_compile_caches_the_artifact(tmp_path, capsys, demo_cache):
    argv = ["run", "--compile", "--prompt", "a kite", "--height", "32", "--width", "48", "--steps", "2", "--seed", "4",
            "--no-progress", *SMALL]
    perf = tmp_path / "perf.json"
    assert main([*argv, "-o", str(tmp_path / "first.png"), "--perf-dump-path", str(perf)]) == 0
    assert json.loads(perf.read_text())["compile_s"] > 0
    first = capsys.readouterr()
    assert "diffc: compiling the DiT for" in first.err and "traced " in first.err
    assert "using the compiled DiT cached" not in first.err
    (cached,) = (demo_cache / "compiled").iterdir()
    assert (cached / "manifest.json").is_file()

    assert main([*argv, "-o", str(tmp_path / "second.png")]) == 0
    second = capsys.readouterr()
    assert f"diffc: using the compiled DiT cached at {cached}" in second.err and "traced " not in second.err
    assert "no graph" not in first.err + second.err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "first.png")), np.asarray(Image.open(tmp_path / "second.png")))

    # found by an audit: a damaged cache entry failed every later run; one diffc wrote (its manifest lists every file)
    # is compiled again over; a folder there without a manifest may be the user's and is refused (test_output_paths)
    graph = next(p for p in cached.rglob("*.json") if p.name != "manifest.json")
    graph.write_text(graph.read_text() + " ")
    assert main([*argv, "-o", str(tmp_path / "third.png")]) == 0
    third = capsys.readouterr()
    assert "the cached entry is damaged" in third.err and "diffc: compiling the DiT for" in third.err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "third.png")), np.asarray(Image.open(tmp_path / "first.png")))


@pytest.mark.parametrize("argv,fragment", [
    (["--compile", "--compiled", "somewhere"], "--compile: give either --compile (compile now, cached) or --compiled"),
    (["--quality", "lossless"], "--quality: applies to --compile only"),
    (["--compiled", "/nonexistent/x.diffc"], "compiled artifact not found: /nonexistent/x.diffc"),
    (["--compiled", "{tmp}/file.diffc"], "{tmp}/file.diffc is a file, not a compiled artifact (expected a directory "
                                         "written by `diffc compile`)"),  # was 'not found', of a file that is there
])
def test_run_compiled_bad_flags_exit_2(tmp_path, capsys, argv, fragment):
    (tmp_path / "file.diffc").write_text("x")
    argv, fragment = [a.replace("{tmp}", str(tmp_path)) for a in argv], fragment.replace("{tmp}", str(tmp_path))
    code = main(["run", "--prompt", "p", "-o", str(tmp_path / "x.png"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err, err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("where", ["the artifact", "inside it"])
def test_the_report_may_not_overwrite_the_artifact(artifact, tmp_path, capsys, monkeypatch, where):
    """``--report`` naming ``--out`` or a file inside it (a previous artifact's manifest) is refused before loading."""
    import diffc.loader.pipeline

    monkeypatch.setattr(diffc.loader.pipeline, "load", lambda *a, **k: pytest.fail("loaded before checking --report"))
    previous = artifact[0]
    out = tmp_path / "r.json" if where == "the artifact" else previous
    report = out if where == "the artifact" else previous / "manifest.json"
    before = (previous / "manifest.json").read_bytes()
    assert main(["compile", "--out", str(out), "--report", str(report)]) == 2
    err = capsys.readouterr().err
    assert "--report: " in err and "write the report elsewhere" in err, err
    assert (previous / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("name,code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_or_sighup_while_compiling_leaves_nothing_behind(tmp_path, capsys, monkeypatch, name, code):
    """SIGTERM, or SIGHUP (a closed terminal, a dropped SSH session), ends ``diffc compile`` as Ctrl-C does: the
    temporary artifact folder is removed, exit 128 + the signal."""
    import signal

    import diffc.compile.pipeline as compile_pipeline

    signum = getattr(signal, name)
    seen = {}

    def terminated(pipe, requests, writer, **kwargs):
        seen["tmp"] = writer.tmp
        assert writer.tmp.exists()
        signal.getsignal(signum)(signum, None)  # what the signal runs, in the main thread
        raise AssertionError(f"{name} did not stop the compile")

    monkeypatch.setattr(compile_pipeline, "_compile_all", terminated)
    out = tmp_path / "a.diffc"
    # diffc takes only signals nothing else handles (under nohup SIGHUP is ignored): start from the defaults
    before = {s: signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        assert main(["compile", "--out", str(out), "--height", "32", "--width", "32", "--max-sequence-length",
                     "8"]) == code
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL == signal.getsignal(signal.SIGHUP)  # put back
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    assert f"diffc compile: terminated ({name})" in capsys.readouterr().err
    assert not seen["tmp"].exists() and not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag,inside", [("--perf-dump-path", "manifest.json"), ("--output", "x.png")])
def test_run_writes_nothing_into_the_artifact_it_reads(artifact, tmp_path, capsys, flag, inside):
    """Found by an audit: ``--perf-dump-path ART/manifest.json`` replaced the artifact's manifest (the next run failed)."""
    out = artifact[0]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    argv = ["run", "--compiled", str(out), "--prompt", "a kite", "--steps", "1", "-o", str(tmp_path / "a.png")]
    argv += [flag, str(out / inside)] if flag == "--perf-dump-path" else []
    if flag == "--output":
        argv[argv.index("-o") + 1] = str(out / inside)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{flag}: {out / inside} is inside the artifact {out}, which this command reads; write it elsewhere" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_compile_writes_no_report_into_the_checkpoint(demo_cache, tmp_path, capsys):
    """``--report CKPT/model_index.json`` replaced the checkpoint's index: refused before loading."""
    from diffc.demo import demo_checkpoint

    checkpoint = demo_checkpoint("flux")
    index = (checkpoint / "model_index.json").read_bytes()
    argv = ["compile", "--model", str(checkpoint), "--out", str(tmp_path / "a.diffc"), "--height", "64", "--width",
            "64", "--report", str(checkpoint / "model_index.json"), *SMALL]
    assert main(argv) == 2
    assert "--report: " in (err := capsys.readouterr().err) and f"is inside the checkpoint {checkpoint}" in err
    assert (checkpoint / "model_index.json").read_bytes() == index and not (tmp_path / "a.diffc").exists()


def test_compile_writes_no_artifact_into_the_checkpoint(demo_cache, tmp_path, capsys, monkeypatch):
    """Found by an audit: ``--out CKPT/art`` compiled and wrote the artifact into the checkpoint it read."""
    from diffc.demo import demo_checkpoint
    from diffc.loader import pipeline as pipeline_loader

    checkpoint = demo_checkpoint("flux")
    monkeypatch.setattr(pipeline_loader, "load", lambda *a, **k: pytest.fail("loaded before the error"))
    argv = ["compile", "--model", str(checkpoint), "--out", str(checkpoint / "art.diffc"), "--height", "64",
            "--width", "64", *SMALL]
    assert main(argv) == 2
    assert f"--out: {checkpoint / 'art.diffc'} is inside the checkpoint {checkpoint}" in capsys.readouterr().err
    assert not (checkpoint / "art.diffc").exists()


def _tampered_copy(artifact, tmp_path, edit) -> Path:
    out = artifact[0]
    copy = tmp_path / "copy.diffc"
    shutil.copytree(out, copy)
    data = _manifest(copy)
    edit(data)
    (copy / "manifest.json").write_text(json.dumps(data))
    return copy


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_gpu_artifact_on_a_machine_without_one_says_so(artifact, tmp_path, capsys):
    copy = _tampered_copy(artifact, tmp_path, lambda m: m["environment"].update(device_type="cuda", gpu_arch="sm_90"))
    assert main(["run", "--compiled", str(copy), "--prompt", "x", "-o", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert f"--compiled: {copy} was compiled for a CUDA GPU (sm_90) and this machine has none; compile the model " \
           "here with diffc compile" in err


def test_the_artifacts_dtype_is_the_default(artifact, tmp_path):
    """As its device: ``run --compiled`` of a bf16 artifact loads bf16 without ``--dtype`` (it said "recompile")."""
    from diffc.cli.main import build_parser
    from diffc.cli.options import resolve_model

    copy = _tampered_copy(artifact, tmp_path, lambda m: m.update(dtype="bfloat16"))
    args = build_parser().parse_args(["run", "--compiled", str(copy), "--prompt", "x"])
    resolve_model(args)
    assert args.dtype == "bfloat16"
    args = build_parser().parse_args(["run", "--compiled", str(copy), "--prompt", "x", "--dtype", "fp32"])
    resolve_model(args)
    assert args.dtype == "fp32"


@pytest.mark.parametrize("argv,message", [
    (["run", "--compiled", "{art}", "--task", "t2v", "--prompt", "x"], "--task: only selects the demo model; with "
                                                                        "--compiled the model is the one the artifact"),
    (["run", "--compiled", "", "--prompt", "x"], "--compiled: is empty; give the artifact's path"),
    (["compile", "--out", ""], "--out: is empty; give the artifact's path"),
])
def test_compiled_flag_mistakes_are_one_line(artifact, tmp_path, capsys, argv, message):
    argv = [a.replace("{art}", str(artifact[0])) for a in argv] + ["-o", str(tmp_path / "a.png")] * (argv[0] == "run")
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()
