"""Reading ``--config FILE`` (YAML or JSON) under command-line flags."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

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
    if isinstance(data.get("cache"), dict) and "cache" in accepted:
        data = {**data, **cache_section(data["cache"], args.config)}
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


# option name (generate's cache_options, a config file's cache section) -> flag
CACHE_FLAGS = {"threshold": "--cache-threshold", "fn": "--cache-fn", "bn": "--cache-bn",
               "warmup_steps": "--cache-warmup-steps", "max_skips_in_a_row": "--cache-max-skips",
               "taylorseer": "--cache-taylorseer", "taylorseer_order": "--cache-taylorseer-order",
               "coefficients": "--cache-coefficients"}


def _numbers(text: str) -> list[float]:
    return [float(x) for x in str(text).strip("[]").split(",") if x.strip()]


def add_cache_flags(p: argparse.ArgumentParser) -> None:
    """Step-cache flags (``diffc.runtime.cache``), shared by ``run`` and ``serve``."""
    p.add_argument("--cache", choices=("dbcache", "fbcache", "teacache", "none"),
                   help="skip DiT work between similar denoising steps (default: none); see README 'Step caching'")
    p.add_argument("--cache-threshold", type=float,
                   help="relative-L1 threshold under which a step is skipped (dbcache/fbcache default 0.08; "
                        "teacache: the model's published value)")
    p.add_argument("--cache-fn", type=int, help="dbcache: first blocks always computed (default 8)")
    p.add_argument("--cache-bn", type=int, help="dbcache: last blocks always computed (default 0)")
    p.add_argument("--cache-warmup-steps", type=int, help="first steps never skipped (default: dbcache 8, teacache the model's)")
    p.add_argument("--cache-max-skips", type=int, help="most steps skipped in a row (default: no limit)")
    p.add_argument("--cache-taylorseer", action="store_const", const=True,
                   help="extrapolate the cached residual (TaylorSeer) instead of reusing it")
    p.add_argument("--cache-taylorseer-order", type=int, help="TaylorSeer's order, 1 to 3 (default 1)")
    p.add_argument("--cache-coefficients", type=_numbers, metavar="C1,C2,...",
                   help="teacache: rescaling polynomial fitted for this checkpoint, highest power first")


def cache_section(section: dict[str, Any], path: str) -> dict[str, Any]:
    """A config file's ``cache:`` mapping (``kind`` and option names) as the flat ``cache*`` options."""
    from ..runtime.cache.config import ALIASES

    out: dict[str, Any] = {"cache": section.get("kind")}
    if out["cache"] is None:
        raise InvalidArgumentError(f"cache (in {path})", "a cache section needs a 'kind' (dbcache, fbcache, teacache or none)")
    for key, value in section.items():
        if key == "kind":
            continue
        name = ALIASES.get(key, key)
        if name not in CACHE_FLAGS:
            raise InvalidArgumentError(f"cache.{key} (in {path})", f"unknown option; accepted: kind, {', '.join(CACHE_FLAGS)}")
        out[CACHE_FLAGS[name][2:].replace("-", "_")] = value
    return out


def cache_settings(args: argparse.Namespace):
    """The :class:`~diffc.runtime.cache.CacheConfig` the ``--cache*`` flags ask for (None: no cache)."""
    from ..runtime.cache import cache_config

    options = {name: getattr(args, flag[2:].replace("-", "_"), None) for name, flag in CACHE_FLAGS.items()}
    options = {k: v for k, v in options.items() if v is not None}
    kind = getattr(args, "cache", None)
    if kind in (None, "none") and options:
        raise InvalidArgumentError(CACHE_FLAGS[next(iter(options))], "needs --cache dbcache, fbcache or teacache")
    with cache_flag_errors():
        return cache_config(kind, options, field="--cache")


@contextlib.contextmanager
def cache_flag_errors() -> Iterator[None]:
    """Re-raise a cache option's error (``cache_options.fn``) under its flag's name (``--cache-fn``)."""
    try:
        yield
    except InvalidArgumentError as exc:
        option = exc.field.split(".", 1)[1].split("[", 1)[0] if "." in exc.field else None
        if option not in CACHE_FLAGS:
            raise
        raise InvalidArgumentError(CACHE_FLAGS[option], str(exc)[len(exc.field) + 2:]) from None


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
