"""``num_images_per_prompt`` / ``num_videos_per_prompt``: several samples of each prompt in one call, as diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffc
from diffc.errors import InvalidArgumentError
from tests.helpers import psnr_uint8

FLUX_KW = dict(height=32, width=48, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=16)


def _flux_reference(ckpt, prompt, generator, **kw):
    import diffusers

    ref = diffusers.FluxPipeline.from_pretrained(ckpt)
    ref.set_progress_bar_config(disable=True)
    out = ref(prompt, generator=generator, output_type="np", **kw).images
    return [(img * 255).round().astype("uint8") for img in out]


@pytest.fixture(scope="module")
def flux_pipe(flux_checkpoint):
    return flux_checkpoint("dev-tiny"), diffc.load(flux_checkpoint("dev-tiny"))


def test_images_per_prompt_match_diffusers_with_one_seed(flux_pipe):
    ckpt, pipe = flux_pipe
    prompts = ["a red fox in snow", "a calico cat playing piano"]
    refs = _flux_reference(ckpt, prompts, torch.Generator("cpu").manual_seed(7), num_images_per_prompt=3, **FLUX_KW)
    out = pipe.generate(prompts, seed=7, num_images_per_prompt=3, progress=False, **FLUX_KW)
    assert len(refs) == len(out.images) == 6 and out.seeds == [7]
    for image, ref in zip(out.images, refs):
        assert psnr_uint8(image, ref) >= 40.0
    assert psnr_uint8(out.images[0], out.images[1]) < 30.0, "samples of one prompt must differ (own noise each)"


def test_a_list_of_seeds_has_one_per_sample(flux_pipe):
    ckpt, pipe = flux_pipe
    seeds = [3, 4]
    refs = _flux_reference(ckpt, "a lighthouse", [torch.Generator("cpu").manual_seed(s) for s in seeds],
                           num_images_per_prompt=2, **FLUX_KW)
    out = pipe.generate("a lighthouse", seed=seeds, num_images_per_prompt=2, progress=False, **FLUX_KW)
    assert out.seeds == seeds
    for image, ref in zip(out.images, refs):
        assert psnr_uint8(image, ref) >= 40.0
    with pytest.raises(InvalidArgumentError, match=r"seed: .*one per sample \(1 prompt\(s\) x 2 = 2\), got 1"):
        pipe.generate("a lighthouse", seed=[3], num_images_per_prompt=2, progress=False, **FLUX_KW)


def test_without_a_seed_each_sample_is_made_again_alone(flux_pipe):
    _, pipe = flux_pipe
    out = pipe.generate("a red fox in snow", num_images_per_prompt=2, progress=False, **FLUX_KW)
    assert len(out.seeds) == 2 and len(out.images) == 2
    again = pipe.generate("a red fox in snow", seed=out.seeds[1], progress=False, **FLUX_KW)
    assert psnr_uint8(again.images[0], out.images[1]) >= 40.0


@pytest.mark.parametrize("kwargs,field,fragment", [
    (dict(num_images_per_prompt=0), "num_images_per_prompt", "from 1 to 64"),
    (dict(num_images_per_prompt=65), "num_images_per_prompt", "from 1 to 64"),
    (dict(num_images_per_prompt=2.0), "num_images_per_prompt", "integer"),
    (dict(num_images_per_prompt=True), "num_images_per_prompt", "integer"),
    (dict(num_videos_per_prompt=2), "num_videos_per_prompt", "makes images; use num_images_per_prompt"),
])
def test_bad_counts_are_refused_by_name(flux_pipe, kwargs, field, fragment):
    _, pipe = flux_pipe
    with pytest.raises(InvalidArgumentError, match=f"^{field}: .*{fragment}"):
        pipe.generate("a fox", progress=False, **FLUX_KW, **kwargs)


def test_videos_per_prompt_match_diffusers(wan_checkpoint):
    import diffusers

    ckpt = wan_checkpoint("base")
    kw = dict(height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=4.0, max_sequence_length=12,
              negative_prompt="blurry")
    ref = diffusers.WanPipeline.from_pretrained(ckpt)
    ref.set_progress_bar_config(disable=True)
    frames = ref("a red fox in snow", generator=torch.Generator("cpu").manual_seed(5), num_videos_per_prompt=2,
                 output_type="np", **kw).frames
    pipe = diffc.load(ckpt)
    out = pipe.generate("a red fox in snow", seed=5, num_videos_per_prompt=2, progress=False, **kw)
    assert len(out.videos) == 2
    for video, want in zip(out.videos, frames):
        assert psnr_uint8(video, (want * 255).round().astype("uint8")) >= 40.0
    with pytest.raises(InvalidArgumentError, match="^num_images_per_prompt: .*makes videos; use num_videos_per_prompt"):
        pipe.generate("a fox", num_images_per_prompt=2, progress=False, **kw)


def test_a_generic_pipeline_takes_it_as_diffusers_does(generic_checkpoint):
    """The generic backend hands diffusers the repeated prompts: the same pixels as its own num_images_per_prompt."""
    import diffusers

    from tests.generic_pipelines import REQUESTS

    ckpt = generic_checkpoint("sd3")
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(ckpt)
    ref.set_progress_bar_config(disable=True)
    want = ref("a fox", generator=torch.Generator("cpu").manual_seed(3), num_images_per_prompt=2, output_type="np",
               **REQUESTS["sd3"]).images
    out = diffc.load(ckpt).generate("a fox", seed=3, num_images_per_prompt=2, progress=False, **REQUESTS["sd3"])
    assert len(out.images) == 2
    for image, w in zip(out.images, want):
        assert psnr_uint8(np.asarray(image), (w * 255).round().astype("uint8")) >= 40.0
