"""How a loaded pipeline runs: offload and CUDA graphs, chosen at ``diffc.load`` time."""

from __future__ import annotations

import dataclasses

from ..errors import InvalidArgumentError

OFFLOAD_MODES = ("none", "layerwise", "model")


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """``offload``: none | layerwise (the DiT's repeated blocks stream from pinned host memory) | model
    (whole components move to the GPU only while used). ``offload_prefetch``: ring depth for layerwise.
    ``resident_blocks``: blocks kept on the GPU (None: as many as free memory allows).
    ``cuda_graphs``: capture and replay the DiT forward (None: on for CUDA, off on CPU)."""

    offload: str = "none"
    offload_prefetch: int = 1
    resident_blocks: int | None = None
    cuda_graphs: bool | None = None

    def __post_init__(self):
        if self.offload not in OFFLOAD_MODES:
            raise InvalidArgumentError("offload", f"'{self.offload}' is not an offload mode; accepted: {', '.join(OFFLOAD_MODES)}")
        p = self.offload_prefetch
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 16:
            raise InvalidArgumentError("offload_prefetch", f"must be an integer from 1 to 16, got {p!r}")
        r = self.resident_blocks
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
            raise InvalidArgumentError("resident_blocks", f"must be a non-negative integer or None (automatic), got {r!r}")
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise InvalidArgumentError("cuda_graphs", f"must be True, False or None (automatic), got {self.cuda_graphs!r}")
        if self.cuda_graphs and self.offload == "layerwise":
            raise InvalidArgumentError("cuda_graphs", "CUDA graphs cannot capture layerwise offload's host-to-device "
                                       "copies (see diffc/runtime/offload.py); use one or the other")


def check_runtime_device(options: RuntimeOptions, device) -> None:
    """Offload and CUDA graphs need a CUDA device; say so before any weights are loaded."""
    if device.type == "cuda":
        return
    if options.offload != "none":
        raise InvalidArgumentError("offload", f"'{options.offload}' offload needs a CUDA GPU; this pipeline runs on "
                                   f"{device.type} (use offload='none' / --offload none)")
    if options.cuda_graphs:
        raise InvalidArgumentError("cuda_graphs", f"CUDA graphs need a CUDA GPU; this pipeline runs on {device.type} "
                                   "(leave them at the default or use --cuda-graphs off)")
