"""``generate(cache=..., cache_options=...)`` on tiny FLUX and Wan pipelines: threshold 0 changes no pixel,
every generation starts from an empty cache and reports it per step, the cache is reused while the
settings stay and removed when a call asks for none, Wan's CFG pair is one decision per step, and bad
settings are refused before any work."""

from __future__ import annotations

import numpy as np
import pytest

import diffc
from diffc.errors import InvalidArgumentError

FLUX = dict(height=32, width=32, num_inference_steps=3, seed=3, progress=False)
WAN = dict(height=32, width=32, num_frames=5, num_inference_steps=3, seed=3, progress=False, guidance_scale=5.0)
SKIPPING = {"threshold": 100.0, "warmup_steps": 1, "max_skips": 1}


@pytest.fixture(scope="module")
def flux(flux_checkpoint):
    pipe = diffc.load(flux_checkpoint("dev-tiny"), device="cpu")
    pipe.reference = pipe.generate("a red fox", **FLUX)
    return pipe


@pytest.fixture(scope="module")
def wan(wan_checkpoint):
    return diffc.load(wan_checkpoint("base"), device="cpu")


def pixels(out) -> np.ndarray:
    return np.asarray(out.images[0]) if out.images is not None else out.videos[0]


def test_threshold_zero_changes_no_pixel_and_reports_each_step(flux):
    ref = flux.reference
    assert ref.timings.runtime["cache"] is None
    out = flux.generate("a red fox", cache="dbcache", cache_options={"fn": 1, "bn": 1, "threshold": 0,
                                                                     "warmup_steps": 0}, **FLUX)
    assert np.array_equal(pixels(out), pixels(ref))
    report = out.timings.runtime["cache"]
    assert report == out.timings.runtime["dit"]["transformer"]["cache"]
    assert report["kind"] == "dbcache" and report["blocks"] == {"first": 1, "middle": 1, "last": 1}
    assert report["forwards"] == {"computed": 3, "skipped": 0} and report["middle_blocks"]["skipped"] == 0
    assert [(s["step"], s["computed"], s["skipped"]) for s in report["steps"]] == [(i, 1, 0) for i in range(3)]
    assert report["steps"][0]["diffs"] == [None] and all(s["diffs"][0] >= 0 for s in report["steps"][1:])


def test_each_generation_starts_empty_and_the_cache_goes_when_not_asked_for(flux):
    ref = flux.reference
    stack = flux.components["transformer"]
    first = flux.generate("a red fox", cache="fbcache", cache_options=SKIPPING, **FLUX)
    cache = stack.cache
    second = flux.generate("a red fox", cache="fbcache", cache_options=dict(SKIPPING), **FLUX)
    assert stack.cache is cache and not cache.active and not cache.branches  # reused, emptied after the call
    assert np.array_equal(pixels(first), pixels(second)) and not np.array_equal(pixels(first), pixels(ref))
    for out in (first, second):
        assert out.timings.runtime["cache"]["skipped_steps"] == [1]
        assert out.timings.runtime["cache"]["forwards"] == {"computed": 2, "skipped": 1}
    flux.generate("a red fox", cache="teacache", cache_options={"threshold": 0.5}, **dict(FLUX, num_inference_steps=1))
    assert stack.cache is not cache and stack.cache.kind == "teacache"
    plain = flux.generate("a red fox", **FLUX)
    assert stack.cache is None and np.array_equal(pixels(plain), pixels(ref))
    assert "cache" not in " ".join(stack.layers())


def test_wan_cfg_pair_is_one_forward_and_one_decision_per_step(wan):
    ref = wan.generate("a boat", **WAN)
    out = wan.generate("a boat", cache="dbcache", cache_options={"fn": 1, "bn": 0, **SKIPPING}, **WAN)
    report = out.timings.runtime["cache"]
    assert report["forwards"] == {"computed": 2, "skipped": 1} and report["skipped_steps"] == [1]
    assert all(len(s["diffs"]) == 1 for s in report["steps"])  # one batch-2 forward per step
    assert pixels(out).shape == pixels(ref).shape and not np.array_equal(pixels(out), pixels(ref))
    zero = wan.generate("a boat", cache="teacache", cache_options={"threshold": 0}, **WAN)
    assert np.array_equal(pixels(zero), pixels(ref))
    assert any("no published rescaling fit" in w for w in zero.warnings)


@pytest.mark.parametrize("cache,options,field", [
    ("dbcache", {"fn": 3}, "cache_options.fn"),
    ("dbcache", {"fn": 1, "bn": 2}, "cache_options.bn"),
    ("dbcache", {"threshold": "high"}, "cache_options.threshold"),
    ("lazycache", None, "cache"),
    (None, {"fn": 1}, "cache_options"),
])
def test_bad_settings_are_refused_before_any_work(flux, cache, options, field):
    calls = flux.executor.stacks["transformer"].cache
    with pytest.raises(InvalidArgumentError) as info:
        flux.generate("a red fox", cache=cache, cache_options=options, **FLUX)
    assert info.value.field == field
    assert flux.executor.stacks["transformer"].cache is calls  # nothing installed


@pytest.mark.parametrize("config,field,fragment", [
    (dict(kind="bogus"), "cache", "'bogus' is not a step cache"),
    (dict(kind="fbcache", threshold=float("nan")), "cache.threshold", "must be a number from 0 to 100, got nan"),
    (dict(kind="fbcache", threshold=-5.0), "cache.threshold", "got -5.0"),
    (dict(kind="fbcache", warmup_steps=-3), "cache.warmup_steps", "must be an integer from 0"),
    (dict(kind="fbcache", threshold="x"), "cache.threshold", "got 'x'"),
    (dict(kind="fbcache", fn=2), "cache.fn", "is not an option of fbcache"),
])
def test_a_cache_config_object_is_checked_as_its_settings_by_name_are(flux, config, field, fragment):
    """``generate(cache=CacheConfig(...))`` (its docstring offers it) took any value: a KeyError, or NaN echoed."""
    from diffc.runtime.cache import CacheConfig

    with pytest.raises(InvalidArgumentError, match=fragment) as info:
        flux.generate("a red fox", cache=CacheConfig(**config), **FLUX)
    assert info.value.field == field
    out = flux.generate("a red fox", cache=CacheConfig("fbcache", threshold=0.0), **FLUX)
    assert np.array_equal(pixels(out), pixels(flux.reference))


def test_zimage_takes_a_block_cache(zimage_checkpoint):
    """Three regions, one stream each (image tokens, caption tokens, both joined): threshold 0 changes no pixel,
    a skipping threshold skips (with CFG too); TeaCache has no fit for it and says so."""
    pipe = diffc.load(zimage_checkpoint("tiny"), device="cpu")
    kw = dict(height=32, width=32, num_inference_steps=4, seed=3, progress=False)
    for extra in ({}, {"guidance_scale": 4.0, "negative_prompt": "blurry"}):
        ref = pipe.generate("a fox", **kw, **extra)
        zero = pipe.generate("a fox", cache="dbcache", cache_options={"fn": 1, "bn": 1, "threshold": 0,
                                                                      "warmup_steps": 0}, **kw, **extra)
        assert np.array_equal(pixels(zero), pixels(ref))
        out = pipe.generate("a fox", cache="fbcache", cache_options=SKIPPING, **kw, **extra)
        report = out.timings.runtime["cache"]
        assert report["forwards"] == {"computed": 2, "skipped": 2} and report["skipped_steps"] == [1, 3]
        assert not np.array_equal(pixels(out), pixels(ref))
    with pytest.raises(InvalidArgumentError, match="does not declare \\(_teacache\\); use dbcache or fbcache"):
        pipe.generate("a fox", cache="teacache", **kw)


def test_a_model_without_block_streams_says_it_takes_no_step_cache(flux, monkeypatch):
    from diffc.runtime.dit_stack import unwrap

    monkeypatch.setattr(type(unwrap(flux.components["transformer"])), "_block_streams", {})
    with pytest.raises(InvalidArgumentError, match=r"this model \(FluxTransformer2DModel\) does not support a step "
                                                   r"cache yet; run it without one") as info:
        flux.generate("a red fox", cache="fbcache", **FLUX)
    assert info.value.field == "cache"
