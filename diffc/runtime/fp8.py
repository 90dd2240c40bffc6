"""The fp8 weight transform of a DiT stack: float8_e4m3 copies of the blocks' linear weights.

The ``fp8`` quality tier (``diffc compile --quality fp8``) runs the repeated blocks' linear layers as
``torch._scaled_mm`` on float8_e4m3 operands. Their weights are quantized here, at load, from the
checkpoint's own tensors (the checkpoint is never converted): every ``nn.Linear`` of a repeated block
whose dimensions ``_scaled_mm`` accepts (multiples of 16) gets two buffers beside its ``weight``,

- ``weight_fp8``: float8_e4m3fn (out, in), and
- ``weight_fp8_scale``: float32 (1, out), one scale per output channel (``weight ~= weight_fp8 * scale``),

which the compiled block graphs read by name like any other tensor of the block. The bf16 ``weight``
stays: eager fallbacks, the compile-time reference and the sites a compile keeps in bf16 use it.
Merging a LoRA re-quantizes the layers it wrote (in place: compiled graphs and CUDA graphs keep
their addresses). The transform is data, computed again at every load; artifacts never store it.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..models.structure import dit_regions, has_regions
from ..ops.fp8 import FP8, fp8_linear_ok, quantize_weight

WEIGHT = "weight_fp8"
SCALE = "weight_fp8_scale"
SCHEMES = ("fp8",)


def fp8_linears(module: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers of ``module``'s repeated blocks the fp8 tier quantizes, by their names in ``module``."""
    if not has_regions(module):
        raise InvalidArgumentError("quality", f"fp8 needs a DiT that declares its repeated blocks; "
                                   f"{type(module).__name__} declares none")
    owner = {id(m): n for n, m in module.named_modules()}
    found: dict[str, nn.Linear] = {}
    for region in dit_regions(module):
        for block in region.blocks:
            prefix = owner.get(id(block), "")
            for name, m in block.named_modules():
                if (isinstance(m, nn.Linear) and m.weight.dtype.is_floating_point
                        and fp8_linear_ok(m.in_features, m.out_features)):
                    found[f"{prefix}.{name}" if prefix else name] = m
    return found


class Fp8Weights:
    """One DiT's fp8 weight transform: :meth:`apply` adds the buffers, :meth:`remove` takes them away."""

    kind = "fp8"

    def __init__(self, module: nn.Module):
        self.module = module
        self.linears = fp8_linears(module)
        self.requantized = 0

    def apply(self) -> Fp8Weights:
        with torch.no_grad():
            for linear in self.linears.values():
                w8, scale = quantize_weight(linear.weight)
                linear.register_buffer(WEIGHT, w8)
                linear.register_buffer(SCALE, scale)
        return self

    def remove(self) -> None:
        for linear in self.linears.values():
            linear._buffers.pop(WEIGHT, None)
            linear._buffers.pop(SCALE, None)

    def weights_written(self, names: Iterable[str]) -> None:
        """Parameters ``names`` (by the DiT's names) changed in place (a LoRA merge): re-quantize their layers."""
        with torch.no_grad():
            for name in names:
                owner, _, attr = name.rpartition(".")
                linear = self.linears.get(owner)
                if attr != "weight" or linear is None or WEIGHT not in linear._buffers:
                    continue
                w8, scale = quantize_weight(linear.weight)
                linear._buffers[WEIGHT].copy_(w8)
                linear._buffers[SCALE].copy_(scale)
                self.requantized += 1

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for m in self.linears.values()
                   for k, b in m._buffers.items() if k in (WEIGHT, SCALE) and b is not None)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "format": f"{str(FP8).removeprefix('torch.')}, per-output-channel float32 scales",
                "linears": len(self.linears), "bytes": self.nbytes(), "requantized": self.requantized}


def check_scheme(scheme: str | None) -> None:
    if scheme is not None and scheme not in SCHEMES:
        raise InvalidArgumentError("quality", f"no weight quantization {scheme!r}; accepted: {', '.join(SCHEMES)}")


__all__ = ["SCALE", "SCHEMES", "WEIGHT", "Fp8Weights", "check_scheme", "fp8_linears"]
