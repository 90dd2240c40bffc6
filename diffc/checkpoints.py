"""Checkpoint files as both backends read them (diffc's native loader and the generic diffusers one): bounded JSON
configs, safetensors headers, tokenizer folders. Each problem is one ``CheckpointError`` line naming the file."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from .errors import CheckpointError

MAX_CONFIG_BYTES = 16 << 20
# A tokenizer folder's vocabulary: a fast tokenizer's JSON (or Mistral's tekken.json), BPE or WordPiece vocab.*, a
# SentencePiece .model, a tiktoken file.
VOCABULARY = re.compile(r"^(tokenizer\.json|tekken\.json|vocab(\.\w+)?|.+\.(model|tiktoken))$")


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file as an object; anything else is one ``CheckpointError`` line naming it."""
    if not path.is_file():
        if path.exists():  # a folder, a device or FIFO (or a link to one): reading it would hang or fail oddly
            raise CheckpointError(f"{path} is not a file; a config is a JSON file")
        link = " (a symbolic link to a missing file)" if path.is_symlink() else ""
        raise CheckpointError(f"missing file: {path}{link}")
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; not a config file")
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: invalid JSON ({reason})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: invalid JSON (expected an object, got {type(data).__name__})")
    return data


def check_tokenizer_folder(folder: Path) -> None:
    """A tokenizer folder holds a non-empty vocabulary file: from a folder without one transformers builds a
    tokenizer that knows no word (every prompt all unknown tokens), or one that fails only at generation."""
    found = [p for p in folder.iterdir() if VOCABULARY.match(p.name) and p.is_file() and p.stat().st_size > 0]
    if not found:
        raise CheckpointError(f"{folder}: no tokenizer vocabulary (tokenizer.json, vocab.json, vocab.txt or a "
                              "sentencepiece .model file)")


def open_safetensors(path: Path, device: str = "cpu"):
    try:
        return safe_open(str(path), framework="pt", device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None


def stored_tensors(f) -> dict[str, tuple[str, list[int]]]:
    """Every tensor of the safetensors file ``f`` (:func:`open_safetensors`' handle): its stored dtype as safetensors
    names it (``F32``, ``BF16``, ``I32``, ``BOOL``, ...) and its shape, from the header only. safetensors checks the
    header as it opens the file (its length, its JSON, each dtype, shape and data offset within the file size)."""
    slices = {name: f.get_slice(name) for name in f.keys()}
    return {name: (s.get_dtype(), s.get_shape()) for name, s in slices.items()}


def stored_dtypes(files: list[Path]) -> dict[str, str]:
    """Every tensor's stored dtype as safetensors names it, from the headers only."""
    dtypes: dict[str, str] = {}
    for path in files:
        with open_safetensors(path) as f:
            dtypes.update({name: dtype for name, (dtype, _) in stored_tensors(f).items()})
    return dtypes


def component_entry(where: Path, name: str, entry: Any) -> tuple[str, str] | None:
    """``model_index.json``'s entry for component ``name``: ``[library, class name]`` (two strings, the class a
    Python name), or None for an optional component the pipeline leaves out (``[null, null]``)."""
    if not (isinstance(entry, list) and len(entry) == 2):
        raise CheckpointError(f"{where}: component {name!r} must be [library, class name], got "
                              f"{json.dumps(entry)[:200]}")
    if entry == [None, None]:
        return None
    library, class_name = entry
    if not (isinstance(library, str) and isinstance(class_name, str) and class_name.isidentifier()):
        raise CheckpointError(f"{where}: component {name!r} must be [library, class name] (two strings, such as "
                              f"[\"diffusers\", \"AutoencoderKL\"]), got {json.dumps(entry)[:200]}")
    return library, class_name


# The stored kinds a floating-point weight may have (safetensors' names); each converts exactly to the model's dtype.
# Not F4/F6 (packed, their shapes count elements torch does not), F8_E8M0 (exponents only, a scale format), complex.
FLOAT_KINDS = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")


def check_floating_stored(folder: Path, files: list[Path], floating: set[str] | None) -> None:
    """No tensor named in ``floating`` (None: every tensor stored in a floating kind) (the model's floating-point parameters and buffers) is stored in ``files`` as
    integers or booleans, which a load would convert to floats without a word, or as another kind than
    :data:`FLOAT_KINDS` (read from the headers only)."""
    stored = {n: d for n, d in stored_dtypes(files).items()
              if d not in FLOAT_KINDS and (n in floating if floating is not None else d[0] in "FC")}
    wrong = [f"{n} ({d})" for n, d in stored.items() if d == "BOOL" or d[0] in "IU"]
    if wrong:
        raise CheckpointError(f"{folder}: {len(wrong)} weight(s) stored as integers or booleans, not floating point: "
                              + ", ".join(wrong[:5]) + (", ..." if len(wrong) > 5 else ""))
    other = [f"{n} ({d})" for n, d in stored.items()]
    if other:
        raise CheckpointError(f"{folder}: {len(other)} weight(s) stored in a kind diffc does not load as weights: "
                              + ", ".join(other[:5]) + (", ..." if len(other) > 5 else "")
                              + f" (accepted: {', '.join(FLOAT_KINDS)})")


def first_line(exc: BaseException, typed: bool = False) -> str:
    """The first line of a library's error about a checkpoint file (at most 300 characters of it), for diffc's
    one-line messages; ``typed``: after the error's type (``TypeError: ...``), where the type says what went wrong."""
    text = str(exc).strip()
    if "contains custom code" in text:  # transformers' refusal of trust_remote_code=False
        return "its configuration names a class defined by Python code in the folder (auto_map); diffc never runs " \
               "code from a checkpoint"
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0][:300]
    return f"{type(exc).__name__}: {line}" if typed else line


def refuse_folder_code(folder: Path) -> None:
    """Refuse ``folder`` when one of its JSON files maps a class to Python code (``auto_map``), before any library
    reads it: transformers (and diffusers' AutoModel) resolve such an entry to a .py module of the folder, and when
    the caller does not say ``trust_remote_code=False`` (diffusers does not, for its transformers components)
    transformers asks "Do you wish to run the custom code? [y/N]" on the terminal and runs it on a yes."""
    for path in sorted(folder.glob("*.json")):
        try:
            data = path.read_bytes() if path.is_file() else b""
        except OSError:
            continue  # unreadable: the library that needs the file names it
        if b"auto" not in data and b"\\u" not in data:
            continue  # the key cannot be spelt (JSON may write any character of it as a \u escape)
        try:
            config = json.loads(data)
        except (ValueError, RecursionError):
            continue  # not JSON: the library that reads the file refuses it (one line, naming it)
        # a vocabulary (vocab.json) may hold the word auto_map, with a token id: only a mapping or list is code
        code = config.get("auto_map") if isinstance(config, dict) else None
        if isinstance(code, (dict, list)) and code:
            raise CheckpointError(f"{path}: 'auto_map' names a class defined by Python code in the folder; diffc "
                                  "never runs code from a checkpoint")
