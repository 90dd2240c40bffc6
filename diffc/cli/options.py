"""Options shared by the subcommands: the model to use (``--model`` / ``--compiled`` / the demo), runtime flags."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any, Iterator

from ..errors import InvalidArgumentError

# With no --model, the embedded demo runs at a size a CPU finishes in seconds.
DEMO_DEFAULTS = {"image": {"height": 256, "width": 256, "num_inference_steps": 4},
                 "video": {"height": 128, "width": 128, "num_frames": 9, "num_inference_steps": 4}}
DEMO_TASKS = {"t2i": "flux", "t2v": "wan", "i2v": "wan-i2v", "flf2v": "wan-flf2v"}
DEMO_OUTPUT = {"flux": "image", "wan": "video", "wan-i2v": "video", "wan-flf2v": "video"}


def add_model_flags(p: argparse.ArgumentParser, verb: str) -> None:
    """``--model`` and ``--task``, the same for every subcommand."""
    p.add_argument("--model", help="diffusers-format checkpoint directory (default: the built-in tiny demo model)")
    p.add_argument("--task", choices=sorted(DEMO_TASKS),
                   help=f"demo model to {verb} when --model is not given (default t2i)")


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    """Flags for ``diffc.runtime.options.RuntimeOptions``, shared by ``run`` and ``serve``."""
    p.add_argument("--cuda-graphs", choices=("on", "off"),
                   help="capture and replay the DiT forward and the text encoders in CUDA graphs (default: on for a "
                        "GPU, off on CPU)")
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
    try:
        return [float(x) for x in str(text).strip("[]").split(",") if x.strip()]
    except ValueError:  # argparse would name the function: "invalid _numbers value"
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


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
        raise InvalidArgumentError(CACHE_FLAGS[option], exc.message) from None


def add_compiled_flag(p: argparse.ArgumentParser) -> None:
    """``--compiled``, shared by ``run`` and ``serve``."""
    p.add_argument("--compiled", metavar="ARTIFACT",
                   help="directory written by `diffc compile`: run its compiled DiT graphs (the checkpoint is the "
                        "one it was compiled from unless --model is given)")


def add_progress_flag(p: argparse.ArgumentParser, bars: str) -> None:
    """``--no-progress``, shared by ``run``, ``compile`` and ``serve`` (``bars``: the ones the command shows)."""
    p.add_argument("--no-progress", action="store_const", const=True, help=f"hide the progress bars: {bars}")


def progress_shown(args: argparse.Namespace) -> bool:
    """False under ``--no-progress`` (given or from ``--config``), which then turns the libraries' bars (loading
    weights, writing the demo model) off until the command ends; diffc's own bars take the answer as ``progress``."""
    if not args.no_progress:
        return True
    from ..progress import library_bars_off

    args._until_done.enter_context(library_bars_off())
    return False


def runtime_options(args: argparse.Namespace) -> dict[str, Any]:
    flag = getattr(args, "cuda_graphs", None)
    options: dict[str, Any] = {"cuda_graphs": None if flag is None else flag == "on"}
    for name in ("offload", "offload_prefetch", "resident_blocks"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    return options


@dataclasses.dataclass
class ModelChoice:
    """What ``--model``, ``--compiled`` and the demo default resolve to, found before anything loads.

    ``path`` is the checkpoint directory (None: the demo, built by :meth:`checkpoint`); ``demo`` the
    demo family when the checkpoint is the built-in demo (given by default or through an artifact
    compiled from it); ``output`` "image" or "video"; ``bucket`` the first compiled shape of
    ``--compiled`` (its size, guidance and text length, used where the command gives none).
    """

    path: Path | None
    demo: str | None
    output: str
    device: str | None
    bucket: dict[str, Any] | None = None

    @property
    def notice(self) -> str | None:
        from ..demo import DEMO_NOTICE

        return DEMO_NOTICE.format(family=self.demo) if self.demo else None

    @property
    def defaults(self) -> dict[str, Any]:
        """Request values where the command gives none: the compiled shape, then the demo's small size and steps."""
        out = {k: v for k, v in (self.bucket or {}).items() if k != "prompt" and v is not None}
        if self.demo:
            out = {**DEMO_DEFAULTS[self.output], **out}
        return out

    def checkpoint(self) -> Path:
        from ..demo import demo_checkpoint

        return demo_checkpoint(self.demo) if self.path is None else self.path


def checkpoint_dir(path: str | Path, field: str, origin: str = "") -> Path:
    """``path`` as a checkpoint directory with a ``model_index.json``; the one wording for a wrong ``--model``."""
    if not str(path).strip():  # Path("") is the current directory
        raise InvalidArgumentError(field, f"is empty; give a diffusers-format checkpoint directory{origin}")
    root = Path(path).expanduser()
    if not root.exists():
        raise InvalidArgumentError(field, f"checkpoint directory not found: {path}{origin}")
    if not root.is_dir() or not (root / "model_index.json").is_file():
        raise InvalidArgumentError(field, f"{path}{origin} is not a diffusers-format checkpoint directory "
                                          "(no model_index.json)")
    return root


def _output_kind(root: Path) -> str | None:
    """"image" or "video" for the checkpoint's pipeline; None when only loading it can tell (generic)."""
    from ..loader.pipeline import read_index

    index, spec = read_index(root)
    if spec is not None:
        return spec.output
    from ..pipelines.generic.spec import class_output_kind

    return class_output_kind(index["_class_name"])


def _check_bucket(bucket: dict[str, Any], compiled: str) -> None:
    """The manifest's first compiled shape, whose values become the defaults of the command's requests: a value no
    request can have is the artifact's error, not one of a flag the command did not give (the manifest is not
    covered by the artifact's hashes)."""
    from ..compile.artifact import ArtifactError

    for key, value in bucket.items():
        if key in ("height", "width", "num_frames", "max_sequence_length"):
            ok = type(value) is int and 1 <= value <= 1 << 20
        elif key in ("guidance_scale", "true_cfg_scale"):
            ok = type(value) in (int, float) and math.isfinite(value)
        else:
            continue
        if value is not None and not ok:
            raise ArtifactError(f"{compiled}: its manifest's compiled shape has {key} {str(value)[:80]!r}, which no "
                                "request can have; recompile the artifact with `diffc compile`")


def resolve_model(args: argparse.Namespace) -> ModelChoice:
    """The model a ``run``, ``serve`` or ``compile`` command names, checked before it loads.

    ``--compiled`` gives the checkpoint it was compiled from (``--model`` overrides it); otherwise
    ``--model``; otherwise the demo of ``--task``. Only ``model_index.json`` and the artifact's
    manifest are read.
    """
    model, task, compiled = args.model, getattr(args, "task", None), getattr(args, "compiled", None)
    if model is not None and task is not None:
        raise InvalidArgumentError("--task", "only selects the demo model; the task of --model comes from "
                                   "its model_index.json")
    if compiled is not None and not str(compiled).strip():
        raise InvalidArgumentError("--compiled", "is empty; give the artifact's path")
    device = getattr(args, "device", None)
    if device is not None and not str(device).strip():  # --device "$UNSET" chose a device silently
        raise InvalidArgumentError("--device", "is empty; give cpu, cuda or cuda:N, or leave the flag out")
    if compiled and task is not None:
        raise InvalidArgumentError("--task", "only selects the demo model; with --compiled the model is the one the "
                                   "artifact was compiled from")
    if compiled:
        from ..compile.artifact import ArtifactError, read_manifest
        from ..demo import demo_family

        manifest = read_manifest(compiled)
        try:
            bucket = dict(manifest["stages"]["transformer"]["buckets"][0]["request"])
        except (KeyError, IndexError, TypeError, ValueError):
            raise ArtifactError(f"{compiled}: its manifest lists no compiled shape") from None
        _check_bucket(bucket, compiled)
        environment = manifest.get("environment") if isinstance(manifest.get("environment"), dict) else {}
        built_on = environment.get("device_type") if environment.get("device_type") in ("cpu", "cuda") else None
        if model is not None:
            root = checkpoint_dir(model, "--model")
        else:
            recorded = (manifest.get("model") or {}).get("path") if isinstance(manifest.get("model"), dict) else None
            if not isinstance(recorded, str) or not recorded:
                raise InvalidArgumentError("--compiled", f"{compiled}: the manifest names no checkpoint; pass --model")
            root = checkpoint_dir(recorded, "--model", origin=f" (the checkpoint {compiled} was compiled from; "
                                                              "pass --model to use another)")
        if args.device is None and built_on == "cuda":
            import torch

            if not torch.cuda.is_available():
                arch = environment.get("gpu_arch")
                raise InvalidArgumentError("--compiled", f"{compiled} was compiled for a CUDA GPU"
                                           f"{f' ({arch})' if isinstance(arch, str) else ''} and this machine has "
                                           "none; compile the model here with diffc compile")
        if getattr(args, "dtype", None) is None and manifest.get("dtype") in ("bfloat16", "float16", "float32"):
            args.dtype = manifest["dtype"]  # as the device: the artifact's, unless the command gives one
        family = demo_family(root)
        return ModelChoice(root, family, _output_kind(root), args.device or built_on, bucket)
    if model is not None:
        root = checkpoint_dir(model, "--model")
        return ModelChoice(root, None, _output_kind(root), args.device)
    family = DEMO_TASKS[task or "t2i"]
    return ModelChoice(None, family, DEMO_OUTPUT[family], args.device or "cpu")
