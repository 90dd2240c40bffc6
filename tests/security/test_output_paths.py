"""No user file is lost and no output fails late: compile --out replaces only a diffc artifact, every output
path is checked before a model loads, and a failed write is one line that leaves nothing behind."""

from __future__ import annotations

import errno
import json
import os

import pytest

import diffc
from diffc.loader import pipeline as pipeline_loader
from diffc.cli.main import main
from diffc.compile import artifact as art
from diffc.compile import pipeline as compile_pipeline_module
from diffc.runtime.artifacts import compile_cached
from diffc.errors import InvalidArgumentError

SMALL = ["--height", "32", "--width", "32", "--steps", "1", "--max-sequence-length", "8", "--no-progress"]


@pytest.fixture
def demo_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(pipeline_loader, "load", refuse)


def _files(root) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _run(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


# ---- compile --out ---------------------------------------------------------------------------

@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    (folder / "2025").mkdir(parents=True)
    (folder / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    (folder / "2025" / "dog.jpg").write_bytes(b"\xff\xd8 a dog")
    return folder


def test_compile_out_refuses_a_folder_of_other_files(photos, capsys, no_loading):
    before = _files(photos)
    code, err = _run(["compile", "--out", str(photos)], capsys)
    assert code == 2
    assert err == (f"diffc compile: error: --out: {photos} exists and is not a diffc artifact (no diffc manifest.json); "
                   "diffc replaces only an artifact it wrote: choose another path\n")
    assert _files(photos) == before


def test_compile_out_refuses_a_file(tmp_path, capsys, no_loading):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    code, err = _run(["compile", "--out", str(target)], capsys)
    assert code == 2 and f"--out: {target} exists and is not a diffc artifact (it is a file)" in err
    assert target.read_text() == "mine"


def test_compile_out_refuses_an_artifact_holding_a_users_file(tmp_path, capsys, no_loading):
    old = tmp_path / "old.diffc"
    old.mkdir()
    (old / art.MANIFEST).write_text(json.dumps({"format_version": 2, "stages": {}, "files": {}}))
    (old / "my-notes.txt").write_text("keep me")
    code, err = _run(["compile", "--out", str(old)], capsys)
    assert code == 2 and f"--out: {old} holds my-notes.txt, which is not part of the diffc artifact there" in err
    assert (old / "my-notes.txt").read_text() == "keep me"


def test_compile_out_refuses_a_symlink(tmp_path, photos, capsys, no_loading):
    link = tmp_path / "link.diffc"
    link.symlink_to(photos)
    code, err = _run(["compile", "--out", str(link)], capsys)
    assert code == 2 and f"--out: {link} is a symbolic link" in err


def test_replaceable_targets(tmp_path):
    """Free, empty, a current artifact, and a format-1 artifact (its known layout) may be replaced."""
    assert art.check_output_target(tmp_path / "new.diffc") == tmp_path / "new.diffc"
    (tmp_path / "empty").mkdir()
    art.check_output_target(tmp_path / "empty")
    v1 = tmp_path / "v1.diffc"
    (v1 / "transformer").mkdir(parents=True)
    (v1 / "triton-cache" / "KEY").mkdir(parents=True)
    (v1 / art.MANIFEST).write_text(json.dumps({"format_version": 1, "stages": {}}))
    (v1 / "transformer" / "bucket-0.pt2").write_bytes(b"zip")
    (v1 / "triton-cache" / "KEY" / "k.so").write_bytes(b"elf")
    art.check_output_target(v1)
    (v1 / "transformer" / "other.bin").write_bytes(b"?")
    with pytest.raises(InvalidArgumentError, match="holds transformer/other.bin"):
        art.check_output_target(v1)


def test_an_artifact_name_at_the_file_systems_limit_is_written(demo_cache, tmp_path, capsys):
    """Found by an audit: compile wrote into a temporary folder named '.NAME.' + 8 characters beside --out: a name
    the file system takes, near its 255 bytes, failed once the model was loaded and compiled."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    name = "a" * os.pathconf(out_dir, "PC_NAME_MAX")
    code, err = _run(["compile", "--out", str(out_dir / name), "--height", "32", "--width", "32",
                      "--max-sequence-length", "8", "--no-progress"], capsys)
    assert code == 0, err
    assert [p.name for p in out_dir.iterdir()] == [name] and (out_dir / name / art.MANIFEST).is_file()


def test_the_writer_replaces_an_artifact_named_at_the_limit(tmp_path):
    """The folder the previous artifact is moved to while the new one takes its place is short too."""
    name = "b" * os.pathconf(tmp_path, "PC_NAME_MAX")
    for content in (b"old", b"new"):
        writer = art.ArtifactWriter(tmp_path / name)
        writer.file("stage/x.bin").write_bytes(content)
        writer.commit({"format_version": art.FORMAT_VERSION, "stages": {}})
    assert [p.name for p in tmp_path.iterdir()] == [name] and (tmp_path / name / "stage/x.bin").read_bytes() == b"new"


def test_a_name_the_file_system_cannot_take_is_refused_by_the_writer(tmp_path):
    """The Python API (``pipe.compile(out=...)``) too, before any tracing, even where the folder is still to be
    made (the compile made it, compiled, and failed at the last rename)."""
    name = "c" * (os.pathconf(tmp_path, "PC_NAME_MAX") + 1)
    for out in (tmp_path / name, tmp_path / "new" / name):
        with pytest.raises(InvalidArgumentError) as info:
            art.ArtifactWriter(out)
        assert info.value.field == "out" and "File name too long" in str(info.value), info.value
    assert list(tmp_path.iterdir()) == []


def test_the_python_api_refuses_before_tracing(photos, demo_cache, monkeypatch):
    from diffc.demo import demo_checkpoint

    pipe = diffc.load(demo_checkpoint("flux"), device="cpu")

    def traced(*args, **kwargs):
        raise AssertionError("traced before refusing --out")

    monkeypatch.setattr(compile_pipeline_module, "compile_region", traced)
    before = _files(photos)
    with pytest.raises(InvalidArgumentError, match="exists and is not a diffc artifact"):
        pipe.compile([{"height": 32, "width": 32}], out=str(photos), log=lambda line: None)
    assert _files(photos) == before
    # run --compile's cache folder: a folder there that is not a diffc artifact is refused, not replaced
    seen = []
    pipe.compile = lambda requests, out, **kw: seen.append(out)
    compile_cached(pipe, {"height": 32, "width": 32}, log=lambda line: None)
    del pipe.compile
    (cached := seen[0]).mkdir(parents=True)
    (cached / "user.txt").write_text("mine")
    with pytest.raises(InvalidArgumentError, match=f"{cached} exists and is not a diffc artifact"):
        compile_cached(pipe, {"height": 32, "width": 32}, log=lambda line: None)
    assert (cached / "user.txt").read_text() == "mine"


# ---- every output path before loading ------------------------------------------------------------

@pytest.mark.parametrize("extra,fragment", [
    (["-o", "{tmp}/missing/a.png"], "--output: directory does not exist: {tmp}/missing"),
    (["-o", "{tmp}/file.txt/a.png"], "--output: {tmp}/file.txt is not a directory"),
    (["-o", "{tmp}"], "--output: {tmp} is a directory; give a file name (such as {tmp}/out.png)"),
    (["-o", "{tmp}/dir.png"], "--output: {tmp}/dir.png is a directory; give a file name"),
    (["-o", "{tmp}/a.mp4"], "--output: an image model writes .png, .jpg, .jpeg, .webp files, got 'a.mp4'"),
    (["--perf-dump-path", "{tmp}/missing/p.json"], "--perf-dump-path: directory does not exist: {tmp}/missing"),
    (["--perf-dump-path", "{tmp}/p.txt"], "--perf-dump-path: must be a .json file, got 'p.txt'"),
    (["--perf-dump-path", "{tmp}/file.txt/p.json"], "--perf-dump-path: {tmp}/file.txt is not a directory"),
    # found by an audit: an output over a file the command reads replaced it
    (["--image", "{tmp}/in.png", "-o", "{tmp}/in.png"], "--output: {tmp}/in.png is the --image file this command "
                                                           "reads; write it elsewhere"),
    (["--config", "{tmp}/c.json", "--perf-dump-path", "{tmp}/c.json"], "--perf-dump-path: {tmp}/c.json is the "
                                                                        "--config file this command reads"),
])
def test_run_checks_outputs_before_loading(tmp_path, capsys, no_loading, extra, fragment):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "in.png").write_bytes(b"\x89PNG mine")
    (tmp_path / "c.json").write_text("{}")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    base = ["run", "--prompt", "x"] + ([] if "-o" in extra else ["-o", str(tmp_path / "a.png")])
    code, err = _run(base + extra, capsys)
    assert code == 2 and fragment.replace("{tmp}", str(tmp_path)) in err and "Traceback" not in err, err
    assert err.count("\n") == 1
    assert (tmp_path / "in.png").read_bytes() == b"\x89PNG mine" and (tmp_path / "c.json").read_text() == "{}"


@pytest.mark.parametrize("extra,fragment", [
    (["--out", "{tmp}/missing/a.diffc"], "--out: directory does not exist: {tmp}/missing"),
    (["--report", "{tmp}/missing/r.json"], "--report: directory does not exist: {tmp}/missing"),
    (["--report", "{tmp}/r.yaml"], "--report: must be a .json file, got 'r.yaml'"),
    (["--config", "{tmp}/c.json", "--report", "{tmp}/c.json"], "--report: {tmp}/c.json is the --config file this "
                                                                "command reads"),
])
def test_compile_checks_outputs_before_loading(tmp_path, capsys, no_loading, extra, fragment):
    (tmp_path / "c.json").write_text("{}")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    base = ["compile"] + ([] if "--out" in extra else ["--out", str(tmp_path / "a.diffc")])
    code, err = _run(base + extra, capsys)
    assert code == 2 and fragment.replace("{tmp}", str(tmp_path)) in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_is_refused_before_loading(tmp_path, capsys, no_loading):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = _run(["run", "--prompt", "x", "-o", str(locked / "a.png")], capsys)
    finally:
        locked.chmod(0o700)
    assert code == 2 and f"--output: cannot write in {locked}: Permission denied" in err


# ---- a failure while writing -----------------------------------------------------------------

def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(demo_cache, tmp_path, capsys, monkeypatch):
    import diffc.fileio as fileio

    out_dir = tmp_path / "out"
    out_dir.mkdir()

    replace = os.replace

    def disk_full(src, dst):
        if str(dst).startswith(str(out_dir)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", disk_full)
    code, err = _run(["run", "--prompt", "x", "-o", str(out_dir / "a.png"), *SMALL], capsys)
    assert code == 2
    assert err.endswith(f"diffc run: error: cannot write {out_dir / 'a.png'}: No space left on device\n"), err
    assert "Traceback" not in err and list(out_dir.iterdir()) == []


def test_a_failed_artifact_write_is_one_line_and_leaves_nothing(demo_cache, tmp_path, capsys, monkeypatch):
    from diffc.compile import program_io

    def disk_full(program, path):
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(program_io, "save_program", disk_full)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, err = _run(["compile", "--out", str(out_dir / "a.diffc"), "--height", "32", "--width", "32",
                      "--max-sequence-length", "8"], capsys)
    assert code == 2
    assert err.endswith(f"diffc compile: error: cannot write {out_dir / 'a.diffc'}: No space left on device\n"), err
    assert list(out_dir.iterdir()) == []


LONG = "x" * 300  # one path component past every Linux file system's 255 bytes


@pytest.mark.parametrize("argv,flag", [
    (["run", "--prompt", "x", "-o", "{tmp}/" + LONG + ".png"], "--output"),
    (["run", "--prompt", "x", "-o", "{tmp}/a.png", "--perf-dump-path", "{tmp}/" + LONG + ".json"], "--perf-dump-path"),
    (["run", "--prompt", "x", "-o", "{tmp}/a.png", "--model", "{tmp}/" + LONG], "--model"),
    (["run", "--prompt", "x", "-o", "{tmp}/a.png", "--config", "{tmp}/" + LONG + ".json"], "--config"),
    (["run", "--prompt", "x", "-o", "{tmp}/a.png", "--image", "{tmp}/" + LONG + ".png"], "--image"),
    (["run", "--prompt", "x", "-o", "{tmp}/a.png", "--compiled", "{tmp}/" + LONG], None),  # an artifact error: the path
    (["run", "--prompt", "x", "-o", "{tmp}/a.png", "--lora-path", "{tmp}/" + LONG], "--lora-path"),
    (["compile", "--out", "{tmp}/" + LONG], "--out"),
    (["serve", "--port", "0", "--output-dir", "{tmp}/" + LONG], "--output-dir"),
])
def test_a_path_the_os_refuses_is_one_line_naming_its_flag(tmp_path, capsys, no_loading, demo_cache, argv, flag):
    """Found by an audit: a file name too long was an OSError traceback from wherever the path was first touched."""
    code, err = _run([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith(f"diffc {argv[0]}: error: ")]  # (serve: the demo note)
    named = f"{flag}: " if flag is not None else f"{tmp_path}/"
    assert len(errors) == 1 and errors[0].startswith(f"diffc {argv[0]}: error: {named}"), err
    assert "File name too long" in errors[0], err
