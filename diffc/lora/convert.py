"""Converting a LoRA file into per-parameter updates of one native model.

The result is a list of :class:`Piece` s, each on one native parameter:

- ``lora``: ``W += strength * scale * up @ down`` (``scale`` = alpha / rank, 1 without alpha);
- ``add``: ``P += strength * scale * value`` (``.diff``/``.diff_b`` deltas, LoRA biases);
- ``set``: ``P = value`` (norm weights that BFL LoRAs replace; strength does not apply).

A fused source module (FLUX's QKV, ``linear1``) is split by rows over its targets; a target's
columns of ``up`` that are all zero (kohya's block-diagonal QKV) are dropped with their rows of
``down``, which changes no value of the product.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Mapping

import torch

from ..errors import CheckpointError
from .files import METADATA_KEY, LoraFile, component_config, component_prefix
from .keys import SourceModule, parse_keys, split_key
from .naming import Entry, NameTable, Naming

SHOWN = 20  # keys listed in an error or a warning


@dataclasses.dataclass
class Piece:
    param: str
    kind: str  # "lora", "add" or "set"
    up: torch.Tensor | None = None  # (rows, rank)
    down: torch.Tensor | None = None  # (rank, in)
    value: torch.Tensor | None = None
    scale: float = 1.0


@dataclasses.dataclass
class Conversion:
    """What a LoRA file does to one native model, and what of it did not apply."""

    pieces: dict[str, list[Piece]]  # parameter name -> its updates, in file order
    formats: list[str]
    matched: int  # source modules applied
    applied_keys: int
    total_keys: int
    unmatched: list[str]  # keys that name nothing in the model
    text_encoder: list[str]
    dora: list[str]
    rank: int | None

    @property
    def warnings(self) -> list[str]:
        out = []
        if self.unmatched:
            out.append(f"partial match: {self.applied_keys} of {self.total_keys} keys applied ({self.matched} "
                       f"modules); {len(self.unmatched)} key(s) match nothing in the model and were skipped: "
                       f"{_listing(self.unmatched)}")
        if self.text_encoder:
            out.append(f"{len(self.text_encoder)} text-encoder key(s) are not supported and were skipped "
                       f"(diffc applies LoRAs to the DiT only): {_listing(self.text_encoder)}")
        if self.dora:
            out.append(f"{len(self.dora)} DoRA magnitude key(s) are not supported and were skipped; the rest "
                       f"applies as a plain LoRA: {_listing(self.dora)}")
        return out


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN])
    return shown + (f", ... ({len(keys) - SHOWN} more)" if len(keys) > SHOWN else "")


def convert(file: LoraFile, params: Mapping[str, torch.Tensor], naming: Naming | None, model_name: str) -> Conversion:
    """Map ``file`` onto a model whose parameters (name -> tensor, for names and shapes) are ``params``.

    Raises ``CheckpointError`` when nothing in the file matches the model, when a matched module's
    tensors do not fit the model's shapes, or when an alpha or a rank is one no LoRA can have.
    """
    config = _checked_config(file)
    parsed, unknown = parse_keys(file.tensors)
    table = NameTable(params, naming)
    pieces: dict[str, list[Piece]] = collections.defaultdict(list)
    unmatched, formats, ranks, matched, applied = list(unknown), collections.Counter(), set(), 0, 0
    owners: dict[tuple[str, str], str] = {}  # (parameter, piece kind) -> the source module that updates it
    for stem, source in parsed.modules.items():
        found = table.lookup(stem)
        if found is None or not _applies(source, found[0], params):
            unmatched += source.keys
            continue
        entry, scheme = found
        try:
            _check_kinds(source)
            made = _pieces(source, entry, params, config)
        except _Invalid as exc:
            raise CheckpointError(f"{file.path}: {exc}") from None
        except _Mismatch as exc:
            raise CheckpointError(f"{file.path}: {exc} (is this LoRA for another model or size than "
                                  f"{model_name}?)") from None
        if not made:
            unmatched += source.keys
            continue
        for piece in made:
            other = owners.setdefault((piece.param, piece.kind), stem)
            if other != stem:  # the same module under two names (two formats): it would be merged twice
                raise CheckpointError(f"{file.path}: {other} and {stem} both update {piece.param} (one module named "
                                      "twice, e.g. in two key formats); a LoRA names each module once")
            pieces[piece.param].append(piece)
        matched += 1
        applied += len(source.keys)
        formats[scheme] += 1
        if source.down is not None:
            ranks.add(source.down.shape[0])
    if not matched:
        sample = unmatched or parsed.text_encoder
        raise CheckpointError(f"{file.path}: no key of this LoRA matches {model_name}; "
                              f"unmatched keys ({len(sample)}): {_listing(sorted(sample))}")
    return Conversion(dict(pieces), [f for f, _ in formats.most_common()], matched, applied, len(file.tensors) - len(parsed.text_encoder),
                      sorted(unmatched),
                      parsed.text_encoder, parsed.dora, max(ranks) if ranks else None)


class _Mismatch(Exception):
    """The file's tensors do not fit the model's (the error asks whether it is for another model)."""


class _Invalid(_Mismatch):
    """The file is wrong whatever the model: a missing matrix, rank 0, an alpha that is not a number."""


MATRICES = ("down", "up", "down_bias", "up_bias", "diff", "diff_b", "value")  # SourceModule's float tensors


def _check_kinds(source: SourceModule) -> None:
    """A matched module's matrices are floating point (an integer or boolean one is a damaged or foreign file:
    cast and merged, it would change the weights without an error)."""
    for attr in MATRICES:
        tensor = getattr(source, attr)
        if tensor is not None and not tensor.is_floating_point():
            raise _Invalid(f"{source.stem}: its {attr} tensor is stored as {str(tensor.dtype).removeprefix('torch.')}, "
                           "not floating point; LoRA matrices are float tensors (float32, bfloat16 or float16)")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _finite(value: Any) -> bool:
    """A JSON number (not a bool) that is finite as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _checked_config(file: LoraFile) -> dict[str, Any]:
    """The DiT's LoRA config from the file's metadata, refused unless ``lora_alpha`` is a finite number,
    ``alpha_pattern`` maps module patterns to finite numbers and ``use_rslora`` is a bool (what PEFT's
    ``LoraConfig`` holds; a negative alpha is kept, as PEFT and diffusers keep it). ``null`` means unset."""
    config = component_config(file.config)
    prefix = component_prefix(file.config)

    def refuse(key: str, message: str) -> CheckpointError:
        return CheckpointError(f"{file.path}: '{prefix}{key}' in its '{METADATA_KEY}' metadata {message}")

    alpha = config.get("lora_alpha")
    if alpha is not None and not _finite(alpha):
        raise refuse("lora_alpha", f"must be a finite number, got {_short(alpha)}")
    patterns = config.get("alpha_pattern")
    if patterns is not None:
        if not isinstance(patterns, dict):
            raise refuse("alpha_pattern", f"must be an object of module patterns to finite numbers, got {_short(patterns)}")
        for key, value in patterns.items():
            if not _finite(value):
                raise refuse("alpha_pattern", f"maps {key!r} to {_short(value)}; it must be an object of module "
                                              "patterns to finite numbers")
    rslora = config.get("use_rslora")
    if rslora is not None and not isinstance(rslora, bool):
        raise refuse("use_rslora", f"must be true or false, got {_short(rslora)}")
    return config


def _applies(source: SourceModule, entry: Entry, params: Mapping[str, torch.Tensor]) -> bool:
    """A source whose only tensor is a full ``.weight`` matches only norm weights (which it replaces)."""
    if source.has_lora or source.diff is not None or source.diff_b is not None:
        return True
    if source.value is not None:
        return len(entry.targets) == 1 and "norm" in entry.targets[0] and f"{entry.targets[0]}.weight" in params
    return False


def _weight(params, target: str) -> str:
    return f"{target}.weight" if f"{target}.weight" in params else target


def _split(tensor: torch.Tensor, sizes: list[int], swap: bool, what: str) -> list[torch.Tensor]:
    if tensor.shape[0] != sum(sizes):
        raise _Mismatch(f"{what} has {tensor.shape[0]} rows where the model's module(s) have {sum(sizes)}")
    if swap:
        half = tensor.shape[0] // 2
        tensor = torch.cat([tensor[half:], tensor[:half]])
    return list(torch.split(tensor, sizes)) if len(sizes) > 1 else [tensor]


def _pieces(source: SourceModule, entry: Entry, params, config: dict[str, Any]) -> list[Piece]:
    names = [_weight(params, t) for t in entry.targets]
    if any(n not in params for n in names):
        return []
    weights = [params[n] for n in names]
    sizes = [w.shape[0] for w in weights]
    where = source.stem
    out: list[Piece] = []
    scale = 1.0
    if source.has_lora:
        if source.down is None or source.up is None:
            raise _Invalid(f"{where} has only one of its two LoRA matrices (down/A and up/B)")
        down, up = source.down, source.up
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise _Mismatch(f"{where}: LoRA matrices of shapes {tuple(down.shape)} (down) and {tuple(up.shape)} "
                            f"(up) do not form a product (only linear layers are supported)")
        if down.shape[0] == 0:
            key = next(k for k in source.keys if split_key(k)[1] == "down")
            raise _Invalid(f"{key} has shape {tuple(down.shape)}: rank 0; a LoRA's rank must be at least 1")
        if any(w.ndim != 2 or w.shape[1] != down.shape[1] for w in weights):
            raise _Mismatch(f"{where}: the LoRA takes {down.shape[1]} input features where {names[0]} has shape "
                            f"{tuple(weights[0].shape)}")
        scale = _scale(source, entry.targets[0], down.shape[0], config)
        for name, rows in zip(names, _split(up, sizes, entry.swap_halves, f"{where} (up)")):
            keep = rows.ne(0).any(dim=0)
            if bool(keep.all()) or not bool(keep.any()):
                out.append(Piece(name, "lora", rows, down, scale=scale))
            else:
                out.append(Piece(name, "lora", rows[:, keep], down[keep], scale=scale))
        bias = None
        if source.down_bias is not None:
            bias = up.float() @ source.down_bias.float()
        if source.up_bias is not None:
            bias = source.up_bias.float() if bias is None else bias + source.up_bias.float()
        if bias is not None:
            out += _adds(entry, params, bias, sizes, ".bias", scale, f"{where} (LoRA bias)")
    if source.diff is not None:
        value = source.diff
        if len(names) == 1 and value.shape != weights[0].shape:
            raise _Mismatch(f"{where}.diff has shape {tuple(value.shape)}, {names[0]} {tuple(weights[0].shape)}")
        parts = _split(value, sizes, entry.swap_halves, f"{where}.diff")
        for name, w, part in zip(names, weights, parts):
            if part.shape != w.shape:
                raise _Mismatch(f"{where}.diff has shape {tuple(part.shape)} for {name} of {tuple(w.shape)}")
            out.append(Piece(name, "add", value=part))
    if source.diff_b is not None:
        out += _adds(entry, params, source.diff_b, sizes, ".bias", 1.0, f"{where}.diff_b")
    if source.value is not None and not source.has_lora and source.diff is None:
        if source.value.shape != weights[0].shape:
            raise _Mismatch(f"{source.keys[0]} has shape {tuple(source.value.shape)}, {names[0]} "
                            f"{tuple(weights[0].shape)}")
        out.append(Piece(names[0], "set", value=source.value))
    return out


def _adds(entry: Entry, params, value: torch.Tensor, sizes, suffix: str, scale: float, what: str) -> list[Piece]:
    names = [f"{t}{suffix}" for t in entry.targets]
    missing = [n for n in names if n not in params]
    if missing:
        raise _Mismatch(f"{what} targets {missing[0]}, which the model does not have")
    out = []
    for name, part in zip(names, _split(value.reshape(-1), sizes, entry.swap_halves, what)):
        if part.shape != params[name].shape:
            raise _Mismatch(f"{what} has shape {tuple(part.shape)} for {name} of {tuple(params[name].shape)}")
        out.append(Piece(name, "add", value=part, scale=scale))
    return out


def _scale(source: SourceModule, module: str, rank: int, config: dict[str, Any]) -> float:
    """alpha / rank: alpha from the module's ``.alpha`` tensor, else the file's LoRA config, else rank."""
    rslora = bool(config.get("use_rslora", False))
    if source.alpha is not None:
        if source.alpha.numel() != 1:
            raise _Invalid(f"{source.stem}.alpha must hold one finite number, got shape "
                           f"{tuple(source.alpha.shape)}")
        if source.alpha.dtype == torch.bool:  # True merged as alpha 1
            raise _Invalid(f"{source.stem}.alpha is stored as a boolean; alpha must be a finite number")
        alpha = float(source.alpha.float().item())
        if not math.isfinite(alpha):
            raise _Invalid(f"{source.stem}.alpha is {alpha}; alpha must be a finite number")
    else:  # the metadata, checked by _checked_config
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module)
        if alpha is None:
            alpha = config.get("lora_alpha")
        if alpha is None:
            return 1.0
        alpha = float(alpha)
    return alpha / (math.sqrt(rank) if rslora else rank)


PATTERN_SECONDS = 0.5  # one alpha_pattern key against one module name: a real one takes microseconds


def _pattern_value(patterns: dict[str, Any], module: str):
    """PEFT's per-module override: a key matches a module name ending in it (or, starting with ``^``, all of it).

    The keys are the file's regular expressions: one that backtracks exponentially (``(.|.)*!``) would hold the
    merge (and a server's LoRA lock) for ever, so each match is bounded (``regex``'s timeout) and refused past it."""
    import regex

    for key, value in patterns.items():
        pattern = key if key.startswith("^") else rf"(.*\.)?(?:{key})"
        try:
            if regex.fullmatch(pattern.lstrip("^"), module, timeout=PATTERN_SECONDS):
                return value
        except regex.error:
            if module == key or module.endswith("." + key):
                return value
        except TimeoutError:
            raise _Invalid(f"its alpha_pattern key {key[:80]!r} takes over {PATTERN_SECONDS:g} s to match the module "
                           f"name {module!r}; a pattern that backtracks this much is not loaded") from None
    return None
