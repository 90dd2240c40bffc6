"""The ``diffc compile`` artifact: a directory of data files described by a manifest that hashes each one.

Layout::

    flux-dev.diffc/
      manifest.json                      what was compiled, for which machine, what the passes did,
                                         the SHA-256 and size of every other file ("files"), and the
                                         SHA-256 of all of its own other fields ("manifest_sha256")
      transformer/transformer_blocks/bucket-0.json
                                         one rewritten block graph per region and shape, in torch.export's
                                         JSON schema (:mod:`.program_io`), weights left out
      transformer/transformer_blocks/bucket-0.safetensors
                                         its lifted constants, if it has any
      triton-cache/<key>/<file>          Triton kernels compiled while warming the graphs up (:mod:`.kernel_cache`)

An artifact is data, as safe to load as safetensors: nothing in it is unpickled, imported or copied
where another program would run it. :func:`open_artifact` reads the manifest, refuses another format
version, then checks every file against the manifest before any is read: a file that is missing,
modified, not listed, a symbolic link or not a regular file is refused, naming it; a manifest whose fields
changed since (``passes.tier``, a bucket key) is refused by :func:`check_manifest_digest` before any
of them is acted on. Programs are read
by :meth:`Artifact.load_program` and kernels are copied by :meth:`Artifact.install_kernel_cache` into
a cache private to this process. Any number of programs may share one artifact.

Weights are not in the artifact: a region's graph reads each block's tensors by their names relative
to the block, so ``diffc run --compiled`` loads the checkpoint the manifest names (or ``--model``) and
every block runs the graph with its own weights. Re-layouts a pass introduced (QKV concatenation) are
packed per block at first use.

:func:`check_compatible` refuses an artifact built for another torch, Triton or CUDA version, GPU
architecture, device type, dtype, model config, or by passes and ops whose source differs from this
diffc's, naming every difference. :class:`ArtifactWriter` replaces only a previous diffc artifact
(:func:`check_output_target`), never another folder or file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import DiffcError, InvalidArgumentError, OutputError
from ..fileio import UMASK, name_too_long, os_reason, shown_path, temporary_prefix
from . import kernel_cache, program_io
from .kernel_cache import TRITON_CACHE

# 2: one graph per repeated-block region per bucket; 3: JSON + safetensors, files hashed; 4: the manifest's own
# fields hashed too (MANIFEST_DIGEST)
FORMAT_VERSION = 4
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest_sha256"
MAX_MANIFEST_BYTES = 64 << 20
_CHUNK = 1 << 20


class ArtifactError(DiffcError):
    """A compiled artifact is missing, damaged, or was built for another machine, version or model."""


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def config_hash(checkpoint: Path, component: str = "transformer") -> str:
    """Hash of ``model_index.json`` and the component's ``config.json``, keys sorted (weights excluded)."""
    from ..checkpoints import read_json
    from ..errors import CheckpointError

    parts = []
    for path in (checkpoint / "model_index.json", checkpoint / component / "config.json"):
        try:
            data = read_json(path)  # bounded: a config linked to /dev/zero was read until memory ran out
        except CheckpointError as exc:
            raise ArtifactError(f"cannot identify the model: {exc}") from None
        data = {k: v for k, v in data.items() if not k.startswith("_diffusers_version")}
        parts.append(json.dumps(data, sort_keys=True))
    return sha256_text("\n".join(parts))[:16]


def environment(device: torch.device) -> dict[str, Any]:
    """The versions and hardware a compiled graph depends on; all of these must match at load time."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "device_type": device.type,
        "gpu": None,
        "gpu_arch": None,
    }
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_arch"] = f"sm_{major}{minor}"
    return env


def informational() -> dict[str, Any]:
    """Recorded but not checked: where and with what the artifact was made."""
    from ..version import __version__

    return {"diffc": __version__, "python": sys.version.split()[0], "host": platform.node()}


# Fields of environment() that must match, with what to tell the user when they do not.
CHECKED_ENV = ("torch", "triton", "cuda", "device_type", "gpu_arch")


def source_differences(built: dict[str, str], here: dict[str, str]) -> list[str]:
    """Passes and ops whose source hash differs between an artifact (``built``) and this diffc (``here``)."""
    out = []
    for name in sorted(set(built) | set(here)):
        if name not in here:
            out.append(f"{name} (not in this diffc)")
        elif name not in built:
            out.append(f"{name} (new since the artifact)")
        elif built[name] != here[name]:
            out.append(f"{name} (changed)")
    return out


def check_compatible(manifest: dict[str, Any], *, device: torch.device, dtype: torch.dtype,
                     model_hash: str | None, where: str, sources: dict[str, str] | None = None) -> None:
    """Raise :class:`ArtifactError` listing every field in which ``manifest`` differs from this run.

    ``sources`` is this diffc's source hash of every pass and op (``compiler.pass_sources()``): an
    artifact compiled by other pass or kernel code is refused, naming the passes and ops that changed.
    """
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{where}: artifact format {manifest.get('format_version')!r}, this diffc reads "
                            f"format {FORMAT_VERSION}; recompile it with `diffc compile`")
    here = environment(device)
    built = manifest.get("environment") if isinstance(manifest.get("environment"), dict) else {}
    diffs = [f"{k}: artifact {built.get(k)!r}, here {here[k]!r}" for k in CHECKED_ENV if built.get(k) != here[k]]
    if manifest.get("dtype") != str(dtype).removeprefix("torch."):
        diffs.append(f"dtype: artifact {manifest.get('dtype')!r}, here {str(dtype).removeprefix('torch.')!r}")
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    if model_hash is not None and model.get("config_hash") != model_hash:
        diffs.append(f"model config: artifact {model.get('config_hash')!r} ({model.get('path')}), here {model_hash!r}")
    if sources is not None:
        passes = manifest.get("passes") if isinstance(manifest.get("passes"), dict) else {}
        recorded = passes.get("sources") if isinstance(passes.get("sources"), dict) else {}
        changed = source_differences(recorded, sources)
        if changed:
            diffs.append("pass and op sources differ from this diffc's: " + ", ".join(changed))
    if diffs:
        raise ArtifactError(f"{where} was compiled for another setup; recompile it with `diffc compile` "
                            "on this machine. Differences: " + "; ".join(diffs))


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the artifact at ``path`` (JSON only: nothing else in the artifact is read)."""
    root = Path(path).expanduser()
    try:
        found = root.is_dir()
    except OSError as exc:  # a name too long, ...
        raise ArtifactError(f"{str(root)[:200]}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not found:
        what = "is a file" if root.is_file() else "is not a directory" if root.exists() else None
        problem = f"compiled artifact not found: {root}" if what is None else f"{root} {what}, not a compiled artifact"
        raise ArtifactError(f"{problem} (expected a directory written by `diffc compile`)")
    file = root / MANIFEST
    if file.is_symlink() or (file.exists() and not file.is_file()):
        raise ArtifactError(f"{file} is not a regular file")
    try:
        if file.stat().st_size > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{file} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; not a diffc manifest")
        manifest = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise ArtifactError(f"{root} is not a diffc artifact: {MANIFEST} is missing") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read {file}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
        raise ArtifactError(f"{file} is not a diffc manifest (no 'stages')")
    return manifest


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of every field of ``manifest`` but :data:`MANIFEST_DIGEST` (keys sorted, compact JSON): a field that
    changes what loading does (``passes.tier``, a bucket's or region's key, a region's graph file) is covered as
    the files are by their hashes in ``files``."""
    fields = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_manifest_digest(manifest: dict[str, Any], where: str) -> None:
    """Refuse a manifest whose fields changed after ``diffc compile`` wrote it (its digest no longer matches)."""
    recorded = manifest.get(MANIFEST_DIGEST)
    if not isinstance(recorded, str):
        raise ArtifactError(f"{where}/{MANIFEST} has no {MANIFEST_DIGEST}; recompile the artifact with `diffc compile`")
    if recorded != manifest_digest(manifest):
        raise ArtifactError(f"{where}/{MANIFEST} was modified after `diffc compile` wrote it (its fields no longer "
                            f"match its {MANIFEST_DIGEST}); recompile the artifact")


def _file_digest(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _listed_files(manifest: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{where}: the manifest lists no files (no 'files'); recompile it with `diffc compile`")
    for relative, entry in files.items():
        parts = relative.split("/") if isinstance(relative, str) else []
        if (not parts or relative == MANIFEST or any(p in ("", ".", "..") or p.startswith(".") for p in parts)
                or "\\" in relative or "\0" in relative):
            raise ArtifactError(f"{where}: the manifest lists an invalid file name {str(relative)[:200]!r}")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and type(entry.get("bytes")) is int):
            raise ArtifactError(f"{where}: the manifest entry for {relative} has no sha256 and bytes")
    return files


MAX_DEPTH = 8  # folders below the root: diffc writes two (transformer/<region>/, triton-cache/<key>/)


def _present_files(root: Path, where: str) -> set[str]:
    """Every file under ``root`` as a relative POSIX path, refusing links, special files and folders nested deeper
    than any artifact's (os.walk recursed into 1000 of them until Python's recursion limit)."""
    present = set()
    folders = [(root, 0)]
    while folders:
        folder, depth = folders.pop()
        try:
            names = sorted(os.listdir(folder))
        except OSError as exc:
            raise ArtifactError(f"cannot read {where}/{folder.relative_to(root).as_posix()}: "
                                f"{exc.strerror or exc}") from None
        for name in names:
            path = folder / name
            relative = path.relative_to(root).as_posix()
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                raise ArtifactError(f"{where}/{relative} is a symbolic link; an artifact holds regular files only")
            if stat.S_ISDIR(mode):
                if depth + 1 > MAX_DEPTH:
                    raise ArtifactError(f"{where}/{relative}: folders nested deeper than an artifact's "
                                        f"({MAX_DEPTH} levels)")
                folders.append((path, depth + 1))
                continue
            if not stat.S_ISREG(mode):
                raise ArtifactError(f"{where}/{relative} is not a regular file")
            present.add(relative)
    present.discard(MANIFEST)
    return present


@dataclasses.dataclass
class Artifact:
    """An artifact whose files all matched its manifest when it was opened (:func:`open_artifact`)."""

    root: Path
    manifest: dict[str, Any]
    files: dict[str, dict[str, Any]]
    where: str

    def read(self, relative: str) -> bytes:
        """The bytes of a listed file, checked against the manifest again as they are read."""
        entry = self.files.get(relative)
        if entry is None:
            raise ArtifactError(f"{self.where}: {relative} is not listed in the manifest")
        path = self.root / relative
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as f:
                data = f.read(entry["bytes"] + 1)
        except OSError as exc:
            raise ArtifactError(f"cannot read {self.where}/{relative}: {exc.strerror or exc}") from None
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ArtifactError(f"{self.where}/{relative} was modified after `diffc compile` wrote it "
                                "(its SHA-256 differs from the manifest); recompile the artifact")
        return data

    def load_program(self, relative: str, device: torch.device | str = "cpu") -> torch.export.ExportedProgram:
        """The program stored at ``relative`` (a ``.json`` file), weights as meta tensors, constants on ``device``."""
        if not relative.endswith(".json"):
            raise ArtifactError(f"{self.where}/{relative}: a compiled graph is a .json file; recompile the artifact")
        if relative not in self.files:
            raise ArtifactError(f"compiled graph missing from the artifact: {self.where}/{relative}")
        constants = program_io.constants_path(Path(relative)).as_posix()
        try:
            return program_io.load_program(self.read(relative),
                                           self.read(constants) if constants in self.files else None, device)
        except program_io.ProgramFormatError as exc:
            raise ArtifactError(f"cannot read compiled graph {self.where}/{relative}: {exc}") from None

    def buckets(self, stage: str) -> list[dict[str, Any]]:
        """The manifest's bucket entries for ``stage``, each an object with a ``key`` string."""
        entries = self.manifest["stages"].get(stage)
        buckets = entries.get("buckets") if isinstance(entries, dict) else None
        if not isinstance(buckets, list) or not all(isinstance(b, dict) and isinstance(b.get("key"), str)
                                                    for b in buckets):
            raise ArtifactError(f"{self.where}/{MANIFEST}: no valid bucket list for stage '{stage}'")
        return buckets

    def kernel_files(self) -> list[str]:
        return sorted(r for r in self.files if r.split("/", 1)[0] == TRITON_CACHE)

    def install_kernel_cache(self) -> Path | None:
        """Copy the artifact's kernels into this process's private Triton cache and use it (see :mod:`.kernel_cache`)."""
        try:
            for relative in self.kernel_files():
                kernel_cache.check_kernel_file(relative)
            return kernel_cache.install_private_cache({r: self.read(r) for r in self.kernel_files()})
        except kernel_cache.KernelCacheError as exc:
            raise ArtifactError(f"{self.where}: {exc}") from None


def open_artifact(path: str | Path) -> Artifact:
    """Read the manifest of the artifact at ``path`` and check every file against it before anything else is read."""
    root = Path(path).expanduser()
    where = str(root)
    manifest = read_manifest(root)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{where}: artifact format {manifest.get('format_version')!r}, this diffc reads "
                            f"format {FORMAT_VERSION}; recompile it with `diffc compile`")
    files = _listed_files(manifest, where)
    present = _present_files(root, where)
    unknown = sorted(present - set(files))
    if unknown:
        raise ArtifactError(f"{where}/{unknown[0]} is not listed in the artifact's manifest; an artifact holds only "
                            f"the files `diffc compile` wrote ({len(unknown)} unknown file(s))")
    for relative in sorted(files):
        if relative not in present:
            raise ArtifactError(f"{where}/{relative} is missing from the artifact (listed in its manifest)")
        try:
            kernel_cache.check_kernel_file(relative) if relative.startswith(f"{TRITON_CACHE}/") else None
        except kernel_cache.KernelCacheError as exc:
            raise ArtifactError(f"{where}: {exc}") from None
        try:
            digest, size = _file_digest(root / relative)
        except OSError as exc:
            raise ArtifactError(f"cannot read {where}/{relative}: {exc.strerror or exc}") from None
        if size != files[relative]["bytes"] or digest != files[relative]["sha256"]:
            raise ArtifactError(f"{where}/{relative} was modified after `diffc compile` wrote it (its SHA-256 "
                                "differs from the manifest); recompile the artifact")
    return Artifact(root, manifest, files, where)


def _is_artifact_file(manifest: dict[str, Any], relative: str) -> bool:
    files = manifest.get("files")
    if isinstance(files, dict):
        return relative in files
    parts = relative.split("/")  # format 1 listed no files: its known layout
    return parts[0] == TRITON_CACHE or (len(parts) == 2 and parts[0] == "transformer" and parts[1].endswith(".pt2"))


def check_output_target(path: str | Path, field: str = "out") -> Path:
    """Refuse an output path holding anything but a previous diffc artifact; returns the absolute path.

    Nothing exists there, an empty directory, or a directory with a diffc manifest whose every file
    is one the artifact lists: diffc may replace it. A file, a link, or a folder with anything else
    is the user's and is refused, naming it.
    """
    if not str(path).strip():
        raise InvalidArgumentError(field, "is empty; give the artifact's path")
    p = Path(os.path.abspath(Path(path).expanduser()))
    try:
        too_long, is_link, exists = name_too_long(p), p.is_symlink(), p.exists()
    except OSError as exc:  # a folder's name above it that the file system cannot take
        raise InvalidArgumentError(field, f"{shown_path(path)}: {os_reason(exc)}") from None
    if too_long:
        raise InvalidArgumentError(field, f"{shown_path(path)}: {too_long}")
    if is_link:
        raise InvalidArgumentError(field, f"{path} is a symbolic link; give the artifact directory itself")
    if not exists:
        return p
    if not p.is_dir():
        raise InvalidArgumentError(field, f"{path} exists and is not a diffc artifact (it is a file); diffc "
                                          "replaces only an artifact it wrote: choose another path")
    entries = list(p.iterdir())
    if not entries:
        return p
    try:
        manifest = read_manifest(p)
    except ArtifactError:
        raise InvalidArgumentError(field, f"{path} exists and is not a diffc artifact (no diffc {MANIFEST}); diffc "
                                          "replaces only an artifact it wrote: choose another path") from None
    for dirpath, dirnames, filenames in os.walk(p):
        for name in filenames + dirnames:
            full = Path(dirpath) / name
            relative = full.relative_to(p).as_posix()
            if full.is_symlink() or (not full.is_dir() and relative != MANIFEST
                                     and not _is_artifact_file(manifest, relative)):
                raise InvalidArgumentError(field, f"{path} holds {relative}, which is not part of the diffc artifact "
                                                  "there; diffc will not replace it: choose another path")
    return p


@dataclasses.dataclass
class ArtifactWriter:
    """Writes an artifact into a temporary sibling directory; :meth:`commit` renames it into place.

    ``path`` must be free or hold a previous diffc artifact (checked at construction, before any
    compiling, and again at commit). A failed compile (an exception before ``commit``) leaves nothing
    at ``path``; an existing artifact there is replaced only by a complete new one.
    """

    path: Path
    tmp: Path = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.given = str(self.path)
        self.path = check_output_target(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=temporary_prefix(self.path.name)))
        except OSError as exc:
            raise OutputError(self.given, exc.strerror or str(exc)) from None

    def file(self, relative: str) -> Path:
        out = self.tmp / relative
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def save_program(self, program: torch.export.ExportedProgram, relative: str) -> int:
        """Store ``program`` at ``relative`` (``.json``, plus constants in ``.safetensors``); returns bytes written."""
        try:
            files = program_io.save_program(program, self.file(relative))
        except program_io.ProgramFormatError as exc:
            raise ArtifactError(f"cannot store the compiled graph {relative}: {exc}") from None
        except OSError as exc:
            raise OutputError(self.given, exc.strerror or str(exc)) from None
        return sum(f.stat().st_size for f in files)

    def commit(self, manifest: dict[str, Any]) -> Path:
        try:
            kernel_cache.prune(self.tmp / TRITON_CACHE)
            files = {}
            for path in sorted(self.tmp.rglob("*")):
                if path.is_file() and path.name != MANIFEST:
                    digest, size = _file_digest(path)
                    files[path.relative_to(self.tmp).as_posix()] = {"sha256": digest, "bytes": size}
            manifest = json.loads(json.dumps({**manifest, "files": files}))  # hashed as it will be read back
            manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
            self.file(MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
            os.chmod(self.tmp, 0o777 & ~UMASK)  # mkdtemp makes the directory private; give it the usual mode
            check_output_target(self.given)
            if self.path.exists():
                old = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=temporary_prefix(self.path.name) + "old."))
                os.replace(self.path, old / "artifact")
                os.replace(self.tmp, self.path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp, self.path)
        except OSError as exc:
            raise OutputError(self.given, exc.strerror or str(exc)) from None
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def save_program(program: torch.export.ExportedProgram, path: str | Path) -> list[Path]:
    """Write ``program`` as JSON (``path``) plus safetensors constants; weights are not stored."""
    return program_io.save_program(program, Path(path))


def load_program(path: str | Path, device: torch.device | str = "cpu") -> torch.export.ExportedProgram:
    """Read a program :func:`save_program` wrote (outside an artifact: no manifest, no hash check)."""
    path = Path(path)
    constants = program_io.constants_path(path)
    try:
        data = path.read_bytes()
        extra = constants.read_bytes() if constants.is_file() else None
    except FileNotFoundError:
        raise ArtifactError(f"compiled graph not found: {path}") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return program_io.load_program(data, extra, device)
    except program_io.ProgramFormatError as exc:
        raise ArtifactError(f"cannot read compiled graph {path}: {exc}") from None


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
