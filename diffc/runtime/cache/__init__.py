"""Step caching: skip DiT work between similar denoising steps (one layer of the DiT stack).

- :mod:`.config`: :class:`CacheConfig` and :func:`cache_config`, the one parser of user settings;
- :mod:`.dbcache`: DBCache / FBCache (first blocks decide, middle blocks skipped);
- :mod:`.teacache`: TeaCache (the timestep-modulated input decides, every block skipped);
- :mod:`.taylorseer`: extrapolation of the cached residual;
- :mod:`.base`, :mod:`.state`, :mod:`.streams`: the shared block cache, its rules and counters, and the
  block streams the models declare;
- :mod:`.graphs`: CUDA graphs per block segment, so that graphs and a cache work together.

``DiTStack.set_cache(build_cache(config, dit))`` installs one; ``Executor.set_cache(config)`` does it for
every DiT of a pipeline (see ``diffc/runtime/dit_stack.py`` and ``executor.py``).
"""

from __future__ import annotations

from torch import nn

from .base import BlockStepCache
from .config import CACHE_KINDS, CacheConfig, cache_config
from .dbcache import DBCache, FBCache
from .teacache import TeaCache

STRATEGIES = {"dbcache": DBCache, "fbcache": FBCache, "teacache": TeaCache}

__all__ = ["BlockStepCache", "CACHE_KINDS", "CacheConfig", "DBCache", "FBCache", "TeaCache", "build_cache",
           "cache_config"]


def build_cache(config: CacheConfig, dit: nn.Module) -> BlockStepCache:
    """The step cache ``config`` asks for, on ``dit`` (its eager module); raises ``InvalidArgumentError``
    for settings this model cannot take (too few blocks for fn + bn, no TeaCache spec)."""
    return STRATEGIES[config.kind](config, dit)
