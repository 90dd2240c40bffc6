"""The compiler on the generic backend's diffusers transformer, region by region: ``diffc compile`` writes an
artifact that ``diffc run --compiled`` loads; lossless gives the eager pixels, fast fuses every pass each
block contains."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import diffc
from diffc.cli.main import main
from tests.generic_pipelines import REQUESTS
from tests.helpers import psnr_uint8

# Regions of the tiny HunyuanVideo DiT (from its _repeated_blocks) and the block class each holds; their
# counts are the per-block ones of tests/compile/test_diffusers_blocks.py.
HUNYUAN_REGIONS = {"transformer_blocks": "HunyuanVideoTransformerBlock",
                   "single_transformer_blocks": "HunyuanVideoSingleTransformerBlock",
                   "x_embedder": "HunyuanVideoPatchEmbed", "context_embedder": "HunyuanVideoTokenRefiner"}


def test_compile_cli_then_run_compiled_is_lossless(generic_checkpoint, tmp_path, capsys):
    ckpt, art = generic_checkpoint("sd3"), tmp_path / "sd3.diffc"
    assert main(["compile", "--model", str(ckpt), "--height", "32", "--width", "32", "--guidance", "4.0",
                 "--max-sequence-length", "16", "--quality", "lossless", "--device", "cpu", "--out", str(art)]) == 0
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["model"]["pipeline_class"] == "StableDiffusion3Pipeline"
    assert manifest["passes"]["tier"] == "lossless"
    outs = []
    for extra in ([], ["--compiled", str(art)]):
        out, perf = tmp_path / f"cat{len(outs)}.png", tmp_path / f"perf{len(outs)}.json"
        assert main(["run", "--model", str(ckpt), "--prompt", "a calico cat", "--height", "32", "--width", "32",
                     "--steps", "2", "--guidance", "4.0", "--seed", "3", "--max-sequence-length", "16", "--no-progress",
                     "--device", "cpu", "--output", str(out), "--perf-dump-path", str(perf), *extra]) == 0
        outs.append((np.asarray(Image.open(out)), json.loads(perf.read_text())))
    (eager, _), (compiled, dump) = outs
    assert np.array_equal(eager, compiled)
    assert dump["runtime"]["compiled"] is not None
    capsys.readouterr()


def test_fast_tier_compiles_every_region_of_the_diffusers_dit(generic_checkpoint, monkeypatch):
    import diffc.runtime.dit_stack as dit_stack_module
    from tests.compile.test_diffusers_blocks import EXPECTED, PASSES
    from tests.runtime.test_cudagraphs import EmulatedGraphs

    from diffc.compile.passes import key_padding

    # the joint blocks' prompt-padding mask is lowered from MIN_KEYS keys on: here, at any length
    monkeypatch.setattr(key_padding, "MIN_KEYS", 0)
    pipe = diffc.load(generic_checkpoint("hunyuan"), device="cpu")
    request = {k: v for k, v in REQUESTS["hunyuan"].items() if k != "num_inference_steps"}
    eager = pipe.generate("waves at sunset", seed=5, progress=False, **REQUESTS["hunyuan"]).frames
    report = pipe.compile([request], log=lambda line: None)
    (bucket,) = report.buckets
    masked = {"transformer_blocks": 1, "single_transformer_blocks": 1}
    assert {r.region: {k: r.matches[k] for k in PASSES} for r in bucket.regions} == \
        {name: {**EXPECTED["hunyuan", cls], "key_padding_attention": masked.get(name, 0)}
         for name, cls in HUNYUAN_REGIONS.items()}
    assert bucket.rel_err_vs_eager < 1e-4
    out = pipe.generate("waves at sunset", seed=5, progress=False, **REQUESTS["hunyuan"])
    assert out.timings.runtime["compiled"] is not None and out.timings.runtime["generic"]["backend"] == "diffusers"
    assert psnr_uint8(out.frames, eager) >= 35.0
    # the blocks' attention over the keys the prompt's padding mask keeps reads the mask on the host: no CUDA
    # graphs, said so, even when asked for
    monkeypatch.setattr(dit_stack_module, "CudaGraphModule", EmulatedGraphs)
    pipe.executor.set_cuda_graphs(True)
    again = pipe.generate("waves at sunset", seed=5, progress=False, **REQUESTS["hunyuan"])
    assert np.array_equal(again.frames, out.frames)
    assert again.timings.runtime["cuda_graphs"] == {
        "enabled": False, "reason": "the compiled graphs of single_transformer_blocks, transformer_blocks read the "
        "attention mask on the host (attention over the keys a padding mask keeps), which a CUDA graph cannot capture"}
    pipe.executor.set_cuda_graphs(None)


def test_blocks_built_differently_get_their_own_region(generic_pipe):
    """SD3's last joint block has no text output (context_pre_only): it cannot share the others' graph."""
    from diffc.models.structure import dit_regions

    regions = dit_regions(generic_pipe("sd3").components["transformer"].module)
    assert [(r.name, len(r.blocks)) for r in regions] == [("transformer_blocks[0:1]", 1), ("transformer_blocks[1:2]", 1)]
    assert regions[1].blocks[0].context_pre_only and not regions[0].blocks[0].context_pre_only


def test_the_diffusers_vae_decodes_with_fused_group_norms(generic_checkpoint):
    """What a compiled generic pipeline does to its diffusers VAE on a GPU (``Executor.set_fused_vae``): its plain
    group norms run ``diffc::group_norm`` (same modules, same state dict), its output stays within float32
    rounding; off again, it is the eager VAE, bit for bit. The zero-latent warm-up decodes through them."""
    import torch

    from diffc.compile.pipeline import capture_inputs, warm_vae_kernels
    from diffc.models.vae_blocks import FusedGroupNorm, uses_fused_vae
    from diffc.ops.registry import COUNTERS, kernel_runs_on

    if not kernel_runs_on(torch.device("cpu")):
        pytest.skip("the fused kernels run on a GPU or under TRITON_INTERPRET=1 (as CI runs the tests)")
    pipe = diffc.load(generic_checkpoint("sd3"), device="cpu")
    vae = pipe.components["vae"]
    keys = list(vae.state_dict())
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in vae.decoder.modules())
    z = torch.randn(1, vae.config.latent_channels, 5, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = vae.decode(z).sample
    pipe.executor.set_fused_vae(True)
    assert uses_fused_vae(vae) and list(vae.state_dict()) == keys
    COUNTERS.reset()
    with torch.no_grad():
        fused = vae.decode(z).sample
    assert COUNTERS.kernel_launches == norms > 0
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5)
    pipe.executor.set_fused_vae(False)
    assert not any(type(m) is FusedGroupNorm for m in vae.modules())
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample, eager)
    request = {"height": 32, "width": 32, "max_sequence_length": 16}
    inputs = capture_inputs(pipe, request)
    COUNTERS.reset()
    assert warm_vae_kernels(pipe, request, inputs, force=True)
    assert COUNTERS.kernel_launches == norms and not uses_fused_vae(vae)  # warmed through them, the setting kept


def test_hunyuan_video_vae_pads_its_causal_convolutions_with_diffc_copies(generic_checkpoint):
    """The HunyuanVideo VAE's causal convolutions pad with ``replicate_pad`` once fused (torch's replication-pad
    kernel was 800 ms of a 3 s decode): same modules and state dict, the decode the same bit for bit; off again,
    diffusers' own classes. A convolution whose ``pad_mode`` is not "replicate" keeps diffusers' forward."""
    import pickle

    import torch
    import torch.nn.functional as F

    from diffc.models import vae_blocks
    from diffc.models.vae_blocks import fuse_causal_convs, has_fused_path, uses_fused_vae

    vae = diffc.load(generic_checkpoint("hunyuan"), device="cpu").components["vae"]
    convs = [m for m in vae.modules() if type(m).__name__ == "HunyuanVideoCausalConv3d"]
    classes, keys = {type(m) for m in convs}, list(vae.state_dict())
    assert convs and has_fused_path(vae) and not uses_fused_vae(vae)
    z = torch.randn(1, vae.config.latent_channels, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        eager = vae.decode(z).sample
        assert fuse_causal_convs(vae, True) == len(convs)
        assert uses_fused_vae(vae) and list(vae.state_dict()) == keys
        assert all(type(m).__name__ == "FusedHunyuanVideoCausalConv3d" and isinstance(m, tuple(classes)) for m in convs)
        calls = []
        real = vae_blocks.replicate_pad

        def counting(x, pad):
            calls.append(pad)
            return real(x, pad)

        vae_blocks.replicate_pad = counting
        try:
            fused = vae.decode(z).sample
            convs[0].pad_mode = "constant"  # diffusers' forward: F.pad(mode="constant")
            x = torch.randn(1, convs[0].conv.in_channels, 2, 3, 3)
            assert torch.equal(convs[0](x), convs[0].conv(F.pad(x, convs[0].time_causal_padding)))
            convs[0].pad_mode = "replicate"
        finally:
            vae_blocks.replicate_pad = real
        decoder = [tuple(m.time_causal_padding) for m in vae.decoder.modules() if m in convs]
        assert sorted(calls) == sorted(decoder) and (1, 1, 1, 1, 2, 0) in calls  # each once a decode
        assert torch.equal(fused, eager)
        copied = pickle.loads(pickle.dumps(vae))  # the fused class is found by name, like any module class
        assert torch.equal(copied.decode(z).sample, eager) and uses_fused_vae(copied)
        assert fuse_causal_convs(vae, False) == 0 and {type(m) for m in convs} == classes
        assert torch.equal(vae.decode(z).sample, eager)


@pytest.mark.parametrize("name", ["hunyuan", "cogvideox"])
def test_video_autoencoders_fuse_their_group_norms_too(name, generic_checkpoint):
    """The generic backend's video VAEs normalise 5-D maps: the fused group norms read them as (batch, channels,
    pixels); the decode stays within float32 rounding of the eager one."""
    import torch

    from diffc.models.vae_blocks import has_fused_path, set_fused_vae
    from diffc.ops.registry import COUNTERS, kernel_runs_on

    if not kernel_runs_on(torch.device("cpu")):
        pytest.skip("the fused kernels run on a GPU or under TRITON_INTERPRET=1 (as CI runs the tests)")
    vae = diffc.load(generic_checkpoint(name), device="cpu").components["vae"]
    assert has_fused_path(vae)
    z = torch.randn(1, vae.config.latent_channels, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eager = vae.decode(z).sample
        set_fused_vae(vae, True)
        COUNTERS.reset()
        fused = vae.decode(z).sample
        set_fused_vae(vae, False)
    assert COUNTERS.kernel_launches > 0
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5)
