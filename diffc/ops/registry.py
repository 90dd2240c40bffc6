"""One way to define a diffc fused op: ``torch.ops.diffc.<name>``, destination passing, a fake, a fallback.

Every fused op is declared with :func:`register_op` on its Triton launcher::

    @register_op("gelu_tanh", mutates_args=("out",), fake=_check, fallback=_gelu_tanh_into_ref)
    def _gelu_tanh_launch(x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
        ...

- The launcher's annotated signature is the op's schema. Ops write into ``out`` tensors they are given
  and return nothing, so the fake only checks shapes and buffers stay static for CUDA graphs.
- Dispatch: CUDA tensors run the Triton kernel; CPU tensors run it under Triton's interpreter when
  ``TRITON_INTERPRET=1`` is set (how the test suite checks the kernels), otherwise the torch
  reference; without an importable Triton everything runs the reference. :data:`COUNTERS` says which.
- Kernels are declared with :func:`triton_kernel`, which jits them at first launch, so
  ``TRITON_INTERPRET`` is read when an op first runs rather than when this package is imported.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable, Sequence

import torch

from ..errors import InvalidArgumentError

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: every op runs its torch reference.
    triton = tl = None

try:
    from triton.language.extra import libdevice
except ImportError:
    libdevice = None

NAMESPACE = "diffc"


@dataclasses.dataclass
class OpCounters:
    """How many fused-op calls ran a kernel (Triton's, or of those ``csrc_launches`` a CUDA C++ one of
    ``csrc/``) and how many fell back to the torch reference."""

    kernel_launches: int = 0
    reference_fallbacks: int = 0
    csrc_launches: int = 0

    def reset(self) -> None:
        self.kernel_launches = 0
        self.reference_fallbacks = 0
        self.csrc_launches = 0


COUNTERS = OpCounters()
REGISTERED: dict[str, torch.library.CustomOpDef] = {}
HOST_READS: set = set()  # the ops (OpOverloads) that read device values on the host: no CUDA graph can hold them
# ops around an external library's kernel (OpOverload -> why it cannot run on a device, or None): where it
# cannot, the torch reference runs, which a compiled artifact's loader reports (diffc/runtime/artifacts.py)
EXTERNAL: dict = {}


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_runs_on(device: torch.device) -> bool:
    """Whether a fused op on tensors of ``device`` runs its Triton kernel (else the torch reference)."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


class LazyKernel:
    """A Triton kernel jitted at first launch, once per mode (compiled, or interpreted on CPU)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self._built: dict[bool, object] = {}

    def __getitem__(self, grid):
        mode = interpreting()
        if mode not in self._built:
            self._built[mode] = triton.jit(self.fn)  # triton.jit reads TRITON_INTERPRET now
        return self._built[mode][grid]


def triton_kernel(fn: Callable) -> LazyKernel:
    """Decorator for a Triton kernel body; launch it as ``kernel[grid](...)`` like a ``triton.jit`` one.

    Kernels declared this way must not call other jitted helpers (those would be fixed to one mode).
    """
    return LazyKernel(fn)


def register_op(
    name: str,
    *,
    mutates_args: Sequence[str],
    fake: Callable,
    fallback: Callable,
    runs: Callable[[torch.device], bool] | None = None,
    unavailable: Callable[[torch.device], str | None] | None = None,
    reads_host: bool = False,
) -> Callable[[Callable], torch.library.CustomOpDef]:
    """Decorator defining ``torch.ops.diffc.<name>`` from a Triton launcher.

    Args:
        name: op name inside the ``diffc`` namespace.
        mutates_args: the destination arguments the op writes. Empty only for an op around an external
            library kernel that allocates its own output (then the op returns it, and so do the fake and
            the fallback).
        fake: called with the op's arguments when tracing (fake or meta tensors); checks shapes, writes nothing.
        fallback: same signature as the launcher; writes the torch reference's result into the destinations.
        runs: whether the launcher can run on a device (default: :func:`kernel_runs_on`, for Triton
            kernels); where it cannot, the fallback runs.
        unavailable: for an op around an external library's kernel, why it cannot run on a device (None
            when it can); it decides where the launcher runs (in place of ``runs``) and is listed in
            :data:`EXTERNAL`.
        reads_host: the op copies device values to the host to decide what to run (listed in
            :data:`HOST_READS`, so that a graph calling it is never captured in a CUDA graph).

    The decorated launcher's annotations give the schema. Returns the ``CustomOpDef`` (callable as the op).
    """
    if fake is None or fallback is None:
        raise ValueError(f"diffc::{name}: a fake and a torch fallback are required")

    def wrap(launcher: Callable) -> torch.library.CustomOpDef:
        returns = inspect.signature(launcher).return_annotation
        if not mutates_args and returns in (None, "None", inspect.Signature.empty):
            raise ValueError(f"diffc::{name}: ops use destination passing; name the out arguments in mutates_args "
                             "(only an op around an external kernel returns its output, annotated)")
        params = list(inspect.signature(launcher).parameters)
        if list(inspect.signature(fallback).parameters) != params:
            raise ValueError(f"diffc::{name}: fallback signature must equal the launcher's {params}")
        missing = [a for a in mutates_args if a not in params]
        if missing:
            raise ValueError(f"diffc::{name}: mutates_args {missing} are not arguments of the launcher")
        schema = torch.library.infer_schema(launcher, mutates_args=tuple(mutates_args))

        if unavailable is not None:
            can_run = lambda device: unavailable(device) is None  # noqa: E731
        else:
            can_run = kernel_runs_on if runs is None else runs

        def impl(*args, **kwargs):
            device = next(a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
            if can_run(device):
                COUNTERS.kernel_launches += 1
                return launcher(*args, **kwargs)
            COUNTERS.reference_fallbacks += 1
            return fallback(*args, **kwargs)

        impl.__name__ = launcher.__name__
        impl.__signature__ = inspect.signature(launcher)
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=tuple(mutates_args), schema=schema)(impl)
        op.register_fake(fake)
        REGISTERED[name] = op
        if reads_host:
            HOST_READS.add(getattr(getattr(torch.ops, NAMESPACE), name).default)
        if unavailable is not None:
            EXTERNAL[getattr(getattr(torch.ops, NAMESPACE), name).default] = unavailable
        return op

    return wrap


# ---------------------------------------------------------------------------------------------
# Argument checks shared by the fakes and launchers (they work on fake tensors too)
# ---------------------------------------------------------------------------------------------


def expect_shape(field: str, t: torch.Tensor, shape: Sequence[int], what: str | None = None) -> None:
    """Raise ``InvalidArgumentError`` unless ``t.shape == shape``."""
    if tuple(t.shape) != tuple(shape):
        raise InvalidArgumentError(field, f"expected shape {what or tuple(shape)}, got {tuple(t.shape)}")


def expect_dtype(field: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise InvalidArgumentError(field, f"expected dtype {dtype}, got {t.dtype}")


def expect_float(field: str, t: torch.Tensor) -> None:
    if not t.dtype.is_floating_point:
        raise InvalidArgumentError(field, f"expected a floating-point tensor, got {t.dtype}")


def expect_unit_last_stride(field: str, t: torch.Tensor) -> None:
    """Kernels index the last dimension densely."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise InvalidArgumentError(field, f"last dimension must be contiguous (stride 1), got strides {t.stride()}")


def expect_same_device(fields: dict[str, torch.Tensor | None]) -> None:
    devices = {n: t.device for n, t in fields.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise InvalidArgumentError(", ".join(devices), f"tensors must share one device, got {devices}")


def broadcast_stride(t: torch.Tensor, dim: int) -> int:
    """Stride to step ``t`` along ``dim``: 0 where that dimension has size 1 (it is broadcast)."""
    return 0 if t.shape[dim] == 1 else t.stride(dim)


def cdiv(n: int, d: int) -> int:
    return -(-n // d)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
