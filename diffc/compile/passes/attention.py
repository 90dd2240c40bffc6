"""Lower ``aten.scaled_dot_product_attention`` onto the attention kernel chosen for its shape.

Before (after :mod:`.canonicalize`)::

    o = aten.scaled_dot_product_attention(q, k, v[, scale=s])        # q: (B, H, S_q, D), k/v: (B, H, S_kv, D)

After, for a shape whose chosen backend is e.g. ``sdpa_cudnn`` (:data:`~diffc.compile.attention_select.BACKENDS`)::

    o = getitem(aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, False, False[, scale=s]), 0)

or, for a backend that is a diffc op (``sdpa_flash``, ``fa4``, ``flashinfer``), ``o = diffc.attention_<name>(q, k, v, s)``,

so the saved program names the kernel that runs instead of leaving it to torch's dispatcher at run
time. A backend of ``"sdpa"`` leaves the node as it is. A call whose ``attn_mask`` is a boolean mask that
only drops keys (an sdpa node with one, or the ``diffc.attention_key_padding`` the key-padding pass made of
it) is planned by its key-masked shape and lowered onto the chosen backend's key-mask form
(``diffc.attention_fa4_key_mask``), which needs no host read, so the graph keeps its CUDA graph. Nodes with
another mask, dropout, ``is_causal`` or ``enable_gqa`` are refused (left unchanged) and counted by reason, as
are nodes whose tensors live on a device the backend does not run on.

``bit_exact`` is a property of the instance: True when every lowering is onto the kernel torch's
dispatcher picks for that shape anyway (known from an :class:`AttentionChoice`, which records it) or
nothing is lowered; another kernel computes the same attention with another reduction order.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping

import torch
from torch import fx

from ...errors import InvalidArgumentError
from ...ops.attention_key_padding import key_mask_ok
from ..attention_select import (
    BACKENDS,
    AttentionBackend,
    AttentionChoice,
    AttentionShape,
)
from .base import FusionPass, _propagate_val

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
KEY_PADDING = torch.ops.diffc.attention_key_padding.default
LOWERABLE = tuple(name for name, b in BACKENDS.items() if b.op is not None)


@dataclasses.dataclass
class AttentionLoweringReport:
    """What the pass did over every graph it ran on: lowered nodes per backend, nodes left to
    ``sdpa`` (planned so, or a shape the plan does not name), refused nodes per reason."""

    lowered: dict[str, int] = dataclasses.field(default_factory=dict)
    kept: int = 0
    refused: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _bound_args(node: fx.Node) -> dict:
    """The node's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    bound = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    bound.update({a.name: value for a, value in zip(schema.arguments, node.args)})
    bound.update(node.kwargs)
    return bound


def _refusal(bound: dict) -> str | None:
    if bound.get("attn_mask") is not None:
        return "attn_mask"
    if bound.get("dropout_p", 0.0) != 0.0:
        return "dropout"
    if bound.get("is_causal", False):
        return "is_causal"
    if bound.get("enable_gqa", False):
        return "enable_gqa"
    vals = [getattr(bound.get(n), "meta", {}).get("val") for n in ("query", "key", "value")]
    if not all(isinstance(t, torch.Tensor) and t.ndim == 4 for t in vals):
        return "not (B, H, S, D) tensors with export's fake values"
    q, k, v = vals
    if k.shape[:2] != q.shape[:2] or v.shape != k.shape or k.shape[-1] != q.shape[-1]:
        return "k/v heads, batch or head_dim differ from q's"
    return None


def key_masked_values(bound: dict) -> tuple[torch.Tensor, ...] | None:
    """The fake ``(q, k, v, mask)`` of an sdpa call (its arguments by name) whose mask is boolean and only drops
    keys, (B or 1, 1, 1, S_kv), with no dropout, causality or GQA, q, k, v (B, H, S, D) and k's head_dim q's;
    else None. v's head_dim may differ."""
    if not isinstance(bound.get("attn_mask"), fx.Node) or bound.get("dropout_p", 0.0) != 0.0 \
            or bound.get("is_causal", False) or bound.get("enable_gqa", False):
        return None
    vals = tuple(getattr(bound.get(n), "meta", {}).get("val") for n in ("query", "key", "value", "attn_mask"))
    if not all(isinstance(t, torch.Tensor) for t in vals):
        return None
    q, k, v, m = vals
    if not (q.ndim == k.ndim == v.ndim == 4 and k.shape[:2] == q.shape[:2] and v.shape[:3] == k.shape[:3]
            and k.shape[3] == q.shape[3] and m.dtype == torch.bool
            and key_mask_ok(tuple(m.shape), tuple(q.shape), tuple(k.shape))):
        return None
    return vals


def key_mask_args(node: fx.Node) -> tuple | None:
    """``(q, k, v, mask, scale)`` of a call that attends under a boolean mask dropping keys only, v of k's shape:
    an sdpa node with such a mask (:func:`key_masked_values`) or a ``diffc.attention_key_padding`` node; else None."""
    if node.op != "call_function":
        return None
    if node.target == KEY_PADDING:
        q, k, v, mask, *rest = node.args
        same = q.meta["val"].shape[-1] == v.meta["val"].shape[-1]
        return (q, k, v, mask, rest[0] if rest else node.kwargs.get("scale")) if same else None
    if node.target != SDPA:
        return None
    bound = _bound_args(node)
    vals = key_masked_values(bound)
    if vals is None or vals[2].shape != vals[1].shape:
        return None
    return bound["query"], bound["key"], bound["value"], bound["attn_mask"], bound.get("scale")


def attention_shapes(gm: fx.GraphModule, dtype: torch.dtype | None = None,
                     key_masks: bool = True) -> list[AttentionShape]:
    """The distinct shapes of the lowerable attention calls in ``gm`` (of ``dtype`` when given), in
    graph order: what :func:`~diffc.compile.attention_select.select_attention_backend` measures. With
    ``key_masks``, the key-masked calls' shapes too (:func:`key_mask_args`)."""
    shapes: list[AttentionShape] = []
    for node in gm.graph.nodes:
        shape = None
        masked = key_mask_args(node) if key_masks else None
        if masked is not None:
            q = masked[0].meta["val"]
            shape = AttentionShape.of(q, masked[1].meta["val"], key_mask=True)
        elif node.op == "call_function" and node.target == SDPA:
            bound = _bound_args(node)
            if _refusal(bound) is None:
                q = bound["query"].meta["val"]
                shape = AttentionShape.of(q, bound["key"].meta["val"])
        if shape is not None and (dtype is None or q.dtype == dtype) and shape not in shapes:
            shapes.append(shape)
    return shapes


def replace_node(gm: fx.GraphModule, node: fx.Node, op, args: tuple, kwargs: dict | None = None,
                 output_index: int | None = None) -> fx.Node:
    """Replace ``node`` by a call of ``op`` (and a getitem of its output ``output_index``, for an op returning
    several), which keeps the node's metadata and gets export's fake value; returns the new output node."""
    meta = {key: value for key, value in node.meta.items() if key not in ("val", "tensor_meta")}
    with gm.graph.inserting_before(node):
        call = gm.graph.call_function(op, args, kwargs or {})
        call.meta.update(meta)
        _propagate_val(call)
        out = call
        if output_index is not None:
            out = gm.graph.call_function(operator.getitem, (call, output_index))
            out.meta.update(meta)
            if "val" in call.meta:
                out.meta["val"] = call.meta["val"][output_index]
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return out


def lower_node(gm: fx.GraphModule, node: fx.Node, backend: AttentionBackend) -> fx.Node:
    """Replace one sdpa ``node`` by ``backend``'s op (+ getitem of its output); returns the new output node."""
    bound = _bound_args(node)
    args, kwargs = backend.graph_args(bound["query"], bound["key"], bound["value"], bound.get("scale"))
    return replace_node(gm, node, backend.op, args, kwargs, backend.output_index)


def _check_backend(name, field: str) -> str:
    if name == "sdpa" or name in LOWERABLE:
        return name
    if name in BACKENDS:
        raise InvalidArgumentError(
            field, f"{name!r} has no ATen op to lower a graph onto; lowerable: {', '.join(LOWERABLE)}"
        )
    raise InvalidArgumentError(field, f"unknown backend {name!r}; accepted: {', '.join(LOWERABLE)}")


class AttentionLoweringPass(FusionPass):
    """Lowers each unmasked, non-causal, dropout-free sdpa node onto the backend planned for its shape.

    ``backends``: one backend name for every node; a mapping ``AttentionShape -> name`` (shapes it does
    not name stay ``sdpa``); or an :class:`AttentionChoice` (only nodes of its dtype and device type are
    lowered). The default, ``"sdpa"``, lowers nothing. :attr:`report` accumulates over calls.
    """

    name = "attention"

    def __init__(self, backends: str | Mapping[AttentionShape, str] | AttentionChoice = "sdpa"):
        self.dtype: torch.dtype | None = None
        self.device_type: str | None = None
        if isinstance(backends, AttentionChoice):
            self.default, self.plan = "sdpa", {s.shape: _check_backend(s.backend, "backends") for s in backends.shapes}
            self.dtype, self.device_type = backends.dtype, torch.device(backends.device).type
            self.bit_exact = backends.bit_exact
        elif isinstance(backends, str):
            self.default, self.plan = _check_backend(backends, "backends"), {}
            self.bit_exact = self.default == "sdpa"
        elif isinstance(backends, Mapping):
            for shape, name in backends.items():
                if not isinstance(shape, AttentionShape):
                    raise InvalidArgumentError("backends", f"mapping keys must be AttentionShape, got {shape!r}")
                _check_backend(name, f"backends[{shape}]")
            self.default, self.plan = "sdpa", dict(backends)
            self.bit_exact = all(name == "sdpa" for name in self.plan.values())
        else:
            raise InvalidArgumentError(
                "backends", f"expected a backend name, a mapping AttentionShape -> name or an AttentionChoice, "
                f"got {type(backends).__name__}"
            )
        self.report = AttentionLoweringReport()

    def backend_for(self, q: torch.Tensor, k: torch.Tensor, key_mask: bool = False) -> str:
        """The planned backend for a node with these fake q, k (under a key mask: its key-masked shape)."""
        if self.dtype is not None and (q.dtype != self.dtype or q.device.type != self.device_type):
            return "sdpa"
        return self.plan.get(AttentionShape.of(q, k, key_mask), self.default)

    def _refuse(self, reason: str) -> None:
        self.report.refused[reason] = self.report.refused.get(reason, 0) + 1

    def _lower_key_masked(self, gm: fx.GraphModule, node: fx.Node, args: tuple) -> bool:
        q, k = args[0].meta["val"], args[1].meta["val"]
        name = self.backend_for(q, k, key_mask=True)
        if name == "sdpa" or BACKENDS[name].key_mask_op is None:
            if name != "sdpa" and node.target == SDPA:  # a backend planned for every node, with no key-mask form
                self._refuse("attn_mask")
            else:  # the masked sdpa, or the key-padding op, kept
                self.report.kept += 1
            return False
        why = BACKENDS[name].unavailable(q.device)
        if why is not None:
            self._refuse(f"{name}: {why}")
            return False
        replace_node(gm, node, BACKENDS[name].key_mask_op, args)
        self.report.lowered[name] = self.report.lowered.get(name, 0) + 1
        return True

    def __call__(self, gm: fx.GraphModule) -> int:
        """Rewrite ``gm`` in place; returns the number of attention nodes lowered."""
        lowered = 0
        for node in list(gm.graph.nodes):
            masked = key_mask_args(node)
            if masked is not None:
                lowered += self._lower_key_masked(gm, node, masked)
                continue
            if node.op != "call_function" or node.target != SDPA:
                continue
            bound = _bound_args(node)
            reason = _refusal(bound)
            if reason is not None:
                self._refuse(reason)
                continue
            q, k = bound["query"].meta["val"], bound["key"].meta["val"]
            name = self.backend_for(q, k)
            if name == "sdpa":
                self.report.kept += 1
                continue
            why = BACKENDS[name].unavailable(q.device)
            if why is not None:
                self._refuse(f"{name}: {why}")
                continue
            lower_node(gm, node, BACKENDS[name])
            self.report.lowered[name] = self.report.lowered.get(name, 0) + 1
            lowered += 1
        gm.graph.lint()
        gm.recompile()
        return lowered
