"""Fuse the sinusoidal timestep projection into ``torch.ops.diffc.timestep_embedding``.

Unfused, FLUX's ``timestep_sinusoid`` and Wan's ``timestep_sinusoids`` (export's ATen, after
:mod:`.canonicalize`; ``half = dim // 2``, FLUX scales the timestep by 1000 before, as the model does)::

    freqs = aten.exp(aten.div(aten.mul(aten.arange(half, dtype=float32), -log(max_period)), half))
    col   = aten.unsqueeze(t, 1)                                 # FLUX bf16: aten.to(col, float32)
    args  = aten.mul(col, aten.unsqueeze(freqs, 0))              # (N, half)
    emb   = aten.cat([aten.cos(args), aten.sin(args)], -1)       # FLUX bf16: aten.to(emb, bfloat16)

diffusers' ``get_timestep_embedding`` spells it sine first, with a scale, and swaps the halves when
``flip_sin_to_cos``::

    freqs = aten.exp(aten.div(aten.mul(aten.arange(0, half, dtype=float32), -log(max_period)), half - shift))
    args  = aten.mul(aten.mul(aten.unsqueeze(t, 1), aten.unsqueeze(freqs, 0)), scale)
    emb   = aten.cat([aten.sin(args), aten.cos(args)], -1)
    emb   = aten.cat([aten.slice(emb, 1, half, MAX), aten.slice(emb, 1, 0, half)], -1)

Fused (any of them; the cast of the result to the embedder's dtype goes into the op's store)::

    out = aten.new_empty(t, [N, 2 * half], dtype=emb.dtype)
    diffc.timestep_embedding(t, flip_sin_to_cos, half - denominator, scale, max_period, out)

The embedder's ``linear_1`` stays: the op does not take the MLP. An odd width's trailing zero column
(``aten.pad(emb, [0, 1])``) stays too, after the op's even-width result. Filters take only what the op
computes the same way: float32 angles from a 1-D contiguous ``t``, an ``exp`` of
``-log(max_period) * i / (half - shift)`` whose constant the op reproduces exactly, and ``arange`` on
``t``'s device.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import sys
from collections.abc import Callable

import torch
from torch import fx

from ...errors import InvalidArgumentError
from .base import FusionPass, Pattern

aten = torch.ops.aten
SLICE_END = sys.maxsize  # export's stop for an open slice ``emb[:, half:]``


@dataclasses.dataclass(frozen=True)
class Spelling:
    """How a model writes the projection. ``diffusers``: sine first, multiplied by a scale (always
    recorded, even 1), arange from an explicit 0; ``flipped``: then the halves swapped
    (``flip_sin_to_cos=True``); ``upcast``: low-precision ``t`` cast to float32 after the unsqueeze;
    ``downcast``: the embedding cast to the embedder's dtype."""

    diffusers: bool = False
    flipped: bool = False
    upcast: bool = False
    downcast: bool = False

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if not isinstance(getattr(self, field.name), bool):
                raise InvalidArgumentError(field.name, f"expected a bool, got {getattr(self, field.name)!r}")
        if self.flipped and not self.diffusers:
            raise InvalidArgumentError("flipped", "only diffusers' sine-first spelling swaps halves after the cat")

    @property
    def wildcards(self) -> tuple[str, ...]:
        return ("t", "end", "neg_log", "denom", "device", *(("scale",) if self.diffusers else ()),
                *(("dtype",) if self.downcast else ()))


def _bind(spelling: Spelling, body: Callable) -> Callable:
    """``body(t, end, neg_log, denom, device, scale, dtype)`` as a function of exactly ``spelling``'s
    wildcards (the subgraph rewriter traces by signature; absent ones are passed as None)."""
    if spelling.diffusers and spelling.downcast:
        def fn(t, end, neg_log, denom, device, scale, dtype):
            return body(t, end, neg_log, denom, device, scale, dtype)
    elif spelling.diffusers:
        def fn(t, end, neg_log, denom, device, scale):
            return body(t, end, neg_log, denom, device, scale, None)
    elif spelling.downcast:
        def fn(t, end, neg_log, denom, device, dtype):
            return body(t, end, neg_log, denom, device, None, dtype)
    else:
        def fn(t, end, neg_log, denom, device):
            return body(t, end, neg_log, denom, device, None, None)
    return fn


def _unfused(spelling: Spelling, t, end, neg_log, denom, device, scale, dtype):
    if spelling.diffusers:
        index = aten.arange.start(0, end, dtype=torch.float32, device=device, pin_memory=False)
    else:
        index = aten.arange.default(end, dtype=torch.float32, device=device, pin_memory=False)
    freqs = aten.exp.default(aten.div.Tensor(aten.mul.Tensor(index, neg_log), denom))  # (half,)
    col = aten.unsqueeze.default(t, 1)  # (N, 1)
    if spelling.upcast:
        col = aten.to.dtype(col, torch.float32)
    args = aten.mul.Tensor(col, aten.unsqueeze.default(freqs, 0))  # (N, half)
    if spelling.diffusers:
        args = aten.mul.Tensor(args, scale)
        emb = aten.cat.default([aten.sin.default(args), aten.cos.default(args)], -1)
    else:
        emb = aten.cat.default([aten.cos.default(args), aten.sin.default(args)], -1)
    if spelling.flipped:
        emb = aten.cat.default([aten.slice.Tensor(emb, 1, end, SLICE_END), aten.slice.Tensor(emb, 1, 0, end)], -1)
    return aten.to.dtype(emb, dtype) if spelling.downcast else emb


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def max_period_of(neg_log) -> float | None:
    """The shortest decimal ``max_period`` whose ``-log`` is exactly the recorded constant ``neg_log``
    (10000.0 rather than ``exp(log(10000)) = 10000.00000000001``), or None."""
    if not _is_number(neg_log) or neg_log == 0:
        return None
    try:
        period = math.exp(-neg_log)
    except OverflowError:
        return None
    if not 0 < period < math.inf:
        return None
    for digits in range(1, 18):
        candidate = float(f"{period:.{digits}g}")
        if candidate > 0 and -math.log(candidate) == neg_log:
            return candidate
    return None


def freq_shift_of(end, denom) -> float | None:
    """``downscale_freq_shift`` with ``end - shift == denom`` exactly (as the op computes it), or None."""
    if not _is_number(denom) or denom == 0:
        return None
    shift = float(end - denom)
    return shift if end - shift == denom else None


class Sinusoid(Pattern):
    """One :class:`Spelling` of the projection, through the (optionally cast) concatenation."""

    def __init__(self, spelling: Spelling):
        if not isinstance(spelling, Spelling):
            raise InvalidArgumentError("spelling", f"expected a Spelling, got {type(spelling).__name__}")
        self.spelling = spelling

    @property
    def name(self) -> str:
        return f"Sinusoid[{spelling_name(self.spelling)}]"

    def example_inputs(self) -> tuple:
        s = self.spelling
        t = torch.tensor([0.5, 3.0, 20.25], dtype=torch.bfloat16 if s.upcast else torch.float32)
        values = {"t": t, "end": 8, "neg_log": -math.log(10000.0), "denom": 7 if s.diffusers else 8,
                  "device": torch.device("cpu"), "scale": 1.5, "dtype": torch.bfloat16}
        return tuple(values[name] for name in s.wildcards)

    @property
    def pattern(self) -> Callable:
        return _bind(self.spelling, functools.partial(_unfused, self.spelling))

    @property
    def replacement(self) -> Callable:
        """The replacement at the example inputs' sizes (the pass builds one per match)."""
        return self.build_replacement(**dict(zip(self.spelling.wildcards, self.example_inputs())))

    def build_replacement(self, **values) -> Callable:
        s = self.spelling
        t, end = values["t"], values["end"]
        size = [t.shape[0], 2 * end]
        dtype = values["dtype"] if s.downcast else torch.float32
        flip = s.flipped or not s.diffusers
        shift = freq_shift_of(end, values["denom"])
        scale = float(values["scale"]) if s.diffusers else 1.0
        period = max_period_of(values["neg_log"])

        def fused(t, end, neg_log, denom, device, _scale, _dtype):
            out = aten.new_empty.default(t, size, dtype=dtype)  # (N, 2 * half)
            torch.ops.diffc.timestep_embedding.default(t, flip, shift, scale, period, out)
            return out

        return _bind(s, fused)

    def accepts(self, t, end, neg_log, denom, device, scale=1.0, dtype=torch.float32) -> bool:
        s = self.spelling
        if not (isinstance(t, torch.Tensor) and t.ndim == 1 and (t.shape[0] <= 1 or t.stride(0) == 1)):
            return False
        if s.upcast:
            if t.dtype == torch.float32 or t.dtype.is_complex or t.dtype == torch.bool:
                return False
        elif t.dtype != torch.float32:
            return False  # float64 timesteps make float64 angles; the op computes in float32
        if not (isinstance(end, int) and not isinstance(end, bool) and end >= 1):
            return False
        if max_period_of(neg_log) is None or freq_shift_of(end, denom) is None or not _is_number(scale):
            return False
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            return False
        return isinstance(device, (torch.device, str)) and torch.device(device) == t.device


def spelling_name(spelling: Spelling) -> str:
    """``"native"``, or the flags that are set joined by ``_``, e.g. ``"diffusers_flipped_downcast"``."""
    return "_".join(f.name for f in dataclasses.fields(spelling) if getattr(spelling, f.name)) or "native"


# Every spelling (flipped only with diffusers), most specific first: flipped before diffusers' plain
# sine-first (whose inner cat alone is one), a cast before none.
SPELLINGS: dict[str, Spelling] = {
    spelling_name(s): s
    for s in (Spelling(*flags) for flags in itertools.product((True, False), repeat=4) if flags[0] or not flags[1])
}


class TimestepEmbeddingPass(FusionPass):
    """Sinusoidal timestep projection -> ``diffc.timestep_embedding``. Not bit-exact: the kernel's
    ``exp``/``cos``/``sin`` are not ATen's (both accurate to an ulp or two of float32)."""

    name = "timestep_embedding"
    bit_exact = False
    patterns = tuple(Sinusoid(s) for s in SPELLINGS.values())

    def __call__(self, gm: fx.GraphModule) -> int:
        if not isinstance(gm, fx.GraphModule):
            raise InvalidArgumentError("gm", f"expected a torch.fx.GraphModule, got {type(gm).__name__}")
        return super().__call__(gm)
