"""Regional compilation: every repeated-block list of a DiT is one region, traced and fused once.

A DiT declares its repeated blocks as data (``_repeated_blocks``: attribute names of ``nn.ModuleList``s
in diffc's native models, block class names in diffusers' models). The blocks of one list share their
code and, within one DiT call, their input shapes, so one graph serves them all: it is traced from the
first block with its parameters left as graph inputs ("lifted"), and :class:`RegionGraph` runs it for
any block of the list with that block's own tensors, looked up by name at call time. The DiT's own
forward (embeddings, RoPE tables, the final norm) stays eager Python that calls the blocks, which is
what lets the runtime put offload hooks, a step cache or per-block CUDA graphs around them, and lets
weights change in place (LoRA) without re-tracing.

A call's *key* (:func:`call_key`) is the structure of its arguments with every tensor's shape and dtype
and every other value's type and value; a region holds one graph per key it was compiled for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from ..models.structure import Region, RegionError, dit_regions  # noqa: F401  (re-exported)
from .prepack import adjacent_view, written

aten = torch.ops.aten

# ----------------------------------------------------------------------------------------- keys


def _value_text(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{'x'.join(map(str, value.shape)) or 'scalar'}:{str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (tuple, list)):
        inner = ",".join(_value_text(v) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}={_value_text(value[k])}" for k in sorted(value)) + "}"
    if value is None:
        return "None"
    return f"{type(value).__name__}={value!r}"


def call_key(args: tuple, kwargs: dict[str, Any]) -> str:
    """``arg0=1x4608x3072:bfloat16,...,name=...``: a call's structure, shapes, dtypes and other values."""
    parts = [f"arg{i}={_value_text(a)}" for i, a in enumerate(args)]
    parts += [f"{k}={_value_text(kwargs[k])}" for k in sorted(kwargs)]
    return ",".join(parts)


def _detached(value: Any) -> Any:
    """Detached contiguous copies of the tensors in ``value``: the graph is traced on dense inputs (which the
    fused ops' filters need), and :meth:`RegionGraph.__call__` hands it dense inputs."""
    return pytree.tree_map(lambda v: v.detach().contiguous().clone() if isinstance(v, torch.Tensor) else v, value)


def capture_region_inputs(dit: nn.Module, kwargs: dict[str, Any],
                          regions: list[Region] | None = None) -> tuple[dict[str, tuple[tuple, dict]], Any]:
    """Run ``dit(**kwargs)`` once and record the arguments of each region's first block.

    Returns ``({region name: (args, kwargs)}, dit output)``; tensors are detached clones.
    """
    regions = dit_regions(dit) if regions is None else regions
    records: dict[str, tuple[tuple, dict]] = {}
    hooks = []

    def recorder(name: str):
        def hook(_module, args, kw):
            records.setdefault(name, (_detached(tuple(args)), _detached(dict(kw))))
        return hook

    for region in regions:
        hooks.append(region.blocks[0].register_forward_pre_hook(recorder(region.name), with_kwargs=True))
    try:
        with torch.no_grad():
            out = dit(**kwargs)
    finally:
        for h in hooks:
            h.remove()
    missing = [r.name for r in regions if r.name not in records]
    if missing:
        raise RegionError(f"{type(dit).__name__}'s forward never called the blocks of {missing}")
    return records, out


# ----------------------------------------------------------------------------------------- running


class RegionGraph:
    """Runs one traced block graph for any block of its region, with that block's tensors.

    ``program`` is the (rewritten) ``ExportedProgram`` of one block; its parameters and buffers are read
    from the block passed to :meth:`__call__` by their names relative to the block, at every call, so
    in-place weight updates and offload's re-pointed tensors are always what runs. Concatenations of a
    block's own weights that a pass left in the graph (``concat_linear``) are folded into one packed
    tensor per block the first time the block runs (see :mod:`diffc.compile.prepack`).
    """

    def __init__(self, program: torch.export.ExportedProgram):
        self.program = program
        self.gm = _own_copy(program.graph_module)  # folding below must not change the program (it is saved)
        self.in_spec = program.call_spec.in_spec
        self.out_spec = program.call_spec.out_spec
        bad = [s.kind.name for s in program.graph_signature.output_specs if s.kind != OutputKind.USER_OUTPUT]
        if bad:
            raise RegionError(f"a compiled block graph may only return values (it also has {sorted(set(bad))}): "
                              "a block that mutates its buffers or inputs cannot be compiled as a region")
        self.sources: list[tuple[str, Any]] = []  # per placeholder: ("state", name) | ("const", t) | ("user", i)
        user = 0
        for spec in program.graph_signature.input_specs:
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                self.sources.append(("state", spec.target))
            elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
                self.sources.append(("const", program.constants[spec.target]))
            elif spec.kind == InputKind.USER_INPUT:
                self.sources.append(("user", user))
                user += 1
            else:
                raise RegionError(f"unsupported graph input kind {spec.kind.name} in a compiled block")
        self._fold_weight_concats()
        self._fold_input_concats()
        self._packed: dict[int, list[torch.Tensor]] = {}  # id(block) -> packed tensors

    @property
    def state_names(self) -> list[str]:
        """Names (relative to a block) of the parameters and buffers the graph reads."""
        names = [value for kind, value in self.sources if kind == "state"]
        for recipes in self._packed_specs:
            names += [r[1] for r in recipes if r[0] == "state"]
        return list(dict.fromkeys(names))

    @property
    def read_state_names(self) -> set[str]:
        """The names in :attr:`state_names` the graph really reads: a rewrite can leave a weight's placeholder
        with no reader (the fp8 tier's linears read the fp8 copies beside their weight), and the runtime may
        then keep that weight off the device (:mod:`diffc.runtime.fp8`)."""
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        names = {value for node, (kind, value) in zip(placeholders, self.sources) if kind == "state" and node.users}
        for recipes in self._packed_specs:  # packing reads every tensor its recipes name
            names.update(_recipe_states(recipes))
        return names

    def check_block(self, block: nn.Module) -> list[str]:
        """What in ``block`` does not fit the graph: missing tensors, or shapes/dtypes that differ."""
        expected = self.program.state_dict
        problems = []
        for kind, name in self.sources:
            if kind != "state":
                continue
            try:
                tensor = _tensor_of(block, name)
            except AttributeError:
                problems.append(f"missing {name}")
                continue
            want = expected.get(name)
            if want is not None and (tuple(want.shape) != tuple(tensor.shape) or want.dtype != tensor.dtype):
                problems.append(f"{name} {tuple(tensor.shape)}/{tensor.dtype} vs {tuple(want.shape)}/{want.dtype}")
        return problems

    def __call__(self, block: nn.Module, args: tuple, kwargs: dict[str, Any]):
        flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec != self.in_spec:
            flat = self._reorder(args, kwargs)
        packed = self._packed.get(id(block))
        if packed is None and self._has_packed:
            packed = self._pack(block)
        values = []
        for kind, value in self.sources:
            if kind == "state":
                values.append(_tensor_of(block, value))
            elif kind == "user":
                # a block may receive a strided view (HunyuanVideo's first block: the patch embedder's transpose)
                v = flat[value]
                values.append(v.contiguous() if isinstance(v, torch.Tensor) else v)
            elif kind == "joined":
                values.append(joined([flat[i] for i in value[0]], value[1]))
            elif kind == "const":
                values.append(value)
            else:
                values.append(packed[value])
        return pytree.tree_unflatten(list(self.gm(*values)), self.out_spec)

    def forget(self, block: nn.Module | None = None) -> None:
        """Drop packed tensors (of one block, or all): the next call packs again from the current weights."""
        if block is None:
            self._packed.clear()
        else:
            self._packed.pop(id(block), None)

    def _reorder(self, args: tuple, kwargs: dict[str, Any]) -> list:
        """Flatten ``kwargs`` in the order the graph was traced with (the same call, keywords reordered)."""
        kw_spec = self.in_spec.children_specs[1]
        keys = list(kw_spec.context)
        if sorted(keys) != sorted(kwargs):
            raise RegionError(f"compiled block called with keywords {sorted(kwargs)}, traced with {sorted(keys)}")
        flat, spec = pytree.tree_flatten((tuple(args), {k: kwargs[k] for k in keys}))
        if spec != self.in_spec:
            raise RegionError("compiled block called with arguments of another structure than it was traced with")
        return flat

    def _to_placeholder(self, node: torch.fx.Node, placeholders: list[torch.fx.Node], name: str,
                        source: tuple) -> None:
        """Replace ``node`` by a new first placeholder ``name``, whose value :meth:`__call__` takes from ``source``
        (an entry of ``self.sources``); ``placeholders`` (the graph's, in order) is kept up to date."""
        graph = self.gm.graph
        with graph.inserting_before(placeholders[0]):
            new = graph.placeholder(name)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        placeholders.insert(0, new)
        self.sources.insert(0, source)

    # ---- weight concatenations (concat_linear) ---------------------------------------------------

    def _fold_weight_concats(self) -> None:
        """Replace each ``aten.cat(..., 0)`` over the block's own tensors (or literal factories of them,
        such as a zero bias) by a placeholder that :meth:`_pack` fills once per block."""
        from .prepack import CONSTANT_FACTORIES

        graph = self.gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        state_of = {node: value for node, (kind, value) in zip(placeholders, self.sources) if kind == "state"}

        def recipe(node):
            if node in state_of:
                return ("state", state_of[node])
            if (node.op == "call_function" and node.target in CONSTANT_FACTORIES
                    and all(a in state_of for a in node.all_input_nodes)):
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: ("state", state_of[a]))
                return ("factory", node.target, args, kwargs)
            return None

        self._packed_specs: list[tuple] = []
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target != aten.cat.default:
                continue
            inputs = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            recipes = [recipe(i) if isinstance(i, torch.fx.Node) else None for i in inputs]
            if dim != 0 or not recipes or any(r is None for r in recipes):
                continue
            self._to_placeholder(node, placeholders, f"_diffc_packed_{len(self._packed_specs)}",
                                 ("packed", len(self._packed_specs)))
            self._packed_specs.append(tuple(recipes))
        self._has_packed = bool(self._packed_specs)
        if self._has_packed:
            graph.eliminate_dead_code()
            graph.lint()
            self.gm.recompile()

    # ---- concatenations of the block's inputs ------------------------------------------------------

    def _fold_input_concats(self) -> None:
        """Replace each ``aten.cat`` of user inputs that nothing else reads by a placeholder that
        :meth:`__call__` fills with :func:`joined`: FLUX.1's and HunyuanVideo's single-stream blocks are
        given the text and image streams apart and concatenate them first, while every block but the first
        is given the two slices of its predecessor's output, which lie end to end in one buffer already
        (FLUX.1-dev at 1024²: a copy of 4608 x 3072 values saved in 37 of its 38 single blocks)."""
        graph = self.gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        user_of = {node: value for node, (kind, value) in zip(placeholders, self.sources) if kind == "user"}
        folded = False
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target != aten.cat.default:
                continue
            inputs = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if (len(inputs) < 2 or len(set(inputs)) != len(inputs)
                    or any(i not in user_of or len(i.users) != 1 for i in inputs) or written(node)):
                continue
            self._to_placeholder(node, placeholders, f"_diffc_joined_{node.name}",
                                 ("joined", (tuple(user_of[i] for i in inputs), dim)))
            for piece in inputs:  # read by nothing now: the runner passes the pieces only through the join
                index = placeholders.index(piece)
                graph.erase_node(piece)
                del placeholders[index], self.sources[index]
            folded = True
        if folded:
            graph.lint()
            self.gm.recompile()

    def _pack(self, block: nn.Module) -> list[torch.Tensor]:
        from .prepack import pack_tensors

        def value(recipe):
            if recipe[0] == "state":
                return _tensor_of(block, recipe[1])
            _, target, args, kwargs = recipe
            resolve = (lambda a: _tensor_of(block, a[1]) if isinstance(a, tuple) and len(a) == 2
                       and a[0] == "state" else a)
            return target(*[resolve(a) for a in args], **{k: resolve(v) for k, v in kwargs.items()})

        with torch.no_grad():
            packed = [pack_tensors([value(r) for r in recipes], [r[0] == "state" for r in recipes])
                      for recipes in self._packed_specs]
        self._packed[id(block)] = packed
        return packed


def joined(pieces: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat(pieces, dim)``, as a view of the pieces' buffer where they already lie end to end in it
    (slices of one contiguous tensor along ``dim``, in order), so nothing is copied; a copy otherwise."""
    if (not all(isinstance(p, torch.Tensor) for p in pieces)
            or any(p.device.type == "meta" or is_fake(p) for p in pieces)):  # no memory to share: trace the copy
        return torch.cat(pieces, dim)
    view = adjacent_view(pieces, dim)
    return torch.cat(pieces, dim) if view is None else view


def _recipe_states(value: Any) -> set[str]:
    """The block tensors a packing recipe (nested tuples, dicts and ``("state", name)`` pairs) names."""
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "state" and isinstance(value[1], str):
        return {value[1]}
    if isinstance(value, dict):
        value = tuple(value.values())
    if isinstance(value, (tuple, list)):
        return set().union(*map(_recipe_states, value)) if value else set()
    return set()


def _own_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A graph module with its own copy of ``gm``'s graph (nodes' metadata shared), same attributes."""
    graph = torch.fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return torch.fx.GraphModule(gm, graph)


def _tensor_of(block: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    module = block.get_submodule(owner) if owner else block
    value = module._parameters.get(attr)
    if value is None:
        value = module._buffers.get(attr)
    if value is None:
        value = getattr(module, attr)
    return value
