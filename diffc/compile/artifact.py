"""The ``diffc compile`` artifact: a directory with a manifest and one rewritten graph per shape bucket.

Layout::

    flux-dev.diffc/
      manifest.json                                       what was compiled, for which machine, what the passes did
      transformer/transformer_blocks/bucket-0.pt2         one rewritten block graph per region and shape,
      transformer/single_transformer_blocks/bucket-1.pt2  weights left out
      triton-cache/                                       Triton kernels compiled while warming the graphs up

Weights are not in the artifact: a region's graph reads each block's tensors by their names relative
to the block, so ``diffc run --compiled`` loads the checkpoint the manifest names (or ``--model``) and
every block runs the graph with its own weights. Re-layouts a pass introduced (QKV concatenation) are
packed per block at first use.

:func:`check_compatible` refuses an artifact built for another torch, Triton or CUDA version, GPU
architecture, device type, dtype, model config or diffc format, naming every field that differs.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import DiffcError
from ..fileio import UMASK

FORMAT_VERSION = 2  # 2: one graph per repeated-block region per bucket
MANIFEST = "manifest.json"
TRITON_CACHE = "triton-cache"


class ArtifactError(DiffcError):
    """A compiled artifact is missing, damaged, or was built for another machine, version or model."""


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def config_hash(checkpoint: Path, component: str = "transformer") -> str:
    """Hash of ``model_index.json`` and the component's ``config.json``, keys sorted (weights excluded)."""
    parts = []
    for path in (checkpoint / "model_index.json", checkpoint / component / "config.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"cannot read {path} to identify the model: {exc}") from exc
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


def check_compatible(manifest: dict[str, Any], *, device: torch.device, dtype: torch.dtype,
                     model_hash: str | None, where: str) -> None:
    """Raise :class:`ArtifactError` listing every field in which ``manifest`` differs from this run."""
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{where}: artifact format {manifest.get('format_version')!r}, this diffc reads "
                            f"format {FORMAT_VERSION}; recompile it with `diffc compile`")
    here = environment(device)
    built = manifest.get("environment", {})
    diffs = [f"{k}: artifact {built.get(k)!r}, here {here[k]!r}" for k in CHECKED_ENV if built.get(k) != here[k]]
    if manifest.get("dtype") != str(dtype).removeprefix("torch."):
        diffs.append(f"dtype: artifact {manifest.get('dtype')!r}, here {str(dtype).removeprefix('torch.')!r}")
    if model_hash is not None and manifest.get("model", {}).get("config_hash") != model_hash:
        diffs.append(f"model config: artifact {manifest.get('model', {}).get('config_hash')!r} "
                     f"({manifest.get('model', {}).get('path')}), here {model_hash!r}")
    if diffs:
        raise ArtifactError(f"{where} was compiled for another setup; recompile it with `diffc compile` "
                            "on this machine. Differences: " + "; ".join(diffs))


def read_manifest(path: str | Path) -> dict[str, Any]:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ArtifactError(f"compiled artifact not found: {root} (expected a directory written by `diffc compile`)")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(f"{root} is not a diffc artifact: {MANIFEST} is missing") from exc
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{root / MANIFEST} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or "stages" not in manifest:
        raise ArtifactError(f"{root / MANIFEST} is not a diffc manifest (no 'stages')")
    return manifest


@dataclasses.dataclass
class ArtifactWriter:
    """Writes an artifact into a temporary sibling directory; :meth:`commit` renames it into place.

    A failed compile (an exception before ``commit``) leaves nothing at ``path``; an existing artifact
    there is replaced only by a complete new one.
    """

    path: Path
    tmp: Path = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path).expanduser().resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}."))

    def file(self, relative: str) -> Path:
        out = self.tmp / relative
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def save_program(self, program: torch.export.ExportedProgram, relative: str) -> int:
        """``torch.export.save`` of ``program`` with its weights replaced by meta tensors; returns bytes."""
        out = self.file(relative)
        torch.export.save(without_weights(program), str(out))
        return out.stat().st_size

    def commit(self, manifest: dict[str, Any]) -> Path:
        self.file(MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        os.chmod(self.tmp, 0o777 & ~UMASK)  # mkdtemp makes the directory private; give it the usual mode
        if self.path.exists():
            old = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.old."))
            os.replace(self.path, old / "artifact")
            os.replace(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def without_weights(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """A shallow copy of ``program`` whose parameters and buffers are meta tensors (no data is saved).

    Lifted constants (e.g. Wan's RoPE tables, computed at trace time) keep their values: they are
    part of the graph, not of the checkpoint.
    """
    stripped = {}
    for name, t in program.state_dict.items():
        meta = t.detach().to("meta")
        stripped[name] = torch.nn.Parameter(meta, requires_grad=False) if isinstance(t, torch.nn.Parameter) else meta
    out = copy.copy(program)  # shares the graph; only the state dict differs
    out._state_dict = stripped
    return out


def load_program(path: Path) -> torch.export.ExportedProgram:
    try:
        return torch.export.load(str(path))
    except FileNotFoundError as exc:
        raise ArtifactError(f"compiled graph missing from the artifact: {path}") from exc
    except Exception as exc:  # torch raises several types for a damaged archive
        raise ArtifactError(f"cannot read compiled graph {path}: {type(exc).__name__}: {exc}") from exc


_PRIVATE_CACHES: list[Any] = []


def use_kernel_cache(source: Path) -> Path | None:
    """Use the artifact's compiled Triton kernels in this process only: copy them into a private
    temporary cache and point ``TRITON_CACHE_DIR`` at it (nothing is written to the user's own cache)."""
    if not Path(source).is_dir():
        return None
    private = tempfile.TemporaryDirectory(prefix="diffc-triton-")
    _PRIVATE_CACHES.append(private)  # lives as long as the process
    target = Path(private.name)
    for path in Path(source).rglob("*"):
        if path.is_file() and not path.is_symlink():
            dest = target / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
    os.environ["TRITON_CACHE_DIR"] = str(target)
    return target


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
