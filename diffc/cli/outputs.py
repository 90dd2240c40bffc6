"""Output paths, checked before any model loads: a mistake is one line at once, not a traceback at the end."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import InvalidArgumentError
from ..fileio import IMAGE_SUFFIXES as IMAGE_FORMAT_OF
from ..fileio import VIDEO_SUFFIXES, os_reason, shown_path

IMAGE_SUFFIXES = tuple(IMAGE_FORMAT_OF)
JSON_SUFFIXES = (".json",)


def check_writable_dir(directory: Path, field: str) -> None:
    """``directory`` exists and a file can be created in it (tried, so read-only mounts and ACLs count)."""
    if not directory.exists():
        raise InvalidArgumentError(field, f"directory does not exist: {directory}")
    if not directory.is_dir():
        raise InvalidArgumentError(field, f"{directory} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".diffc-write-check.")
    except OSError as exc:
        raise InvalidArgumentError(field, f"cannot write in {directory}: {os_reason(exc)}") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str | Path, field: str, suffixes: tuple[str, ...], what: str | None = None) -> Path:
    """A file diffc will write: an accepted suffix, not a directory, in a writable directory."""
    p = Path(path).expanduser()
    try:
        is_dir = p.is_dir()
    except OSError as exc:  # a name too long: --output's own, or a numbered OUTPUT-i of --batch
        raise InvalidArgumentError(field, f"{shown_path(path)}: {os_reason(exc)}") from None
    if is_dir:  # before the suffix: "/tmp" is a folder, not a file with the wrong suffix
        raise InvalidArgumentError(field, f"{path} is a directory; give a file name (such as "
                                          f"{p / ('out' + suffixes[0])})")
    if p.suffix.lower() not in suffixes:
        expected = f"{what} writes {', '.join(suffixes)} files" if what else f"must be a {' or '.join(suffixes)} file"
        raise InvalidArgumentError(field, f"{expected}, got '{p.name}'")
    check_writable_dir(p.parent if str(p.parent) else Path("."), field)
    return p


def check_media_output(path: str | Path, kind: str, field: str = "--output") -> Path:
    suffixes = IMAGE_SUFFIXES if kind == "image" else VIDEO_SUFFIXES
    return check_output_file(path, field, suffixes, f"a{'n' if kind == 'image' else ''} {kind} model")


def check_json_output(path: str | Path, field: str) -> Path:
    return check_output_file(path, field, JSON_SUFFIXES)


def check_artifact_output(path: str | Path, field: str = "--out") -> Path:
    """``compile --out``: free or a previous diffc artifact, in an existing writable directory."""
    from ..compile.artifact import check_output_target

    target = check_output_target(path, field)
    check_writable_dir(target.parent, field)
    return target


def check_outside(path: Path, field: str, folders: dict[str, str | Path | None]) -> None:
    """``path`` (a file diffc will write) lies in none of ``folders`` (what each is -> its path): a checkpoint or an
    artifact the command reads is the user's, and a file written into it breaks it."""
    target = Path(path).expanduser().resolve()
    for what, folder in folders.items():
        if folder is None or not str(folder).strip():
            continue
        root = Path(folder).expanduser().resolve()
        if target == root or target.is_relative_to(root):
            raise InvalidArgumentError(field, f"{path} is inside the {what} {folder}, which this command reads; "
                                              "write it elsewhere")


def check_not_input(path: Path, field: str, inputs: dict[str, list]) -> None:
    """``path`` (a file diffc will write) is none of the files the command reads (flag -> the paths it gave): an
    output written over its own ``--image`` or ``--config`` replaces what the user asked diffc to read."""
    target = Path(path).expanduser().resolve()
    for flag, given in inputs.items():
        for item in given or ():
            if item is not None and str(item).strip() and Path(item).expanduser().resolve() == target:
                raise InvalidArgumentError(field, f"{path} is the {flag} file this command reads; write it elsewhere")
