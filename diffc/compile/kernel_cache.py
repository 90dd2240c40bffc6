"""The Triton kernels an artifact carries, kept private to the process that loads it.

While ``diffc compile`` warms a graph up, Triton compiles its kernels into the artifact's
``triton-cache/<key>/`` folders. Only the files Triton needs to skip compiling a kernel travel with
the artifact (:data:`KERNEL_SUFFIXES`: kernel metadata JSON, the IR stages and the GPU binary);
launcher stubs (``.so``) and anything else are dropped, and Triton's group files, which hold
absolute paths, are rewritten to name their files only.

A run never copies these files into ``$TRITON_CACHE_DIR`` or ``~/.triton``, where every later Triton
program would load them: :func:`install_private_cache` copies the hash-checked files into a
directory private to this process (removed at exit) and points ``TRITON_CACHE_DIR`` at it for the
rest of the process, since the compiled graphs build their kernels lazily, at their first call.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

TRITON_CACHE = "triton-cache"
# What Triton writes per kernel (triton/compiler/compiler.py, backends/*/compiler.py), minus launchers.
KERNEL_SUFFIXES = frozenset({".json", ".source", ".ttir", ".ttgir", ".glir", ".llir", ".ptx", ".cubin",
                             ".amdgcn", ".hsaco"})
BINARY_SUFFIXES = frozenset({".cubin", ".hsaco"})  # ELF objects the GPU driver loads
GROUP_PREFIX = "__grp__"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=+-]{0,254}$")

_private: Path | None = None


class KernelCacheError(ValueError):
    """A kernel-cache file the format does not allow; the message names it."""


def check_kernel_file(relative: str) -> tuple[str, str]:
    """``(key, name)`` of ``triton-cache/<key>/<name>``, refusing any other path or kind of file."""
    parts = relative.split("/")
    if len(parts) != 3 or parts[0] != TRITON_CACHE or not all(_NAME.match(p) for p in parts[1:]):
        raise KernelCacheError(f"{relative}: a kernel cache holds only {TRITON_CACHE}/<key>/<file>")
    suffix = os.path.splitext(parts[2])[1].lower()
    if suffix not in KERNEL_SUFFIXES:
        raise KernelCacheError(f"{relative}: '{suffix or parts[2]}' files are not part of a kernel cache "
                               f"(accepted: {', '.join(sorted(KERNEL_SUFFIXES))})")
    return parts[1], parts[2]


def prune(cache: Path) -> None:
    """At ``diffc compile``: keep only regular kernel files two levels down; make group files path-free."""
    if not cache.exists():
        return
    for dirpath, dirnames, filenames in os.walk(cache, topdown=False):
        here = Path(dirpath)
        for name in filenames + dirnames:
            path = here / name
            relative = f"{TRITON_CACHE}/{path.relative_to(cache).as_posix()}"
            if path.is_symlink() or (not path.is_dir() and not path.is_file()):
                path.unlink()
            elif path.is_dir():
                if not any(path.iterdir()):
                    path.rmdir()
            else:
                try:
                    check_kernel_file(relative)
                except KernelCacheError:
                    path.unlink()
                    continue
                if name.startswith(GROUP_PREFIX):
                    try:
                        children = _group_children(path.read_bytes(), relative, lambda child: (here / child).is_file())
                    except KernelCacheError:
                        path.unlink()  # Triton compiles that kernel again at the first call
                        continue
                    path.write_text(json.dumps({"child_paths": children}))


def _group_children(data: bytes, relative: str, exists: Callable[[str], bool]) -> dict[str, str]:
    """A group file's ``{child: file name}``, each file name bare and present beside it."""
    try:
        children = json.loads(data)["child_paths"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise KernelCacheError(f"{relative}: not a Triton group file") from None
    if not isinstance(children, dict):
        raise KernelCacheError(f"{relative}: not a Triton group file")
    out = {}
    for child, path in children.items():
        name = os.path.basename(path) if isinstance(path, str) else ""
        if not (isinstance(child, str) and _NAME.match(child) and _NAME.match(name) and exists(name)):
            raise KernelCacheError(f"{relative}: names a file outside its folder or not in the artifact: {str(path)[:200]!r}")
        out[child] = name
    return out


def _check_content(relative: str, name: str, data: bytes) -> None:
    """Each kind holds what Triton expects: a JSON object, an ELF object, or UTF-8 text."""
    suffix = os.path.splitext(name)[1].lower()
    if suffix == ".json":
        try:
            ok = isinstance(json.loads(data), dict)
        except (ValueError, RecursionError):
            ok = False
        if not ok:
            raise KernelCacheError(f"{relative}: not a JSON object")
    elif suffix in BINARY_SUFFIXES:
        if not data.startswith(b"\x7fELF"):
            raise KernelCacheError(f"{relative}: not an ELF object")
    else:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise KernelCacheError(f"{relative}: not UTF-8 text") from None


def private_cache_dir() -> Path:
    """This process's private Triton cache directory (created once, removed at exit)."""
    global _private
    if _private is None or not _private.is_dir():
        _private = Path(tempfile.mkdtemp(prefix=f"diffc-triton-{os.getpid()}-"))
        atexit.register(shutil.rmtree, _private, True)
    return _private


def install_private_cache(files: dict[str, bytes]) -> Path | None:
    """Copy kernel ``files`` (``{relative path: verified bytes}``) into :func:`private_cache_dir` and use it.

    Group files are rewritten to the private copies' paths. Returns the directory, or None when
    the artifact carries no kernels (``TRITON_CACHE_DIR`` is left alone then).
    """
    if not files:
        return None
    parsed = {relative: check_kernel_file(relative) for relative in files}
    present = {(key, name) for key, name in parsed.values()}
    target = private_cache_dir()
    ready: dict[Path, bytes] = {}
    for relative, (key, name) in sorted(parsed.items()):
        data = files[relative]
        _check_content(relative, name, data)
        folder = target / key
        if name.startswith(GROUP_PREFIX):
            children = _group_children(data, relative, lambda child, key=key: (key, child) in present)
            data = json.dumps({"child_paths": {c: str(folder / n) for c, n in children.items()}}).encode()
        ready[folder / name] = data
    for dest, data in ready.items():
        dest.parent.mkdir(exist_ok=True)
        if not dest.exists():
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, dest)
    os.environ["TRITON_CACHE_DIR"] = str(target)
    return target
