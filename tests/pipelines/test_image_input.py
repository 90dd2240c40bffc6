"""The ``image`` request field: refused by text-only models, checked for type, mode, count and size."""

import dataclasses

import pytest
from PIL import Image

from diffc.errors import InvalidArgumentError
from diffc.pipelines.base import GenerationRequest, PipelineSpec
from diffc.pipelines.images import input_images, validate_image


def _spec(image_input="none", max_images=1):
    return PipelineSpec(family="x", pipeline_class="XPipeline", output="image", components=(), defaults={},
                        build_stages=list, validate=lambda p, r: None, image_input=image_input,
                        max_images=max_images)


def test_text_only_model_refuses_an_image():
    with pytest.raises(InvalidArgumentError, match="image: XPipeline does not take an input image"):
        validate_image(_spec(), GenerationRequest("p", image=Image.new("RGB", (8, 8))))


def test_required_image_missing():
    with pytest.raises(InvalidArgumentError, match="needs an input image"):
        validate_image(_spec("required"), GenerationRequest("p"))
    validate_image(_spec("optional"), GenerationRequest("p", image=[]))


@pytest.mark.parametrize("bad, match", [
    ("not an image", "must be a PIL image, a numpy array or a torch tensor, got str"),
    ([Image.new("RGB", (4, 4))] * 3, "at most 2 input image"),
])
def test_bad_images(bad, match):
    with pytest.raises(InvalidArgumentError, match=match):
        validate_image(_spec("optional", max_images=2), GenerationRequest("p", image=bad))


def test_modes_convert_to_rgb():
    request = GenerationRequest("p", image=[Image.new("L", (5, 3)), Image.new("RGBA", (2, 2))])
    validate_image(_spec("optional", max_images=2), request)
    assert [im.mode for im in input_images(request)] == ["RGB", "RGB"]
    assert input_images(dataclasses.replace(request, image=None)) == []


def test_a_closed_image_is_named(tmp_path):
    """It reached PIL's "Operation on closed image" ValueError inside the pipeline."""
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    closed = Image.open(tmp_path / "a.png")
    closed.close()
    with pytest.raises(InvalidArgumentError, match=r"^image\[1\]: cannot be read \(Operation on closed image\)"):
        validate_image(_spec("optional", max_images=2), GenerationRequest("p", image=[Image.new("RGB", (4, 4)),
                                                                                         closed]))
    lazy = Image.open(tmp_path / "a.png")  # opened, not loaded: read now
    validate_image(_spec("optional"), GenerationRequest("p", image=lazy))
    assert input_images(GenerationRequest("p", image=lazy))[0].size == (4, 4)


def test_arrays_and_tensors_are_taken_as_diffusers_takes_them():
    """numpy (H, W[, C]) uint8 0-255 or float 0-1, torch (C, H, W) 0-1, either with a batch of one: the same pixels
    as the PIL image they came from; a list mixes them freely."""
    import numpy as np
    import torch

    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    as_float = rgb.astype(np.float32) / 255.0
    inputs = [rgb, as_float, as_float[None], torch.from_numpy(as_float).permute(2, 0, 1),
              torch.from_numpy(as_float).permute(2, 0, 1)[None], Image.fromarray(rgb)]
    request = GenerationRequest("p", image=inputs)
    validate_image(_spec("optional", max_images=len(inputs)), request)
    for im in input_images(request):
        assert im.size == (5, 6) and np.array_equal(np.asarray(im), rgb)
    grey = GenerationRequest("p", image=np.full((4, 3), 0.5, dtype=np.float64))
    validate_image(_spec("optional"), grey)
    assert grey.image.mode == "L" and np.asarray(grey.image).max() == 128


@pytest.mark.parametrize("bad, match", [
    (lambda np, torch: np.zeros((2, 4, 4, 3), np.uint8), r"^image: an array of 2 images; pass one image per array"),
    (lambda np, torch: np.zeros((4, 4, 3), np.int32), r"^image: an image array holds uint8 values \(0-255\) or floats"),
    (lambda np, torch: np.full((4, 4, 3), 255.0), r"^image: a float image array holds values from 0 to 1, got 255 to 255"),
    (lambda np, torch: torch.full((3, 4, 4), float("nan")), r"^image: a float image tensor holds values from 0 to 1, got NaN"),
    (lambda np, torch: torch.rand(4, 4, 4), r"^image: a tensor image is \(channels, height, width\) with 1 or 3"),
    (lambda np, torch: np.zeros((4, 4, 5), np.uint8), r"^image: an image array is \(height, width"),
    (lambda np, torch: np.zeros((20000, 1), np.uint8), r"^image: size 1x20000 is out of range"),
])
def test_bad_arrays_are_named(bad, match):
    import numpy as np
    import torch

    with pytest.raises(InvalidArgumentError, match=match):
        validate_image(_spec("optional"), GenerationRequest("p", image=bad(np, torch)))
