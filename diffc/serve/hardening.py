"""What the server checks before a request reaches a route: the ``Host`` header (DNS rebinding), bounded
metric labels, and JSON bodies a parser or a tokenizer would choke on (deep nesting, huge numbers,
lone surrogates)."""

from __future__ import annotations

import ipaddress
import json
from typing import Any, Iterable

from .api_error import APIError

# Methods counted under their own name in /metrics; any other is "other" (a client picks the method).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
MAX_JSON_DEPTH = 32  # diffc's own requests nest 3 deep at most


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"


def route_label(scope: dict) -> str:
    """The matched route's template (``/v1/videos/{video_id}``), never the raw path; ``other`` when none matched."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else "other"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def default_allowed_hosts(bind_host: str) -> list[str] | None:
    """Host names a server bound to ``bind_host`` answers to by default: on a loopback address only the
    loopback names (a browser page cannot rebind a name of its own to it); elsewhere any (None)."""
    if not is_loopback(bind_host):
        return None
    return sorted({*LOOPBACK_NAMES, bind_host.strip("[]").lower()})


def parse_allowed_hosts(values: Iterable[str]) -> list[str] | None:
    """``--allowed-hosts`` values (repeatable, comma-separated): host names, ``*.example.com``, or ``*``
    for any (None)."""
    hosts: list[str] = []
    for value in values:  # host_name: a port given with a name ("gpu-box:30000") would never match a Host header
        hosts += [host_name(h) for h in value.split(",") if h.strip()]
    if "*" in hosts:
        return None
    return sorted(set(hosts))


def host_name(header: str) -> str:
    """The host of a ``Host`` header, without its port, lower-case (``[::1]:8000`` -> ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    if header.count(":") == 1:
        return header.split(":", 1)[0]
    return header


def host_allowed(header: str | None, allowed: list[str] | None) -> bool:
    if allowed is None:
        return True
    if not header:
        return False
    name = host_name(header)
    for pattern in allowed:
        if name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


def host_error(header: str | None, allowed: list[str]) -> APIError:
    shown = (header or "")[:100]
    return APIError(400, f"Host '{shown}' is not served here (DNS rebinding protection); this server answers to "
                         f"{', '.join(allowed)}. Start it with --allowed-hosts to add names.",
                    param=None, code="invalid_host")


def load_json(body: bytes) -> Any:
    """A request body as JSON: an empty body, malformed text, a key given twice in one object, nesting deeper than
    ``MAX_JSON_DEPTH``, numbers Python refuses to read (more than 4300 digits) and strings holding lone surrogates
    are all 400s."""
    if not body.strip():
        raise APIError(400, "The request body is empty; send a JSON object (Content-Type: application/json) such as "
                            '{"prompt": "a cat"}, or multipart/form-data.', code="invalid_json")
    try:
        data = json.loads(body, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise _too_deep() from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"We could not parse the JSON body of your request ({exc}).", code="invalid_json") from None
    except ValueError as exc:  # int('9' * 5000): "Exceeds the limit (4300 digits) ..."
        reason = str(exc).split(";")[0]
        raise APIError(400, f"We could not parse the JSON body of your request: a number is too large ({reason}).",
                       code="invalid_json") from None
    check_values(data)
    return data


def duplicated(name: str) -> APIError:
    """A field given twice (a JSON key, a form part): which one counts would be the parser's choice, not the
    client's."""
    return APIError(400, f"'{name}' is given more than once; give each field once.", param=name,
                    code="duplicate_parameter")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        raise duplicated(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return data


def _too_deep() -> APIError:
    return APIError(400, f"We could not parse the JSON body of your request: it nests deeper than {MAX_JSON_DEPTH} "
                         "levels.", code="invalid_json")


def check_values(data: Any) -> None:
    """Refuse nesting deeper than ``MAX_JSON_DEPTH`` and strings that are not valid Unicode (lone surrogates,
    which JSON's ``\\ud800`` escapes can write), naming the field."""
    stack: list[tuple[Any, int, str | None]] = [(data, 0, None)]
    while stack:
        value, depth, field = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        if isinstance(value, str):
            _check_text(value, field)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, field)
                stack.append((item, depth + 1, key if field is None else field))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, field) for item in value)


def _check_text(text: str, field: str | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        where = f"'{field}'" if field is not None else "a field name"
        raise APIError(400, f"Invalid value for {where}: the text holds a lone surrogate (\\ud800-\\udfff), "
                            "which is not valid Unicode.", param=field, code="invalid_value") from None
