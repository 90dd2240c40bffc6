"""Wan2.1 image-to-video and the Wan2.2 A14B two-expert models against diffusers on tiny random checkpoints:
the same seed and input image give the same frames (fp32, CPU)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

import diffc
from diffc.errors import InvalidArgumentError
from tests.helpers import psnr_uint8

pytest.importorskip("diffusers")

PROMPT = "a red fox in snow"
MIN_PSNR = 40.0  # the floor is 35 dB for video; measured > 60 dB on these tiny models
# diffusers' Wan attention splits image tokens from text tokens assuming 512 text tokens: I2V parity needs 512
TEXT_LEN = 512


def _image(width: int = 40, height: int = 24, seed: int = 0) -> Image.Image:
    """A smooth random picture (not the video size: both pipelines resize it)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def _reference(pipeline_class: str, ckpt, seed: int, **kw) -> np.ndarray:
    import diffusers

    ref = getattr(diffusers, pipeline_class).from_pretrained(ckpt, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    frames = ref(prompt=PROMPT, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kw).frames
    return (frames[0] * 255).round().astype("uint8")


def _dit_calls(pipe) -> list[str]:
    calls: list[str] = []
    for name in ("transformer", "transformer_2"):
        if name in pipe.components:
            pipe.components[name].register_forward_pre_hook(lambda *a, name=name: calls.append(name))
    return calls


@pytest.mark.parametrize("kind, kw", [
    ("i2v", dict(height=32, width=48, num_frames=5, num_inference_steps=2, guidance_scale=5.0)),
    ("i2v", dict(height=16, width=32, num_frames=9, num_inference_steps=2, guidance_scale=1.0,
                 negative_prompt=None)),
    ("i2v-a14b", dict(height=32, width=32, num_frames=5, num_inference_steps=4, guidance_scale=4.0,
                      guidance_scale_2=2.5, negative_prompt="blurry")),
], ids=["i2v-cfg", "i2v-no-cfg", "i2v-a14b"])
def test_image_to_video_matches_diffusers(wan22_checkpoint, kind, kw):
    ckpt = wan22_checkpoint(kind)
    image = _image()
    kw = dict(kw, max_sequence_length=TEXT_LEN)
    want = _reference("WanImageToVideoPipeline", ckpt, 5, image=image, **kw)
    pipe = diffc.load(ckpt, device="cpu")
    assert pipe.spec.pipeline_class == "WanImageToVideoPipeline"
    calls = _dit_calls(pipe)
    out = pipe.generate(PROMPT, image=image, seed=5, progress=False, **kw)
    video = out.frames
    assert video.shape == (kw["num_frames"], kw["height"], kw["width"], 3) and video.std() > 1.0
    parity = psnr_uint8(video, want)
    assert parity >= MIN_PSNR
    assert "encode_image" in out.timings.stages
    if kind == "i2v-a14b":  # boundary 0.9 of 1000: the high-noise expert for t >= 900, then the low-noise one
        assert "transformer_2" in calls and calls[0] == "transformer" and calls[-1] == "transformer_2"
    # the image matters: another first frame gives another video
    other = pipe.generate(PROMPT, image=_image(seed=1), seed=5, progress=False, **kw).frames
    assert psnr_uint8(other, video) < min(parity, 99.0) - 10



@pytest.mark.parametrize("kind, kw", [
    ("flf2v", dict(height=16, width=32, num_frames=5, num_inference_steps=2, guidance_scale=5.0)),
    ("flf2v", dict(height=16, width=16, num_frames=9, num_inference_steps=2, guidance_scale=1.0)),
    ("i2v-a14b", dict(height=16, width=16, num_frames=5, num_inference_steps=3, guidance_scale=4.0)),
], ids=["flf2v-cfg", "flf2v-no-cfg", "i2v-a14b"])
def test_a_first_and_last_frame_match_diffusers_last_image(wan22_checkpoint, kind, kw):
    """``image=[first, last]`` is diffusers' ``last_image``: on a first-last-frame DiT (Wan2.1 FLF2V, which
    pairs the frames' CLIP tokens) and on one without an image encoder (Wan2.2 I2V-A14B). FLF2V with one image
    stopped inside the DiT naming encoder_hidden_states_image, a field no request has."""
    ckpt = wan22_checkpoint(kind)
    first, last = _image(seed=3), _image(56, 24, seed=4)
    kw = dict(kw, max_sequence_length=TEXT_LEN)
    want = _reference("WanImageToVideoPipeline", ckpt, 2, image=first, last_image=last, **kw)
    pipe = diffc.load(ckpt, device="cpu")
    video = pipe.generate(PROMPT, image=[first, last], seed=2, progress=False, **kw).frames
    assert video.shape == (kw["num_frames"], kw["height"], kw["width"], 3) and video.std() > 1.0
    parity = psnr_uint8(video, want)
    assert parity >= MIN_PSNR
    other = pipe.generate(PROMPT, image=[first, _image(56, 24, seed=5)], seed=2, progress=False, **kw).frames
    assert psnr_uint8(other, want) < min(parity, 99.0) - 5  # the last frame matters: another is further off
    if kind == "flf2v":
        with pytest.raises(InvalidArgumentError, match=r"^image: .*needs a first and a last frame: image=\[first"):
            pipe.generate(PROMPT, image=first, seed=2, progress=False, **kw)


@pytest.mark.parametrize("kind, kw, field, fragment", [
    ("i2v", dict(num_frames=5), "image", "takes one image, the first frame: a last frame needs"),
    ("i2v-a14b", dict(num_frames=1), "num_frames", "a first and a last frame need at least 5 frames, got 1"),
    ("i2v-a14b", dict(num_frames=5, n=3), "image", "takes at most 2 input image(s), got 3"),
])
def test_a_last_frame_where_the_checkpoint_cannot_read_it_is_refused(wan22_checkpoint, kind, kw, field, fragment):
    pipe = diffc.load(wan22_checkpoint(kind), device="cpu")
    images = [_image(seed=i) for i in range(kw.pop("n", 2))]
    with pytest.raises(InvalidArgumentError, match=re.escape(fragment)) as err:
        pipe.resolve(prompt=PROMPT, image=images, height=16, width=16, **kw)
    assert err.value.field == field

def test_two_expert_text_to_video_matches_diffusers(wan22_checkpoint):
    ckpt = wan22_checkpoint("t2v-a14b")
    kw = dict(height=32, width=48, num_frames=5, num_inference_steps=4, guidance_scale=5.0, guidance_scale_2=3.0,
              max_sequence_length=16)
    want = _reference("WanPipeline", ckpt, 7, **kw)
    pipe = diffc.load(ckpt, device="cpu")
    calls = _dit_calls(pipe)
    video = pipe.generate(PROMPT, seed=7, progress=False, **kw).frames
    assert psnr_uint8(video, want) >= MIN_PSNR
    # UniPC with flow shift 3 over 4 steps: timesteps 1000, 900, 750, 500 -> boundary 875: two of each expert
    assert calls == ["transformer", "transformer", "transformer_2", "transformer_2"]
    # guidance_scale_2 acts on the low-noise expert's steps only
    changed = pipe.generate(PROMPT, seed=7, progress=False, **{**kw, "guidance_scale_2": 6.0}).frames
    assert psnr_uint8(changed, video) < 60.0


def test_the_expert_switch_reads_no_timestep_on_the_device(wan22_checkpoint, monkeypatch):
    """Each step's expert comes from the schedule read once a generation, not from ``float(t)`` (a device read
    that makes the host wait at every step on a GPU): a timestep that refuses to be read changes nothing."""
    pipe = diffc.load(wan22_checkpoint("t2v-a14b"), device="cpu")
    calls = _dit_calls(pipe)
    real_float = torch.Tensor.__float__

    def no_read(t):
        if t.ndim == 0 and t.dtype == torch.int64:  # UniPC's timesteps
            raise AssertionError("a timestep was read on the host")
        return real_float(t)

    monkeypatch.setattr(torch.Tensor, "__float__", no_read)
    kw = dict(height=32, width=48, num_frames=5, num_inference_steps=4, guidance_scale=5.0, max_sequence_length=16)
    pipe.generate(PROMPT, seed=7, progress=False, **kw)
    assert calls == ["transformer", "transformer", "transformer_2", "transformer_2"]


def test_image_is_required_and_checked(wan22_checkpoint):
    pipe = diffc.load(wan22_checkpoint("i2v"), device="cpu")
    small = dict(height=16, width=16, num_frames=1, num_inference_steps=1)
    with pytest.raises(InvalidArgumentError, match="needs an input image"):
        pipe.generate(PROMPT, progress=False, **small)
    with pytest.raises(InvalidArgumentError, match="image"):
        pipe.generate(PROMPT, image="first.png", progress=False, **small)
    with pytest.raises(InvalidArgumentError, match="takes one image, the first frame"):
        pipe.generate(PROMPT, image=[_image(), _image()], progress=False, **small)
    with pytest.raises(InvalidArgumentError, match="num_frames"):
        pipe.generate(PROMPT, image=_image(), progress=False, **{**small, "num_frames": 6})



def _modes(image: Image.Image) -> dict[str, Image.Image]:
    grey = np.asarray(image.convert("L"), dtype=np.uint16) * 257
    rgba = image.copy()
    rgba.putalpha(Image.fromarray(np.random.default_rng(1).integers(0, 256, image.size[::-1], dtype=np.uint8)))
    return {"I;16": Image.fromarray(grey), "P": image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
            "RGBA": rgba}


@pytest.mark.parametrize("mode", ["I;16", "P", "RGBA"])
def test_a_first_frame_of_another_mode_is_taken_as_8_bit_rgb(wan22_checkpoint, mode):
    """The first frame becomes 8-bit RGB before it is resized, as on the image families: a 16-bit greyscale image was
    clipped almost white, a palette image resized by its palette indices (PIL resizes "P" nearest-neighbour) and an
    RGBA one resized with its alpha premultiplied."""
    from diffc.pipelines.images import to_rgb

    image = _modes(_image(seed=2))[mode]
    assert image.mode == mode
    pipe = diffc.load(wan22_checkpoint("i2v"), device="cpu")
    kw = dict(height=16, width=32, num_frames=1, num_inference_steps=1, seed=3, progress=False)
    got = pipe.generate(PROMPT, image=image, **kw).frames
    assert np.array_equal(got, pipe.generate(PROMPT, image=to_rgb(image), **kw).frames)

def test_a_vae_of_2x_temporal_compression_matches_diffusers(wan22_checkpoint):
    """I2V-A14B on a VAE that folds 2 frames per latent frame: 5 frames (3 latent frames, a 2-channel mask) give
    diffusers' video; 3 frames, which that VAE's 2k+1 rule allows but the VAE encoder (diffusers' too) reads only as
    1 + 4k frames, are refused naming num_frames (it was a "x: the number of frames ..." error from inside the VAE)."""
    ckpt = wan22_checkpoint("i2v-a14b-odd")
    kw = dict(height=16, width=32, num_frames=5, num_inference_steps=3, guidance_scale=4.0,
              max_sequence_length=TEXT_LEN)
    want = _reference("WanImageToVideoPipeline", ckpt, 3, image=_image(), **kw)
    pipe = diffc.load(ckpt, device="cpu")
    video = pipe.generate(PROMPT, image=_image(), seed=3, progress=False, **kw).frames
    assert video.shape == (5, 16, 32, 3) and video.std() > 1.0 and psnr_uint8(video, want) >= MIN_PSNR
    with pytest.raises(InvalidArgumentError, match=r"needs 4k\+1 frames .*got 3 \(nearest: 1 or 5\)") as err:
        pipe.generate(PROMPT, image=_image(), progress=False, **{**kw, "num_frames": 3})
    assert err.value.field == "num_frames"


def test_guidance_scale_2_needs_two_experts(wan22_checkpoint):
    pipe = diffc.load(wan22_checkpoint("i2v"), device="cpu")
    with pytest.raises(InvalidArgumentError, match="guidance_scale_2"):
        pipe.generate(PROMPT, image=_image(), guidance_scale_2=2.0, progress=False, height=16, width=16,
                      num_frames=1, num_inference_steps=1)


@pytest.mark.parametrize("kind", ["i2v", "i2v-a14b"])
def test_compiled_experts_match_eager_and_write_an_artifact(wan22_checkpoint, tmp_path, kind):
    """``compile`` traces every expert (the second one from the first one's inputs), the artifact loads into
    a fresh pipeline, and the compiled video equals the eager one."""
    ckpt = wan22_checkpoint(kind)
    kw = dict(height=32, width=48, num_frames=5, num_inference_steps=4, guidance_scale=4.0,
              max_sequence_length=TEXT_LEN)
    pipe = diffc.load(ckpt, device="cpu")
    eager = pipe.generate(PROMPT, image=_image(), seed=2, progress=False, **kw).frames
    report = pipe.compile([{k: kw[k] for k in ("height", "width", "num_frames", "max_sequence_length")}],
                          out=str(tmp_path / "art"), log=lambda _m: None)
    experts = {"transformer", "transformer_2"} if kind == "i2v-a14b" else {"transformer"}
    assert {b.stage for b in report.buckets} == experts
    compiled = diffc.load(ckpt, device="cpu", compiled=str(tmp_path / "art"))
    calls = _dit_calls(compiled)
    frames = compiled.generate(PROMPT, image=_image(), seed=2, progress=False, **kw).frames
    assert psnr_uint8(frames, eager) >= MIN_PSNR and set(calls) == experts
    assert all(compiled.components[name].compiled is not None for name in experts)


def test_cli_image_to_video_and_guidance_2(wan22_checkpoint, tmp_path, capsys):
    from diffc.cli.main import main

    first = tmp_path / "first.png"
    _image().save(first)
    out = tmp_path / "clip.mp4"
    code = main(["run", "--model", str(wan22_checkpoint("i2v-a14b")), "--image", str(first), "--prompt", PROMPT,
                 "--height", "16", "--width", "32", "--num-frames", "5", "--steps", "2", "--guidance-2", "2.0",
                 "--no-progress", "--output", str(out)])
    assert code == 0 and out.read_bytes()[4:8] == b"ftyp", capsys.readouterr().err
    code = main(["run", "--model", str(wan22_checkpoint("i2v")), "--image", str(first), "--prompt", PROMPT,
                 "--guidance-2", "2.0", "--no-progress", "--output", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert code == 2 and "guidance_scale_2" in err and "two-expert" in err and not (tmp_path / "x.mp4").exists()


def _ti2v_reference(ckpt, seed: int, image, **kw) -> np.ndarray:
    """diffusers' frames for a TI2V checkpoint: WanPipeline, or with an image WanImageToVideoPipeline on the folder."""
    if image is None:
        return _reference("WanPipeline", ckpt, seed, **kw)
    return _reference("WanImageToVideoPipeline", ckpt, seed, image=image, **kw)


@pytest.mark.parametrize("with_image", [False, True], ids=["t2v", "i2v"])
def test_expand_timesteps_text_and_image_to_video_match_diffusers(wan22_checkpoint, with_image):
    """Wan2.2 TI2V: one WanPipeline checkpoint, per-token timesteps; with an image its latent frame replaces the
    first latent frame at timestep 0 (diffusers runs that through WanImageToVideoPipeline on the same folder)."""
    ckpt = wan22_checkpoint("ti2v")
    kw = dict(height=32, width=48, num_frames=9, num_inference_steps=3, guidance_scale=5.0, max_sequence_length=16)
    image = _image() if with_image else None
    want = _ti2v_reference(ckpt, 4, image, **kw)
    pipe = diffc.load(ckpt, device="cpu")
    assert pipe.spec.image_input == "optional" and pipe.spec.defaults["num_frames"] == 121
    timesteps = []
    pipe.components["transformer"].register_forward_pre_hook(
        lambda m, a, k: timesteps.append(k["timestep"]), with_kwargs=True)
    video = pipe.generate(PROMPT, image=image, seed=4, progress=False, **kw).frames
    assert psnr_uint8(video, want) >= MIN_PSNR and video.std() > 1.0
    tokens = 3 * (32 // 8 // 2) * (48 // 8 // 2)  # latent frames x patches
    assert all(t.shape == (2, tokens) for t in timesteps)  # per token, the CFG pair batched
    first_frame = timesteps[0][:, : tokens // 3]
    assert bool((first_frame == 0).all()) == with_image
    if with_image:  # the decoded first frame is the input image, as far as the VAE reproduces it
        other = pipe.generate(PROMPT, image=_image(seed=1), seed=4, progress=False, **kw).frames
        assert psnr_uint8(other[:1], video[:1]) < psnr_uint8(video, want) - 10


def test_a_text_to_video_checkpoint_takes_no_image(wan_checkpoint):
    pipe = diffc.load(wan_checkpoint("base"), device="cpu")
    assert pipe.spec.image_input == "none"
    with pytest.raises(InvalidArgumentError, match="does not take an input image"):
        pipe.generate(PROMPT, image=_image(), progress=False, height=16, width=16, num_frames=1,
                      num_inference_steps=1)


@pytest.mark.parametrize("with_image", [False, True], ids=["t2v", "i2v"])
def test_ti2v_with_the_wan22_vae_matches_diffusers(wan22_checkpoint, with_image):
    """Wan2.2 TI2V-5B's layout: the Wan2.2 VAE (residual stages, 2x2 patchify), 16x-style compression here 8x."""
    ckpt = wan22_checkpoint("ti2v-5b")
    kw = dict(height=32, width=48, num_frames=5, num_inference_steps=3, guidance_scale=5.0, max_sequence_length=16)
    image = _image() if with_image else None
    want = _ti2v_reference(ckpt, 6, image, **kw)
    pipe = diffc.load(ckpt, device="cpu")
    assert pipe.components["vae"].config.is_residual
    video = pipe.generate(PROMPT, image=image, seed=6, progress=False, **kw).frames
    assert video.shape == (5, 32, 48, 3) and video.std() > 1.0
    assert psnr_uint8(video, want) >= MIN_PSNR


def test_ti2v_compiled_for_text_to_video_serves_image_to_video_too(wan22_checkpoint):
    """The per-token-timestep DiT compiles from a text-to-video call; an input image changes values, not shapes,
    so image-to-video runs the same compiled graphs."""
    ckpt = wan22_checkpoint("ti2v-5b")
    kw = dict(height=32, width=48, num_frames=5, num_inference_steps=3, guidance_scale=5.0, max_sequence_length=16)
    pipe = diffc.load(ckpt, device="cpu")
    eager = pipe.generate(PROMPT, image=_image(), seed=2, progress=False, **kw).frames
    pipe.compile([{k: kw[k] for k in ("height", "width", "num_frames", "max_sequence_length")}], log=lambda _m: None)
    out = pipe.generate(PROMPT, image=_image(), seed=2, progress=False, **kw)
    assert psnr_uint8(out.frames, eager) >= MIN_PSNR
    runtime = out.timings.runtime["compiled"]
    assert runtime["compiled_calls"] == 3 and runtime["eager_fallbacks"] == 0
