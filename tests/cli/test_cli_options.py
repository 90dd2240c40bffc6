"""Papercuts of the CLI (issue 12 section 7): config files with the CLI's option names, -v after the
subcommand, help text, one wording for a wrong --model in run/serve/compile, seconds with num_frames."""

from __future__ import annotations

import json
import re

import pytest

from diffc.loader import pipeline as pipeline_loader
from diffc.cli.main import build_parser, main
from diffc.errors import InvalidArgumentError
from diffc.serve.protocol import APIError, VideoRequest, parse_body

COMMANDS = ("run", "serve", "compile")


@pytest.fixture
def demo_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(pipeline_loader, "load", refuse)


def _argv(command: str, tmp_path) -> list[str]:
    return {"run": ["run", "--prompt", "x", "-o", str(tmp_path / "a.png")],
            "serve": ["serve", "--port", "0"],
            "compile": ["compile", "--out", str(tmp_path / "a.diffc")]}[command]


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own refusals
        return exc.code


def _config(tmp_path, data: dict, suffix: str = ".json"):
    path = tmp_path / f"cfg{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(data))
    else:
        import yaml

        path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_takes_the_cli_option_names(demo_cache, tmp_path, capsys, suffix):
    perf = tmp_path / "perf.json"
    cfg = _config(tmp_path, {"prompt": "a kite", "steps": 1, "guidance": 2.5, "seed": 9, "height": 32, "width": 32,
                             "max-sequence-length": 8, "no-progress": True, "perf-dump-path": str(perf)}, suffix)
    assert main(["run", "--config", cfg, "-o", str(tmp_path / "a.png"), "--seed", "4"]) == 0
    request = json.loads(perf.read_text())["request"]
    assert (request["num_inference_steps"], request["guidance_scale"], request["seed"]) == (1, 2.5, 4)  # flag wins
    assert "1 steps, seed 4" in capsys.readouterr().out


@pytest.mark.parametrize("data,fragment", [
    ({"sampler": "ddim"}, "unknown option 'sampler'; accepted: "),
    ({"steps": "many"}, "steps (in "),
    ({"steps": 2.5}, "invalid value 2.5 (expected int)"),
    ({"steps": True}, "invalid value True"),
    ({"height": [32]}, "invalid value a list (expected int)"),
    ({"no-progress": "yes"}, "expected true or false, got 'yes'"),
    ({"scheduler": "ddim"}, "must be one of unipc, euler, got 'ddim'"),
    ({"steps": 1, "num_inference_steps": 2}, "'num_inference_steps' and 'steps' set the same option"),
])
def test_config_refusals(demo_cache, tmp_path, capsys, no_loading, data, fragment):
    cfg = _config(tmp_path, {"prompt": "x", **data})
    assert main(["run", "--config", cfg, "-o", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err


@pytest.mark.parametrize("text,dest,value", [
    ("cuda-graphs: off\n", "cuda_graphs", "off"),  # YAML reads it as False: was 'invalid value False'
    ("cuda-graphs: on\n", "cuda_graphs", "on"),
    ("cuda-graphs: 'off'\n", "cuda_graphs", "off"),
    ("offload: no\n", None, "must be one of none, layerwise, model, got False (YAML reads unquoted yes, no, on and off"),
])
def test_yaml_booleans_where_an_option_takes_words(tmp_path, text, dest, value):
    from diffc.cli.config import merge_config

    (tmp_path / "c.yaml").write_text(text)
    args = build_parser().parse_args(["run", "--config", str(tmp_path / "c.yaml")])
    args._given = set()
    if dest is None:
        with pytest.raises(InvalidArgumentError, match=re.escape(value)):
            merge_config(args, args._parser)
    else:
        merge_config(args, args._parser)
        assert getattr(args, dest) == value


def test_unknown_config_key_lists_the_cli_names(tmp_path, capsys, no_loading):
    cfg = _config(tmp_path, {"sampler": "ddim"})
    assert main(["run", "--config", cfg]) == 2
    accepted = capsys.readouterr().err.split("accepted: ")[1].strip().split(", ")
    assert {"steps", "guidance", "negative-prompt", "perf-dump-path", "output", "compiled"} <= set(accepted)
    assert "num_inference_steps" not in accepted and "config" not in accepted and "_parser" not in accepted


def test_config_sets_options_with_defaults_and_flags_still_win(tmp_path, capsys, monkeypatch, no_loading):
    """compile's --batch and --quality have defaults; the file sets them unless the flag is given (even = default)."""
    import diffc.cli.compile as compile_cli

    cfg = _config(tmp_path, {"batch": 0, "quality": "lossless"})
    assert main(["compile", "--config", cfg, "--out", str(tmp_path / "x.diffc")]) == 2
    assert "--batch: must be from 1 to 64, got 0" in capsys.readouterr().err
    seen = []

    def stop(args, video):
        seen.append((args.batch, args.quality))
        raise InvalidArgumentError("stop", "here")

    monkeypatch.setattr(compile_cli, "parse_buckets", stop)
    assert main(["compile", "--config", cfg, "--out", str(tmp_path / "x.diffc"), "--batch", "1"]) == 2
    assert seen == [(1, "lossless")]


@pytest.mark.parametrize("argv,verbose", [
    (["run", "--prompt", "x"], False),
    (["-v", "run", "--prompt", "x"], True),
    (["run", "-v", "--prompt", "x"], True),
    (["run", "--prompt", "x", "--verbose"], True),
    (["compile", "--out", "x", "-v"], True),
    (["serve", "-v"], True),
])
def test_verbose_before_or_after_the_subcommand(argv, verbose):
    assert build_parser().parse_args(argv).verbose is verbose


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_has_no_rst_markup(capsys, command):
    with pytest.raises(SystemExit) as info:
        main(["--help"] if command is None else [command, "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "usage: diffc" in out
    assert "``" not in out, out


@pytest.mark.parametrize("argv,line", [
    (["run", "--steps", "1.5"], "diffc run: error: argument --steps: invalid int value: '1.5' (see diffc run --help)"),
    (["compile"], "diffc compile: error: the following arguments are required: --out/-o (see diffc compile --help)"),
    (["serve", "--port", "x"], "diffc serve: error: argument --port: invalid int value: 'x' (see diffc serve --help)"),
    (["bogus"], "diffc: error: argument COMMAND: invalid choice: 'bogus' (choose from 'compile', 'run', 'serve') "
                "(see diffc --help)"),
    (["run", "--cache-coefficients", "a,b"], "diffc run: error: argument --cache-coefficients: expected numbers "
                                             "separated by commas, got 'a,b' (see diffc run --help)"),
])
def test_a_flag_mistake_is_one_line(capsys, argv, line):
    """Found by an audit: argparse printed the usage of every option first (27 lines for run), and a bad
    --cache-coefficients was an 'invalid _numbers value' (the name of a function)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert capsys.readouterr().err == line + "\n"


@pytest.mark.parametrize("command", COMMANDS)
def test_one_wording_for_a_wrong_model(tmp_path, capsys, no_loading, command):
    (tmp_path / "empty").mkdir()
    expected = {
        "/nonexistent/ckpt": "--model: checkpoint directory not found: /nonexistent/ckpt",
        str(tmp_path / "empty"): f"--model: {tmp_path / 'empty'} is not a diffusers-format checkpoint directory "
                                 "(no model_index.json)",
        "": "--model: is empty; give a diffusers-format checkpoint directory",  # was ' is not a ... directory'
        " ": "--model: is empty; give a diffusers-format checkpoint directory",
    }
    for model, message in expected.items():
        assert _exit_code([*_argv(command, tmp_path), "--model", model]) == 2
        err = capsys.readouterr().err
        assert err == f"diffc {command}: error: {message}\n", err
    assert _exit_code([*_argv(command, tmp_path), "--model", str(tmp_path), "--task", "t2v"]) == 2
    assert "--task: only selects the demo model; the task of --model comes from its model_index.json" in \
        capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
def test_an_empty_device_is_refused(tmp_path, capsys, no_loading, command):
    """Found by an audit: --device "" (an unset shell variable) ran on a device chosen silently."""
    assert _exit_code([*_argv(command, tmp_path), "--device", ""]) == 2
    assert f"diffc {command}: error: --device: is empty; give cpu, cuda or cuda:N" in capsys.readouterr().err


def test_a_compiled_artifact_whose_checkpoint_moved(tmp_path, capsys, no_loading):
    from diffc.compile import artifact as art

    path = tmp_path / "a.diffc"
    path.mkdir()
    (path / art.MANIFEST).write_text(json.dumps({
        "format_version": art.FORMAT_VERSION, "model": {"path": "/gone/FLUX.1-dev"},
        "stages": {"transformer": {"buckets": [{"request": {"height": 64, "width": 64}}]}}}))
    for command in ("run", "serve"):
        assert _exit_code([*_argv(command, tmp_path), "--compiled", str(path)]) == 2
        assert (f"diffc {command}: error: --model: checkpoint directory not found: /gone/FLUX.1-dev (the checkpoint "
                f"{path} was compiled from; pass --model to use another)") in capsys.readouterr().err


@pytest.mark.parametrize("request_,shown", [({"height": "abc", "width": 64}, "height 'abc'"),
                                            ({"height": 64, "width": -64}, "width '-64'"),
                                            ({"height": 64, "width": 64, "guidance_scale": None, "num_frames": True},
                                             "num_frames 'True'")])
def test_a_damaged_compiled_shape_is_the_artifacts_error(tmp_path, capsys, no_loading, request_, shown):
    """Found by an audit: a manifest's shape value no request can have was reported as a bad --height or --width,
    flags the command did not give (the manifest holds the hashes and is not covered by them)."""
    from diffc.compile import artifact as art

    path = tmp_path / "a.diffc"
    path.mkdir()
    (path / art.MANIFEST).write_text(json.dumps({
        "format_version": art.FORMAT_VERSION, "model": {"path": "/gone/FLUX.1-dev"},
        "stages": {"transformer": {"buckets": [{"request": request_}]}}}))
    for command in ("run", "serve"):
        assert _exit_code([*_argv(command, tmp_path), "--compiled", str(path)]) == 2
        assert f"{path}: its manifest's compiled shape has {shown}, which no request can have" in capsys.readouterr().err


def test_video_seconds_with_num_frames_is_refused():
    with pytest.raises(APIError) as info:
        parse_body(VideoRequest, {"prompt": "x", "seconds": 1, "num_frames": 17})
    assert info.value.status == 400 and info.value.param == "seconds" and "not both" in info.value.message
    assert parse_body(VideoRequest, {"prompt": "x", "seconds": 1}).seconds == 1
    assert parse_body(VideoRequest, {"prompt": "x", "num_frames": 17}).num_frames == 17


def test_help_and_flag_errors_do_not_import_torch():
    """`diffc --help`, `--version` and a bad flag answer before torch loads (seconds of start-up: 2.2 s -> 0.2 s
    for `diffc --version` on the dev machine); a command that runs imports it."""
    import subprocess
    import sys

    probe = ("import sys\nfrom diffc.cli.main import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    for argv in (["--version"], ["--help"], ["run", "--help"], ["serve", "--help"], ["compile", "--help"],
                 ["run", "--steps", "x"]):
        out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120)
        assert out.stdout.strip().splitlines()[-1] == "NO-TORCH", (argv, out.stdout[-300:], out.stderr[-300:])
    out = subprocess.run([sys.executable, "-c", probe, "run", "--prompt", "p", "--device", "tpu", "-o", "x.png"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "TORCH" and "device" in out.stderr


@pytest.mark.parametrize("flag", ["--prompt", "--negative-prompt"])
def test_a_prompt_that_is_not_utf8_is_one_line_before_loading(tmp_path, capsys, no_loading, flag):
    """``--prompt $'a\\xff'``: Python's argv holds a lone surrogate for the byte, which no tokenizer takes."""
    argv = ["run", "--prompt", "a fox", "-o", str(tmp_path / "a.png")]
    argv += ["--negative-prompt", "snow \udcff"] if flag == "--negative-prompt" else []
    if flag == "--prompt":
        argv[2] = "a \udcff fox"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{flag}: is not valid Unicode text" in err and "Traceback" not in err
    assert not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("command", ["run", "compile"])
def test_a_diffc_cache_that_is_a_file_is_one_line(tmp_path, capsys, monkeypatch, command):
    (tmp_path / "cachefile").write_text("x")
    monkeypatch.setenv("DIFFC_CACHE", str(tmp_path / "cachefile"))
    assert main(_argv(command, tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"DIFFC_CACHE: cannot build the demo model in {tmp_path / 'cachefile' / 'demo'} (Not a directory); point " \
           "DIFFC_CACHE at a writable folder or give --model" in err and "Traceback" not in err


def _laughs(levels: int) -> str:
    """A "billion laughs" YAML: 9 ** levels strings from a few hundred bytes of anchors and aliases."""
    lines = ['  - &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"  - &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "prompt:\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize("name,text,fragment", [
    ("laughs.yaml", _laughs(9), "laughs.yaml): invalid value a list (expected a single value)"),
    ("dup.yaml", "steps: 2\nsteps: 3\n", "option 'steps' is given twice"),
    ("dup.json", '{"steps": 2, "steps": 3}', "option 'steps' is given twice"),
    ("binary.yaml", "prompt: !!binary aGVsbG8=\n", "binary.yaml): invalid value b'hello'"),
    ("big.yaml", "prompt: " + "x" * (1 << 20) + "\n", "larger than 1 MiB; not a config file"),
])
def test_config_files_that_attack_the_parser_are_one_short_line(tmp_path, capsys, no_loading, name, text, fragment):
    """Found by an audit: the laughs took gigabytes (every value's repr was built before it was checked)."""
    (tmp_path / name).write_text(text)
    assert main(["run", "--config", str(tmp_path / name), "-o", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and len(err) < 1000, err[:300]


@pytest.mark.parametrize("config,fragment", [("", "--config: is empty"), ("{tmp}", "is not a file")])
def test_a_config_path_that_is_no_file_is_named(tmp_path, capsys, no_loading, config, fragment):
    assert main(["run", "--config", config.replace("{tmp}", str(tmp_path)), "--prompt", "x"]) == 2
    assert fragment in capsys.readouterr().err
