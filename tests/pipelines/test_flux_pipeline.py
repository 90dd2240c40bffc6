"""End to end: diffc.load(dir).generate(...) against diffusers.FluxPipeline on the same checkpoint and seed."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import diffc
from diffc.errors import InvalidArgumentError
from tests.helpers import psnr_uint8, rel_err

PROMPT = "a red fox in snow"

# (variant, sharded, height, width, steps, guidance, max_sequence_length)
CASES = [
    ("dev-tiny", False, 48, 64, 3, 3.5, 32),
    ("dev-tiny", True, 32, 32, 2, 5.0, 512),
    ("schnell-odd", False, 36, 20, 4, 0.0, 16),
    ("dev-wide", True, 64, 40, 2, 1.0, 24),
]


def _diffusers_images(ckpt, prompt, seeds, **kw):
    import diffusers

    ref = diffusers.FluxPipeline.from_pretrained(ckpt)
    ref.set_progress_bar_config(disable=True)
    generator = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = ref(prompt, generator=generator if len(generator) > 1 else generator[0], output_type="np", **kw).images
    return [(img * 255).round().astype("uint8") for img in out]


@pytest.mark.parametrize("variant,sharded,height,width,steps,guidance,max_len", CASES)
def test_matches_diffusers(flux_checkpoint, variant, sharded, height, width, steps, guidance, max_len):
    ckpt = flux_checkpoint(variant, sharded=sharded)
    kw = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=max_len)
    ref = _diffusers_images(ckpt, PROMPT, [11], **kw)[0]
    out = diffc.load(ckpt, device="cpu").generate(PROMPT, seed=11, progress=False, **kw)
    image = np.asarray(out.images[0])
    assert image.shape == (height, width, 3) and image.dtype == np.uint8
    assert image.std() > 1.0, "degenerate (flat) image: the parity check would prove nothing"
    assert psnr_uint8(image, ref) >= 40.0
    assert out.seeds == [11]
    assert len(out.timings.step_ms) == steps
    assert list(out.timings.stages) == ["encode_prompt", "prepare_latents", "prepare_timesteps", "denoise", "decode", "postprocess"]


def test_batch_with_one_seed_per_prompt_matches_diffusers(flux_checkpoint):
    ckpt = flux_checkpoint("dev-tiny")
    prompts = ["a red fox in snow", "a calico cat playing piano"]
    kw = dict(height=32, width=48, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=16)
    refs = _diffusers_images(ckpt, prompts, [3, 4], **kw)
    out = diffc.load(ckpt).generate(prompts, seed=[3, 4], progress=False, **kw)
    assert len(out.images) == 2
    for image, ref in zip(out.images, refs):
        assert psnr_uint8(image, ref) >= 40.0
    # each sample is what a batch of one with that seed gives
    single = diffc.load(ckpt).generate(prompts[1], seed=4, progress=False, **kw)
    assert psnr_uint8(single.images[0], out.images[1]) >= 40.0


def test_a_batch_without_seeds_draws_one_per_prompt(flux_checkpoint):
    """``out.seeds`` lists one seed per image, and each image is made again by a single call with its seed."""
    pipe = diffc.load(flux_checkpoint("dev-tiny"))
    kw = dict(height=32, width=32, num_inference_steps=1, max_sequence_length=16, progress=False)
    prompts = ["a red fox in snow", "a calico cat playing piano", "a lighthouse"]
    out = pipe.generate(prompts, **kw)
    assert len(out.seeds) == 3 and len(out.images) == 3
    again = pipe.generate(prompts[2], seed=out.seeds[2], **kw)
    assert psnr_uint8(again.images[0], out.images[2]) >= 40.0
    assert len(pipe.generate(prompts, seed=5, **kw).seeds) == 1  # one integer seeds the batch (diffusers' way)


def test_initial_latents_match_diffusers(flux_checkpoint):
    import diffusers

    from diffc.pipelines.flux import prepare_latents

    ckpt = flux_checkpoint("schnell-odd")
    ref = diffusers.FluxPipeline.from_pretrained(ckpt)
    pipe = diffc.load(ckpt)
    for h, w in [(32, 32), (36, 20), (64, 48)]:
        want, want_ids = ref.prepare_latents(1, ref.transformer.config.in_channels // 4, h, w, torch.float32, "cpu",
                                             torch.Generator("cpu").manual_seed(5))
        ctx = type("Ctx", (), {"components": pipe.components, "device": pipe.device, "dtype": pipe.dtype})
        got = prepare_latents(ctx, {"prompt": ["x"], "height": h, "width": w, "seeds": [5]})
        assert torch.equal(got["latents"], want) and torch.equal(got["img_ids"], want_ids)


def test_text_encoding_matches_diffusers(flux_checkpoint):
    import diffusers

    from diffc.pipelines.flux import encode_prompt
    from diffc.pipelines.stages import RunContext
    from diffc.runtime.perf import PerfRecorder

    ckpt = flux_checkpoint("dev-wide")
    ref = diffusers.FluxPipeline.from_pretrained(ckpt)
    pipe = diffc.load(ckpt)
    prompts = ["a red fox in snow", "portrait of an old sailor with a white beard"]
    want_embeds, want_pooled, want_ids = ref.encode_prompt(prompts, prompt_2=None, max_sequence_length=40)
    ctx = RunContext(pipe.components, pipe.device, pipe.dtype, PerfRecorder(pipe.device))
    got = encode_prompt(ctx, {"prompt": prompts, "max_sequence_length": 40})
    assert got["prompt_embeds"].shape == (2, 40, 16)
    assert rel_err(got["prompt_embeds"], want_embeds) < 1e-6
    assert rel_err(got["pooled_prompt_embeds"], want_pooled) < 1e-6
    assert torch.equal(got["text_ids"], want_ids)


def test_truncation_is_reported(flux_checkpoint, capfd):
    pipe = diffc.load(flux_checkpoint("dev-tiny"))
    pipe.components["tokenizer"].model_max_length = 77  # as CLIP's: past it transformers would warn of "indexing errors"
    long_prompt = " ".join(["a red fox in snow"] * 30)
    capfd.readouterr()
    out = pipe.generate(long_prompt, height=16, width=16, num_inference_steps=1, max_sequence_length=8, progress=False, seed=0)
    assert any("T5 tokens" in w and "truncated to 8" in w for w in out.warnings)
    assert any("CLIP tokens" in w for w in out.warnings)
    assert "Token indices sequence length" not in "".join(capfd.readouterr())  # ours says what was cut, once
    short = pipe.generate("a red fox", height=16, width=16, num_inference_steps=1, max_sequence_length=8, progress=False, seed=0)
    assert short.warnings == []


def test_bf16_generation_runs(flux_checkpoint):
    pipe = diffc.load(flux_checkpoint("dev-tiny"), dtype="bf16")
    assert pipe.components["transformer"].x_embedder.weight.dtype == torch.bfloat16
    out = pipe.generate(PROMPT, height=32, width=32, num_inference_steps=2, seed=1, progress=False)
    assert np.asarray(out.images[0]).shape == (32, 32, 3)


def test_numpy_numbers_are_numbers(flux_checkpoint):
    """Sizes, steps and scales as NumPy scalars (an array's shape, a float32 from a config) give the picture Python
    numbers give: np.int64 steps were refused as "must be an integer >= 1, got np.int64(2)" and a np.float32
    guidance_scale as "must be a number from 0 to 100, got np.float32(3.5)", though diffusers takes both."""
    pipe = diffc.load(flux_checkpoint("dev-tiny"))
    kw = dict(seed=2, progress=False, max_sequence_length=16, true_cfg_scale=2.0, negative_prompt="blurry")
    want = pipe.generate(PROMPT, height=32, width=48, num_inference_steps=2, guidance_scale=3.5, **kw).images[0]
    got = pipe.generate(PROMPT, height=np.int64(32), width=np.int32(48), num_inference_steps=np.int64(2),
                        guidance_scale=np.float32(3.5), **{**kw, "true_cfg_scale": np.float64(2.0)}).images[0]
    assert np.array_equal(np.asarray(got), np.asarray(want))
    request = pipe.resolve(prompt=PROMPT, num_inference_steps=np.int16(3), guidance_scale=np.float16(2.5))
    assert type(request.num_inference_steps) is int and type(request.guidance_scale) is float


@pytest.mark.parametrize("kwargs,field,fragment", [
    (dict(height=42), "height", "needs a multiple of 4"),
    (dict(width=30), "width", "needs a multiple of 4"),
    (dict(height=0), "height", "integer from 1"),
    (dict(num_inference_steps=0), "num_inference_steps", "from 1 to 1000"),
    (dict(num_inference_steps=2.5), "num_inference_steps", "integer"),
    (dict(guidance_scale=-1.0), "guidance_scale", "from 0 to 100"),
    (dict(guidance_scale=float("nan")), "guidance_scale", "number"),
    (dict(seed=-3), "seed", "integer from 0"),
    (dict(seed=[1, 2]), "seed", "one per prompt"),
    (dict(negative_prompt="blurry"), "negative_prompt", "only with true_cfg_scale > 1"),
    (dict(max_sequence_length=513), "max_sequence_length", "from 1 to 512"),
    (dict(max_sequence_length=3.5), "max_sequence_length", "an integer from 1 to 512"),
    (dict(num_frames=9), "num_frames", "image model"),
    (dict(num_frames=True), "num_frames", "image model"),
    (dict(num_frames=1.0), "num_frames", "image model"),
    (dict(step_callback=5), "step_callback", "must be a function (done, total) or None, got 5"),
    (dict(decode_callback="x"), "decode_callback", "must be a function"),
    (dict(sampler="ddim"), "sampler", "not a generation option"),
])
def test_bad_requests_are_refused(flux_checkpoint, kwargs, field, fragment):
    pipe = diffc.load(flux_checkpoint("dev-tiny"))
    with pytest.raises(InvalidArgumentError) as info:
        pipe.generate(PROMPT, progress=False, **{"height": 32, "width": 32, **kwargs})
    assert info.value.field == field and fragment in str(info.value)


@pytest.mark.parametrize("prompt", ["", "   ", ["ok", ""], 5])
def test_empty_prompt_is_refused(flux_checkpoint, prompt):
    pipe = diffc.load(flux_checkpoint("dev-tiny"))
    with pytest.raises(InvalidArgumentError, match="prompt: must be a non-empty string"):
        pipe.generate(prompt, height=32, width=32, progress=False)


@pytest.mark.parametrize("kwargs,field", [
    (dict(prompt="a\ud800b"), "prompt"),
    (dict(prompt=["ok", "fox \udcff"]), "prompt"),  # what Python makes of a byte that is not UTF-8 in argv
    (dict(prompt="ok", negative_prompt="blurry\udfff", true_cfg_scale=2.0), "negative_prompt"),
])
def test_text_that_is_not_unicode_is_refused_naming_its_field(flux_checkpoint, kwargs, field):
    """A lone surrogate reached the tokenizer as a transformers TypeError; now one line before any work."""
    pipe = diffc.load(flux_checkpoint("dev-tiny"))
    with pytest.raises(InvalidArgumentError, match="is not valid Unicode text: it holds a lone surrogate") as info:
        pipe.generate(height=32, width=32, progress=False, **kwargs)
    assert info.value.field == field


@pytest.mark.parametrize("swap,fragment", [
    ("text_encoder_2", "text_encoder_2's width (d_model) is 24 but the transformer's joint_attention_dim is 32"),
    ("text_encoder", "text_encoder's width (hidden_size) is 40 but the transformer's pooled_projection_dim is 32"),
    ("vae", "4 x the vae's latent_channels is 12 but the transformer's in_channels is 16"),
])
def test_a_component_of_another_checkpoint_is_refused_before_any_work(flux_checkpoint, tmp_path, swap, fragment):
    """A T5, CLIP or VAE of another FLUX model stopped in the DiT naming encoder_hidden_states, in a matmul (torch's
    RuntimeError), or in the VAE naming z after the whole denoising."""
    from diffc.errors import CheckpointError
    from tests.helpers import with_component_of

    root = with_component_of(flux_checkpoint("dev-tiny"), flux_checkpoint("schnell-odd"), swap, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=f"^FluxPipeline: {re.escape(fragment)}; the checkpoint's components"):
        diffc.load(root).generate(PROMPT, height=16, width=16, num_inference_steps=1, progress=False)


def test_one_step_on_a_sampler_with_shift_terminal_is_refused_before_any_work(flux_checkpoint, tmp_path):
    """One step is sigma 1, which shift_terminal cannot stretch (diffusers' NaN pixels): refused by name when the
    request is read (the sampler refused it mid-generation, "needs a schedule that ends below sigma 1")."""
    import json
    import shutil

    root = tmp_path / "ckpt"
    shutil.copytree(flux_checkpoint("dev-tiny"), root)
    path = root / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "shift_terminal": 0.1}))
    pipe = diffc.load(root)
    with pytest.raises(InvalidArgumentError, match=r"^num_inference_steps: this checkpoint's sampler \(shift_terminal\) "
                                                   r"needs at least 2 steps, got 1"):
        pipe.resolve(prompt=PROMPT, height=16, width=16, num_inference_steps=1)
    assert pipe.resolve(prompt=PROMPT, height=16, width=16, num_inference_steps=2).num_inference_steps == 2


def test_a_size_whose_time_shift_overflows_is_refused_before_any_work(flux_checkpoint):
    """FLUX.1's size-dependent shift (mu grows with the latent tokens) overflows e^mu in float32 past some size
    (FLUX.1-dev: about 11,500 pixels a side), where diffusers denoises on NaN sigmas; diffc refuses the size when the
    request is read, naming height and width and the most pixels that work. The largest square that works (found
    with diffusers' calculate_shift, on the tiny checkpoint's own VAE factor and scheduler) still resolves."""
    import math

    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pipe = diffc.load(flux_checkpoint("dev-tiny"))
    cfg = pipe.components["scheduler"].config
    multiple = 2 * 2 ** (len(pipe.components["vae"].config.block_out_channels) - 1)  # 2x2 patches of VAE latents
    limit = math.log(float(np.finfo(np.float32).max))
    mu = lambda side: calculate_shift((side // multiple) ** 2, cfg.base_image_seq_len, cfg.max_image_seq_len,  # noqa: E731
                                      cfg.base_shift, cfg.max_shift)
    side = multiple
    while mu(side + multiple) <= limit:
        side += multiple
    with pytest.raises(InvalidArgumentError, match=rf"^height: {side + multiple}x{side + multiple} \(height x width\) "
                                                   r"is too large for the scheduler's size-dependent time shift: \d+ "
                                                   r"latent tokens give mu = 88\.\d, .* at most about \d+ megapixels$"):
        pipe.resolve(prompt=PROMPT, height=side + multiple, width=side + multiple, num_inference_steps=2)
    assert pipe.resolve(prompt=PROMPT, height=side, width=side, num_inference_steps=2).height == side
