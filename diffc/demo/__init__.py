"""The embedded demo models: tiny random-weight checkpoints in diffusers layout, built once and cached.

They exercise the real loader and pipelines end to end on a CPU in seconds. Their weights are random,
so what they generate is noise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import InvalidArgumentError
from ..fileio import cache_dir, os_reason

DEMO_NOTICE = (
    "note: no --model given, so diffc runs its built-in demo {family} model: tiny and with RANDOM weights, "
    "so the output is noise.\n"
    "      For real results point diffc at a diffusers-format checkpoint directory, e.g. "
    "--model /ckpt/FLUX.1-dev or --model /ckpt/Wan2.1-T2V-1.3B-Diffusers"
)

# family -> (cache folder name, "module:builder"). Bump the folder's version when a builder changes.
_BUILDERS = {
    "flux": ("flux-tiny-v1", "diffc.demo.flux:build_flux_demo"),
    "wan": ("wan-tiny-v1", "diffc.demo.wan:build_wan_demo"),
    "wan-i2v": ("wan-i2v-tiny-v1", "diffc.demo.wan:build_wan_i2v_demo"),
    "wan-flf2v": ("wan-flf2v-tiny-v1", "diffc.demo.wan:build_wan_flf2v_demo"),
}


def demo_family(path: str | Path) -> str | None:
    """The family of the built-in demo checkpoint at ``path``, or None if ``path`` is not one."""
    try:
        here = Path(path).expanduser().resolve()
        for family, (name, _) in _BUILDERS.items():
            if here == (cache_dir() / "demo" / name).resolve():
                return family
    except OSError:
        pass
    return None


def demo_checkpoint(family: str = "flux") -> Path:
    """Path of the cached demo checkpoint for ``family``, building it the first time."""
    import importlib

    name, builder = _BUILDERS[family]
    target = cache_dir() / "demo" / name
    if (target / "model_index.json").is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    except OSError as exc:  # $DIFFC_CACHE is a file, read-only, or on a full disk
        raise InvalidArgumentError("DIFFC_CACHE", f"cannot build the demo model in {target.parent} "
                                                  f"({os_reason(exc)}); point DIFFC_CACHE at a writable folder "
                                                  "or give --model") from None
    try:
        module, attr = builder.split(":")
        getattr(importlib.import_module(module), attr)(tmp)
        try:
            os.replace(tmp, target)  # atomic: another process may have finished first
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
