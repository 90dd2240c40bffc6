"""Model structure declared as data: the repeated-block lists (regions) of a DiT.

A DiT declares its repeated blocks (``_repeated_blocks``): attribute names of ``nn.ModuleList``s in
diffc's native models, block class names in diffusers' models (which may declare them only as
``_no_split_modules``). Regional compilation, offload and the
step cache all read the blocks through :func:`dit_regions`, never by special-casing a model.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

from torch import nn

from ..errors import DiffcError


class RegionError(DiffcError):
    """A DiT's declared repeated blocks cannot be found or used."""


@dataclasses.dataclass(frozen=True)
class Region:
    """One repeated-block list: its name (the ``ModuleList``'s attribute path) and its blocks, in order.
    ``single``: a declared block class found outside any list (a diffusers patch embedder), a region of
    one block that is no step of the residual stream."""

    name: str
    blocks: tuple[nn.Module, ...]
    single: bool = False


def declared_blocks(dit: nn.Module) -> tuple[str, ...]:
    """What ``dit`` declares as its repeated blocks: ``_repeated_blocks``, else (diffusers models that
    declare none, e.g. SD3, CogVideoX) the block classes of ``_no_split_modules``."""
    return tuple(getattr(dit, "_repeated_blocks", ()) or ()) or tuple(getattr(dit, "_no_split_modules", ()) or ())


def dit_regions(dit: nn.Module) -> list[Region]:
    """The regions of ``dit`` in declaration order, from :func:`declared_blocks`.

    An entry names a ``ModuleList`` attribute (diffc's models) or a block class (diffusers' models,
    whose lists are then found by the class of their elements; a block of that class outside any list,
    e.g. a patch embedder, is a region of its own). A list whose blocks are not all built alike (SD3's
    last joint block has no text output) splits into runs of alike blocks, ``name[start:stop]``, since
    one graph serves one structure. Raises :class:`RegionError` when the model declares none or an
    entry matches nothing.
    """
    declared = declared_blocks(dit)
    if not declared:
        raise RegionError(f"{type(dit).__name__} declares no repeated blocks (_repeated_blocks); "
                          "regional compilation needs them")
    regions, seen = [], set()
    for entry in declared:
        found, single = _lists_named(dit, entry) or _lists_of_class(dit, entry), False
        if not found:
            found, single = _single_blocks(dit, entry), True
        if not found:
            raise RegionError(f"{type(dit).__name__}._repeated_blocks names {entry!r}, which is neither a "
                              "ModuleList attribute nor the class of a ModuleList's blocks")
        for name, blocks in found:
            for run_name, run in _alike_runs(name, list(blocks)):
                if run_name not in seen and run:
                    seen.add(run_name)
                    regions.append(Region(run_name, tuple(run), single))
    return regions


def regions_in_run_order(dit: nn.Module) -> list[Region]:
    """:func:`dit_regions` in the order the model registers their blocks, taken as their run order: a
    diffusers model may declare its embedders' blocks after the blocks they feed (HunyuanVideo)."""
    position = {id(m): i for i, m in enumerate(dit.modules())}
    return sorted(dit_regions(dit), key=lambda r: position[id(r.blocks[0])])


def residual_regions(dit: nn.Module) -> list[Region]:
    """The regions whose blocks are steps of the residual stream (those in lists, not single embedder
    blocks), in run order: the blocks a step cache skips."""
    return [r for r in regions_in_run_order(dit) if not r.single]


def _structure(block: nn.Module) -> tuple:
    """A block's class and its tensors' names, shapes and dtypes: blocks alike here run one graph."""
    tensors = list(block.named_parameters()) + list(block.named_buffers())
    return (type(block), tuple((n, tuple(t.shape), t.dtype) for n, t in tensors))


def _alike_runs(name: str, blocks: list[nn.Module]) -> list[tuple[str, list[nn.Module]]]:
    """``blocks`` as consecutive runs of alike blocks; one run keeps the list's name."""
    runs: list[tuple[int, list[nn.Module]]] = []
    for i, block in enumerate(blocks):
        if runs and _structure(runs[-1][1][-1]) == _structure(block):
            runs[-1][1].append(block)
        else:
            runs.append((i, [block]))
    if len(runs) == 1:
        return [(name, blocks)]
    return [(f"{name}[{start}:{start + len(run)}]", run) for start, run in runs]


def _single_blocks(dit: nn.Module, class_name: str) -> list[tuple[str, list[nn.Module]]]:
    """Modules of class ``class_name`` that are no ``ModuleList``'s elements, each a one-block list."""
    listed = {id(b) for _, m in dit.named_modules() if isinstance(m, nn.ModuleList) for b in m}
    return [(name, [m]) for name, m in dit.named_modules()
            if name and type(m).__name__ == class_name and id(m) not in listed]


def _lists_named(dit: nn.Module, name: str) -> list[tuple[str, nn.ModuleList]]:
    try:
        module = dit.get_submodule(name)
    except AttributeError:
        return []
    return [(name, module)] if isinstance(module, nn.ModuleList) else []


def _lists_of_class(dit: nn.Module, class_name: str) -> list[tuple[str, nn.ModuleList]]:
    return [(name, m) for name, m in dit.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) and all(type(b).__name__ == class_name for b in m)]


def has_regions(dit: nn.Module) -> bool:
    """Whether ``dit`` declares repeated blocks that exist."""
    try:
        return bool(dit_regions(dit))
    except RegionError:
        return False


@functools.cache
def forward_parameters(block_class: type) -> tuple[inspect.Parameter, ...]:
    """The parameters of ``block_class.forward`` after ``self``, in order (how a block call's arguments are read)."""
    return tuple(inspect.signature(block_class.forward).parameters.values())[1:]


@dataclasses.dataclass(frozen=True)
class BlockStreams:
    """Which of a region's block arguments are residual streams, and how the block returns them.

    ``inputs`` names the block ``forward`` parameters that carry a stream (the first one is the stream
    a step cache compares between steps); ``outputs`` is the name of the stream a block returns bare,
    or the names of the streams it returns as a tuple, in order. A stream keeps its name from one
    region to the next. The other arguments (timestep embedding, RoPE tables, text context) are the
    same for every block of a forward and pass through untouched.
    """

    inputs: tuple[str, ...]
    outputs: str | tuple[str, ...]

    def __post_init__(self):
        names = (self.outputs,) if isinstance(self.outputs, str) else tuple(self.outputs)
        if not self.inputs or len(set(self.inputs)) != len(self.inputs) or sorted(names) != sorted(self.inputs):
            raise RegionError(f"BlockStreams: outputs {names} must name the input streams {self.inputs}, "
                              "each once")


def block_streams(dit: nn.Module, region: Region) -> BlockStreams:
    """The :class:`BlockStreams` ``dit`` declares for ``region`` (``_block_streams``, keyed by the
    region's name or its blocks' class name), else those read from the block's ``forward``
    (:func:`inferred_block_streams`); :class:`RegionError` when neither gives them."""
    declared = getattr(dit, "_block_streams", None) or {}
    found = declared.get(region.name) or declared.get(type(region.blocks[0]).__name__)
    if found is not None:
        return found
    try:
        return inferred_block_streams(type(region.blocks[0]))
    except RegionError as exc:
        raise RegionError(f"{type(dit).__name__} declares no block streams for its blocks '{region.name}' "
                          f"(_block_streams), which the step cache needs to skip blocks, and they cannot be read "
                          f"from the block's code: {exc}") from None


def inferred_block_streams(block_class: type) -> BlockStreams:
    """A block's streams read from its ``forward``'s code: the parameters it returns, bare or as a tuple,
    in the order it returns them (diffusers' joint blocks return ``(encoder_hidden_states, hidden_states)``
    or the other way round; a block returning ``hidden_states`` alone takes the text as context). Every
    ``return`` must give the same parameter names; the first stream compared between steps is
    ``hidden_states`` when the block returns it."""
    import ast
    import inspect
    import textwrap

    forward = getattr(block_class, "forward", None)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
        params = list(inspect.signature(forward).parameters)[1:]
    except (OSError, TypeError, SyntaxError, ValueError) as exc:
        raise RegionError(f"{block_class.__name__}.forward's source cannot be read ({exc})") from None
    returns, todo = [], list(ast.iter_child_nodes(tree.body[0]))
    while todo:  # the forward's own returns, not those of functions defined inside it
        node = todo.pop()
        if isinstance(node, ast.Return):
            returns.append(node)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            todo += ast.iter_child_nodes(node)
    returned = set()
    for node in returns:
        value = node.value
        items = value.elts if isinstance(value, ast.Tuple) else [value]
        names = tuple(item.id if isinstance(item, ast.Name) else None for item in items)
        if None in names or not set(names) <= set(params):
            raise RegionError(f"{block_class.__name__}.forward returns something else than its own arguments")
        returned.add((isinstance(value, ast.Tuple), names))
    if len(returned) != 1:
        raise RegionError(f"{block_class.__name__}.forward returns {'nothing' if not returned else 'differently'} "
                          "on different paths")
    (is_tuple, names), = returned
    inputs = tuple(sorted(names, key=lambda n: (n != "hidden_states", params.index(n))))
    return BlockStreams(inputs=inputs, outputs=names if is_tuple else names[0])


@dataclasses.dataclass(frozen=True)
class TeaCacheFit:
    """TeaCache's rescaling polynomial (highest power first) fitted by its authors for the
    checkpoints whose config has the fields in ``match``, and their recommended threshold."""

    match: tuple[tuple[str, object], ...]
    coefficients: tuple[float, ...]
    threshold: float
    name: str


@dataclasses.dataclass(frozen=True)
class TeaCacheSpec:
    """Where TeaCache reads a DiT's timestep-modulated input, and the published fits for it.

    The signal is ``first_block.<module>(*args)[output]`` (``module`` None: the argument ``args[0]``
    itself), computed from the arguments of the first repeated block. ``warmup_steps`` first steps and
    ``final_steps`` last steps are always computed, as TeaCache's reference code for the model does.
    """

    module: str | None
    args: tuple[str, ...]
    output: int | None
    fits: tuple[TeaCacheFit, ...]
    warmup_steps: int
    final_steps: int

    def fit_for(self, config) -> TeaCacheFit | None:
        """The first fit whose ``match`` fields equal ``config``'s, or None."""
        for fit in self.fits:
            if all(getattr(config, k, None) == v for k, v in fit.match):
                return fit
        return None
