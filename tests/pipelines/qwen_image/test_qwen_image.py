"""End to end: diffc.load(dir).generate(...) against diffusers' QwenImagePipeline on the same checkpoint and seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffc
from diffc.errors import InvalidArgumentError
from tests.helpers import psnr_uint8

pytest.importorskip("diffusers")

PROMPT = "a red fox in snow"
STAGES = ["encode_prompt", "prepare_latents", "prepare_timesteps", "denoise", "decode", "postprocess"]


def reference(pipe, prompt, seeds, **kw):
    """diffusers' images as uint8 (H, W, 3) arrays."""
    pipe.set_progress_bar_config(disable=True)
    generator = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = pipe(prompt=prompt, generator=generator if len(generator) > 1 else generator[0], output_type="np", **kw).images
    return [(img * 255).round().astype("uint8") for img in out]


@pytest.fixture(scope="module")
def t2i(qwen_checkpoint):
    path, ref = qwen_checkpoint("t2i")
    return path, ref, diffc.load(path, device="cpu")


# (height, width, steps, true CFG with a negative prompt?, max_sequence_length)
CASES = [(32, 48, 2, False, 512), (48, 32, 3, True, 512), (32, 32, 2, True, 4)]


@pytest.mark.parametrize("height,width,steps,cfg,max_len", CASES)
def test_matches_diffusers(t2i, height, width, steps, cfg, max_len):
    path, ref_pipe, pipe = t2i
    kw = dict(height=height, width=width, num_inference_steps=steps, max_sequence_length=max_len)
    extra = dict(negative_prompt=" ", true_cfg_scale=4.0) if cfg else {}
    ref = reference(ref_pipe, PROMPT, [7], **kw, **extra)[0]
    out = pipe.generate(PROMPT, seed=7, progress=False, **kw, **extra)
    image = np.asarray(out.images[0])
    assert image.shape == (height, width, 3)
    assert image.std() > 1.0, "degenerate (flat) image: the parity check would prove nothing"
    assert psnr_uint8(image, ref) >= 40.0
    assert len(out.timings.step_ms) == steps and list(out.timings.stages) == STAGES
    if max_len == 4:
        assert any("kept the first 4" in w for w in out.warnings)


def test_batch_with_padding_mask_matches_diffusers(t2i):
    """Two prompts of different lengths: the shorter one's text is padded and masked in attention."""
    _, ref_pipe, pipe = t2i
    prompts = ["a red fox", "a lighthouse on a cliff at sunset, oil painting"]
    kw = dict(height=32, width=32, num_inference_steps=2, negative_prompt=["blurry", " "], true_cfg_scale=3.0)
    refs = reference(ref_pipe, prompts, [3, 4], **kw)
    out = pipe.generate(prompts, seed=[3, 4], progress=False, **kw)
    for image, ref in zip(out.images, refs):
        assert psnr_uint8(image, ref) >= 40.0
    single = pipe.generate(prompts[0], seed=3, progress=False, **{**kw, "negative_prompt": "blurry"})
    assert psnr_uint8(single.images[0], out.images[0]) >= 40.0


def test_guidance_scale_stands_for_true_cfg_scale(t2i):
    _, _, pipe = t2i
    kw = dict(height=32, width=32, num_inference_steps=2, negative_prompt=" ", seed=1, progress=False)
    a = pipe.generate(PROMPT, guidance_scale=2.5, **kw).images[0]
    b = pipe.generate(PROMPT, true_cfg_scale=2.5, **kw).images[0]
    c = pipe.generate(PROMPT, true_cfg_scale=1.0, **kw)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c.images[0]))
    assert any("negative_prompt is ignored" in w for w in c.warnings)


@pytest.mark.parametrize("kwargs,field", [
    (dict(height=40), "height"),
    (dict(width=20), "width"),
    (dict(true_cfg_scale=-1.0), "true_cfg_scale"),
    (dict(max_sequence_length=5000), "max_sequence_length"),
    (dict(num_frames=5), "num_frames"),
    (dict(num_inference_steps=1), "num_inference_steps"),
])
def test_bad_requests_name_the_field(t2i, kwargs, field):
    _, _, pipe = t2i
    with pytest.raises(InvalidArgumentError, match=rf"^{field}: "):
        pipe.resolve(prompt=PROMPT, **kwargs)


def test_image_is_refused_by_text_to_image(t2i):
    from PIL import Image

    _, _, pipe = t2i
    with pytest.raises(InvalidArgumentError, match="^image: QwenImagePipeline does not take an input image"):
        pipe.resolve(prompt=PROMPT, image=Image.new("RGB", (32, 32)))


def test_true_cfg_scale_is_refused_by_families_without_it(zimage_checkpoint):
    pipe = diffc.load(zimage_checkpoint(), device="cpu")  # Z-Image's CFG is guidance_scale with a negative prompt
    with pytest.raises(InvalidArgumentError, match="^true_cfg_scale: ZImagePipeline has no true classifier-free"):
        pipe.resolve(prompt=PROMPT, true_cfg_scale=4.0)


def test_prompt_lengths_match_the_dit_and_compile_for_any_prompt(t2i):
    """Qwen-Image pads prompt states to a multiple of 128: the spec's token count agrees with the DiT's text
    length, and compiling every length (``prompt_lengths``) leaves no prompt running eagerly."""
    from diffc.compile import prompt_lengths
    from diffc.compile.pipeline import capture_inputs

    _, _, pipe = t2i
    assert prompt_lengths.lengths(pipe, 512) == [128, 256, 384, 512]
    assert prompt_lengths.lengths(pipe, 100) == [128]
    long = " ".join(["lighthouse"] * 150)
    assert prompt_lengths.prompt_length(pipe, long, 256) == 256
    for prompt in ("a fox", long):
        inputs = capture_inputs(pipe, {"height": 32, "width": 32, "max_sequence_length": 512, "prompt": [prompt]})
        assert inputs["transformer"]["encoder_hidden_states"].shape[1] == prompt_lengths.prompt_length(pipe, prompt, 512)
    fresh = diffc.load(pipe.source, device="cpu")
    report = fresh.compile([{"height": 32, "width": 32, "max_sequence_length": 256, "prompt_lengths": "all"}],
                           log=lambda line: None)
    assert [b.request["prompt_length"] for b in report.buckets] == [128, 256]
    counters = fresh.executor.compiled().counters
    fresh.generate(long, height=32, width=32, max_sequence_length=256, num_inference_steps=2, seed=1, progress=False)
    assert counters.compiled_calls == 2 and counters.eager_fallbacks == 0


def test_generation_passes_one_precomputed_modulation_row_a_step(t2i):
    """Both guided calls of a step get the same precomputed row; the images equal those computed without it."""
    _, _, pipe = t2i
    stack = pipe.components["transformer"]
    seen = []
    hook = stack.module.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("modulation")), with_kwargs=True)
    kw = dict(height=32, width=32, num_inference_steps=2, negative_prompt=" ", true_cfg_scale=4.0)
    try:
        out = pipe.generate(["a red fox", "a cat"], seed=[1, 2], progress=False, **kw)
        assert len(seen) == 4 and all(m is not None and m.shape == (1, stack.module.modulation_width) for m in seen)
        assert seen[0] is seen[1] and not torch.equal(seen[1], seen[2])
        seen.clear()
        stack.set_precompute(False)
        plain = pipe.generate(["a red fox", "a cat"], seed=[1, 2], progress=False, **kw)
        assert seen == [None] * 4
    finally:
        hook.remove()
        stack.set_precompute(True)
    for image, ref in zip(out.images, plain.images):
        assert psnr_uint8(np.asarray(image), np.asarray(ref)) >= 50.0


def test_vae_latent_statistics_are_checked_before_any_work(t2i, monkeypatch):
    """A latents_std of 0 scaled the latents by 1 / 0 at the decode, after the whole denoising."""
    import dataclasses

    from diffc.errors import CheckpointError

    _, _, pipe = t2i
    vae = pipe.components["vae"]
    monkeypatch.setattr(vae, "config", dataclasses.replace(vae.config, latents_std=(1.0,) * 15 + (0.0,)))
    with pytest.raises(CheckpointError, match=r"latents_std holds 0 \(channel 15\)"):
        pipe.resolve(prompt=PROMPT, height=32, width=32)


def test_a_text_encoder_or_vae_of_another_width_is_refused_before_any_work(t2i, monkeypatch):
    import dataclasses

    from diffc.errors import CheckpointError

    _, _, pipe = t2i
    text = pipe.components["text_encoder"].config.text_config
    monkeypatch.setattr(text, "hidden_size", 48)
    with pytest.raises(CheckpointError, match=r"^QwenImagePipeline: text_encoder's width \(hidden_size\) is 48 but "
                                              r"the transformer's joint_attention_dim is 32"):
        pipe.resolve(prompt=PROMPT, height=32, width=32)
    monkeypatch.setattr(text, "hidden_size", 32)
    vae = pipe.components["vae"]
    monkeypatch.setattr(vae, "config", dataclasses.replace(vae.config, z_dim=4, latents_mean=(0.0,) * 4,
                                                           latents_std=(1.0,) * 4))
    with pytest.raises(CheckpointError, match=r"4 x the vae's z_dim is 16 but the transformer's in_channels is 64"):
        pipe.resolve(prompt=PROMPT, height=32, width=32)
