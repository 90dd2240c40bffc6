"""Pixels that decode to NaN or inf are named in the output's warnings, per sample, not only seen as a flat image."""

from __future__ import annotations

import numpy as np
import torch

import diffc
from diffc.pipelines import flux, wan
from diffc.pipelines.generic.pipeline import to_uint8
from diffc.pipelines.stages import NON_FINITE, RunContext
from diffc.runtime.perf import PerfRecorder


def _ctx() -> RunContext:
    return RunContext({}, torch.device("cpu"), torch.float32, PerfRecorder(torch.device("cpu")))


def test_a_generation_from_nan_weights_says_so(flux_checkpoint):
    pipe = diffc.load(flux_checkpoint("dev-tiny"))
    kw = dict(height=32, width=32, num_inference_steps=1, max_sequence_length=16, seed=1, progress=False)
    assert not any("NaN" in w for w in pipe.generate("a fox", **kw).warnings)
    with torch.no_grad():
        pipe.components["transformer"].proj_out.weight.fill_(float("nan"))
    out = pipe.generate(["a fox", "a cat"], **kw)
    assert out.warnings == [f"prompt 0 {NON_FINITE}", f"prompt 1 {NON_FINITE}"]
    assert out.sample_warnings == {0: [NON_FINITE], 1: [NON_FINITE]}


def test_only_the_samples_with_non_finite_pixels_are_named():
    ctx = _ctx()
    decoded = torch.zeros(3, 3, 4, 4)
    decoded[1, 2, 3, 0] = float("inf")
    images = flux.postprocess(ctx, {"decoded": decoded})["images"]
    assert len(images) == 3 and ctx.warnings == [f"prompt 1 {NON_FINITE}"] and list(ctx.sample_warnings) == [1]
    ctx = _ctx()
    video = torch.zeros(2, 3, 5, 4, 4)  # (B, 3, F, H, W)
    video[0, 0, 4, 1, 1] = float("nan")
    assert len(wan.postprocess(ctx, {"decoded": video})["videos"]) == 2
    assert ctx.warnings == [f"prompt 0 {NON_FINITE}"]


def test_generic_outputs_report_non_finite_items():
    batch = np.full((2, 4, 4, 3), 0.5, np.float32)
    batch[1, 0, 0, 0] = np.nan
    flags: list[bool] = []
    arrays = to_uint8(batch, "image", flags)
    assert flags == [False, True] and arrays[1][0, 0, 0] == 0 and arrays[0].dtype == np.uint8
