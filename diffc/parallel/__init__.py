"""Multi-GPU inference of one request: CFG-parallel and unified sequence parallelism (Ulysses + ring).

:mod:`.config` the layout and its checks, :mod:`.mesh` the process groups, :mod:`.attention` the
Ulysses / ring attention and its graph op, :mod:`.layer` the DiT stack's parallelism layer.
Launching the workers is the CLI's (``diffc/cli/parallel.py``).
"""

from .config import ParallelConfig, resolve, valid_layouts
from .mesh import Mesh, ParallelError, init_mesh

__all__ = ["Mesh", "ParallelConfig", "ParallelError", "init_mesh", "resolve", "valid_layouts"]
