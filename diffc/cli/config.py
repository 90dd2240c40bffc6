"""``--config FILE`` (YAML or JSON): the command's own option names, under the flags given on the command line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError

# Options a config file cannot set: they act before the file is read.
NOT_IN_CONFIG = ("help", "config", "verbose", "version")


MAX_CONFIG_BYTES = 1 << 20
MAX_REPEATS = 64  # values of one repeatable option (--image, --lora-path)  # a config file is a few lines; more is a mistake (or an attack on the parser)


def _unique_keys(pairs: list[tuple[Any, Any]], path: str) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidArgumentError("--config", f"{path}: option '{key}' is given twice")
        out[key] = value
    return out


def _yaml_loader(path: str):
    """yaml's safe loader, refusing a key given twice (which plain YAML loading settles silently, last one wins)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            self.flatten_mapping(node)
            pairs = [(self.construct_object(k, deep=deep), self.construct_object(v, deep=deep)) for k, v in node.value]
            return _unique_keys(pairs, path)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, Loader.construct_mapping)
    return Loader


def read_config_file(path: str) -> dict[str, Any]:
    import json

    if not str(path).strip():
        raise InvalidArgumentError("--config", "is empty; give a .json, .yaml or .yml file")
    p = Path(path).expanduser()
    if not p.exists():
        raise InvalidArgumentError("--config", f"file not found: {path}")
    if not p.is_file():
        raise InvalidArgumentError("--config", f"{path} is not a file")
    suffix = p.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise InvalidArgumentError("--config", f"{path}: use a .json, .yaml or .yml file")
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise InvalidArgumentError("--config", f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; not a config file")
        text = p.read_text(encoding="utf-8")
        if suffix == ".json":
            data = json.loads(text, object_pairs_hook=lambda pairs: _unique_keys(pairs, path))
        else:
            import yaml

            data = yaml.load(text, Loader=_yaml_loader(path))  # noqa: S506 - a SafeLoader subclass
    except InvalidArgumentError:
        raise
    except OSError as exc:
        raise InvalidArgumentError("--config", f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # JSON, YAML and UnicodeDecodeError, RecursionError for absurd nesting
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InvalidArgumentError("--config", f"{path}: cannot parse ({reason})") from None
    if not isinstance(data, dict):
        raise InvalidArgumentError("--config", f"{path}: must hold a mapping of option names to values")
    return data


def config_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Accepted keys, each mapped to its option: the long option names (``steps``, ``negative-prompt``) and the
    destination names (``num_inference_steps``), with dashes or underscores."""
    keys: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in NOT_IN_CONFIG or not action.option_strings:
            continue
        names = [action.dest] + [o[2:] for o in action.option_strings if o.startswith("--")]
        for name in names:
            keys[name.replace("-", "_")] = action
    return keys


def cli_name(action: argparse.Action) -> str:
    return next((o[2:] for o in action.option_strings if o.startswith("--")), action.dest)


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options ``argv`` gives explicitly (a flag equal to its default counts)."""
    saved = [(a, a.default) for a in parser._actions]
    saved_defaults = dict(parser._defaults)
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        parser._defaults.clear()
        namespace, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved:
            action.default = default
        parser._defaults.update(saved_defaults)
    return set(vars(namespace))


def _shown(value: Any) -> str:
    """A config value as an error message shows it: short, whatever its size (a list of aliases can hold 10^9)."""
    if isinstance(value, (list, tuple, dict, set)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _convert_one(action: argparse.Action, value: Any, where: str) -> Any:
    kind = action.type
    bad = InvalidArgumentError(where, f"invalid value {_shown(value)}" + (
        f" (expected {getattr(kind, '__name__', 'a value')})" if kind in (int, float) else " (expected a single value)"
        if isinstance(value, (list, dict, bytes)) else ""))
    if isinstance(value, (bool, list, dict, bytes)) or not isinstance(value, (str, int, float)):
        raise bad
    if kind is int:
        if isinstance(value, float):
            raise bad
        try:
            return int(value)
        except ValueError:
            raise bad from None
    if kind is float:
        try:
            return float(value)
        except ValueError:
            raise bad from None
    if kind is None:
        return str(value)
    try:
        return kind(str(value))
    except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(where, f"invalid value {_shown(value)} ({exc})") from None


def _choice_word(action: argparse.Action, value: Any, where: str) -> Any:
    """A YAML boolean where the option takes words: YAML reads unquoted on/off/yes/no as true/false, so
    ``cuda-graphs: off`` arrives as False; it means "off" where the option takes on/off, else it is refused
    naming the accepted words."""
    if not isinstance(value, bool) or action.choices is None:
        return value
    word = "on" if value else "off"
    if word in action.choices:
        return word
    raise InvalidArgumentError(where, f"must be one of {', '.join(map(str, action.choices))}, got {value} (YAML reads "
                               "unquoted yes, no, on and off as true and false: quote the word)")


def convert(action: argparse.Action, value: Any, where: str) -> Any:
    """A config value as the flag would have given it (type, choices, lists for repeatable flags)."""
    if action.nargs == 0:  # store_true / store_const flags: true or false
        if not isinstance(value, bool):
            raise InvalidArgumentError(where, f"expected true or false, got {_shown(value)}")
        return action.const if value else action.default
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        if len(items) > MAX_REPEATS:
            raise InvalidArgumentError(where, f"at most {MAX_REPEATS} values, got {len(items)}")
        out = [_convert_one(action, _choice_word(action, item, where), where) for item in items]
    else:
        out = _convert_one(action, _choice_word(action, value, where), where)
    for item in out if isinstance(out, list) else [out]:
        if action.choices is not None and item not in action.choices:
            raise InvalidArgumentError(where, f"must be one of {', '.join(map(str, action.choices))}, got {_shown(item)}")
    return out


def merge_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill options from ``args.config``; flags given on the command line win.

    Keys are the command's option names (``steps``, ``guidance``, ``negative-prompt``) or their
    destination names (``num_inference_steps``), with dashes or underscores; an unknown key is an
    error listing the accepted ones. Values are checked as the flag's would be.
    """
    if getattr(args, "config", None) is None:
        return
    data = read_config_file(args.config)
    keys = config_keys(parser)
    if isinstance(data.get("cache"), dict) and "cache" in keys:  # a cache: section, as the --cache* flags
        from .options import cache_section

        data = {**{k: v for k, v in data.items() if k != "cache"}, **cache_section(data["cache"], args.config)}
    given = getattr(args, "_given", None)
    seen: dict[str, str] = {}
    for key, value in data.items():
        action = keys.get(str(key).replace("-", "_"))
        if action is None:
            accepted = sorted({cli_name(a) for a in keys.values()})
            raise InvalidArgumentError(f"--config {args.config}",
                                       f"unknown option '{key}'; accepted: {', '.join(accepted)}")
        if action.dest in seen:
            raise InvalidArgumentError(f"--config {args.config}",
                                       f"'{key}' and '{seen[action.dest]}' set the same option")
        seen[action.dest] = str(key)
        if value is None:  # null: the option's default
            continue
        explicit = action.dest in given if given is not None else getattr(args, action.dest, None) is not None
        if not explicit:
            setattr(args, action.dest, convert(action, value, f"{key} (in {args.config})"))
