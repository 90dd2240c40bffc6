"""The generic backend's runtime layers on a CUDA GPU: real CUDA graph captures of each tiny diffusers
transformer, and offload's pinned host copies, give the pixels of the plain resident run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffc
from tests.generic_pipelines import REQUESTS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NAMES = ("sd3", "hunyuan", "ltx", "cogvideox")


def _output(pipe, name: str) -> tuple[np.ndarray, dict]:
    out = pipe.generate("a lighthouse at dusk", seed=4, progress=False, **REQUESTS[name])
    return (np.asarray(out.images[0]) if out.images else out.frames), out.timings.runtime


@pytest.mark.parametrize("name", NAMES)
def test_cuda_graphs_and_offload_give_the_resident_pixels(name, generic_checkpoint):
    root = generic_checkpoint(name)
    plain = diffc.load(root, device="cuda", dtype="float32", cuda_graphs=False)
    reference, runtime = _output(plain, name)
    assert runtime["cuda_graphs"] == {"enabled": False, "reason": "turned off"}
    del plain
    graphs = diffc.load(root, device="cuda", dtype="float32")  # graphs on by default on a GPU
    outs = [_output(graphs, name) for _ in range(2)]
    described = outs[-1][1]["cuda_graphs"]
    assert described["enabled"] and described["captures"] == 1 and described["replays"] > 0, described
    assert described["fallbacks"] == 0 and not described["failed_captures"], described
    assert all(np.array_equal(o, reference) for o, _ in outs)
    del graphs
    for mode in ("layerwise", "model"):
        pipe = diffc.load(root, device="cuda", dtype="float32", offload=mode,
                          **({"resident_blocks": 0} if mode == "layerwise" else {}))
        for _ in range(2):
            out, runtime = _output(pipe, name)
            assert np.array_equal(out, reference), mode
        assert runtime["offload"]["mode"] == mode
        del pipe
        torch.cuda.empty_cache()


@pytest.mark.parametrize("name", ["sd3", "hunyuan"])
def test_compiled_pipeline_decodes_with_fused_group_norms(name, generic_checkpoint, tmp_path):
    """A compiled generic pipeline on a GPU (the fast tier) swaps its diffusers VAE's plain group norms for
    ``FusedGroupNorm``: the kernels run in the decode, whose output stays within bf16 rounding of torch's group
    norms (the same compiled DiT); ``diffc compile`` ships a 2-D VAE's kernels in the artifact."""
    from diffc.models.vae_blocks import FusedGroupNorm
    from diffc.ops.registry import COUNTERS

    request = {k: v for k, v in REQUESTS[name].items() if k != "num_inference_steps"}
    pipe = diffc.load(generic_checkpoint(name), device="cuda", dtype="bf16")
    pipe.compile([request], out=str(tmp_path / "art"), log=lambda _line: None)
    vae = pipe.components["vae"]
    assert any(type(m) is FusedGroupNorm for m in vae.modules())
    if name == "sd3":
        names = {p.name.split(".")[0] for p in (tmp_path / "art").rglob("*.json")}
        assert {"group_norm_partials_kernel", "group_norm_apply_kernel"} <= names
    COUNTERS.reset()
    fused, _ = _output(pipe, name)
    assert COUNTERS.kernel_launches > 0
    pipe.executor.set_fused_vae(False)
    assert not any(type(m) is FusedGroupNorm for m in vae.modules())
    plain, _ = _output(pipe, name)
    diff = np.abs(fused.astype(np.float32) - plain.astype(np.float32))
    scale = 255.0 if fused.dtype == np.uint8 else 1.0
    assert diff.mean() < 0.01 * scale and diff.max() < 0.1 * scale, (diff.mean(), diff.max())
