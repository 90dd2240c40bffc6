"""From a source module's name, in any LoRA format, to the native modules it adapts.

A model family declares its formats as data (:class:`Naming`): templates from the original
checkpoint's module names (``double_blocks.{d}.img_attn.qkv``) to diffc's, which are diffusers'
(``transformer_blocks.{d}.attn.to_q``, ``...to_k``, ``...to_v``: a fused source is split by rows, in
that order). :class:`NameTable` expands the templates over the model's blocks, adds every native name
as itself (the diffusers/PEFT format) and indexes each name with dots as underscores (kohya's
``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_transformer_transformer_blocks_0_attn_to_q``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

# Prefixes of DiT keys, tried in order (a bare name is tried last).
DOTTED_PREFIXES = ("transformer.", "transformer_2.", "model.diffusion_model.", "diffusion_model.",
                   "base_model.model.", "")
UNDERSCORED_PREFIXES = ("lora_unet_", "lora_transformer_")
PLACEHOLDER = re.compile(r"\{(\w)\}")


@dataclasses.dataclass(frozen=True)
class Map:
    """Source module ``source`` feeds the native ``targets`` (consecutive row ranges of its output)."""

    source: str
    targets: tuple[str, ...]
    swap_halves: bool = False  # the source's output is (shift, scale) where the native module's is (scale, shift)


@dataclasses.dataclass(frozen=True)
class Naming:
    """A family's LoRA formats: ``blocks`` maps each placeholder to a native block list."""

    blocks: dict[str, str]
    schemes: dict[str, tuple[Map, ...]]


@dataclasses.dataclass(frozen=True)
class Entry:
    targets: tuple[str, ...]
    swap_halves: bool
    scheme: str


def block_count(names: Iterable[str], blocks: str) -> int:
    """How many blocks the list ``blocks`` has, from parameter names like ``blocks.7.ffn.net.2.weight``."""
    prefix = blocks + "."
    indices = {int(part) for n in names if n.startswith(prefix) and (part := n[len(prefix):].split(".")[0]).isdigit()}
    return max(indices) + 1 if indices else 0


class NameTable:
    """Every name a source module may have for one native model, given its parameter names."""

    def __init__(self, param_names: Iterable[str], naming: Naming | None):
        params = set(param_names)
        modules = {n.rsplit(".", 1)[0] for n in params if "." in n}
        self.entries: dict[str, Entry] = {}
        for name in sorted(modules | params):
            self.entries[name] = Entry((name,), False, "diffusers")
        if naming is not None:
            counts = {ph: block_count(params, blocks) for ph, blocks in naming.blocks.items()}
            for scheme, maps in naming.schemes.items():
                for m in maps:
                    for source, targets in _expand(m, counts):
                        if all(t in modules or t in params for t in targets):
                            self.entries.setdefault(source, Entry(targets, m.swap_halves, scheme))
        self.flat: dict[str, str | None] = {}
        for name, entry in self.entries.items():
            key = name.replace(".", "_")
            if key not in self.flat:
                self.flat[key] = name
            elif self.flat[key] is not None and self.entries[self.flat[key]] != entry:
                self.flat[key] = None  # two names with different targets: ambiguous, matched by neither

    def lookup(self, stem: str) -> tuple[Entry, str] | None:
        """The entry for a source stem and the format it was written in, or None."""
        for prefix in DOTTED_PREFIXES:
            if stem.startswith(prefix):
                entry = self.entries.get(stem[len(prefix):])
                if entry is not None:
                    return entry, entry.scheme
        for prefix in UNDERSCORED_PREFIXES:
            if stem.startswith(prefix):
                name = self.flat.get(stem[len(prefix):].replace(".", "_"))
                if name is not None:
                    entry = self.entries[name]
                    return entry, f"kohya ({entry.scheme} names)"
        return None


def _expand(m: Map, counts: dict[str, int]):
    used = set(PLACEHOLDER.findall(m.source)) | {p for t in m.targets for p in PLACEHOLDER.findall(t)}
    if not used:
        yield m.source, m.targets
        return
    if len(used) > 1:
        raise ValueError(f"a LoRA name template may use one block placeholder: {m.source}")
    ph = used.pop()
    for i in range(counts.get(ph, 0)):
        yield m.source.replace(f"{{{ph}}}", str(i)), tuple(t.replace(f"{{{ph}}}", str(i)) for t in m.targets)
