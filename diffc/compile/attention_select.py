"""Attention backends as data, and the compile-time measurement that picks one per attention shape.

:data:`BACKENDS` names every kernel diffc can run unmasked, non-causal, dropout-free attention on
``(q, k, v)`` of shape (B, H, S, D) with an optional ``scale``: the ATen op a graph lowering calls
(positional arguments after q, k, v; which output is attention's) or, for a backend with no ATen op,
an eager adapter, and when it is available. :func:`select_attention_backend` runs each available
candidate on random inputs of each shape, rejects the ones whose output disagrees with a float32
``softmax(q k^T * scale) v`` reference, times the rest (on a GPU replayed from a CUDA graph, as the runtime
runs a compiled DiT; a kernel that cannot be captured is rejected; in interleaved rounds, so that the GPU's clock
drift falls on every candidate alike) and returns an :class:`AttentionChoice` that
:class:`diffc.compile.passes.attention.AttentionLoweringPass` lowers onto and the artifact records.

Rule: one choice per shape (sequence lengths change the winner: Wan's cross-attention over 512 text
tokens is not its self-attention over 32,760), the fastest correct candidate that has a graph op,
except that ``"sdpa"`` (leave the node to torch's dispatcher) is kept unless another kernel beats it by
more than ``margin`` and by more than :data:`MIN_GAIN_MS` a call: below that the difference is timing noise
(at small shapes, where calls take microseconds, two compiles would otherwise choose different kernels by it),
and the untouched node is bit-exact.

Key-masked shapes (:attr:`AttentionShape.key_mask`: a boolean mask that only drops keys, prompt padding in a
joint sequence) are measured the same way with such a mask: ``"sdpa"`` is then torch's masked kernel, and the
candidates are the backends with a key-mask form (:attr:`AttentionBackend.key_mask_op`); the others are
reported unavailable for that shape. The timing mask keeps all keys but a short run, so that a kernel that
only reads the kept keys is timed at about its slowest.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from .. import ops  # noqa: F401  (registers torch.ops.diffc.attention_*)
from ..capture import replayer
from ..errors import InvalidArgumentError

aten = torch.ops.aten

# Relative error ||out - ref|| / ||ref|| against the float32 reference a correct kernel stays within.
REL_TOL = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}
REF_ROWS, REF_HEADS = 256, 4  # the reference checks batch item 0, these many heads and query rows

# The least a kernel must save a call over torch's own to replace it (CUDA-event timings of calls of ~10 us
# spread by about this much between measurements)
MIN_GAIN_MS = 1e-3

# Candidates are timed in this many interleaved rounds (:func:`_time_interleaved`), each of about 1/2 ``iters`` calls
TIMING_ROUNDS = 5


def _round_iters(iters: int) -> int:
    return max(1, -(-iters // 2))


# After the first round, a candidate this many times slower than the fastest one is timed no more: a stall of one
# round was seen at +17% (``_time_interleaved``), and the slow kernels (torch's efficient and flash kernels at
# long sequences: 1.9-3.9x FA4's time at Wan2.1-1.3B's) would otherwise double the selection's time
OUT_OF_THE_RACE = 1.5

# torch's own pick for aten.scaled_dot_product_attention (aten._fused_sdp_choice's SDPBackend enum).
_DISPATCHER = {0: "math", 1: "sdpa_flash", 2: "sdpa_efficient", 3: "sdpa_cudnn", 4: "overrideable"}


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """q: (batch, heads, seq_q, head_dim); k, v: (batch, heads, seq_kv, head_dim); ``key_mask``: the call
    passes a boolean (batch or 1, 1, 1, seq_kv) mask that drops keys."""

    batch: int
    heads: int
    seq_q: int
    seq_kv: int
    head_dim: int
    key_mask: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "key_mask":
                if not isinstance(value, bool):
                    raise InvalidArgumentError("shape.key_mask", f"expected True or False, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"shape.{f.name}", f"expected a positive integer, got {value!r}")

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, key_mask: bool = False) -> AttentionShape:
        batch, heads, seq_q, head_dim = q.shape
        return cls(int(batch), int(heads), int(seq_q), int(k.shape[-2]), int(head_dim), key_mask)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    """One attention kernel. ``op(q, k, v, *extra_args, scale=scale)[output_index]`` is attention's
    (B, H, S_q, D) output (``output_index`` None: the op returns it alone); a backend without an ATen
    op runs ``adapter(q, k, v, scale)`` and can be measured but not yet lowered into a graph.
    ``key_mask_op(q, k, v, mask, scale)``, where there is one, is the backend's form for a boolean mask
    that only drops keys (``sdpa`` takes the mask itself)."""

    name: str
    device_type: str  # "cpu", "cuda" or "any"
    op: torch._ops.OpOverload | None = None
    extra_args: tuple = ()
    output_index: int | None = None
    adapter: Callable | None = None
    requires: Callable[[], str | None] | None = None  # None when usable, else why not
    key_mask_op: torch._ops.OpOverload | None = None

    @property
    def takes_key_mask(self) -> bool:
        return self.name == "sdpa" or self.key_mask_op is not None

    def graph_args(self, q, k, v, scale: float | None) -> tuple[tuple, dict]:
        """Positional and keyword arguments of ``op`` (tensors or graph nodes for q, k, v)."""
        return (q, k, v, *self.extra_args), ({} if scale is None else {"scale": scale})

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                 mask: torch.Tensor | None = None):
        if mask is not None:
            if self.key_mask_op is not None:
                return self.key_mask_op(q, k, v, mask, scale)
            if self.name != "sdpa":
                raise InvalidArgumentError("mask", f"backend {self.name!r} has no key-mask form")
            return self.op(q, k, v, attn_mask=mask, **({} if scale is None else {"scale": scale}))
        if self.op is None:
            return self.adapter(q, k, v, scale)
        args, kwargs = self.graph_args(q, k, v, scale)
        out = self.op(*args, **kwargs)
        return out if self.output_index is None else out[self.output_index]

    def unavailable(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device``, or None when it can."""
        if self.device_type != "any" and device.type != self.device_type:
            return f"needs a {self.device_type.upper()} device, not {device.type}"
        return None if self.requires is None else self.requires()


def _cudnn_ready() -> str | None:
    return None if torch.backends.cudnn.is_available() else "cuDNN is not available in this torch build"


def _fa4_ready() -> str | None:
    from ..ops.attention_fa4 import fa4_unavailable

    return fa4_unavailable()


def _flashinfer_ready() -> str | None:
    from ..ops.attention_flashinfer import flashinfer_unavailable

    return flashinfer_unavailable()


BACKENDS: dict[str, AttentionBackend] = {
    b.name: b
    for b in (
        AttentionBackend("sdpa", "any", aten.scaled_dot_product_attention.default),
        # aten._scaled_dot_product_flash_attention's kernel, its output alone (the op's uint64 RNG state cannot
        # be written by torch.export's serializer before torch 2.13), see diffc/ops/attention_sdpa_flash.py
        AttentionBackend("sdpa_flash", "cuda", torch.ops.diffc.attention_sdpa_flash.default),
        # (q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask, *, scale)
        AttentionBackend(
            "sdpa_cudnn", "cuda", aten._scaled_dot_product_cudnn_attention.default,
            (None, False, 0.0, False, False), 0, requires=_cudnn_ready,
        ),
        # (q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, *, scale) -> (output, log_sumexp, ...)
        AttentionBackend(
            "sdpa_efficient", "cuda", aten._scaled_dot_product_efficient_attention.default, (None, False, 0.0, False), 0
        ),
        # (q, k, v, dropout_p, is_causal, *, attn_mask, scale) -> (output, logsumexp)
        AttentionBackend(
            "sdpa_flash_cpu", "cpu", aten._scaled_dot_product_flash_attention_for_cpu.default, (0.0, False), 0
        ),
        # diffc's ops around external kernels: (q, k, v, scale) -> output, see diffc/ops/attention_*.py
        AttentionBackend("fa4", "cuda", torch.ops.diffc.attention_fa4.default, requires=_fa4_ready,
                         key_mask_op=torch.ops.diffc.attention_fa4_key_mask.default),
        AttentionBackend("flashinfer", "cuda", torch.ops.diffc.attention_flashinfer.default,
                         requires=_flashinfer_ready),
    )
}


def dispatcher_pick(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> str:
    """The kernel ``aten.scaled_dot_product_attention`` runs for these inputs, as a backend name."""
    name = _DISPATCHER.get(int(aten._fused_sdp_choice(q, k, v, mask)), "unknown")
    return "sdpa_flash_cpu" if name == "sdpa_flash" and q.device.type == "cpu" else name


@dataclasses.dataclass
class CandidateResult:
    """``status``: "ok" (correct, timed), "unavailable", "error" (it raised) or "wrong" (numerics)."""

    status: str
    median_ms: float | None = None  # the median of the timing rounds' medians
    rel_err: float | None = None
    reason: str | None = None
    rounds_ms: list[float] | None = None  # each timing round's median (:func:`_time_interleaved`)


@dataclasses.dataclass
class ShapeChoice:
    shape: AttentionShape
    backend: str
    torch_default: str  # what aten.scaled_dot_product_attention dispatches to for this shape
    candidates: dict[str, CandidateResult]

    def to_dict(self) -> dict:
        return {
            "shape": self.shape.to_dict(),
            "backend": self.backend,
            "torch_default": self.torch_default,
            "candidates": {name: dataclasses.asdict(r) for name, r in self.candidates.items()},
        }


@dataclasses.dataclass
class AttentionChoice:
    """The backend chosen for each shape, on ``device`` for ``dtype``, with every candidate's result."""

    device: str
    dtype: torch.dtype
    shapes: list[ShapeChoice]

    @property
    def backends(self) -> dict[AttentionShape, str]:
        return {s.shape: s.backend for s in self.shapes}

    @property
    def bit_exact(self) -> bool:
        """Every choice is ``sdpa`` or the kernel torch's dispatcher runs for that shape anyway."""
        return all(s.backend in ("sdpa", s.torch_default) for s in self.shapes)

    def to_dict(self) -> dict:
        """A JSON-serialisable record for the artifact manifest."""
        return {
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "bit_exact": self.bit_exact,
            "shapes": [s.to_dict() for s in self.shapes],
        }


def _random_qkv(shape: AttentionShape, device: torch.device, dtype: torch.dtype, seed: int):
    g = torch.Generator(device).manual_seed(seed)

    def make(seq: int) -> torch.Tensor:  # (B, S, H, D) viewed as (B, H, S, D): the layout DiTs feed
        return torch.randn(shape.batch, seq, shape.heads, shape.head_dim, generator=g, device=device,
                           dtype=dtype).transpose(1, 2)

    return make(shape.seq_q), make(shape.seq_kv), make(shape.seq_kv)


def timing_mask(shape: AttentionShape, device: torch.device) -> torch.Tensor:
    """The (batch, 1, 1, seq_kv) key mask a key-masked shape is measured with: every key but a run of
    ``max(1, seq_kv // 32)`` starting at a quarter of the keys (a prompt's padding between its tokens and the
    image's), one key later for each further batch element (each drops its own keys)."""
    n = shape.seq_kv
    run = max(1, n // 32)
    keys = torch.arange(n, device=device)
    starts = torch.arange(shape.batch, device=device)[:, None] + n // 4
    drop = (keys >= starts) & (keys < starts + run)
    return torch.logical_not(drop)[:, None, None, :]


def _reference_rel_err(out: torch.Tensor, q, k, v, scale: float, mask: torch.Tensor | None = None) -> float:
    """||out - ref|| / ||ref|| on batch item 0, the first REF_HEADS heads and REF_ROWS query rows."""
    h, rows = min(REF_HEADS, q.shape[1]), min(REF_ROWS, q.shape[2])
    q32, k32, v32 = q[0, :h, :rows].float(), k[0, :h].float(), v[0, :h].float()
    scores = q32 @ k32.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(torch.logical_not(mask[0, 0, 0]), -math.inf)
    ref = torch.softmax(scores, dim=-1) @ v32  # (h, rows, D)
    got = out[0, :h, :rows].float()
    if not torch.isfinite(got).all():
        return math.inf
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def _timed_call(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """What is timed of one ``fn()``. On CUDA the call is replayed from a CUDA graph, as the runtime replays a
    compiled DiT: timed plainly, a call also counts its Python launch, which the graph removes
    (FlashAttention-4's wrapper adds ~0.13 ms a call, a third of its kernel at FLUX.1's shape, where its
    kernel is faster than cuDNN's but its plainly timed call lost to it). On the CPU: the call itself."""
    return replayer(fn, device) if device.type == "cuda" else fn


def _median_ms(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Median milliseconds of ``iters`` calls of ``fn``: CUDA events on CUDA, wall clock on the CPU."""
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _check_candidate(backend: AttentionBackend, qkv, mask, device, dtype):
    """Run ``backend`` once against the reference; returns its result and, where it is correct, the call to time
    (a kernel that raises, disagrees with the reference or cannot be captured is an "error" / "wrong" result)."""
    q, k, v = qkv
    scale = 1.0 / math.sqrt(q.shape[-1])
    try:
        out = backend(q, k, v, scale, mask)
        if tuple(out.shape) != tuple(q.shape):
            return CandidateResult("wrong", reason=f"output shape {tuple(out.shape)}, expected {tuple(q.shape)}"), None
        err = _reference_rel_err(out, q, k, v, scale, mask)
        del out
        if not err <= REL_TOL[dtype]:
            return CandidateResult("wrong", rel_err=err, reason=f"relative error {err:.3g} > {REL_TOL[dtype]:g}"), None
        call = _timed_call(lambda: backend(q, k, v, scale, mask), device)
    except Exception as e:  # noqa: BLE001  (a kernel refusing a shape or dtype is a result, not a failure)
        return _error(e), None
    return CandidateResult("ok", rel_err=err), call


def _error(e: Exception) -> CandidateResult:
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return CandidateResult("error", reason=f"{type(e).__name__}: {message}"[:300])


def _time_interleaved(calls: dict[str, Callable[[], object]], results: dict[str, CandidateResult],
                      device: torch.device, warmup: int, iters: int, rounds: int) -> None:
    """Time the correct candidates of one shape in ``rounds`` interleaved rounds (each round times every candidate
    ``iters`` times, in an order that reverses from one round to the next) and give each the median of its rounds'
    medians. One candidate timed after the other puts the GPU's clock drift (a card warming up or throttling
    over a few hundred milliseconds) and any transient stall between them: on an H100 at Wan2.1-1.3B's
    self-attention, one such timing put FA4 at 11.07 ms against its 9.45-9.65 in the rounds after, and a compile
    chose flashinfer's kernel (9.5-10.0 ms) over it, a forward 18 ms slower
    (``bench/results/h100-2026-12-07-notes.md``). A candidate whose first round is over :data:`OUT_OF_THE_RACE`
    times the fastest one's is not timed again (its time is that round's). A candidate that raises while timed is
    an "error" result. The candidates' graphs stay captured together until the shape is timed (on a GPU, one
    output and workspace per candidate at once)."""

    def drop(name: str, e: Exception) -> None:
        results[name] = _error(e)
        del calls[name]

    for name, call in list(calls.items()):
        try:
            for _ in range(warmup):
                call()
        except Exception as e:  # noqa: BLE001
            drop(name, e)
    rounds_ms: dict[str, list[float]] = {name: [] for name in calls}
    active = list(calls)
    for r in range(rounds):
        for name in (list(active) if r % 2 == 0 else active[::-1]):
            try:
                rounds_ms[name].append(_median_ms(calls[name], device, iters))
            except Exception as e:  # noqa: BLE001
                drop(name, e)
        active = [name for name in active if name in calls]
        if r == 0 and active:  # far slower than the fastest: out of the later rounds (compile time), kept as timed
            fastest = min(rounds_ms[name][0] for name in active)
            active = [name for name in active if rounds_ms[name][0] <= OUT_OF_THE_RACE * fastest]
    for name in calls:
        results[name].median_ms = statistics.median(rounds_ms[name])
        results[name].rounds_ms = [round(t, 4) for t in rounds_ms[name]]


def _choose(results: dict[str, CandidateResult], table: Mapping[str, AttentionBackend], margin: float) -> str:
    timed = {n: r.median_ms for n, r in results.items() if r.status == "ok" and table[n].op is not None}
    if not timed:
        return "sdpa"
    best = min(timed, key=timed.get)
    if "sdpa" in timed and timed["sdpa"] - timed[best] <= max(timed["sdpa"] * margin, MIN_GAIN_MS):
        return "sdpa"
    return best


def _check(device, dtype, shapes, candidates, table, warmup, iters, margin):
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidArgumentError("device", f"expected a torch device such as 'cuda' or 'cpu', got {device!r}") from e
    if device.type not in ("cpu", "cuda"):
        raise InvalidArgumentError("device", f"accepted device types: cpu, cuda; got {device.type!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("device", "CUDA is not available on this machine; use 'cpu'")
    if dtype not in REL_TOL:
        accepted = ", ".join(str(d).removeprefix("torch.") for d in REL_TOL)
        raise InvalidArgumentError("dtype", f"accepted: {accepted}; got {dtype!r}")
    shapes = list(shapes) if isinstance(shapes, Sequence) else shapes
    if not isinstance(shapes, list) or not shapes:
        raise InvalidArgumentError("shapes", f"expected a non-empty list of AttentionShape, got {shapes!r}")
    for s in shapes:
        if not isinstance(s, AttentionShape):
            raise InvalidArgumentError("shapes", f"expected AttentionShape entries, got {type(s).__name__}")
    names = list(table) if candidates is None else list(candidates)
    if not names or isinstance(candidates, str):
        raise InvalidArgumentError("candidates", f"expected a non-empty list of names from: {', '.join(table)}")
    unknown = [n for n in names if n not in table]
    if unknown:
        raise InvalidArgumentError("candidates", f"unknown backend(s) {unknown}; accepted: {', '.join(table)}")
    for field, value, low in (("warmup", warmup, 0), ("iters", iters, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidArgumentError(field, f"expected an integer >= {low}, got {value!r}")
    if not isinstance(margin, (int, float)) or not 0.0 <= margin < 1.0:
        raise InvalidArgumentError("margin", f"expected a fraction in [0, 1), got {margin!r}")
    return device, list(dict.fromkeys(shapes)), list(dict.fromkeys(names))


def select_attention_backend(
    shapes: Sequence[AttentionShape],
    device: torch.device | str,
    dtype: torch.dtype,
    candidates: Sequence[str] | None = None,
    warmup: int = 3,
    iters: int = 10,
    margin: float = 0.02,
    backends: Mapping[str, AttentionBackend] | None = None,
) -> AttentionChoice:
    """Measure ``candidates`` (default: every backend in ``backends``, default :data:`BACKENDS`) on
    each shape and choose one per shape (module docstring: the rule). Unavailable candidates are
    reported, never run; a candidate that raises or disagrees with the reference is rejected with
    its reason. Timings: CUDA events on CUDA, ``time.perf_counter`` on CPU; :data:`TIMING_ROUNDS` rounds that
    interleave the candidates, each timing every candidate about ``iters / 2`` times after ``warmup`` calls; a
    candidate's time is the median of its rounds' medians."""
    table = BACKENDS if backends is None else backends
    device, shapes, names = _check(device, dtype, shapes, candidates, table, warmup, iters, margin)
    chosen = []
    with torch.no_grad():
        for i, shape in enumerate(shapes):
            qkv = _random_qkv(shape, device, dtype, seed=i)
            mask = timing_mask(shape, device) if shape.key_mask else None
            results, calls = {}, {}
            for name in names:
                why = table[name].unavailable(device)
                if why is None and mask is not None and not table[name].takes_key_mask:
                    why = "no key-mask form"
                if why:
                    results[name] = CandidateResult("unavailable", reason=why)
                    continue
                results[name], call = _check_candidate(table[name], qkv, mask, device, dtype)
                if call is not None:
                    calls[name] = call
            _time_interleaved(calls, results, device, warmup, _round_iters(iters), TIMING_ROUNDS)
            for name, r in results.items():
                if r.status == "ok" and table[name].op is None:
                    r.reason = "measured only: no ATen op to lower a graph onto"
            chosen.append(ShapeChoice(shape, _choose(results, table, margin), dispatcher_pick(*qkv, mask), results))
            del qkv, mask, calls
    return AttentionChoice(str(device), dtype, chosen)
