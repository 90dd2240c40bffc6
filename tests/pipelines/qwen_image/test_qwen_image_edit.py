"""End to end: Qwen-Image-Edit (one image) and -Edit-2509 (one and two images) against diffusers' pipelines."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import diffc
from diffc.errors import InvalidArgumentError
from tests.helpers import assert_planted_code_never_runs, psnr_uint8

from .test_qwen_image import reference

pytest.importorskip("diffusers")

PROMPT = "make it night"
STAGES = ["prepare_images", "encode_prompt", "prepare_latents", "prepare_timesteps", "denoise", "decode",
          "postprocess"]


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random RGB picture (not flat, so the parity checks compare real content)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(3, 4, 4, generator=g)
    big = torch.nn.functional.interpolate(small[None], size=(height, width), mode="bilinear")[0]
    return Image.fromarray((big.permute(1, 2, 0).numpy() * 255).astype("uint8"))


@pytest.fixture(scope="module")
def loaded(qwen_checkpoint):
    cache = {}

    def get(kind):
        if kind not in cache:
            path, ref = qwen_checkpoint(kind)
            cache[kind] = (ref, diffc.load(path, device="cpu"))
        return cache[kind]

    return get


# (pipeline, input sizes (width, height), output (height, width), true CFG). The output size that follows the input
# (about 1024x1024) is checked by test_output_size_follows_the_input without generating: too slow on a CPU.
CASES = {
    "edit-one": ("edit", [(40, 24)], (32, 48), False),
    "plus-one": ("edit_plus", [(24, 40)], (48, 32), False),
    "plus-two-cfg": ("edit_plus", [(40, 24), (24, 32)], (32, 32), True),
}


@pytest.fixture
def small_plus_sizes(monkeypatch):
    """Edit-2509's image sizes (about 1024x1024 for the VAE, 384x384 for the vision encoder) are module constants in
    both pipelines: made small for the CPU, the same in both. (Edit's 1024x1024 is a literal in diffusers.)"""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as ref_module

    from diffc.pipelines import qwen_image_edit

    for module, vae, condition in ((ref_module, "VAE_IMAGE_SIZE", "CONDITION_IMAGE_SIZE"),
                                   (qwen_image_edit, "VAE_IMAGE_AREA", "CONDITION_IMAGE_AREA")):
        monkeypatch.setattr(module, vae, 96 * 96)
        monkeypatch.setattr(module, condition, 64 * 64)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_diffusers(loaded, small_plus_sizes, case):
    kind, sizes, out_size, cfg = CASES[case]
    ref_pipe, pipe = loaded(kind)
    images = [picture(w, h, i) for i, (w, h) in enumerate(sizes)]
    image_arg = images if kind == "edit_plus" else images[0]
    kw = dict(num_inference_steps=2, height=out_size[0], width=out_size[1])
    extra = dict(negative_prompt=" ", true_cfg_scale=4.0) if cfg else {}
    ref = reference(ref_pipe, PROMPT, [5], image=image_arg, **kw, **extra)[0]
    out = pipe.generate(PROMPT, image=image_arg, seed=5, progress=False, **kw, **extra)
    result = np.asarray(out.images[0])
    assert result.shape == ref.shape
    assert result.std() > 1.0, "degenerate (flat) image: the parity check would prove nothing"
    assert psnr_uint8(result, ref) >= 40.0
    assert list(out.timings.stages) == STAGES


def test_several_prompts_edit_the_same_images(loaded, small_plus_sizes):
    _, pipe = loaded("edit_plus")
    images = [picture(40, 24, 0), picture(24, 32, 1)]
    kw = dict(image=images, height=32, width=32, num_inference_steps=2, progress=False)
    batch = pipe.generate(["make it night", "add a hat"], seed=[5, 6], **kw)
    single = pipe.generate("add a hat", seed=6, **kw)
    assert psnr_uint8(np.asarray(batch.images[1]), np.asarray(single.images[0])) >= 40.0


def test_output_size_follows_the_input(loaded):
    _, pipe = loaded("edit")
    request = pipe.resolve(prompt=PROMPT, image=picture(300, 100, 0))
    # about 1024x1024 pixels at 3:1 in multiples of 32, as diffusers' calculate_dimensions gives
    assert (request.width, request.height) == (1760, 576)


@pytest.mark.parametrize("kind,kwargs,field,message", [
    ("edit", dict(), "image", "needs an input image"),
    ("edit", dict(image=[picture(32, 32, 0)] * 2), "image", "at most 1 input image"),
    ("edit_plus", dict(image=[picture(32, 32, 0)] * 4), "image", "at most 3 input image"),
    ("edit", dict(image="in.png"), "image", "must be a PIL image"),
    ("edit", dict(image=picture(32, 32, 0), height=40), "height", "multiple of 16"),
    ("edit", dict(image=picture(32, 32, 0), max_sequence_length=64), "max_sequence_length", "leave"),
    ("edit", dict(image=picture(2000, 1, 0)), "image", "image is 2000x1: its aspect ratio is too extreme"),
    ("edit_plus", dict(image=[picture(32, 32, 0), picture(20, 6400, 0)]), "image",
     "image 2 is 20x6400: its aspect ratio is too extreme .*below 200:1"),
])
def test_bad_requests_name_the_field(loaded, kind, kwargs, field, message):
    _, pipe = loaded(kind)
    kwargs = {"prompt": PROMPT, **kwargs}
    with pytest.raises(InvalidArgumentError, match=rf"^{field}: .*{message}"):
        pipe.resolve(**kwargs)


def test_rgba_and_grayscale_inputs_become_rgb(loaded):
    _, pipe = loaded("edit_plus")
    request = pipe.resolve(prompt=PROMPT, image=[picture(32, 32, 1).convert("RGBA"), picture(32, 32, 1).convert("L")])
    assert [im.mode for im in request.image] == ["RGB", "RGB"]


def test_a_processor_naming_code_in_its_folder_never_runs_it(qwen_checkpoint, tmp_path, monkeypatch):
    """Found by an audit: the ``processor`` folder's tokenizer_config.json naming a class of its own .py file
    (auto_map) made transformers ask "Do you wish to run the custom code? [y/N]" on the terminal, and a yes ran it."""
    root = shutil.copytree(qwen_checkpoint("edit")[0], tmp_path / "ckpt")
    assert_planted_code_never_runs(root, "processor", "Qwen2TokenizerFast", monkeypatch)
