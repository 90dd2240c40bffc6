"""Model configs are frozen dataclasses read from a component's ``config.json``, checked before anything is built."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, TypeVar

from ..errors import CheckpointError, DiffcError

C = TypeVar("C", bound="ModelConfig")

# Generic bounds on every integer field of a config: a size, width, length or count is a non-negative
# integer no larger than MAX_SIZE, and a count of layers, blocks or heads no larger than MAX_COUNT, so a
# config such as ``num_layers: 1e9`` or ``-3`` is refused before a module is built. A config class can
# widen one field through its ``_limits`` class attribute ({field: largest value}).
MAX_SIZE = 1 << 20
MAX_COUNT = 1024
MAX_ITEMS = 1 << 16
COUNT_FIELD = re.compile(r"layers|blocks|heads")
# Integer fields that size a tensor dimension (widths, head counts and sizes, channels, patches, groups, scale
# factors, their lists): at least 1, since 0 builds zero-element weights that no checkpoint tensor fits. Counts of
# layers or blocks may be 0; RoPE axes (``axes_dims``) are not matched.
POSITIVE_FIELD = re.compile(r"patch_size|heads|head_dim|(^|_)dim$|dim_mult|channels|groups|scale_factor")


def integer_minimum(name: str) -> int:
    return 1 if POSITIVE_FIELD.search(name) else 0


def integer_limit(name: str, limits: dict[str, int] | None = None) -> int:
    if limits and name in limits:
        return limits[name]
    return MAX_COUNT if COUNT_FIELD.search(name) else MAX_SIZE


class _Mismatch(Exception):
    pass


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_value(name: str, hint: Any, value: Any, limit: int) -> Any:
    """``value`` checked against the annotation ``hint`` (lists become tuples); raises ``_Mismatch`` with the reason."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        reasons = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return check_value(name, arm, value, limit)
            except _Mismatch as exc:
                reasons.append(str(exc))
        raise _Mismatch(" or ".join(dict.fromkeys(reasons)))
    if hint is bool:
        if not isinstance(value, bool):
            raise _Mismatch(f"expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if type(value) is not int:
            raise _Mismatch(f"expected an integer, got {_describe(value)}")
        low = integer_minimum(name)
        if not low <= value <= limit:
            raise _Mismatch(f"expected an integer from {low} to {limit}, got {value}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _Mismatch(f"expected a finite number, got {_describe(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str) or len(value) > 1000:
            raise _Mismatch(f"expected a string, got {_describe(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) > MAX_ITEMS:
            raise _Mismatch(f"expected a list, got {_describe(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(check_value(name, args[0], v, limit) for v in value)
        if len(value) != len(args):
            raise _Mismatch(f"expected a list of {len(args)} values, got {_describe(value)}")
        return tuple(check_value(name, a, v, limit) for a, v in zip(args, value))
    return tuple(value) if isinstance(value, list) else value  # Any and other annotations: as given


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base for native model configs.

    ``from_dict`` keeps the fields the dataclass declares and ignores the rest (``_class_name``,
    ``_diffusers_version`` and options that do not change the math). An explicit null keeps the field's
    default unless that default is ``None``. Lists become tuples so configs stay hashable. Every value
    is checked against its field's type and the generic bounds above (:func:`check_value`); a wrong
    type, a negative or absurd size, or a missing required field is a ``CheckpointError`` naming the
    file and the field.
    """

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], source: str = "config.json") -> C:
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        limits = getattr(cls, "_limits", None)
        kwargs = {}
        for f in dataclasses.fields(cls):
            value = data.get(f.name)
            if value is not None:
                try:
                    kwargs[f.name] = check_value(f.name, hints.get(f.name, Any), value, integer_limit(f.name, limits))
                except _Mismatch as exc:
                    raise CheckpointError(f"{source}: '{f.name}': {exc}") from None
            elif f.name in data and f.default is None:
                kwargs[f.name] = None  # an explicit null where the field allows it
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise CheckpointError(f"{source}: required field '{f.name}' is missing for {cls.__name__}")
        try:
            return cls(**kwargs)
        except (DiffcError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# Fields of a transformers config (text encoders) that size the model: checked the same way before
# transformers builds it. Names are transformers' own, across the configs of the supported encoders.
TRANSFORMERS_SIZE_FIELDS = re.compile(
    r"^(num_\w*layers|num_\w*heads|n_layers?|n_heads?|num_layers|num_heads|hidden_size|intermediate_size|d_model|d_ff|"
    r"d_kv|head_dim|vocab_size|max_position_embeddings|projection_dim|num_key_value_heads)$")


def check_size_fields(data: dict[str, Any], source: str) -> None:
    """Refuse absurd sizes in a raw transformers config (and its nested ``*_config`` objects) before loading."""
    for key, value in data.items():
        if isinstance(value, dict) and key.endswith("_config"):
            check_size_fields(value, source)
        elif TRANSFORMERS_SIZE_FIELDS.match(key) and value is not None:
            limit = integer_limit(key)
            if type(value) is not int or not 0 <= value <= limit:
                raise CheckpointError(f"{source}: '{key}': expected an integer from 0 to {limit}, got {_describe(value)}")
