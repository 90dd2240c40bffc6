"""FLUX.1 Kontext editing and FLUX true CFG against diffusers on the tiny FLUX checkpoint and seed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import diffc
from diffc.errors import InvalidArgumentError
from diffc.pipelines import flux_kontext
from tests.helpers import psnr_uint8

PROMPT = "make it night"
TINY_RESOLUTIONS = ((24, 40), (32, 32), (40, 24))  # (width, height), the tiny model's stand-in for ~1 MP


@pytest.fixture(scope="module")
def kontext_checkpoint(flux_checkpoint, tmp_path_factory):
    """The tiny FLUX.1-dev checkpoint as a FluxKontextPipeline (Kontext-dev has FLUX.1-dev's layout)."""
    root = tmp_path_factory.mktemp("kontext") / "ckpt"
    shutil.copytree(flux_checkpoint("dev-tiny"), root)
    index = json.loads((root / "model_index.json").read_text())
    index["_class_name"] = "FluxKontextPipeline"
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture
def tiny_resolutions(monkeypatch):
    import diffusers.pipelines.flux.pipeline_flux_kontext as ref_module

    monkeypatch.setattr(ref_module, "PREFERRED_KONTEXT_RESOLUTIONS", list(TINY_RESOLUTIONS))
    monkeypatch.setattr(flux_kontext, "PREFERRED_RESOLUTIONS", TINY_RESOLUTIONS)


def _input_image(w=50, h=30, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
    return Image.fromarray(np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype("uint8"))


def _reference(cls_name, ckpt, seed, **kw):
    import diffusers

    ref = getattr(diffusers, cls_name).from_pretrained(ckpt)
    ref.set_progress_bar_config(disable=True)
    out = ref(prompt=PROMPT, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kw).images[0]
    return (out * 255).round().astype("uint8")


@pytest.mark.parametrize("size,true_cfg", [(None, None), ((32, 48), 3.0)])
def test_edit_matches_diffusers(kontext_checkpoint, tiny_resolutions, size, true_cfg):
    image = _input_image()  # 50x30: aspect 1.67 -> the (40, 24) resolution
    kw = dict(num_inference_steps=2, guidance_scale=2.5, max_sequence_length=32)
    if size:
        kw.update(height=size[0], width=size[1])
    if true_cfg:
        kw.update(true_cfg_scale=true_cfg, negative_prompt="blurry")
    out = diffc.load(kontext_checkpoint).generate(PROMPT, image=image, seed=5, progress=False, **kw)
    got = np.asarray(out.images[0])
    height, width = size or (24, 40)  # the output follows the (resized) input unless a size is given
    assert got.shape == (height, width, 3)
    assert list(out.timings.stages)[:2] == ["encode_prompt", "encode_image"]
    want = _reference("FluxKontextPipeline", kontext_checkpoint, 5, image=image,
                      **{"height": height, "width": width, "max_area": height * width, **kw})
    assert got.std() > 1.0
    assert psnr_uint8(got, want) >= 40.0


def test_edits_per_prompt_match_diffusers(kontext_checkpoint, tiny_resolutions):
    """``num_images_per_prompt``: the one input image conditions every sample; each sample has its own noise."""
    import diffusers

    image = _input_image()
    kw = dict(num_inference_steps=2, guidance_scale=2.5, max_sequence_length=32, height=24, width=40)
    out = diffc.load(kontext_checkpoint).generate(PROMPT, image=image, seed=9, num_images_per_prompt=2,
                                                  progress=False, **kw)
    ref = diffusers.FluxKontextPipeline.from_pretrained(kontext_checkpoint)
    ref.set_progress_bar_config(disable=True)
    want = ref(prompt=PROMPT, image=image, generator=torch.Generator("cpu").manual_seed(9), num_images_per_prompt=2,
               output_type="np", max_area=24 * 40, **kw).images
    assert len(out.images) == 2
    for got, w in zip(out.images, want):
        assert psnr_uint8(np.asarray(got), (w * 255).round().astype("uint8")) >= 40.0


def test_the_input_image_conditions_the_output(kontext_checkpoint, tiny_resolutions):
    pipe = diffc.load(kontext_checkpoint)
    kw = dict(num_inference_steps=2, seed=5, progress=False, max_sequence_length=16)
    a = np.asarray(pipe.generate(PROMPT, image=Image.new("RGB", (40, 24), "black"), **kw).images[0])
    b = np.asarray(pipe.generate(PROMPT, image=Image.new("RGB", (40, 24), "white"), **kw).images[0])
    assert not np.array_equal(a, b)  # the same seed and prompt: only the input image differs


def test_without_image_is_text_to_image(kontext_checkpoint):
    kw = dict(height=32, width=32, num_inference_steps=2, guidance_scale=2.5, max_sequence_length=16)
    out = diffc.load(kontext_checkpoint).generate(PROMPT, seed=2, progress=False, **kw)
    want = _reference("FluxKontextPipeline", kontext_checkpoint, 2, max_area=32 * 32, **kw)
    assert psnr_uint8(out.images[0], want) >= 40.0


def test_conditioning_size_matches_diffusers():
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    processor = VaeImageProcessor(vae_scale_factor=16)
    for w, h in [(1024, 1024), (640, 480), (500, 1200), (1920, 1080), (33, 17), (1000, 999)]:
        img = Image.new("RGB", (w, h))
        ih, iw = processor.get_default_height_width(img)
        _, iw, ih = min((abs(iw / ih - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)
        assert flux_kontext.conditioning_size(img, 16) == (ih // 16 * 16, iw // 16 * 16)


def test_true_cfg_flux_dev_matches_diffusers(flux_checkpoint):
    ckpt = flux_checkpoint("dev-tiny")
    kw = dict(height=32, width=48, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=16,
              true_cfg_scale=4.0, negative_prompt="blurry, low quality")
    out = diffc.load(ckpt).generate(PROMPT, seed=7, progress=False, **kw)
    want = _reference("FluxPipeline", ckpt, 7, **kw)
    assert psnr_uint8(out.images[0], want) >= 40.0
    plain = diffc.load(ckpt).generate(PROMPT, seed=7, progress=False,
                                      **{k: v for k, v in kw.items() if k not in ("true_cfg_scale", "negative_prompt")})
    assert psnr_uint8(out.images[0], plain.images[0]) < 60.0  # guidance changed the image


@pytest.mark.parametrize("kwargs,field,fragment", [
    (dict(true_cfg_scale=4.0), "true_cfg_scale", "needs a negative_prompt"),
    (dict(negative_prompt="x"), "negative_prompt", "only with true_cfg_scale > 1"),
    (dict(true_cfg_scale=-1.0, negative_prompt="x"), "true_cfg_scale", "from 0 to 100"),
    (dict(image=[Image.new("RGB", (32, 32))] * 2), "image", "at most 1 input image"),
    (dict(image=Image.new("RGB", (2, 40))), "image", "at least 4 pixels"),
])
def test_bad_requests(kontext_checkpoint, kwargs, field, fragment):
    pipe = diffc.load(kontext_checkpoint)
    with pytest.raises(InvalidArgumentError, match=fragment) as err:
        pipe.generate(PROMPT, progress=False, height=32, width=32, num_inference_steps=1, **kwargs)
    assert err.value.field == field


def test_a_vae_without_shift_factor_shifts_by_zero(kontext_checkpoint, tmp_path, tiny_resolutions):
    """A VAE config with ``shift_factor: null`` (diffusers' AutoencoderKL default, Stable Diffusion VAEs) made FLUX
    decode and Kontext encode fail with "unsupported operand type(s) ... 'NoneType'" (diffusers' pipelines too); it
    shifts by 0, which is diffusers' picture for the same weights with shift_factor 0.0."""
    null, zero = tmp_path / "null", tmp_path / "zero"
    for folder, shift in ((null, None), (zero, 0.0)):
        shutil.copytree(kontext_checkpoint, folder)
        config = json.loads((folder / "vae" / "config.json").read_text())
        (folder / "vae" / "config.json").write_text(json.dumps({**config, "shift_factor": shift}))
    kw = dict(num_inference_steps=2, guidance_scale=2.5, max_sequence_length=16, height=24, width=40)
    got = diffc.load(null).generate(PROMPT, image=_input_image(), seed=3, progress=False, **kw).images[0]
    want = _reference("FluxKontextPipeline", zero, 3, image=_input_image(), max_area=24 * 40, **kw)
    assert np.asarray(got).std() > 1.0 and psnr_uint8(got, want) >= 40.0


def test_text_to_image_flux_refuses_an_image(flux_checkpoint):
    with pytest.raises(InvalidArgumentError, match="does not take an input image"):
        diffc.load(flux_checkpoint("dev-tiny")).generate(PROMPT, image=_input_image(), progress=False)


def test_a_16_bit_input_image_is_scaled_to_8_bits_not_clipped(kontext_checkpoint, tiny_resolutions):
    """A 16-bit greyscale image (a 16-bit PNG) conditions the edit as its 8-bit scaling does, as on Qwen-Image-Edit;
    Kontext's encoder converted it with PIL's ``convert("RGB")``, which clips every value above 255 (almost white)."""
    from diffc.pipelines.images import to_rgb

    grey = np.asarray(_input_image().convert("L"), dtype=np.uint16) * 257
    wide = Image.fromarray(grey)
    assert wide.mode == "I;16"
    pipe = diffc.load(kontext_checkpoint)
    kw = dict(num_inference_steps=2, seed=3, progress=False, max_sequence_length=16)
    got = np.asarray(pipe.generate(PROMPT, image=wide, **kw).images[0])
    assert np.array_equal(got, np.asarray(pipe.generate(PROMPT, image=to_rgb(wide), **kw).images[0]))
