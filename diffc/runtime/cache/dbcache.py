"""DBCache (Cache-DiT's dual block cache) and FBCache, its ``fn=1, bn=0`` special case.

Every forward computes the first ``fn`` blocks. Their residual on the decision stream (the output of
block ``fn - 1`` minus the input of block 0, e.g. FLUX's image tokens, Wan's ``x``) is compared by
relative L1 with the same residual at the last *computed* step of this branch: under ``threshold``
(past the warm-up, within ``max_skips_in_a_row``) the middle blocks are skipped and their cached
residual reused; the last ``bn`` blocks always run, on the approximated streams. Defaults follow
Cache-DiT's ``DBCacheConfig``: F8B0, threshold 0.08, 8 warm-up steps, no limit on skips in a row.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import BlockStepCache, _Forward
from .state import block_cache_skips, rel_l1
from .streams import StreamIO

DEFAULT_FN, DEFAULT_BN, DEFAULT_THRESHOLD, DEFAULT_WARMUP = 8, 0, 0.08, 8


class DBCache(BlockStepCache):
    kind = "dbcache"

    def _partition(self, dit: nn.Module) -> tuple[int, int]:
        cfg = self.config
        bn = cfg.bn if cfg.bn is not None else DEFAULT_BN
        if cfg.fn is not None:
            fn = cfg.fn
        else:  # the default, on a model too small for it: leave one middle block
            fn = max(1, min(DEFAULT_FN, self.total - bn - 1))
        self.check_blocks(fn, bn, ("cache_options.fn", "cache_options.bn"))
        return fn, bn

    def _threshold(self) -> float:
        return self.config.threshold if self.config.threshold is not None else DEFAULT_THRESHOLD

    def _default_warmup(self) -> int:
        return DEFAULT_WARMUP

    def _after_first_blocks(self, fwd: _Forward, values: tuple[torch.Tensor, ...], io: StreamIO) -> None:
        out = values[io.index(self.decision_stream)]
        residual = out - fwd.first_input
        previous = fwd.branch.previous
        if previous is not None and previous.shape == residual.shape:
            fwd.diff = rel_l1(residual, previous)
        skip = block_cache_skips(fwd.step, fwd.diff, fwd.branch.skips_in_a_row, threshold=self.threshold,
                                 warmup_steps=self.warmup_steps,
                                 max_skips_in_a_row=self.config.max_skips_in_a_row)
        fwd.skip = skip and self._can_skip(fwd)
        if not fwd.skip:
            fwd.branch.previous = residual

    def _describe_strategy(self) -> dict[str, Any]:
        return {"decision": f"relative L1 of the first {self.fn} block(s)' residual of '{self.decision_stream}' "
                            "since the last computed step"}


class FBCache(DBCache):
    """First-block cache: DBCache computing only the first block (``fn=1, bn=0``)."""

    kind = "fbcache"

    def _partition(self, dit: nn.Module) -> tuple[int, int]:
        self.check_blocks(1, 0, ("cache", "cache"))
        return 1, 0
