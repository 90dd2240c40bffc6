"""TeaCache (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model", 2024).

Before any block runs, the DiT's timestep-modulated input (where the model's ``_teacache`` spec says:
FLUX's first-block ``norm1`` output, Wan's block modulation ``temb``) is compared by relative L1 with the
previous step's; the change, rescaled by the polynomial the TeaCache authors fitted for the checkpoint
(``diffc.models.structure.TeaCacheSpec``; sources cited at each model's spec), accumulates while it stays
under ``threshold``, and every block is skipped (the whole stack's residual reused). Reaching the
threshold computes the step and starts the sum over. The first and last steps the reference code
computes are always computed. A checkpoint with no published fit uses ``coefficients`` when given,
else the raw relative L1 (rescale = identity), which needs its own threshold.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import InvalidArgumentError
from ...models.structure import RegionError, forward_parameters, residual_regions
from .base import BlockStepCache, _Forward
from .state import polynomial, rel_l1, teacache_skips
from .streams import StreamIO

UNFITTED_THRESHOLD = 0.1


class TeaCache(BlockStepCache):
    kind = "teacache"

    def __init__(self, config, dit: nn.Module):
        spec = getattr(dit, "_teacache", None)
        if spec is None:
            raise InvalidArgumentError("cache", f"teacache needs to know where {type(dit).__name__} reads its "
                                       "timestep-modulated input, which it does not declare (_teacache); "
                                       "use dbcache or fbcache")
        self.spec = spec
        self.fit = spec.fit_for(getattr(dit, "config", None))
        if config.coefficients is not None:
            self.coefficients, self.source = config.coefficients, "given"
        elif self.fit is not None:
            self.coefficients, self.source = self.fit.coefficients, f"TeaCache fit for {self.fit.name}"
        else:
            self.coefficients, self.source = (1.0, 0.0), "none published for this configuration: raw relative L1"
        self.rescale = polynomial(self.coefficients)
        super().__init__(config, dit)
        first = residual_regions(dit)[0].blocks[0]
        names = [p.name for p in forward_parameters(type(first))]
        missing = [n for n in spec.args if n not in names]
        if missing:
            raise RegionError(f"{self.model}._teacache reads the first block's argument {missing[0]!r}, which "
                              f"{type(first).__name__}.forward does not take")
        self.positions = [(n, names.index(n)) for n in spec.args]
        self.probe = first.get_submodule(spec.module) if spec.module else None

    def _partition(self, dit: nn.Module) -> tuple[int, int]:
        return 0, 0

    def _threshold(self) -> float:
        if self.config.threshold is not None:
            return self.config.threshold
        return self.fit.threshold if self.fit is not None and self.config.coefficients is None else UNFITTED_THRESHOLD

    def _default_warmup(self) -> int:
        return self.spec.warmup_steps

    def _at_first_block(self, fwd: _Forward, block: nn.Module, io: StreamIO, args: tuple, kwargs: dict) -> None:
        signal = self._signal(block, args, kwargs)
        previous, state = fwd.branch.previous, fwd.branch
        if previous is not None and previous.shape == signal.shape:
            fwd.diff = rel_l1(signal, previous)
        skip, state.accumulated = teacache_skips(
            fwd.step, self.total_steps, fwd.diff, state.accumulated, state.skips_in_a_row,
            threshold=self.threshold, warmup_steps=self.warmup_steps, final_steps=self.spec.final_steps,
            max_skips_in_a_row=self.config.max_skips_in_a_row, rescale=self.rescale)
        fwd.skip = skip and self._can_skip(fwd)
        if skip and not fwd.skip:
            state.accumulated = 0.0
        state.previous = signal

    def _signal(self, block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        values = [args[p] if p < len(args) else kwargs[n] for n, p in self.positions]
        if self.probe is None:
            return values[0]
        out = self.probe(*values)
        return out if self.spec.output is None else out[self.spec.output]

    def warnings(self) -> list[str]:
        if self.config.coefficients is None and self.fit is None:
            return [f"teacache: no published rescaling fit for this {self.model} configuration, so the raw relative "
                    f"L1 is accumulated (threshold {self.threshold:g}); pass cache_options coefficients fitted "
                    "for it, or use dbcache"]
        return []

    def _describe_strategy(self) -> dict[str, Any]:
        where = f"{self.spec.module}({', '.join(self.spec.args)})" if self.spec.module else self.spec.args[0]
        return {"decision": f"accumulated rescaled relative L1 of the first block's {where}",
                "coefficients": list(self.coefficients), "coefficients_source": self.source,
                "final_steps": self.spec.final_steps}

