"""``warm_vae_kernels``: a compiled pipeline's fused VAE kernels (Wan, Qwen-Image, FLUX.1) are built (and cuDNN
planned) before the first generation, by ``diffc compile`` into the artifact and by the warm-up at load; the VAE's
fused setting is kept."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import diffc
from diffc.compile.pipeline import capture_inputs, warm_vae_kernels
from diffc.demo import demo_checkpoint
from diffc.ops.registry import COUNTERS, kernel_runs_on


def _fused(vae) -> set:
    return {m.fused_kernels for m in vae.modules() if hasattr(m, "fused_kernels")}


def test_warm_vae_kernels_decodes_two_frames_with_the_fused_kernels():
    if not kernel_runs_on(torch.device("cpu")):
        pytest.skip("the fused kernels run on a GPU or under TRITON_INTERPRET=1 (as CI runs the tests)")
    pipe = diffc.load(demo_checkpoint("wan"))
    vae = pipe.components["vae"]
    request = {"height": 16, "width": 16, "num_frames": 5, "max_sequence_length": 8}
    inputs = capture_inputs(pipe, request)
    assert not warm_vae_kernels(pipe, request, inputs)  # a CPU pipeline decodes as diffusers does: nothing to warm
    calls = _record_decodes(vae)
    COUNTERS.reset()
    assert warm_vae_kernels(pipe, request, inputs, force=True)
    assert calls == [((1, 16, 2, 2, 2), {True})] and COUNTERS.kernel_launches > 0
    assert _fused(vae) == {False}  # the setting it found



def test_warm_vae_kernels_decodes_one_image_for_a_2d_vae():
    """FLUX.1's VAE (a 2-D AutoencoderKL) warms its fused group norms on (1, latent_channels, h, w) zeros of the
    request's size; the VAE's fused setting is kept."""
    if not kernel_runs_on(torch.device("cpu")):
        pytest.skip("the fused kernels run on a GPU or under TRITON_INTERPRET=1 (as CI runs the tests)")
    flux = diffc.load(demo_checkpoint("flux"))
    vae = flux.components["vae"]
    request = {"height": 32, "width": 48, "max_sequence_length": 8}
    inputs = capture_inputs(flux, request)
    calls = _record_decodes(vae)
    COUNTERS.reset()
    assert warm_vae_kernels(flux, request, inputs, force=True)
    f = vae.spatial_compression_ratio
    assert calls == [((1, vae.config.latent_channels, 32 // f, 48 // f), {True})] and COUNTERS.kernel_launches > 0
    assert _fused(vae) == {False}


def _record_decodes(vae) -> list:
    calls = []
    vae.decode = lambda z, **kw: calls.append((tuple(z.shape), _fused(vae))) or type(vae).decode(vae, z, **kw)
    return calls


def test_image_pipelines_warm_one_frame_of_the_request_size():
    """Qwen-Image's VAE is a Wan VAE, its DiT reads packed tokens: the latent size comes from the request (or the
    pipeline's default size)."""
    from diffc.models.qwen_image.vae import QWEN_IMAGE_VAE_SPECS, AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage(QWEN_IMAGE_VAE_SPECS["tiny"])
    vae.set_fused_kernels = lambda enabled: None  # the decode itself is the Wan VAE's, tested above
    pipe = SimpleNamespace(components={"vae": vae}, device=torch.device("cpu"),
                           spec=SimpleNamespace(defaults={"height": 64, "width": 48}))
    packed = {"transformer": {"hidden_states": torch.zeros(1, 16, 64)}}
    calls = _record_decodes(vae)
    assert warm_vae_kernels(pipe, {"height": 32, "width": None}, packed, force=True)
    assert warm_vae_kernels(pipe, {}, packed, force=True)
    assert calls == [((1, 16, 1, 4, 6), {False}), ((1, 16, 1, 8, 6), {False})]
    assert not warm_vae_kernels(pipe, {"height": 4}, packed, force=True)  # smaller than one latent pixel


# name -> (bucket, the VAE kernels the artifact ships, the first output's shape as an array)
GPU_CASES = {
    "wan": ({"height": 32, "width": 32, "num_frames": 5, "max_sequence_length": 8},
            {"channel_rms_norm_silu_kernel", "channel_bias_residual_kernel"}, (5, 32, 32, 3)),
    "flux": ({"height": 64, "width": 64, "max_sequence_length": 8},
             {"group_norm_partials_kernel", "group_norm_stats_kernel", "group_norm_apply_kernel"}, (64, 64, 3)),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(GPU_CASES))
def test_compiled_pipeline_ships_and_runs_the_fused_vae_on_a_gpu(name, tmp_path):
    """On a GPU: ``compile`` writes the VAE kernels into the artifact (Wan's norm kernels, FLUX.1's group norms),
    installing the DiT fuses the VAE, the warm-up at load decodes once, and a generation decodes with the fused
    kernels."""
    import numpy as np

    bucket, kernels, shape = GPU_CASES[name]
    pipe = diffc.load(demo_checkpoint(name), device="cuda", dtype="bf16")
    pipe.compile([bucket], out=str(tmp_path / "art"), log=lambda _line: None)
    names = {p.name.split(".")[0] for p in (tmp_path / "art").rglob("*.json")}
    assert kernels <= names
    assert _fused(pipe.components["vae"]) == {True}
    fresh = diffc.load(demo_checkpoint(name), device="cuda", dtype="bf16")
    fresh.load_compiled(str(tmp_path / "art"))
    assert fresh.warmup_report["vae_decodes"] == 1 and _fused(fresh.components["vae"]) == {True}
    COUNTERS.reset()
    out = fresh.generate("a kite", num_inference_steps=2, progress=False, **bucket)
    first = out.videos[0] if out.videos is not None else np.asarray(out.images[0])
    assert COUNTERS.kernel_launches > 0 and first.shape == shape
