"""The ``image`` request field: refused by text-only models, checked for type, mode, count and size."""

import dataclasses

import pytest
from PIL import Image

from diffc.errors import InvalidArgumentError
from diffc.pipelines.base import GenerationRequest, PipelineSpec, input_images, validate_image


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
    ("not an image", "must be a PIL image, got str"),
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
