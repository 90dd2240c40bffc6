"""The step cache on DiT stacks: threshold 0 changes nothing (bit for bit), the skip decisions follow a plain
re-implementation of each rule on a given residual sequence, skipped blocks are not run and their cached
residual is added, CFG branches keep their own state, TaylorSeer extrapolates, block streams declared as
data drive FLUX's and Wan's blocks, CUDA graphs capture block segments (CPU stand-in), and every bad
setting is refused naming the option. Compiled + cache: tests/runtime/test_cache_compiled.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from diffc.errors import InvalidArgumentError
from diffc.models.structure import BlockStreams, TeaCacheFit, TeaCacheSpec
from diffc.models.wan.transformer import WAN_TRANSFORMER_SPECS, WanTransformer3DModel
from diffc.runtime.cache import CacheConfig, build_cache, cache_config
from diffc.runtime.cache.taylorseer import TaylorSeer
from diffc.runtime.dit_stack import DiTStack
from tests.runtime.test_cudagraphs import EmulatedGraphs
from tests.runtime.test_offload import tiny_flux, tiny_wan

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# A toy DiT whose first block adds a given residual: the decision input is known exactly
# ---------------------------------------------------------------------------------------------


class ToyBlock(nn.Module):
    def __init__(self, index: int):
        super().__init__()
        self.index, self.calls = index, 0
        self.weight = nn.Parameter(torch.full((4,), 0.9 + 0.01 * index))

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + r if self.index == 0 else x * self.weight + 0.1 * self.index


class ToyDiT(nn.Module):
    """``forward(x, r)``: block 0 adds ``r`` (its residual, what DBCache compares); the others are affine.
    TeaCache's signal is ``r`` itself, rescaled by ``2x``."""

    _repeated_blocks = ("blocks",)
    _block_streams = {"blocks": BlockStreams(inputs=("x",), outputs="x")}
    _teacache = TeaCacheSpec(module=None, args=("r",), output=None, warmup_steps=1, final_steps=1,
                             fits=(TeaCacheFit((), (2.0, 0.0), 0.3, "toy"),))

    def __init__(self, blocks: int = 5):
        super().__init__()
        self.blocks = nn.ModuleList(ToyBlock(i) for i in range(blocks))

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, r)
        return x


def toy_stack(blocks: int = 5) -> tuple[ToyDiT, DiTStack]:
    model = ToyDiT(blocks).requires_grad_(False)
    return model, DiTStack("transformer", model, CPU, cuda_graphs=False)


def run_toy(stack, cache, scales, branches=1):
    """One toy forward per step (per branch), block 0's residual ``scales[s] * ones``; outputs per step."""
    cache.begin_generation(len(scales))
    outs = []
    for step, c in enumerate(scales):
        cache.begin_step(step)
        outs.append([stack(torch.ones(1, 4) * (1 + b), torch.full((1, 4), c[b] if branches > 1 else c))
                     for b in range(branches)])
    cache.end_generation()
    return outs


def expected_dbcache(scales, threshold, warmup, max_skips):
    """Which steps DBCache skips, re-implemented plainly: compare with the last computed step's residual."""
    skipped, last, in_a_row = [], None, 0
    for step, c in enumerate(scales):
        skip = (step >= warmup and last is not None and (max_skips is None or in_a_row < max_skips)
                and threshold > 0 and abs(c - last) / abs(last) < threshold)
        if skip:
            skipped.append(step)
            in_a_row += 1
        else:
            last, in_a_row = c, 0
    return skipped


def expected_teacache(scales, threshold, warmup, final, max_skips, rescale=lambda d: 2 * d):
    """Which steps TeaCache skips: the rescaled change since the previous step accumulates until the threshold."""
    skipped, previous, acc, in_a_row = [], None, 0.0, 0
    for step, c in enumerate(scales):
        forced = step < warmup or previous is None or step >= len(scales) - final or \
            (max_skips is not None and in_a_row >= max_skips)
        skip = False
        if not forced:
            acc += rescale(abs(c - previous) / abs(previous))
            skip = threshold > 0 and acc < threshold
        if skip:
            skipped.append(step)
            in_a_row += 1
        else:
            acc, in_a_row = 0.0, 0
        previous = c
    return skipped


SCALES = [1.0, 1.013, 1.062, 1.31, 1.327, 1.348, 1.371, 2.03, 2.041, 2.067, 2.52, 2.533]


@pytest.mark.parametrize("threshold,warmup,max_skips", [
    (0.05, 0, None), (0.05, 3, None), (0.1, 1, 1), (0.1, 0, 2), (0.5, 2, None), (0.0, 0, None), (100.0, 1, 3),
])
def test_dbcache_skips_as_the_rule_says(threshold, warmup, max_skips):
    model, stack = toy_stack()
    cache = build_cache(cache_config("dbcache", {"fn": 1, "bn": 1, "threshold": threshold, "warmup_steps": warmup,
                                                 "max_skips_in_a_row": max_skips}), model)
    stack.set_cache(cache)
    run_toy(stack, cache, SCALES)
    report = cache.describe()
    want = expected_dbcache(SCALES, threshold, warmup, max_skips)
    assert report["skipped_steps"] == want
    assert report["forwards"] == {"computed": len(SCALES) - len(want), "skipped": len(want)}
    assert report["middle_blocks"] == {"computed": 3 * (len(SCALES) - len(want)), "skipped": 3 * len(want)}
    assert report["blocks"] == {"first": 1, "middle": 3, "last": 1}
    calls = [b.calls for b in model.blocks]
    assert calls == [len(SCALES), *[len(SCALES) - len(want)] * 3, len(SCALES)]  # skipped blocks never ran


@pytest.mark.parametrize("threshold,warmup,max_skips", [(0.1, 1, None), (0.3, 1, None), (0.3, 4, 1), (1.0, 0, 2)])
def test_teacache_skips_as_the_rule_says(threshold, warmup, max_skips):
    model, stack = toy_stack()
    cache = build_cache(cache_config("teacache", {"threshold": threshold, "warmup_steps": warmup,
                                                  "max_skips_in_a_row": max_skips}), model)
    stack.set_cache(cache)
    run_toy(stack, cache, SCALES)
    want = expected_teacache(SCALES, threshold, warmup, final=1, max_skips=max_skips)
    assert cache.describe()["skipped_steps"] == want and want  # every case skips something
    assert [b.calls for b in model.blocks] == [len(SCALES) - len(want)] * 5  # teacache skips every block


def test_skipped_middle_reuses_the_cached_residual():
    model, stack = toy_stack()
    cache = build_cache(CacheConfig("dbcache", fn=1, bn=1, threshold=1.0, warmup_steps=1), model)
    stack.set_cache(cache)
    (computed,), (skipped,) = run_toy(stack, cache, [1.0, 1.1])
    assert cache.describe()["skipped_steps"] == [1]
    x0 = torch.ones(1, 4)
    h1 = x0 + 1.0
    mid = h1
    for b in model.blocks[1:4]:
        mid = mid * b.weight + 0.1 * b.index
    residual = mid - h1
    last = model.blocks[4]
    assert torch.allclose(computed, mid * last.weight + 0.4)
    assert torch.allclose(skipped, (x0 + 1.1 + residual) * last.weight + 0.4)


def test_taylorseer_extrapolates_a_linear_residual_exactly():
    seer = TaylorSeer(order=1)
    r = lambda k: (torch.full((3,), 2.0 + 0.5 * k), torch.full((2,), -1.0 * k))  # noqa: E731
    seer.update(0, r(0))
    assert all(torch.equal(a, b) for a, b in zip(seer.forecast(2), r(0)))  # one point: reuse as is
    seer.update(2, r(2))
    assert all(torch.allclose(a, b) for a, b in zip(seer.forecast(5), r(5)))
    second = TaylorSeer(order=2)
    for k in (0, 1, 3):
        second.update(k, (torch.tensor([float(k * k)]),))
    assert second.forecast(4)[0].item() != 16.0  # finite differences over unequal windows: an estimate
    assert TaylorSeer(order=2).order == 2


def test_taylorseer_option_changes_only_skipped_steps():
    outs = {}
    for seer in (False, True):
        model, stack = toy_stack()
        cache = build_cache(CacheConfig("dbcache", fn=1, bn=0, threshold=100.0, warmup_steps=3,
                                        max_skips_in_a_row=2, taylorseer=seer), model)
        stack.set_cache(cache)
        outs[seer] = [o[0] for o in run_toy(stack, cache, [1.0, 1.1, 1.2, 1.3, 1.4, 1.5])]
        assert cache.describe()["skipped_steps"] == [3, 4]
    assert all(torch.equal(outs[False][i], outs[True][i]) for i in (0, 1, 2, 5))
    assert not torch.equal(outs[False][3], outs[True][3])


def test_cfg_branches_keep_their_own_state():
    """Two DiT calls per step (true CFG): branch 0's residual never changes, branch 1's always does."""
    model, stack = toy_stack()
    cache = build_cache(CacheConfig("dbcache", fn=1, bn=0, threshold=0.1, warmup_steps=1), model)
    stack.set_cache(cache)
    scales = [(1.0, 1.0 * 2**s) for s in range(5)]
    run_toy(stack, cache, scales, branches=2)
    steps = cache.describe()["steps"]
    assert [(s["computed"], s["skipped"]) for s in steps] == [(2, 0)] + [(1, 1)] * 4
    assert [s["diffs"][0] for s in steps[1:]] == [0.0] * 4 and all(s["diffs"][1] == 1.0 for s in steps[1:])


def test_without_step_signals_every_forward_is_a_step_and_outside_a_generation_the_cache_is_inert():
    model, stack = toy_stack()
    cache = build_cache(CacheConfig("fbcache", threshold=1.0, warmup_steps=1), model)
    stack.set_cache(cache)
    x, r = torch.ones(1, 4), torch.ones(1, 4)
    plain = stack(x, r)
    assert cache.describe()["forwards"] == {"computed": 0, "skipped": 0}
    cache.begin_generation()
    outs = [stack(x, r * (1 + 0.01 * i)) for i in range(3)]
    assert cache.describe()["skipped_steps"] == [1, 2] and torch.equal(outs[0], plain)
    cache.end_generation()
    assert not cache.branches and torch.equal(stack(x, r), plain)


# ---------------------------------------------------------------------------------------------
# FLUX and Wan: their block streams, threshold 0, batch-2 CFG
# ---------------------------------------------------------------------------------------------


FAMILIES = {"flux": (lambda: tiny_flux(layers=2, single_layers=3), 1.0),
            "wan": (lambda: tiny_wan(layers=4), 1000.0)}


def denoise(stack, inputs, steps, scale, cache=None, calls_per_step=1):
    """A toy flow loop over ``stack``: Euler steps on hidden_states; ``calls_per_step`` DiT calls (CFG)."""
    x = inputs["hidden_states"]
    if cache is not None:
        cache.begin_generation(steps)
    with torch.inference_mode():
        for i in range(steps):
            if cache is not None:
                cache.begin_step(i)
            t = torch.full_like(inputs["timestep"], (1 - i / steps) * scale)
            preds = [stack(**{**inputs, "hidden_states": x, "timestep": t,
                              "encoder_hidden_states": inputs["encoder_hidden_states"] * (1 - 0.5 * b)})
                     for b in range(calls_per_step)]
            pred = preds[0] if calls_per_step == 1 else preds[1] + 3.0 * (preds[0] - preds[1])
            x = x - pred / steps
    if cache is not None:
        cache.end_generation()
    return x


@pytest.fixture(scope="module")
def tiny():
    made = {}

    def get(family):
        if family not in made:
            make, scale = FAMILIES[family]
            model, inputs = make()
            made[family] = (model, inputs, scale)
        return made[family]

    return get


@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("config", [
    CacheConfig("dbcache", fn=2, bn=1, threshold=0.0, warmup_steps=0),
    CacheConfig("fbcache", threshold=0.0, warmup_steps=0, taylorseer=True),
    CacheConfig("teacache", threshold=0.0, warmup_steps=0, coefficients=(1.0, 0.0)),
], ids=["dbcache", "fbcache-taylorseer", "teacache"])
def test_threshold_zero_is_bit_identical(tiny, family, config):
    model, inputs, scale = tiny(family)
    stack = DiTStack("transformer", model, CPU, cuda_graphs=False)
    ref = denoise(stack, inputs, 4, scale, calls_per_step=2)
    cache = build_cache(config, model)
    stack.set_cache(cache)
    assert torch.equal(denoise(stack, inputs, 4, scale, cache, calls_per_step=2), ref)
    report = cache.describe()
    assert report["forwards"] == {"computed": 8, "skipped": 0} and len(report["steps"]) == 4
    assert all(d is not None for s in report["steps"][1:] for d in s["diffs"])  # measured, never under 0
    stack.set_cache(None)
    assert not any("forward" in b.__dict__ for n in model._repeated_blocks for b in getattr(model, n))


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_skipping_through_the_declared_streams(tiny, family):
    """Middle blocks skipped across both FLUX block lists (each list adds its own residual) or Wan's one list;
    a batch-2 forward (Wan's CFG pair) is one forward, one decision per step."""
    model, inputs, scale = tiny(family)
    stack = DiTStack("transformer", model, CPU, cuda_graphs=False)
    ref = denoise(stack, inputs, 6, scale)
    cache = build_cache(CacheConfig("dbcache", fn=1, bn=1, threshold=100.0, warmup_steps=2, max_skips_in_a_row=1),
                        model)
    stack.set_cache(cache)
    out = denoise(stack, inputs, 6, scale, cache)
    report = cache.describe()
    assert report["skipped_steps"] == [2, 4] and report["forwards"] == {"computed": 4, "skipped": 2}
    blocks = sum(len(getattr(model, n)) for n in model._repeated_blocks)
    assert report["middle_blocks"]["skipped"] == 2 * (blocks - 2)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert (out - ref).abs().max() < 0.5 * ref.abs().max()  # an approximation, not garbage


def test_flux_streams_flow_through_both_lists(tiny):
    """Skipping FLUX's middle: at each list's end the streams equal input + that list's cached residual."""
    model, inputs, _ = tiny("flux")
    stack = DiTStack("transformer", model, CPU, cuda_graphs=False)
    cache = build_cache(CacheConfig("fbcache", threshold=100.0, warmup_steps=1), model)
    stack.set_cache(cache)
    seen = {}
    for name in model._repeated_blocks:
        last = getattr(model, name)[-1]
        last.register_forward_hook(lambda m, a, out, name=name: seen.setdefault(name, []).append(out))
    cache.begin_generation()
    with torch.inference_mode():
        stack(**inputs)
        stack(**inputs)  # same input: the skip must give exactly the computed result's streams
    cache.end_generation()
    assert cache.describe()["skipped_steps"] == [1]
    for name in model._repeated_blocks:
        (enc0, hid0), (enc1, hid1) = seen[name]
        assert torch.allclose(hid1, hid0, atol=1e-5) and torch.allclose(enc1, enc0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# CUDA graphs per block segment (the CPU stand-in of tests/runtime/test_cudagraphs.py)
# ---------------------------------------------------------------------------------------------


def test_cuda_graphs_capture_block_segments(tiny, monkeypatch):
    import diffc.runtime.dit_stack as dit_stack_module

    monkeypatch.setattr(dit_stack_module, "CudaGraphModule", EmulatedGraphs)
    model, inputs, scale = tiny("flux")
    plain = DiTStack("transformer", model, CPU, cuda_graphs=False)
    config = CacheConfig("dbcache", fn=2, bn=1, threshold=100.0, warmup_steps=1, max_skips_in_a_row=1)
    cache = build_cache(config, model)
    plain.set_cache(cache)
    ref = denoise(plain, inputs, 5, scale, cache)
    plain.set_cache(None)

    stack = DiTStack("transformer", model, CPU, cuda_graphs=True)
    assert isinstance(stack.graphs, EmulatedGraphs)  # no cache: the whole forward is one graph
    cache = build_cache(config, model)
    stack.set_cache(cache)
    assert cache.segments() == [("transformer_blocks", 0, 2), ("single_transformer_blocks", 0, 2),
                                ("single_transformer_blocks", 2, 3)]
    out = denoise(stack, inputs, 5, scale, cache)
    assert torch.equal(out, ref) and cache.describe()["skipped_steps"] == [1, 3]
    graphs = stack.describe()["cuda_graphs"]
    assert graphs["mode"] == "block segments" and stack.layers()[-1] == "cuda graphs (block segments)"
    first, middle, last = (graphs["segments"][k] for k in ("transformer_blocks[0:2]", "single_transformer_blocks[0:2]",
                                                           "single_transformer_blocks[2:3]"))
    assert (first["captures"], first["replays"]) == (1, 4) and (last["captures"], last["replays"]) == (1, 4)
    assert (middle["captures"], middle["replays"]) == (1, 2)  # 3 computed forwards: a capture and 2 replays
    assert graphs["fallbacks"] == 0
    stack.set_cache(None)
    assert isinstance(stack.graphs, EmulatedGraphs) and stack.describe()["cuda_graphs"]["enabled"]


# ---------------------------------------------------------------------------------------------
# Settings: parsed once, refused by name
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache,options,field,fragment", [
    ("magcache", None, "cache", "accepted: dbcache, fbcache, teacache"),
    (3, None, "cache", "not a step cache"),
    ("dbcache", {"threshold": -0.1}, "cache_options.threshold", "from 0 to 100"),
    ("dbcache", {"threshold": float("nan")}, "cache_options.threshold", "number"),
    ("dbcache", {"threshold": True}, "cache_options.threshold", "number"),
    ("dbcache", {"fn": 0}, "cache_options.fn", "from 1 to 1000"),
    ("dbcache", {"fn": 2.5}, "cache_options.fn", "integer"),
    ("dbcache", {"bn": -1}, "cache_options.bn", "from 0"),
    ("dbcache", {"warmup_steps": "8"}, "cache_options.warmup_steps", "integer"),
    ("dbcache", {"max_skips": 0}, "cache_options.max_skips", "from 1"),
    ("dbcache", {"Fn": 2, "fn": 3}, "cache_options.fn", "twice"),
    ("dbcache", {"treshold": 0.1}, "cache_options.treshold", "accepted: fn, bn, threshold"),
    ("fbcache", {"fn": 2}, "cache_options.fn", "use dbcache"),
    ("teacache", {"bn": 1}, "cache_options.bn", "not an option of teacache"),
    ("dbcache", {"coefficients": [1, 0]}, "cache_options.coefficients", "not an option of dbcache"),
    ("teacache", {"coefficients": []}, "cache_options.coefficients", "1 to 8 numbers"),
    ("teacache", {"coefficients": [1, "x"]}, "cache_options.coefficients[1]", "number"),
    ("dbcache", {"taylorseer": "yes"}, "cache_options.taylorseer", "true or false"),
    ("dbcache", {"taylorseer_order": 2}, "cache_options.taylorseer_order", "taylorseer=true"),
    ("dbcache", {"taylorseer": True, "taylorseer_order": 4}, "cache_options.taylorseer_order", "from 1 to 3"),
    ("dbcache", [("fn", 1)], "cache_options", "mapping"),
    (None, {"threshold": 0.1}, "cache_options", "without a cache"),
    ({"threshold": 0.1}, None, "cache", "needs a 'kind'"),
])
def test_bad_settings_are_refused_by_name(cache, options, field, fragment):
    with pytest.raises(InvalidArgumentError, match=fragment) as info:
        cache_config(cache, options)
    assert info.value.field == field


def test_settings_parse_to_one_hashable_config():
    a = cache_config("DBCache", {"Fn": 4, "max_skips": 2.0, "threshold": 1})
    b = cache_config({"kind": "dbcache", "fn": 4, "max_skips_in_a_row": 2, "threshold": 1.0})
    assert a == b and hash(a) == hash(b) and a.options() == {"threshold": 1.0, "fn": 4, "max_skips_in_a_row": 2}
    assert cache_config("none") is None and cache_config(None) is None and cache_config(a) is a


def test_settings_the_model_cannot_take(tiny):
    model, _, _ = tiny("flux")  # 5 blocks
    with pytest.raises(InvalidArgumentError, match="leaves no middle block.*5 repeated blocks") as info:
        build_cache(CacheConfig("dbcache", fn=3, bn=2), model)
    assert info.value.field == "cache_options.bn"
    with pytest.raises(InvalidArgumentError) as info:
        build_cache(CacheConfig("dbcache", fn=6), model)
    assert info.value.field == "cache_options.fn"
    assert build_cache(CacheConfig("dbcache"), model).fn == 4  # the default F8, on 5 blocks: one middle block left

    class Undeclared(ToyDiT):
        _block_streams = {}
        _teacache = None

    with pytest.raises(Exception, match="_block_streams"):
        build_cache(CacheConfig("dbcache", fn=1), Undeclared())
    with pytest.raises(InvalidArgumentError, match="_teacache"):
        build_cache(CacheConfig("teacache"), Undeclared())


def test_teacache_picks_the_published_fit():
    with torch.device("meta"):
        wan13 = WanTransformer3DModel(WAN_TRANSFORMER_SPECS["wan2.1-t2v-1.3b"])
        tiny_model = WanTransformer3DModel(dataclasses.replace(WAN_TRANSFORMER_SPECS["tiny"], num_layers=2))
    cache = build_cache(CacheConfig("teacache"), wan13)
    d = cache.describe()
    assert d["coefficients"][0] == -5.21862437e04 and d["threshold"] == 0.1 and d["warmup_steps"] == 5
    assert d["coefficients_source"] == "TeaCache fit for Wan2.1-T2V-1.3B" and not cache.warnings()
    unfitted = build_cache(CacheConfig("teacache", threshold=0.2), tiny_model)
    assert unfitted.describe()["coefficients"] == [1.0, 0.0] and "no published" in unfitted.warnings()[0]
    given = build_cache(CacheConfig("teacache", coefficients=(3.0, 1.0)), tiny_model)
    assert given.rescale(0.5) == 2.5 and not given.warnings()


def test_cache_under_layerwise_offload(tiny):
    """Skipped blocks still take their turn in the offload ring (the copies stay in plan); outputs as resident."""
    from diffc.runtime.executor import Executor
    from diffc.runtime.options import RuntimeOptions
    from tests.runtime.test_offload import RecordingStreams

    model, inputs, scale = tiny("wan")
    config = CacheConfig("dbcache", fn=1, bn=1, threshold=100.0, warmup_steps=1, max_skips_in_a_row=1)
    components = {"transformer": model}
    executor = Executor(components, CPU, RuntimeOptions())
    stack = components["transformer"]
    executor.set_cache(config)
    ref = denoise(stack, inputs, 4, scale, stack.cache)
    executor.place("layerwise", prefetch=1, resident_blocks=0, streams=RecordingStreams())
    try:
        executor.set_cache(config)  # equal settings: the same cache stays
        out = denoise(stack, inputs, 4, scale, stack.cache)
        assert torch.equal(out, ref) and stack.cache.describe()["skipped_steps"] == [1, 3]
        assert executor.offload.counters.ring_forwards == 4
        assert stack.layers()[1:] == ["cache dbcache", "placement layerwise", "no cuda graphs"]
        assert executor.describe()["cache"]["forwards"] == {"computed": 2, "skipped": 2}
    finally:
        executor.place("none")
        executor.set_cache(None)
    assert stack.cache is None and executor.describe()["cache"] is None
