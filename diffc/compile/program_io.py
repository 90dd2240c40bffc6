"""An ExportedProgram as data: its graph in torch.export's JSON schema, its constants in safetensors.

``torch.export.save`` / ``load`` keep a program's state dict, constants and example inputs as pickles
inside a zip, and ``load`` unpickles them. diffc stores a program as two files instead::

    bucket-0.json           {"format": "diffc-program", "version": 1, "exported_program": <torch.export JSON>,
                             "state": {name: {shape, dtype, kind}}, "constants": {name: {shape, dtype}}}
    bucket-0.safetensors    the lifted constants (e.g. RoPE tables computed at trace time), bit-exact

Weights are never stored: ``state`` records only their names, shapes and dtypes, the program is
rebuilt with meta tensors in their place and a run assigns the checkpoint's tensors by name.

Reading is strict, so that a crafted file cannot make the reader run code: the JSON may hold no
symbolic shape expressions (torch parses those with ``sympy.sympify``, which evaluates text), no
custom objects and no named tuples; every node must call an operator of :data:`OP_NAMESPACES` (or
``operator.getitem``), checked on the text and again on the rebuilt graph; and none of the aten/prims operators
that reach files, storages or unchecked memory (:data:`_REFUSED_OPS`).
"""

from __future__ import annotations

import inspect
import json
import operator
import re
from pathlib import Path
from typing import Any

import torch

FORMAT = "diffc-program"
VERSION = 1
# Operator namespaces a stored graph may call; anything else is refused when it is read.
OP_NAMESPACES = ("aten", "prims", "diffc")
_TARGET = re.compile(r"^torch\.ops\.(?:%s)\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$" % "|".join(OP_NAMESPACES))
_PYTHON_TARGETS = {"_operator.getitem": operator.getitem}
# aten/prims operators a stored graph may not call, whatever their namespace allows: those that act outside the
# tensors they are given (``from_file`` maps a file, creating it if missing; ``save`` writes one; ``set``/``set_``
# re-point a tensor at another storage; printing, warnings, TorchScript's list and dict builtins) and those that
# index memory without checking the indices (the ``_unsafe_index`` family, ``_index_put_impl_``'s unsafe flag,
# sparse and nested tensors built from unchecked indices or offsets). Diffusion graphs need none of them.
_REFUSED_OPS = frozenset({"from_file", "save", "set", "set_", "_print", "warn", "_set_item", "Delete", "pop",
                          "remove", "setdefault", "append", "extend", "insert", "clear", "_unsafe_index",
                          "_unsafe_index_put", "_unsafe_masked_index", "_unsafe_masked_index_put_accumulate",
                          "_index_put_impl", "_index_put_impl_"})
_REFUSED_FAMILIES = ("sparse", "nested")  # any operator whose name holds one of these
# JSON keys whose presence means a feature diffc's graphs never use and the reader will not interpret.
_REFUSED_KEYS = {
    "as_expr": "a symbolic shape expression",
    "expr_str": "a symbolic shape expression",
    "as_custom_obj": "a custom (pickled) object",
    "custom_obj": "a custom (pickled) object",
    "as_graph": "a nested graph",
    # an argument torch resolves by name as any attribute of torch, math or operator (``torch.os.system``), for the
    # higher-order operators diffc's graphs never call; its repr went into the code fx generates (a SyntaxError)
    "as_operator": "an operator passed as an argument",
}
# Keys that must be empty (sym_int_values may hold plain integers, e.g. flash attention's max_q; an
# expression in them is an 'as_expr', refused above).
_REFUSED_NONEMPTY = {"custom_obj_values": "a custom (pickled) object"}
_DTYPES = {str(t).removeprefix("torch."): t for t in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
    torch.float8_e4m3fn, torch.float8_e5m2)}
MAX_RANK, MAX_DIM = 8, 1 << 40


class ProgramFormatError(ValueError):
    """A stored program breaks the format; the caller names the file."""


def constants_path(path: Path) -> Path:
    """The safetensors file beside a program's JSON file ``path``."""
    return Path(path).with_suffix(".safetensors")


def _tensor_info(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def _serialize_graph_only(serde, program: torch.export.ExportedProgram):
    """torch's serializer without its pickled parts (weights, constants, example inputs): switched off where
    torch has the switches, else (torch before 2.12) the pickling step is skipped while it runs."""
    serializer = serde.ExportedProgramSerializer()
    if "serialize_state_dict" in inspect.signature(serializer.serialize).parameters:
        return serializer.serialize(program, serialize_state_dict=False, serialize_constants=False,
                                    serialize_example_inputs=False)
    real = serde.serialize_torch_artifact
    serde.serialize_torch_artifact = lambda *args, **kwargs: b""
    try:
        return serializer.serialize(program)
    finally:
        serde.serialize_torch_artifact = real


def program_to_files(program: torch.export.ExportedProgram) -> tuple[bytes, dict[str, torch.Tensor]]:
    """The JSON bytes of ``program`` (weights left out) and its constants, ready for safetensors."""
    from torch._export.serde import serialize as serde

    constants: dict[str, torch.Tensor] = {}
    for name, value in program.constants.items():
        if not isinstance(value, torch.Tensor):
            raise ProgramFormatError(f"constant {name!r} is a {type(value).__name__}; only tensors can be stored")
        constants[name] = value.detach().to("cpu").contiguous()
    serialized = _serialize_graph_only(serde, program)
    graph = json.loads(serde._to_json_bytes(serialized.exported_program))
    state = {name: {**_tensor_info(t), "kind": "parameter" if isinstance(t, torch.nn.Parameter) else "buffer"}
             for name, t in program.state_dict.items()}
    document = {"format": FORMAT, "version": VERSION, "exported_program": graph, "state": state,
                "constants": {name: _tensor_info(t) for name, t in constants.items()}}
    check_graph_json(document["exported_program"])  # what the reader refuses, the writer never writes
    return json.dumps(document).encode(), constants


def save_program(program: torch.export.ExportedProgram, path: Path) -> list[Path]:
    """Write ``program`` to ``path`` (JSON) and, if it has constants, :func:`constants_path`; returns the files."""
    from safetensors.torch import save_file

    data, constants = program_to_files(program)
    path = Path(path)
    path.write_bytes(data)
    if not constants:
        return [path]
    save_file(constants, str(constants_path(path)))
    return [path, constants_path(path)]


def load_program(data: bytes, constants: bytes | None, device: torch.device | str = "cpu"):
    """Rebuild an ExportedProgram from its JSON bytes and constants bytes (no pickle, no code).

    Weights come back as meta tensors of the recorded shapes and dtypes; constants are placed on
    ``device``. Raises :class:`ProgramFormatError` for anything the format does not allow.
    """
    from torch._export.serde import schema
    from torch._export.serde import serialize as serde

    from .. import ops  # noqa: F401  (registers torch.ops.diffc.*, which the graph calls)

    document = _read_json(data)
    graph = document["exported_program"]
    check_graph_json(graph)
    state = {name: _meta_tensor(name, info) for name, info in _entries(document, "state")}
    expected = dict(_entries(document, "constants"))
    tensors = _read_constants(constants, expected, device)
    try:
        exported = serde._dict_to_dataclass(schema.ExportedProgram, graph)
        program = serde.ExportedProgramDeserializer().deserialize(exported, state, tensors, None)
    except ProgramFormatError:
        raise
    except Exception as exc:  # torch raises many types for a malformed program
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ProgramFormatError(f"malformed graph ({type(exc).__name__}: {first})") from None
    check_graph(program.graph_module)
    return program


def _read_json(data: bytes) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ProgramFormatError(f"not valid JSON ({type(exc).__name__})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ProgramFormatError(f"not a {FORMAT} file")
    if document.get("version") != VERSION:
        raise ProgramFormatError(f"{FORMAT} version {document.get('version')!r}; this diffc reads version {VERSION}")
    for key in ("exported_program", "state", "constants"):
        if not isinstance(document.get(key), dict):
            raise ProgramFormatError(f"'{key}' is missing or not an object")
    return document


def check_graph_json(graph: dict[str, Any]) -> None:
    """Refuse what the torch.export reader would interpret as code, before it sees the text."""
    if graph.get("range_constraints"):
        raise ProgramFormatError("the graph has symbolic shapes; diffc stores static shapes only")
    module = graph.get("graph_module")
    if not isinstance(module, dict):
        raise ProgramFormatError("no graph_module")
    if module.get("treespec_namedtuple_fields"):
        raise ProgramFormatError("the graph declares named tuples; diffc's graphs return plain tensors and tuples")
    stack: list[Any] = [graph]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key in _REFUSED_KEYS or (key in _REFUSED_NONEMPTY and value):
                    what = _REFUSED_KEYS.get(key) or _REFUSED_NONEMPTY[key]
                    raise ProgramFormatError(f"the graph holds {what} ('{key}'), which diffc does not read")
                stack.append(value)
            if "target" in item and "inputs" in item and "outputs" in item:
                _check_target(item["target"])
        elif isinstance(item, list):
            stack.extend(item)


def _check_target(target: Any) -> None:
    if not isinstance(target, str) or not (_TARGET.match(target) or target in _PYTHON_TARGETS):
        raise ProgramFormatError(f"the graph calls {str(target)[:200]!r}; a stored graph may call only "
                                 f"operators of torch.ops.{{{','.join(OP_NAMESPACES)}}} and operator.getitem")
    if target in _PYTHON_TARGETS:
        return
    _, _, namespace, op, overload = target.split(".")
    try:
        resolved = getattr(getattr(getattr(torch.ops, namespace), op), overload)
    except (AttributeError, RuntimeError):
        raise ProgramFormatError(f"the graph calls {target}, which is not an operator of this torch and diffc "
                                 "(is the artifact from another version?)") from None
    _check_pure(resolved, target)


def _check_pure(op: Any, name: str) -> None:
    """An aten/prims operator a stored graph calls stays inside the graph's tensors: none of :data:`_REFUSED_OPS`
    or :data:`_REFUSED_FAMILIES`, and none that takes a storage."""
    if not isinstance(op, torch._ops.OpOverload) or op.namespace == "diffc":
        return
    base = op._opname
    if base in _REFUSED_OPS or any(f in base for f in _REFUSED_FAMILIES) \
            or any("Storage" in str(a.type) for a in op._schema.arguments):
        raise ProgramFormatError(f"the graph calls {name}, which a stored graph may not call (it reaches files, "
                                 "storages or memory outside the graph's tensors)")


def check_graph(gm: torch.fx.GraphModule) -> None:
    """The rebuilt graph calls only allowed, registered operators (a name torch could not resolve is refused)."""
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        target = node.target
        allowed = (node.op == "call_function" and (
            target in _PYTHON_TARGETS.values()
            or (isinstance(target, torch._ops.OpOverload) and target.namespace in OP_NAMESPACES)))
        if not allowed:
            raise ProgramFormatError(f"node {node.name!r} ({node.op} {str(target)[:200]!r}) is not an allowed operator "
                                     "call (is an operator missing from this diffc?)")
        _check_pure(target, str(target))


def _entries(document: dict[str, Any], key: str):
    for name, info in document[key].items():
        if not isinstance(info, dict):
            raise ProgramFormatError(f"{key} entry {name!r} is not an object")
        yield name, info


def _shape_dtype(name: str, info: dict[str, Any]) -> tuple[list[int], torch.dtype]:
    shape, dtype = info.get("shape"), _DTYPES.get(info.get("dtype"))
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)):
        raise ProgramFormatError(f"tensor {name!r}: invalid shape {str(shape)[:100]}")
    if dtype is None:
        raise ProgramFormatError(f"tensor {name!r}: unknown dtype {str(info.get('dtype'))[:40]!r}")
    return shape, dtype


def _meta_tensor(name: str, info: dict[str, Any]) -> torch.Tensor:
    shape, dtype = _shape_dtype(name, info)
    t = torch.empty(shape, dtype=dtype, device="meta")
    if info.get("kind") == "parameter":
        return torch.nn.Parameter(t, requires_grad=False)
    if info.get("kind") != "buffer":
        raise ProgramFormatError(f"state entry {name!r}: kind must be 'parameter' or 'buffer'")
    return t


def _read_constants(data: bytes | None, expected: dict[str, dict], device) -> dict[str, torch.Tensor]:
    if not expected:
        if data is not None:
            raise ProgramFormatError("a constants file is present but the program lists no constants")
        return {}
    if data is None:
        raise ProgramFormatError(f"the program lists constants ({', '.join(list(expected)[:5])}) but the constants "
                                 "file is missing")
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ProgramFormatError(f"constants are not a valid safetensors file ({exc})") from None
    if set(tensors) != set(expected):
        extra, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        raise ProgramFormatError(f"constants do not match the program (unexpected {extra[:5]}, missing {missing[:5]})")
    out = {}
    for name, info in expected.items():
        shape, dtype = _shape_dtype(name, info)
        t = tensors[name]
        if list(t.shape) != shape or t.dtype != dtype:
            raise ProgramFormatError(f"constant {name!r} is {list(t.shape)}/{t.dtype}, the program says {shape}/{dtype}")
        out[name] = t.to(device)
    return out
