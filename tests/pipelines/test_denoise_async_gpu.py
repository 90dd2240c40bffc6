"""The denoising loop never waits on the host: from the second step to the last, no operation synchronizes
with the GPU (``torch.cuda.set_sync_debug_mode("error")`` raises on any), so the host queues the next step's
DiT graph while the current one runs. FLUX.1 (flow-match Euler), Wan2.1 (UniPC, CFG as one batch) and Wan2.2's
two experts.

Run with ``python -m pytest tests/pipelines/test_denoise_async_gpu.py -q`` on a CUDA machine; skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

import diffc

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = {
    "flux": ("flux_checkpoint", "dev-tiny", dict(height=64, width=64)),
    "wan-cfg": ("wan_checkpoint", "base", dict(height=32, width=32, num_frames=5, guidance_scale=5.0)),
    # two experts (boundary 875 of 1000: the switch falls between steps 2 and 3 of 4)
    "wan-a14b": ("wan22_checkpoint", "t2v-a14b", dict(height=32, width=48, num_frames=5, guidance_scale=5.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_steps_after_the_first_never_synchronize(request, case):
    fixture, variant, kw = CASES[case]
    pipe = diffc.load(request.getfixturevalue(fixture)(variant), device="cuda", dtype=torch.bfloat16)
    kw = dict(kw, num_inference_steps=4, seed=3, progress=False)
    pipe.generate("a lighthouse", **kw)  # the CUDA graph captures (a capture synchronizes)
    modes = []

    def strict_between_steps(done: int, total: int) -> None:
        torch.cuda.set_sync_debug_mode("error" if done < total else "default")
        modes.append(torch.cuda.get_sync_debug_mode())

    try:
        pipe.generate("a lighthouse", step_callback=strict_between_steps, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert modes == [2, 2, 2, 0]  # steps 2-4 ran under "error"
    assert sum(stack.graphs.counters.replays for stack in pipe.executor.stacks.values()) >= 4
