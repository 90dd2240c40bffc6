"""Masked attention whose boolean mask only drops keys -> ``diffc.attention_key_padding``.

Before::

    o = aten.scaled_dot_product_attention(q, k, v, mask[, scale=s])     # mask: bool (B or 1, 1, 1, S_kv)

After::

    o = diffc.attention_key_padding(q, k, v, mask[, s])

The op runs unmasked attention over each row's kept keys when the mask is a prefix (prompt padding at
the end of a joint sequence) and the masked attention otherwise (:mod:`diffc.ops.attention_key_padding`).
Masks that vary over queries (a text refiner's pairwise mask), float masks, dropout, ``is_causal`` and
``enable_gqa`` are left as they are. Not bit-exact: another kernel, over fewer keys.

Only sequences of at least :data:`MIN_KEYS` keys are lowered: the op reads the mask on the host at every
call, and a graph calling it runs without CUDA graphs. Measured on an H200 (``bench/results/h200-2026-12-04-*``):
HunyuanVideo at 32,896 tokens, DiT forward 2847.6 -> 2258.8 ms; Qwen-Image at 4,224 tokens (a 40-token
prompt padded to 128), 133.3 ms masked under CUDA graphs against 143.9 ms lowered, so it stays masked.

Where flash-attn-4 runs, the attention lowering that follows (:mod:`.attention`) measures the key-masked shape
and may replace both forms, the masked sdpa and this op, by ``diffc.attention_fa4_key_mask``, which needs no
host read; this pass serves GPUs without it.
"""

from __future__ import annotations

import torch
from torch import fx

from .attention import SDPA, _bound_args, key_masked_values, replace_node
from .base import FusionPass

MIN_KEYS = 16384  # keys per attention call from which the unmasked kernel's gain outweighs losing CUDA graphs


def _accepts(bound: dict) -> bool:
    vals = key_masked_values(bound)
    return vals is not None and vals[1].shape[2] >= MIN_KEYS


class KeyPaddingAttentionPass(FusionPass):
    """sdpa with a boolean key-only mask over at least :data:`MIN_KEYS` keys -> ``diffc.attention_key_padding``
    (module docstring)."""

    name = "key_padding_attention"
    bit_exact = False

    def __call__(self, gm: fx.GraphModule) -> int:
        replaced = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target != SDPA:
                continue
            bound = _bound_args(node)
            if not _accepts(bound):
                continue
            replace_node(gm, node, torch.ops.diffc.attention_key_padding.default,
                         (bound["query"], bound["key"], bound["value"], bound["attn_mask"], bound.get("scale")))
            replaced += 1
        if replaced:
            gm.graph.lint()
            gm.recompile()
        return replaced
