"""Step inputs precomputed for many steps at once: FLUX's adaLN modulation table, ``step_index``, ``StepTable``
and the DiT stack's ``takes`` (when a pipeline may pass a precomputed input)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffc
from diffc.pipelines.denoise import StepTable, step_index
from diffc.runtime.compiled import CompiledDiT
from tests.helpers import psnr_uint8

PROMPT = "a red fox in snow"


def test_step_index_finds_the_loop_elements_without_reading_values():
    timesteps = torch.tensor([900.0, 700.0, 700.0, 100.0])
    assert [step_index(t, timesteps) for t in timesteps] == [0, 1, 2, 3]  # equal values, their own indices
    assert step_index(torch.tensor(700.0), timesteps) is None  # the same value, another tensor
    assert step_index(timesteps[1:3], timesteps) is None  # not one element
    assert step_index(timesteps[2].double(), timesteps) is None  # a copy
    strided = torch.arange(10.0)[::3]
    assert [step_index(t, strided) for t in strided] == [0, 1, 2, 3]
    base = torch.arange(10.0)
    assert step_index(base[1], base[::3]) is None  # between the elements of a strided schedule
    assert step_index(base[9], base[:4]) is None  # past the end


def test_step_table_computes_windows_once():
    timesteps = torch.arange(7.0)
    calls = []

    def compute(first, stop):
        calls.append((first, stop))
        return timesteps[first:stop, None] * 10

    table = StepTable(timesteps, compute, window=3)
    got = [float(table(t)) for t in timesteps]
    assert got == [0, 10, 20, 30, 40, 50, 60]
    assert calls == [(0, 3), (3, 6), (6, 7)]
    assert table(torch.tensor(3.0)) is None and len(calls) == 3  # not a schedule element: the caller computes it
    table(timesteps[4])
    assert calls[-1] == (4, 7)  # a step outside the last window starts a new one there


def _generate(pipe, **kw):
    kw = {"height": 32, "width": 48, "num_inference_steps": 3, "guidance_scale": 3.5, "max_sequence_length": 16, **kw}
    return pipe.generate(PROMPT, seed=5, progress=False, **kw)


def _load_ungraphed(path):
    """The pipeline without CUDA graphs: the forward hooks that count DiT calls see a graph's warm-up and capture
    only, not its replays."""
    return diffc.load(path, cuda_graphs=False)


def _recording(stack):
    seen = []
    hook = stack.module.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("modulation")), with_kwargs=True)
    return seen, hook


@pytest.mark.parametrize("negative", [False, True])
def test_flux_generation_passes_the_precomputed_modulation(flux_checkpoint, negative):
    pipe = _load_ungraphed(flux_checkpoint("dev-tiny"))
    stack = pipe.components["transformer"]
    kw = dict(negative_prompt="blurry", true_cfg_scale=4.0) if negative else {}
    seen, hook = _recording(stack)
    try:
        out = _generate(pipe, **kw)
        assert len(seen) == 3 and all(m is not None for m in seen)
        rows = 2 if negative else 1
        assert all(m.shape == (rows, stack.module.modulation_width) for m in seen)
        assert not torch.equal(seen[0], seen[1])  # one row per step
        seen.clear()
        stack.set_precompute(False)
        plain = _generate(pipe, **kw)
        assert seen == [None] * 3
    finally:
        hook.remove()
        stack.set_precompute(True)
    image, ref = np.asarray(out.images[0]), np.asarray(plain.images[0])
    assert image.std() > 1.0
    assert psnr_uint8(image, ref) >= 50.0
    if torch.cuda.is_available():  # graphs replayed with each step's row (a stale row would show here)
        graphed = diffc.load(flux_checkpoint("dev-tiny"))
        assert graphed.components["transformer"].takes("modulation")
        assert psnr_uint8(np.asarray(_generate(graphed, **kw).images[0]), image) >= 50.0


def test_takes_follows_placement_and_compiled_buckets(flux_checkpoint):
    pipe = _load_ungraphed(flux_checkpoint("dev-tiny"))
    stack = pipe.components["transformer"]
    assert stack.takes("modulation")
    stack.set_compiled(CompiledDiT({}, ["hidden_states=1x24x16:float32,timestep=1:float32"], {}))
    assert not stack.takes("modulation")  # an artifact compiled for calls without it keeps being served
    stack.set_compiled(CompiledDiT({}, ["hidden_states=1x24x16:float32,modulation=1x1632:float32"], {}))
    assert stack.takes("modulation") and not stack.takes("dulation")
    with stack.bare():
        stack.set_precompute(False)
        assert not stack.takes("modulation")
        stack.set_precompute(True)
    stack.set_compiled(None)
    stack.set_placement(object())  # offload: the projection weights are not all on the device
    assert not stack.takes("modulation")
    stack.set_placement(None)
    seen, hook = _recording(stack)
    try:
        stack.set_compiled(CompiledDiT({}, ["hidden_states=1x24x16:float32"], {}))
        _generate(pipe, num_inference_steps=2)
        assert seen == [None, None]
    finally:
        hook.remove()


def test_graphs_of_the_precomputed_form_serve_calls_with_the_conditioning(flux_checkpoint):
    """Compiled where the pipeline precomputes the modulation, run where it cannot (offload, here switched off):
    each block projects its own conditioning in its forward and runs the graph compiled for the projection."""
    pipe = _load_ungraphed(flux_checkpoint("dev-tiny"))
    stack = pipe.components["transformer"]
    report = pipe.compile([{"height": 32, "width": 48, "max_sequence_length": 16}], log=lambda line: None)
    assert all(",modulation=" in f",{b.key}" for b in report.buckets)
    ref = _generate(pipe, num_inference_steps=2)
    seen, hook = _recording(stack)
    stack.set_precompute(False)
    try:
        out = _generate(pipe, num_inference_steps=2)
    finally:
        hook.remove()
        stack.set_precompute(True)
    assert seen == [None, None]
    compiled = out.timings.runtime["compiled"]
    assert compiled["region_fallbacks"] == 0 and compiled["eager_fallbacks"] == 0 and compiled["region_calls"] == 12  # both generations
    assert not out.warnings
    assert psnr_uint8(np.asarray(out.images[0]), np.asarray(ref.images[0])) >= 50.0


def test_modulation_table_only_for_a_schedule_tensor_and_a_dit_that_takes_it():
    from diffc.pipelines.denoise import modulation_table

    class Dit:
        modulation_width = 4

        def modulation(self, timestep, dtype=None):
            return timestep[:, None].expand(-1, 4).to(dtype)

    def inputs(t, steps):
        return {"timestep": t, "dtype": torch.float32}

    table = modulation_table(Dit(), torch.tensor([3.0, 2.0, 1.0]), 2, inputs, torch.float32)
    rows = [table(t) for t in table.timesteps]
    assert [r.shape for r in rows] == [(2, 4)] * 3 and [float(r[1, 0]) for r in rows] == [3.0, 2.0, 1.0]
    assert modulation_table(Dit(), [3.0, 2.0], 1, inputs, torch.float32) is None  # not a tensor
    assert modulation_table(Dit(), torch.zeros(0), 1, inputs, torch.float32) is None
    assert modulation_table(object(), torch.ones(2), 1, inputs, torch.float32) is None  # no modulation
