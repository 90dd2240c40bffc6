"""Checks on a diffusers folder's component files before diffusers builds anything from them.

diffusers and transformers trust a config's numbers: ``num_layers: 1000000000`` builds layers for minutes,
``num_attention_heads: -2`` fails deep inside torch, ``block_out_channels: "abc"`` deep inside a block. Every
structural integer of a component's ``config.json`` (a count of layers, blocks or heads, a width, a vocabulary)
is checked here first, by its name, and a tokenizer folder must hold a vocabulary; each refusal is one
``CheckpointError`` naming the file (and key) and what is accepted.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ...errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class Bound:
    kind: str
    largest: int


# Largest values, generous for every released model (production sizes: FLUX.1 19 + 38 blocks of 24 heads x 128;
# SD3.5-Large 38 blocks of 38 heads; HunyuanVideo 20 + 40 blocks, Llama-3-8B intermediate 14336; Wan 14B
# ffn_dim 13824; T5 11B d_ff 65536; UMT5 vocabulary 256384, Gemma 3 262208; Qwen2.5-VL 128000 positions).
COUNT = Bound("count of layers, blocks or heads", 1024)
WIDTH = Bound("width", 1 << 16)
TABLE = Bound("table size", 1 << 20)
MAX_ITEMS = 4096  # entries of one list field (per-block lists, layer indices)
MAX_DEPTH = 3  # nesting of list fields (transformer_layers_per_block may be a list of lists)

# A key's last word that marks a float, a string or a flag, never a structural size (ffn_dim_multiplier,
# encoder_hid_dim_type, attn_scales, layer_norm_eps, ...).
NOT_A_SIZE = frozenset({"ratio", "mult", "multiplier", "scale", "scales", "scaling", "eps", "epsilon", "dropout",
                        "factor", "theta", "rate", "type", "types", "fn", "act", "mode", "std", "mean", "range",
                        "order", "init", "norm"})
COUNT_WORDS = frozenset({"layers", "blocks", "heads"})
WIDTH_WORDS = frozenset({"dim", "dims", "channels"})
EXACT = {"n_layer": COUNT, "n_layers": COUNT, "n_head": COUNT, "n_heads": COUNT, "depth": COUNT,
         "d_model": WIDTH, "d_ff": WIDTH, "d_kv": WIDTH, "n_embd": WIDTH, "n_inner": WIDTH,
         "vocab_size": TABLE, "max_position_embeddings": TABLE, "n_positions": TABLE}
WIDTH_SUFFIXES = ("hidden_size", "intermediate_size")


def size_bound(key: str) -> Bound | None:
    """The bound a config key names, by its words; None for a key that is not a structural size."""
    key = key.lower()
    if key in EXACT:
        return EXACT[key]
    words = key.split("_")
    if words[-1] in NOT_A_SIZE:
        return None
    if COUNT_WORDS.intersection(words):
        return COUNT
    if WIDTH_WORDS.intersection(words) or key.endswith(WIDTH_SUFFIXES):
        return WIDTH
    return None


def _fits(value: Any, bound: Bound, depth: int = 0) -> bool:
    if value is None:
        return depth == 0  # an optional size left out (out_channels: null); never inside a list
    if type(value) is int:
        return 0 <= value <= bound.largest
    if type(value) is bool:
        return depth > 0  # a per-block flag list (Allegro's temporal_downsample_blocks), never a bare size
    if isinstance(value, list) and depth < MAX_DEPTH and len(value) <= MAX_ITEMS:
        return all(_fits(v, bound, depth + 1) for v in value)
    return False


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_sizes(config: dict[str, Any], source: Path | str) -> None:
    """Refuse a structural size of ``config`` (and its nested ``*_config`` objects) that is not an integer
    from 0 to its bound, or a (nested) list of them; a list may also hold per-block flags."""
    for key, value in config.items():
        if isinstance(value, dict) and key.endswith("config"):
            check_sizes(value, source)
            continue
        bound = size_bound(key) if isinstance(key, str) else None
        if bound is not None and not _fits(value, bound):
            raise CheckpointError(f"{source}: '{key}': expected an integer from 0 to {bound.largest} (a {bound.kind}) "
                                  f"or a list of them, got {_describe(value)}")


def _pipeline_module_class(library: Any) -> bool:
    """Whether ``library`` is one of diffusers' pipeline packages (Kolors' ``["kolors", "ChatGLMModel"]``): a class
    diffusers ships, loaded by its own name, never through an ``auto_map`` (Kolors' ChatGLM folders carry one for
    transformers' Auto classes, which diffusers does not use)."""
    if not isinstance(library, str) or library in ("transformers", "diffusers") or not library.isidentifier():
        return False
    import importlib.util

    try:
        spec = importlib.util.find_spec(f"diffusers.pipelines.{library}")
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.submodule_search_locations is not None  # a package, not pipeline_utils


def check_component_files(root: Path, index: dict[str, Any]) -> None:
    """Every listed component's folder (no JSON file naming Python code), ``config.json`` (sizes) and every
    tokenizer folder (vocabulary), checked before diffusers reads them; ``index`` has already passed
    ``check_components``."""
    from ...checkpoints import check_tokenizer_folder, read_json, refuse_folder_code

    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[1] is None:
            continue
        folder = root / name
        if folder.is_dir() and not _pipeline_module_class(entry[0]):
            # diffusers passes no trust_remote_code to transformers: an auto_map (a processor's tokenizer, a
            # config) made it ask "Do you wish to run the custom code? [y/N]" and run the folder's code on a yes
            refuse_folder_code(folder)
        if "Tokenizer" in entry[1] and folder.is_dir():  # diffusers names a missing folder itself
            check_tokenizer_folder(folder)
        config = folder / "config.json"
        if config.is_file():
            check_sizes(read_json(config), config)
