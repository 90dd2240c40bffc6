"""diffc's compiler: trace a native model to an ATen graph, then lower op patterns onto fused ops.

- :func:`trace_module` exports a model with ``torch.export`` (one graph, no graph breaks);
- :class:`PassManager` runs the fusion passes of :mod:`diffc.compile.passes` on the exported
  graph for a quality tier and returns :class:`CompileCounters`.
"""

from .manager import TIERS, CompileCounters, PassManager, default_passes
from .trace import trace_module

__all__ = ["TIERS", "CompileCounters", "PassManager", "default_passes", "trace_module"]
