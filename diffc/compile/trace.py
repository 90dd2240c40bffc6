"""Trace a native model into one ATen graph with ``torch.export``.

``torch.export.export(..., strict=False)`` runs the model's Python forward on fake tensors and
records every ATen op: the result is a single graph (export fails instead of breaking the graph
where something cannot be traced), specialised to the example inputs' shapes, and an
``ExportedProgram`` that ``torch.export.save`` can serialise for the ahead-of-time artifact.
The graph is export's default IR: ATen ops before decomposition (``aten.layer_norm``,
``aten.linear``, ``aten.gelu``, ``aten.rms_norm``), which keeps the fusion patterns short.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import DiffcError


class TraceError(DiffcError):
    """``torch.export`` could not capture a module as one graph."""


def trace_module(model: nn.Module, example_kwargs: dict[str, Any],
                 example_args: tuple = ()) -> torch.export.ExportedProgram:
    """Export ``model(*example_args, **example_kwargs)`` to an ``ExportedProgram`` (ATen graph, parameters lifted).

    The graph is specialised to the example inputs' shapes and dtypes. Raises :class:`TraceError`
    naming the module class and the first line of torch's reason when export fails.
    """
    name = type(model).__name__
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace_module: expected a torch.nn.Module, got {name}")
    try:
        return torch.export.export(model, args=tuple(example_args), kwargs=dict(example_kwargs), strict=False)
    except Exception as exc:  # torch raises many types here (Unsupported, UserError, TypeError, ...)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TraceError(
            f"could not trace {name} into one graph with torch.export ({type(exc).__name__}: {reason}); "
            "the model's forward must be traceable without graph breaks (no data-dependent Python "
            "control flow, no .item() or .tolist() on tensors)"
        ) from exc
