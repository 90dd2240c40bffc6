"""Read safetensors weights (single file or sharded with an index) straight to a device and dtype.

Every weight file stays inside its component folder: a shard name in an index is a plain relative
name (no ``..``, no absolute path) and the file it names, symbolic links followed, resolves inside the
folder (or, for a Hugging Face hub cache snapshot, inside that repository's ``blobs/``), and is a
regular file. A malformed index or safetensors header is a ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError

from ..checkpoints import open_safetensors as _open
from ..errors import CheckpointError

# File names diffusers writes, in the order it prefers them.
_SINGLE = ("diffusion_pytorch_model.safetensors", "model.safetensors")
_INDEX = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
MAX_INDEX_BYTES = 64 << 20
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weights torch would unpickle: named, never read


def _allowed_roots(folder: Path) -> list[Path]:
    """Where ``folder``'s files may resolve: the folder itself, and a hub cache snapshot's ``blobs/``."""
    real = folder.resolve()
    roots = [real]
    for parent in real.parents:
        if parent.name == "snapshots" and parent.parent.name.startswith(("models--", "datasets--")):
            roots.append(parent.parent / "blobs")
            break
    return roots


def check_inside(folder: Path, path: Path, source: Path | str) -> Path:
    """``path`` if it resolves (links followed) inside ``folder`` (see :func:`_allowed_roots`); else refuse."""
    real = path.resolve()
    if not any(real == root or real.is_relative_to(root) for root in _allowed_roots(folder)):
        raise CheckpointError(f"{source}: {path.name} points outside the checkpoint folder {folder}; "
                              "weights must be files inside it")
    return path


def _shard_path(folder: Path, name: object, index_path: Path) -> Path:
    if (not isinstance(name, str) or not name or name.startswith(("/", "\\")) or "\\" in name or "\0" in name
            or ":" in name or any(part in ("", ".", "..") for part in name.split("/"))):
        raise CheckpointError(f"{index_path}: shard name {str(name)[:200]!r} is not a file name inside {folder}")
    return folder / name


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        if index_path.stat().st_size > MAX_INDEX_BYTES:
            raise CheckpointError(f"{index_path}: larger than {MAX_INDEX_BYTES >> 20} MiB; not a safetensors index")
        weight_map = json.loads(index_path.read_bytes())["weight_map"]
    except OSError as exc:
        raise CheckpointError(f"{index_path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{index_path}: not a valid safetensors index ({type(exc).__name__}: {exc})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) for k in weight_map):
        raise CheckpointError(f"{index_path}: not a valid safetensors index ('weight_map' must map names to files)")
    return weight_map


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding a component's weights, checking that every shard is on disk and inside."""
    for name in _INDEX:
        index_path = folder / name
        if index_path.is_file():
            shards = {_shard_path(folder, s, index_path) for s in _read_index(index_path).values()}
            missing = sorted(p.name for p in shards if not p.is_file())
            if missing:
                raise CheckpointError(f"{index_path} names shard(s) that are not on disk: {', '.join(missing)}")
            return [check_inside(folder, p, index_path) for p in sorted(shards)]
    for name in _SINGLE:
        if (folder / name).is_file():
            return [check_inside(folder, folder / name, folder / name)]
    not_files = [name for name in _SINGLE + _INDEX if (folder / name).exists()]
    if not_files:
        raise CheckpointError(f"{folder / not_files[0]} is not a file; weights are safetensors files")
    found = sorted(p.name for p in folder.glob("*.safetensors") if p.is_file())
    if len(found) == 1:
        return [check_inside(folder, folder / found[0], folder / found[0])]
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED)
    raise CheckpointError(
        f"{folder}: no safetensors weights found (expected one of {', '.join(_SINGLE + _INDEX)}"
        + (f"; found several unindexed files: {', '.join(found)}" if found else "")
        + ")" + (f"; {', '.join(pickled[:3])} {'is' if len(pickled) == 1 else 'are'} pickled and never loaded: "
                 "convert the weights to safetensors" if pickled else "")
    )


def tensor_names(files: list[Path]) -> list[str]:
    return list(tensor_shapes(files))


def tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, read from the safetensors headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    first: dict[str, Path] = {}
    for path in files:
        with _open(path) as f:
            for name in f.keys():
                if name in first:  # the later file's tensor would silently replace the earlier one's
                    raise CheckpointError(f"{path}: tensor {name!r} is also in {first[name].name}; each weight must "
                                          "be stored in one shard")
                first[name] = path
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def iter_tensors(
    files: list[Path], device: torch.device, dtype_for: "callable[[str], torch.dtype | None]",
    stored: dict[str, Path] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one tensor at a time, read directly onto ``device``.

    ``dtype_for(name)`` gives the target dtype for a floating-point tensor (``None`` keeps the
    stored dtype). Only one tensor at a time is ever held in its stored dtype. ``stored``, if given,
    receives the file of every tensor yielded exactly as stored (no dtype conversion).
    """
    load_device = "cpu" if device.type == "meta" else str(device)
    for path in files:
        with _open(path, load_device) as f:
            for name in f.keys():
                try:
                    tensor = f.get_tensor(name)
                except (SafetensorError, RuntimeError, ValueError) as exc:
                    raise CheckpointError(f"{path}: cannot read tensor {name!r} ({exc})") from None
                target = dtype_for(name)
                if target is not None and tensor.is_floating_point() and tensor.dtype != target:
                    tensor = tensor.to(target)
                elif stored is not None:
                    stored[name] = path
                yield name, tensor
