"""The generic backend against diffusers itself: same seed, same output; timings; request mapping and its errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import diffc
from diffc.errors import CheckpointError, DiffcError, InvalidArgumentError
from diffc.pipelines.generic import GenericPipeline
from tests.generic_pipelines import REQUESTS
from tests.helpers import psnr_uint8

PSNR_DB = {"image": 40.0, "video": 35.0}
OUTPUT = {"sd3": "image", "hunyuan": "video", "ltx": "video", "cogvideox": "video"}
PIPELINE_CLASS = {"sd3": "StableDiffusion3Pipeline", "hunyuan": "HunyuanVideoPipeline", "ltx": "LTXPipeline",
                  "cogvideox": "CogVideoXPipeline"}


def _uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


@pytest.mark.parametrize("name", sorted(OUTPUT))
def test_same_seed_gives_diffusers_output(name, generic_pipe, diffusers_reference):
    pipe = generic_pipe(name)
    assert isinstance(pipe, GenericPipeline) and pipe.spec.pipeline_class == PIPELINE_CLASS[name]
    assert pipe.spec.output == OUTPUT[name] and pipe.dtype.is_floating_point and str(pipe.dtype) == "torch.float32"
    prompt, seed = "a red fox running through snow", 11
    out = pipe.generate(prompt, seed=seed, progress=False, **REQUESTS[name])
    ref = _uint8(diffusers_reference(name, seed=seed, prompt=prompt, **REQUESTS[name]))[0]
    mine = np.asarray(out.images[0]) if OUTPUT[name] == "image" else out.frames
    assert mine.shape == ref.shape and mine.dtype == np.uint8
    assert np.array_equal(mine, ref) or psnr_uint8(mine, ref) >= PSNR_DB[OUTPUT[name]]
    assert mine.std() > 0  # not a blank output
    assert out.seeds == [seed]

    t = out.timings
    assert list(t.stages)[:1] == ["encode_prompt"] and {"denoise", "decode"} <= set(t.stages)
    assert all(sec >= 0 for sec in t.stages.values()) and t.stages["denoise"] > 0 and t.stages["decode"] > 0
    assert len(t.step_ms) == REQUESTS[name]["num_inference_steps"] and all(ms > 0 for ms in t.step_ms)
    assert sum(t.step_ms) / 1e3 <= t.stages["denoise"] * 1.01 + 1e-3
    assert t.runtime["generic"]["backend"] == "diffusers"
    assert t.runtime["generic"]["pipeline_class"] == PIPELINE_CLASS[name]


def test_another_seed_another_output_and_steps_reported(generic_pipe):
    pipe = generic_pipe("sd3")
    seen = []
    a = pipe.generate("a cat", seed=1, progress=False, step_callback=lambda d, n: seen.append((d, n)),
                      **{**REQUESTS["sd3"], "num_inference_steps": 3})
    b = pipe.generate("a cat", seed=2, progress=False, **REQUESTS["sd3"])
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_batch_with_one_seed_per_prompt_matches_single_calls(generic_pipe):
    pipe = generic_pipe("sd3")
    batch = pipe.generate(["a cat", "a dog"], seed=[4, 9], progress=False, **REQUESTS["sd3"])
    for i, (prompt, seed) in enumerate([("a cat", 4), ("a dog", 9)]):
        single = pipe.generate(prompt, seed=seed, progress=False, **REQUESTS["sd3"])
        assert psnr_uint8(batch.images[i], single.images[0]) >= PSNR_DB["image"]
    assert batch.seeds == [4, 9]


def test_defaults_come_from_the_pipeline(generic_pipe):
    sd3 = generic_pipe("sd3").spec.defaults
    assert sd3["height"] == sd3["width"] == 32  # default_sample_size (16) x vae_scale_factor (2)
    assert sd3["num_inference_steps"] == 28 and sd3["max_sequence_length"] == 256
    hunyuan = generic_pipe("hunyuan").spec
    assert hunyuan.defaults["num_frames"] == 129 and hunyuan.uses_negative_prompt and hunyuan.image_input == "none"


@pytest.mark.parametrize("field, value, message", [
    ("num_frames", 5, "StableDiffusion3Pipeline does not take num_frames"),
    ("height", 33, "divisible by"),  # diffusers' own check_inputs, as an InvalidArgumentError naming the field
    ("num_inference_steps", 0, "must be an integer from 1"),
    ("guidance_scale", float("nan"), "must be a number"),
    ("max_sequence_length", 0, "must be an integer from 1"),
])
def test_bad_fields_are_named(generic_pipe, field, value, message):
    with pytest.raises(InvalidArgumentError, match=message) as info:
        generic_pipe("sd3").generate("a cat", seed=0, progress=False, **{**REQUESTS["sd3"], field: value})
    assert info.value.field == field


def test_image_to_a_text_to_image_pipeline_and_unknown_option(generic_pipe):
    from PIL import Image

    pipe = generic_pipe("sd3")
    with pytest.raises(InvalidArgumentError, match="does not take an input image") as info:
        pipe.generate("a cat", image=Image.new("RGB", (32, 32)), progress=False)
    assert info.value.field == "image"
    with pytest.raises(InvalidArgumentError, match="is not a generation option") as info:
        pipe.generate("a cat", strength=0.5, progress=False)
    assert info.value.field == "strength"


def test_runtime_options_are_checked_as_for_native_pipelines(generic_checkpoint):
    root = generic_checkpoint("sd3")
    for kwargs, field, message in [({"offload": "layerwise"}, "offload", "needs a CUDA GPU"),
                                   ({"cuda_graphs": True}, "cuda_graphs", "need a CUDA GPU"),
                                   ({"scheduler": "euler"}, "scheduler", "generic \\(diffusers\\) backend")]:
        with pytest.raises(InvalidArgumentError, match=message) as info:
            diffc.load(root, device="cpu", **kwargs)
        assert info.value.field == field


def test_missing_diffusers_says_how_to_install(generic_checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError
    with pytest.raises(DiffcError, match=r"pip install 'diffc\[diffusers\]'"):
        diffc.load(generic_checkpoint("sd3"), device="cpu")


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("edit, message", [
    ({"_class_name": "MyPipeline"}, "'MyPipeline' is neither native to diffc nor a pipeline of the installed diffusers"),
    ({"_class_name": ["my_pipeline", "MyPipeline"]}, "is neither native"),
    ({"transformer": ["my_transformer", "MyTransformer"]}, "comes from 'my_transformer'"),
    ({"transformer": ["diffusers"]}, "must be \\[library, class name\\], got \\[\"diffusers\"\\]"),
])
def test_checkpoint_code_is_never_loaded(generic_checkpoint, tmp_path, edit, message):
    root = _copy(generic_checkpoint("sd3"), tmp_path / "ckpt")
    (root / "transformer" / "my_transformer.py").write_text("raise SystemExit('checkpoint code ran')\n")
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, **edit}))
    with pytest.raises(CheckpointError, match=message):
        diffc.load(root, device="cpu")


def test_pickle_weights_are_refused(generic_checkpoint, tmp_path):
    import torch
    from safetensors.torch import load_file

    root = _copy(generic_checkpoint("sd3"), tmp_path / "ckpt")
    weights = root / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), root / "transformer" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(CheckpointError, match="weights must be safetensors"):
        diffc.load(root, device="cpu")


def test_defaults_a_pipeline_cannot_tell_are_left_to_it():
    from diffc.pipelines.generic.spec import call_defaults, call_parameters, image_input, output_kind

    class Tiny:  # a pipeline whose None size has no attribute diffc knows how to read
        def __call__(self, prompt, image, height=None, width=None, num_inference_steps=7, guidance_scale=2.5,
                     generator=None):
            pass

    pipe = Tiny()
    params = call_parameters(pipe)
    assert call_defaults(pipe, params) == {"num_inference_steps": 7, "guidance_scale": 2.5}
    assert output_kind(pipe, params) == "image" and image_input(params) == "required"


def test_diffusers_warnings_reach_the_output(generic_pipe):
    long_prompt = " ".join(["a red fox running through deep snow at golden hour"] * 4)
    out = generic_pipe("sd3").generate(long_prompt, seed=0, progress=False, **REQUESTS["sd3"])
    assert any("truncated" in w for w in out.warnings), out.warnings


def test_diffusers_own_size_limit_is_one_line_naming_the_field(generic_pipe):
    """Found by an audit: past SD3's pos_embed_max_size diffusers raised a ValueError after check_inputs."""
    pipe = generic_pipe("sd3")
    with pytest.raises(InvalidArgumentError, match=r"^height: StableDiffusion3Pipeline refused it: Height \(\d+\) "
                                                   r"cannot be greater than .pos_embed_max_size."):
        pipe.generate("a cat", seed=1, progress=False, **{**REQUESTS["sd3"], "height": 512, "width": 512,
                                                          "num_inference_steps": 1})


def test_an_unused_negative_prompt_and_a_rounded_frame_count_are_reported(generic_pipe):
    """Both were silent: a negative prompt with guidance 1 (no CFG) changed no pixel; LTX made 9 frames for 12."""
    sd3 = generic_pipe("sd3")
    kw = {**REQUESTS["sd3"], "guidance_scale": 1.0, "num_inference_steps": 1}
    out = sd3.generate("a cat", negative_prompt="ugly", seed=1, progress=False, **kw)
    assert "negative_prompt is ignored: guidance_scale 1 turns classifier-free guidance off" in " ".join(out.warnings)
    assert not any("negative_prompt" in w for w in sd3.generate("a cat", seed=1, progress=False, **kw).warnings)
    ltx = generic_pipe("ltx")
    out = ltx.generate("a cat", seed=1, progress=False, **{**REQUESTS["ltx"], "num_frames": 12,
                                                          "num_inference_steps": 1})
    assert out.frames.shape[0] == 9
    assert "num_frames: 12 asked for, LTXPipeline made 9" in " ".join(out.warnings)
