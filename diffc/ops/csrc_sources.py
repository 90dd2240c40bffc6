"""Where the CUDA C++ sources of ``csrc/`` are and what identifies a binary built from them (no torch).

``setup.py`` loads this file by path to build cubins ahead of time where nvcc is present, and
:mod:`diffc.ops.csrc` uses it to decide whether such a cubin was built from the source it ships: a
kernel file's identity is the SHA-256 of its text with the ``#include "..."`` files it names pasted in
(:func:`source`), which is also the text NVRTC compiles, so both routes build from the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

PACKAGED = "_csrc"  # the sources (and any ahead-of-time cubins) inside an installed wheel: diffc/_csrc/
MANIFEST = "manifest.json"
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([A-Za-z0-9_.-]+)"[ \t]*$', re.MULTILINE)


def source_dir() -> Path:
    """``diffc/_csrc`` in an installed wheel, else the checkout's ``csrc/`` (editable installs, the tests)."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / PACKAGED
    return packaged if (packaged / "common.cuh").is_file() else package.parent / "csrc"


def stems(directory: Path) -> list[str]:
    """The kernel files (``<stem>.cu``) of a source folder, sorted."""
    return sorted(p.stem for p in directory.glob("*.cu"))


def source(stem: str, directory: Path) -> str:
    """The text of ``<stem>.cu`` with each ``#include "file"`` of the same folder pasted in, once."""
    seen: set[str] = set()

    def paste(match: re.Match) -> str:
        name = match.group(1)
        if name in seen:
            return ""
        seen.add(name)
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{stem}.cu includes {name}, which is not in {directory}")
        return _INCLUDE.sub(paste, path.read_text())

    path = directory / f"{stem}.cu"
    if not path.is_file():
        raise FileNotFoundError(f"no CUDA source {path}")
    return _INCLUDE.sub(paste, path.read_text())


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def cubin_name(stem: str, arch: str) -> str:
    """File name of an ahead-of-time cubin, e.g. ``quantize_rows.sm_90.cubin``."""
    return f"{stem}.{arch}.cubin"


def build_ahead(src: Path, out: Path, archs: Iterable[str], compile_cubin: Callable[[str, str, Path], None],
                compiler: str) -> dict:
    """Build every ``src/<stem>.cu`` for every arch into ``out`` and write the manifest; returns it.

    ``compile_cubin(text, arch, path)`` compiles one pasted source to a cubin at ``path`` (nvcc in
    setup.py). The manifest records each source's digest, so a cubin is used only with its own source.
    """
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"compiler": compiler, "kernels": {}}
    for stem in stems(src):
        text = source(stem, src)
        built = []
        for arch in archs:
            compile_cubin(text, arch, out / cubin_name(stem, arch))
            built.append(arch)
        manifest["kernels"][stem] = {"sha256": digest(text), "archs": built}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def ahead_of_time(stem: str, arch: str, directory: Path, text: str) -> Path | None:
    """The ahead-of-time cubin for ``stem`` on ``arch`` when the manifest says it was built from ``text``."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        entry = manifest["kernels"][stem]
        matches = entry["sha256"] == digest(text) and arch in entry["archs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = directory / cubin_name(stem, arch)
    return path if matches and path.is_file() else None
