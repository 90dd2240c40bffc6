"""Reading ``--config FILE`` (YAML or JSON) under command-line flags."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError


def read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError("--config", f"file not found: {path}")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        elif p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise InvalidArgumentError("--config", f"{path}: use a .json, .yaml or .yml file")
    except (json.JSONDecodeError, ValueError) as exc:
        if isinstance(exc, InvalidArgumentError):
            raise
        raise InvalidArgumentError("--config", f"{path}: cannot parse ({exc})") from None
    except Exception as exc:  # yaml.YAMLError and friends
        raise InvalidArgumentError("--config", f"{path}: cannot parse ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidArgumentError("--config", f"{path}: must hold a mapping of option names to values")
    return data


def merge_config(args: argparse.Namespace, parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("config",)) -> None:
    """Fill options not given on the command line from ``args.config``; flags always win.

    Every option left at its parser default (``None``) may come from the file. Keys may use dashes or
    underscores; an unknown key is an error naming it and the accepted keys.
    """
    if not getattr(args, "config", None):
        return
    data = read_config_file(args.config)
    accepted = sorted(a.dest for a in parser._actions if a.dest not in skip + ("help",))
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in accepted:
            raise InvalidArgumentError(f"--config {args.config}", f"unknown option '{key}'; accepted: {', '.join(accepted)}")
        if getattr(args, dest, None) is None:
            action = next(a for a in parser._actions if a.dest == dest)
            if action.type is not None and value is not None:
                try:
                    value = action.type(value)
                except (TypeError, ValueError):
                    raise InvalidArgumentError(f"{key} (in {args.config})", f"invalid value {value!r}") from None
            if action.choices is not None and value not in action.choices:
                raise InvalidArgumentError(f"{key} (in {args.config})", f"must be one of {', '.join(map(str, action.choices))}")
            setattr(args, dest, value)


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    """Flags for ``diffc.runtime.options.RuntimeOptions``, shared by ``run`` and ``serve``."""
    p.add_argument("--cuda-graphs", choices=("on", "off"),
                   help="capture and replay the DiT forward in CUDA graphs (default: on for a GPU, off on CPU)")
    p.add_argument("--offload", choices=("none", "layerwise", "model"),
                   help="layerwise: stream the DiT's blocks from pinned host memory; model: whole components "
                        "move to the GPU only while used (default: none)")
    p.add_argument("--offload-prefetch", type=int, help="layerwise: blocks copied ahead of the one computing (default 1)")
    p.add_argument("--resident-blocks", type=int,
                   help="layerwise: blocks kept on the GPU (default: as many as free memory allows)")


def add_compiled_flag(p: argparse.ArgumentParser) -> None:
    """``--compiled``, shared by ``run`` and ``serve``."""
    p.add_argument("--compiled", metavar="ARTIFACT",
                   help="directory written by `diffc compile`: run its compiled DiT graphs (the checkpoint is the "
                        "one it was compiled from unless --model is given)")


def compiled_source(args: argparse.Namespace) -> tuple[str, dict[str, Any]] | None:
    """For ``--compiled``: the checkpoint (``--model``, else the manifest's) and the first bucket's request
    (the compiled size, guidance and text length, used where the command gives none); None without it."""
    if not getattr(args, "compiled", None):
        return None
    from ..compile.artifact import read_manifest

    manifest = read_manifest(args.compiled)
    first = manifest["stages"]["transformer"]["buckets"][0]["request"]
    if args.model is not None:
        return args.model, first
    path = manifest.get("model", {}).get("path")
    if not path:
        raise InvalidArgumentError("--compiled", f"{args.compiled}: the manifest names no checkpoint; pass --model")
    return path, first


def runtime_options(args: argparse.Namespace) -> dict[str, Any]:
    flag = getattr(args, "cuda_graphs", None)
    options: dict[str, Any] = {"cuda_graphs": None if flag is None else flag == "on"}
    for name in ("offload", "offload_prefetch", "resident_blocks"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    return options
