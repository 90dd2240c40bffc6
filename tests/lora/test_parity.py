"""diffc with a LoRA at strength s gives diffusers' image (``load_lora_weights`` + ``set_adapters``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import psnr_uint8
from tests.lora.conftest import PROMPT

SEED = 5


@pytest.fixture(scope="module")
def flux_ref(flux_lora):
    import diffusers

    ref = diffusers.FluxPipeline.from_pretrained(flux_lora.ckpt)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture(scope="module")
def wan_ref(wan_lora):
    import diffusers

    ref = diffusers.WanPipeline.from_pretrained(wan_lora.ckpt)
    ref.set_progress_bar_config(disable=True)
    return ref


def _reference(ref, family, files: list, weights: list[float]) -> np.ndarray:
    names = [f"a{i}" for i in range(len(files))]
    for name, path in zip(names, files):
        ref.load_lora_weights(str(path), adapter_name=name)
    try:
        ref.set_adapters(names, adapter_weights=weights)
        out = ref(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np", **family.kw)
    finally:
        ref.delete_adapters(names)
    array = out.images[0] if hasattr(out, "images") else out.frames[0]
    return (np.asarray(array) * 255).round().astype("uint8")


def _diffc(family) -> np.ndarray:
    out = family.pipe.generate(PROMPT, seed=SEED, progress=False, **family.kw)
    return np.asarray(out.images[0]) if out.images is not None else out.frames


@pytest.fixture(scope="module")
def flux_base(flux_lora):
    return _diffc(flux_lora)


@pytest.mark.parametrize("fmt,strength", [("double-kohya", 1.3), ("double-xlabs", 2.0)])
def test_flux_matches_diffusers(flux, flux_ref, flux_base, fmt, strength):
    flux.pipe.set_lora(fmt, flux.files[fmt], strength=strength)
    image = _diffc(flux)
    assert psnr_uint8(image, flux_base) < 30, "the LoRA barely changes the image: parity would prove nothing"
    assert psnr_uint8(image, _reference(flux_ref, flux, [flux.files[fmt]], [strength])) >= 40


def test_flux_two_adapters_match_diffusers_and_unmerge_is_exact(flux, flux_ref, flux_base):
    files = [flux.files["double-diffusers"], flux.files["second"]]
    flux.pipe.set_lora(["double", "second"], files, strength=[0.6, 1.5])
    image = _diffc(flux)
    assert psnr_uint8(image, _reference(flux_ref, flux, files, [0.6, 1.5])) >= 40
    flux.pipe.set_lora("double", strength=0.6)  # one of them alone is another image
    assert psnr_uint8(_diffc(flux), image) < 40
    flux.pipe.unmerge_lora_weights()
    assert np.array_equal(_diffc(flux), flux_base)


@pytest.fixture(scope="module")
def wan_base(wan_lora):
    return _diffc(wan_lora)


@pytest.mark.parametrize("fmt", ["diffusers", "wan"])
def test_wan_matches_diffusers(wan, wan_ref, wan_base, fmt):
    base = wan_base
    wan.pipe.set_lora(fmt, wan.files[fmt], strength=0.8)
    video = _diffc(wan)
    assert psnr_uint8(video, base) < 30
    assert psnr_uint8(video, _reference(wan_ref, wan, [wan.files[fmt]], [0.8])) >= 40
