"""``--lora-path``/``--lora-strength``/``--lora-nickname``/``--lora-target``, shared by ``run`` and ``serve``.

Each flag may be repeated (one per adapter); a single strength or target applies to every path.
Values may also come from ``--config`` (a value or a list).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError
from ..lora.spec import TARGETS, check_nickname, check_strength


def add_lora_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora-path", action="append", metavar="FILE",
                   help="LoRA .safetensors file or folder to merge into the DiT (repeat for several; any format "
                        "diffusers loads: diffusers/PEFT, kohya, ComfyUI, XLabs, BFL, Wan original)")
    p.add_argument("--lora-strength", action="append", metavar="S",
                   help="LoRA strength: one for all paths or one per --lora-path (default 1.0)")
    p.add_argument("--lora-nickname", action="append", metavar="NAME",
                   help="name of each adapter (default: the file's name without .safetensors)")
    p.add_argument("--lora-target", action="append", metavar="TARGET",
                   help=f"which DiT takes each adapter: {', '.join(TARGETS)} (default all)")
    # Pipeline.set_lora's errors name its own fields (the HTTP API's names); the CLI names the flags
    p.set_defaults(_field_flags={"target": "--lora-target", "strength": "--lora-strength",
                                 "nickname": "--lora-nickname"})


def _values(args: argparse.Namespace, name: str) -> list:
    value = getattr(args, name, None)
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _per_path(flag: str, values: list, n: int) -> list:
    if values and len(values) not in (1, n):
        raise InvalidArgumentError(flag, f"give one value for all {n} --lora-path or one per path, got {len(values)}")
    return values * n if len(values) == 1 else values


def lora_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """``Pipeline.set_lora`` keyword arguments from the flags, or None without ``--lora-path``."""
    paths = [str(p) for p in _values(args, "lora_path")]
    for flag in ("lora_strength", "lora_nickname", "lora_target"):
        if _values(args, flag) and not paths:
            raise InvalidArgumentError(f"--{flag.replace('_', '-')}", "applies to the adapters of --lora-path; give one")
    if not paths:
        return None
    from ..lora.files import resolve_lora_file

    for p in paths:
        if not p.strip():
            raise InvalidArgumentError("--lora-path", f"must be a LoRA .safetensors file or folder, got {p!r}")
        try:  # a missing file, a pickle or a folder of several is one line before the model loads (or serve binds)
            resolve_lora_file(p)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError("--lora-path", exc.message) from None
    strengths = []
    for s in _per_path("--lora-strength", _values(args, "lora_strength"), len(paths)) or [1.0] * len(paths):
        try:
            value = float(s)
        except (TypeError, ValueError):
            raise InvalidArgumentError("--lora-strength", f"must be a number, got {s!r}") from None
        strengths.append(check_strength(value, "--lora-strength"))  # nan, inf, 1e6: before the model loads
    targets = _per_path("--lora-target", _values(args, "lora_target"), len(paths)) or ["all"] * len(paths)
    for t in targets:
        if t not in TARGETS:
            raise InvalidArgumentError("--lora-target", f"must be one of {', '.join(TARGETS)}, got {t!r}")
    names = [str(n) for n in _values(args, "lora_nickname")]
    if names and len(names) != len(paths):
        raise InvalidArgumentError("--lora-nickname", f"give one nickname per --lora-path ({len(paths)}), got {len(names)}")
    for n in names:
        check_nickname(n, "--lora-nickname")
    if not names:
        names = [Path(p).name.removesuffix(".safetensors") or p for p in paths]
        if len(set(names)) != len(names):
            raise InvalidArgumentError("--lora-nickname", f"the files' names repeat ({', '.join(names)}); name each "
                                       "adapter with --lora-nickname")
    return {"nickname": names, "path": paths, "strength": strengths, "target": targets}
