"""Step-cache settings: one validated, hashable :class:`CacheConfig` from whatever a user wrote.

The same parser serves ``generate(cache=..., cache_options=...)``, ``diffc run --cache ...``, the ``cache``
section of a config file and the ``cache`` field of a server request, so every surface accepts the same
names and refuses the same mistakes, naming the option. Settings that depend on the model (how many
blocks it has, TeaCache's published fit) are checked when the cache is built for a DiT
(:func:`diffc.runtime.cache.build_cache`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from ...errors import InvalidArgumentError

CACHE_KINDS = ("dbcache", "fbcache", "teacache")
OFF = ("none", "off")
MAX_THRESHOLD = 100.0
MAX_BLOCKS = 1000  # fn, bn
MAX_STEPS = 1000  # warmup_steps, max_skips_in_a_row
MAX_COEFFICIENTS = 8

# Options each kind takes (fbcache is dbcache with fn=1, bn=0; teacache skips every block).
_COMMON = ("threshold", "warmup_steps", "max_skips_in_a_row", "taylorseer", "taylorseer_order")
OPTIONS = {"dbcache": ("fn", "bn") + _COMMON, "fbcache": _COMMON, "teacache": _COMMON + ("coefficients",)}
ALIASES = {"Fn": "fn", "Bn": "bn", "max_skips": "max_skips_in_a_row"}


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """A step cache's settings. ``None`` fields take the kind's (or, for TeaCache, the model's) default.

    - ``kind``: ``dbcache`` (always compute the first ``fn`` and the last ``bn`` blocks, skip the middle
      ones when the first blocks' output residual changed by less than ``threshold`` in relative L1 since
      the last computed step), ``fbcache`` (dbcache with fn=1, bn=0) or ``teacache`` (skip every block
      while the accumulated, rescaled change of the first block's timestep-modulated input stays under
      ``threshold``);
    - ``warmup_steps``: the first steps always computed; ``max_skips_in_a_row``: at most this many steps
      skipped in a row (None: no limit);
    - ``taylorseer``: extrapolate the cached residual from the last computed steps (Taylor series of
      ``taylorseer_order``) instead of reusing it as is;
    - ``coefficients``: TeaCache's rescaling polynomial, highest power first, replacing the published fit.
    """

    kind: str
    threshold: float | None = None
    fn: int | None = None
    bn: int | None = None
    warmup_steps: int | None = None
    max_skips_in_a_row: int | None = None
    taylorseer: bool = False
    taylorseer_order: int = 1
    coefficients: tuple[float, ...] | None = None

    def options(self) -> dict[str, Any]:
        """The options set (not None), by their names, for ``describe()`` and request echoes."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "kind" and v is not None}
        if not self.taylorseer:
            out.pop("taylorseer", None)
            out.pop("taylorseer_order", None)
        if isinstance(out.get("coefficients"), tuple):
            out["coefficients"] = list(out["coefficients"])
        return out


def cache_config(cache: Any = None, options: Mapping[str, Any] | None = None, *, field: str = "cache",
                 options_field: str = "cache_options") -> CacheConfig | None:
    """Parse ``cache`` (a kind name, ``"none"``, a :class:`CacheConfig`, or a mapping with ``kind`` and
    options) and ``options`` (a mapping of option names) into a :class:`CacheConfig`; None when off.

    Raises :class:`InvalidArgumentError` naming ``field``/``options_field`` and the option at fault.
    """
    if isinstance(cache, CacheConfig):
        if options:
            raise InvalidArgumentError(options_field, "give the options inside the CacheConfig, not beside it")
        # checked as the same settings given by name are (a dataclass takes any value)
        checked = cache_config({"kind": cache.kind, **cache.options()}, field=field, options_field=options_field)
        return cache if checked == cache else checked
    if isinstance(cache, Mapping):
        section = dict(cache)
        if "kind" not in section:
            raise InvalidArgumentError(field, f"a cache section needs a 'kind' ({', '.join(CACHE_KINDS)} or none)")
        kind = section.pop("kind")
        if options:
            raise InvalidArgumentError(options_field, f"give the options inside '{field}', not beside it")
        options, options_field = section, field
    else:
        kind = cache
    if kind is None or (isinstance(kind, str) and kind.strip().lower() in OFF):
        if options:
            raise InvalidArgumentError(options_field, f"options given without a cache; set {field} to one of "
                                       f"{', '.join(CACHE_KINDS)}")
        return None
    if not isinstance(kind, str) or kind.strip().lower() not in CACHE_KINDS:
        raise InvalidArgumentError(field, f"{kind!r} is not a step cache; accepted: {', '.join(CACHE_KINDS)}, none")
    kind = kind.strip().lower()
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise InvalidArgumentError(options_field, f"must be a mapping of option names to values, "
                                   f"got {type(options).__name__}")
    values: dict[str, Any] = {}
    for key, value in options.items():
        name = ALIASES.get(key, key) if isinstance(key, str) else key
        where = f"{options_field}.{key}"
        if name not in OPTIONS[kind]:
            hint = " (fbcache is dbcache with fn=1, bn=0: use dbcache to choose them)" \
                if kind == "fbcache" and name in ("fn", "bn") else ""
            raise InvalidArgumentError(where, f"is not an option of {kind}{hint}; accepted: "
                                       f"{', '.join(OPTIONS[kind])}")
        if name in values:
            raise InvalidArgumentError(where, f"is given twice (as '{name}' and an alias)")
        if value is not None:
            values[name] = _CHECKS[name](where, value)
    if "taylorseer_order" in values and not values.get("taylorseer"):
        raise InvalidArgumentError(f"{options_field}.taylorseer_order", "applies with taylorseer=true only")
    return CacheConfig(kind, **values)


def _number(where: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise InvalidArgumentError(where, f"must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def _integer(low: int, high: int):
    def check(where: str, value: Any) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidArgumentError(where, f"must be an integer from {low} to {high}, got {value!r}")
        return value
    return check


def _boolean(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(where, f"must be true or false, got {value!r}")
    return value


def _coefficients(where: str, value: Any) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) \
            or not 1 <= len(value) <= MAX_COEFFICIENTS:
        raise InvalidArgumentError(where, f"must be a list of 1 to {MAX_COEFFICIENTS} numbers (the rescaling "
                                   f"polynomial, highest power first), got {value!r}"[:300])
    return tuple(_number(f"{where}[{i}]", c, -1e9, 1e9) for i, c in enumerate(value))


_CHECKS = {
    "threshold": lambda where, v: _number(where, v, 0.0, MAX_THRESHOLD),
    "fn": _integer(1, MAX_BLOCKS),
    "bn": _integer(0, MAX_BLOCKS),
    "warmup_steps": _integer(0, MAX_STEPS),
    "max_skips_in_a_row": _integer(1, MAX_STEPS),
    "taylorseer": _boolean,
    "taylorseer_order": _integer(1, 3),
    "coefficients": _coefficients,
}
