"""End to end: diffc.load(dir).generate(...) against diffusers.WanPipeline on the same checkpoint and seed."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

import diffc
from diffc.errors import CheckpointError, InvalidArgumentError
from diffc.pipelines.stages import RunContext
from diffc.runtime.perf import PerfRecorder
from tests.helpers import psnr_uint8, rel_err, with_component_of

from .conftest import WAN_VARIANTS

PROMPT = "a red fox in snow"
# fp32 on CPU: diffc differs from diffusers only in batching cond + uncond into one DiT forward, and the
# frames come out identical or within a few uint8 steps (> 90 dB measured). 35 dB is the acceptance floor;
# 60 keeps the check sharp enough to catch a wrong negative prompt (~38 dB on these tiny models).
MIN_PSNR = 60.0
STAGES = ["encode_prompt", "prepare_latents", "prepare_timesteps", "denoise", "decode", "postprocess"]

# (variant, height, width, num_frames, steps, guidance, negative_prompt, max_sequence_length).
# diffusers' WanPipeline.check_inputs wants multiples of 16 whatever the VAE, so parity sizes are.
CASES = [
    ("base", 32, 48, 5, 2, 5.0, None, 16),
    ("base", 16, 16, 1, 3, 1.0, None, 12),
    ("odd-heads", 48, 32, 5, 3, 5.0, "blurry, low quality", 20),
    ("odd-heads", 32, 32, 9, 2, 1.0, None, 8),
    ("wide-patch", 16, 48, 9, 2, 5.0, "blurry", 16),
]


def _reference(ckpt, prompt, seeds, scheduler=None, dtype=torch.float32, **kw) -> list[np.ndarray]:
    """diffusers' frames as uint8 (F, H, W, 3) per video: output_type="np", then * 255 and round."""
    import diffusers

    ref = diffusers.WanPipeline.from_pretrained(ckpt, dtype=dtype)
    if scheduler is not None:
        ref.scheduler = scheduler
    ref.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    frames = ref(prompt, generator=generators if len(generators) > 1 else generators[0], output_type="np", **kw).frames
    return [(video * 255).round().astype("uint8") for video in frames]


def _count_dit_batches(pipe) -> list[int]:
    """Record the batch size of every DiT forward the pipeline makes."""
    batches: list[int] = []
    pipe.components["transformer"].register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    return batches


def _ctx(pipe) -> RunContext:
    return RunContext(pipe.components, pipe.device, pipe.dtype, PerfRecorder(pipe.device))


@pytest.mark.parametrize("variant,height,width,frames,steps,guidance,negative,max_len", CASES)
def test_matches_diffusers(wan_checkpoint, variant, height, width, frames, steps, guidance, negative, max_len):
    ckpt = wan_checkpoint(variant)
    kw = dict(height=height, width=width, num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
              negative_prompt=negative, max_sequence_length=max_len)
    want = _reference(ckpt, PROMPT, [11], **kw)[0]
    pipe = diffc.load(ckpt, device="cpu")
    batches = _count_dit_batches(pipe)
    out = pipe.generate(PROMPT, seed=11, progress=False, **kw)
    assert out.images is None and len(out.videos) == 1
    video = out.frames
    assert video.shape == (frames, height, width, 3) and video.dtype == np.uint8
    assert video.std() > 1.0, "degenerate (flat) video: the parity check would prove nothing"
    assert psnr_uint8(video, want) >= MIN_PSNR
    # classifier-free guidance is one batched forward of cond + uncond per step; none without guidance
    assert batches == [2 if guidance > 1 else 1] * steps
    assert out.seeds == [11] and all("truncated" in w for w in out.warnings)
    assert len(out.timings.step_ms) == steps and list(out.timings.stages) == STAGES


def test_batch_with_one_seed_per_prompt_matches_diffusers(wan_checkpoint):
    ckpt = wan_checkpoint("base")
    prompts = ["a red fox in snow", "a calico cat playing piano"]
    kw = dict(height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=4.0, max_sequence_length=12,
              negative_prompt=["blurry", "low quality"])
    refs = _reference(ckpt, prompts, [3, 4], **kw)
    pipe = diffc.load(ckpt)
    batches = _count_dit_batches(pipe)
    out = pipe.generate(prompts, seed=[3, 4], progress=False, **kw)
    assert batches == [4, 4]
    for video, ref in zip(out.videos, refs):
        assert psnr_uint8(video, ref) >= MIN_PSNR
    single = pipe.generate(prompts[1], seed=4, progress=False, **{**kw, "negative_prompt": "low quality"})
    assert psnr_uint8(single.frames, out.videos[1]) >= MIN_PSNR
    # one seed for a batch draws the whole batch from one generator, as diffusers does
    ref_one = _reference(ckpt, prompts, [5], **kw)
    out_one = pipe.generate(prompts, seed=5, progress=False, **kw)
    for video, ref in zip(out_one.videos, ref_one):
        assert psnr_uint8(video, ref) >= MIN_PSNR


def test_euler_scheduler_matches_diffusers(wan_checkpoint):
    import diffusers

    ckpt = wan_checkpoint("odd-heads")
    shift = WAN_VARIANTS["odd-heads"].flow_shift
    kw = dict(height=32, width=48, num_frames=5, num_inference_steps=3, guidance_scale=5.0, max_sequence_length=16)
    want = _reference(ckpt, PROMPT, [2], scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=shift), **kw)[0]
    pipe = diffc.load(ckpt, scheduler="euler")
    assert type(pipe.components["scheduler"]).__name__ == "FlowMatchEulerDiscreteScheduler"
    out = pipe.generate(PROMPT, seed=2, progress=False, **kw)
    assert psnr_uint8(out.frames, want) >= MIN_PSNR
    unipc = diffc.load(ckpt).generate(PROMPT, seed=2, progress=False, **kw)
    assert psnr_uint8(unipc.frames, out.frames) < 60, "euler and unipc gave the same video"


def test_text_encoding_matches_diffusers(wan_checkpoint):
    import diffusers
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean as wan_prompt_clean

    from diffc.pipelines.wan import encode_prompt, prompt_clean

    ckpt = wan_checkpoint("wide-patch")
    ref = diffusers.WanPipeline.from_pretrained(ckpt)
    pipe = diffc.load(ckpt)
    # runs of whitespace, tabs, newlines and doubly escaped HTML entities are cleaned as Wan cleans them
    prompts = ["  a red\tfox &amp;amp; a\n\n cat  ", "portrait of an old sailor with a white beard"]
    negatives = ["blurry", ""]
    want, want_neg = ref.encode_prompt(prompts, negative_prompt=negatives, do_classifier_free_guidance=True,
                                       max_sequence_length=64)
    got = encode_prompt(_ctx(pipe), {"prompt": prompts, "negative_prompt": negatives, "guidance_scale": 5.0,
                                     "max_sequence_length": 64})
    assert got["prompt_embeds"].shape == (2, 64, 16) and got["prompt_embeds"].dtype == torch.float32
    assert rel_err(got["prompt_embeds"], want) < 1e-6 and rel_err(got["negative_prompt_embeds"], want_neg) < 1e-6
    # past each prompt's own length the embeddings are exactly zero; the "" negative keeps only its </s>
    cleaned = [wan_prompt_clean(p) for p in prompts]
    assert [prompt_clean(p) for p in prompts] == cleaned == ["a red fox & a cat", prompts[1]]
    lengths = ref.tokenizer(cleaned, padding="max_length", max_length=64, truncation=True).attention_mask
    for embeds, mask in zip(got["prompt_embeds"], lengths):
        n = sum(mask)
        assert embeds[n:].abs().max() == 0 and embeds[:n].abs().min(dim=-1).values.gt(0).all()
    assert got["negative_prompt_embeds"][1, 1:].abs().max() == 0

    # without guidance there is no negative pass; the default negative prompt is ""
    no_cfg = encode_prompt(_ctx(pipe), {"prompt": prompts, "negative_prompt": None, "guidance_scale": 1.0,
                                        "max_sequence_length": 64})
    assert no_cfg["negative_prompt_embeds"] is None
    _, want_empty = ref.encode_prompt(prompts, do_classifier_free_guidance=True, max_sequence_length=64)
    default = encode_prompt(_ctx(pipe), {"prompt": prompts, "negative_prompt": None, "guidance_scale": 5.0,
                                         "max_sequence_length": 64})
    assert rel_err(default["negative_prompt_embeds"], want_empty) < 1e-6


def test_initial_latents_and_timesteps_match_diffusers(wan_checkpoint):
    import diffusers

    from diffc.pipelines.wan import prepare_latents, prepare_timesteps

    for variant in ("base", "odd-heads"):
        ckpt = wan_checkpoint(variant)
        ref = diffusers.WanPipeline.from_pretrained(ckpt)
        pipe = diffc.load(ckpt)
        channels = ref.transformer.config.in_channels
        for batch, h, w, f, seeds in [(1, 32, 48, 1, [5]), (2, 16, 32, 9, [5, 6]), (2, 48, 16, 5, [7])]:
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            want = ref.prepare_latents(batch, channels, h, w, f, torch.float32, "cpu", gens if len(gens) > 1 else gens[0])
            got = prepare_latents(_ctx(pipe), {"prompt": ["x"] * batch, "height": h, "width": w, "num_frames": f,
                                               "seeds": seeds})["latents"]
            assert got.dtype == torch.float32 and torch.equal(got, want)
        ref.scheduler.set_timesteps(7, device="cpu")
        got = prepare_timesteps(_ctx(pipe), {"num_inference_steps": 7})["timesteps"]
        assert torch.equal(got, ref.scheduler.timesteps)


def test_warnings_for_truncation_and_unused_negative_prompt(wan_checkpoint):
    pipe = diffc.load(wan_checkpoint("base"))
    kw = dict(height=16, width=16, num_frames=1, num_inference_steps=1, seed=0, progress=False, max_sequence_length=6)
    out = pipe.generate(" ".join([PROMPT] * 10), negative_prompt="blurry", guidance_scale=1.0, **kw)
    assert any("truncated to 6 UMT5 tokens" in w for w in out.warnings)
    assert any("negative_prompt is ignored" in w for w in out.warnings)
    long_negative = pipe.generate("a red fox", negative_prompt=" ".join(["blurry low quality"] * 10), **kw)
    assert any("UMT5 (negative prompt) tokens" in w for w in long_negative.warnings)
    assert pipe.generate("a red fox", **{**kw, "max_sequence_length": 16}).warnings == []


@pytest.mark.parametrize("variant,scheduler", [("base", None), ("odd-heads", "euler")])
def test_bf16_matches_diffusers_bf16(wan_checkpoint, variant, scheduler):
    import diffusers

    ckpt = wan_checkpoint(variant)
    euler = diffusers.FlowMatchEulerDiscreteScheduler(shift=WAN_VARIANTS[variant].flow_shift) if scheduler else None
    kw = dict(height=32, width=48, num_frames=5, num_inference_steps=3, guidance_scale=5.0, max_sequence_length=16)
    want = _reference(ckpt, PROMPT, [1], scheduler=euler, dtype=torch.bfloat16, **kw)[0]
    pipe = diffc.load(ckpt, dtype="bf16", scheduler=scheduler)
    dit = pipe.components["transformer"]
    assert dit.patch_embedding.weight.dtype == torch.bfloat16
    assert dit.scale_shift_table.dtype == torch.float32
    assert dit.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    out = pipe.generate(PROMPT, seed=1, progress=False, **kw)
    # same dtype flow as diffusers (fp32 latents, bf16 DiT input, fp32 modules): identical or nearly (inf / 50 dB seen)
    assert psnr_uint8(out.frames, want) >= 40.0


def test_defaults_are_wan21s(wan_checkpoint):
    pipe = diffc.load(wan_checkpoint("base"))
    request = pipe.resolve(prompt=PROMPT)
    assert (request.height, request.width, request.num_frames) == (480, 832, 81)
    assert (request.num_inference_steps, request.guidance_scale, request.max_sequence_length) == (50, 5.0, 512)
    assert pipe.spec.uses_negative_prompt and pipe.spec.output == "video"


@pytest.mark.parametrize("variant,kwargs,field,fragment", [
    ("base", dict(num_frames=4), "num_frames", "4k+1 frames (1, 5, 9, ...), got 4 (nearest: 5)"),
    ("base", dict(num_frames=83), "num_frames", "(nearest: 81 or 85)"),
    ("base", dict(num_frames=80), "num_frames", "(nearest: 81)"),
    ("base", dict(num_frames=0), "num_frames", "integer from 1 to 253"),
    ("base", dict(num_frames=257), "num_frames", "integer from 1 to 253"),
    ("base", dict(num_frames=5.0), "num_frames", "integer"),
    ("odd-heads", dict(num_frames=4), "num_frames", "2k+1 frames (1, 3, 5, ...)"),
    ("base", dict(height=40), "height", "multiple of 16, got 40 (nearest: 32 or 48)"),
    ("base", dict(width=20), "width", "multiple of 16, got 20 (nearest: 16)"),
    ("base", dict(height=8), "height", "(nearest: 16)"),
    ("base", dict(height=1040), "height", "at most 1024"),
    ("odd-heads", dict(height=44), "height", "multiple of 8"),
    ("wide-patch", dict(width=40), "width", "multiple of 16, got 40"),
    ("base", dict(height=0), "height", "integer from 1"),
    ("base", dict(max_sequence_length=0), "max_sequence_length", "from 1 to 512"),
    ("base", dict(max_sequence_length=513), "max_sequence_length", "from 1 to 512"),
    ("base", dict(guidance_scale=-1.0), "guidance_scale", "from 0 to 100"),
    ("base", dict(guidance_scale=float("nan")), "guidance_scale", "number"),
    ("base", dict(num_inference_steps=0), "num_inference_steps", "from 1 to 1000"),
    ("base", dict(negative_prompt=["a", "b", "c"]), "negative_prompt", "one string per prompt"),
    ("base", dict(seed=[1, 2]), "seed", "one per prompt"),
])
def test_bad_requests_are_refused(wan_checkpoint, variant, kwargs, field, fragment):
    pipe = diffc.load(wan_checkpoint(variant))
    with pytest.raises(InvalidArgumentError) as info:
        pipe.generate(PROMPT, progress=False, **{"height": 16, "width": 16, "num_frames": 1, **kwargs})
    assert info.value.field == field and fragment in str(info.value)


def test_temporal_patch_must_divide_the_latent_frames():
    from types import SimpleNamespace

    from diffc.pipelines.base import GenerationRequest
    from diffc.pipelines.wan import validate

    dit = SimpleNamespace(config=SimpleNamespace(patch_size=(2, 2, 2), rope_max_seq_len=1024, text_dim=8,
                                                 in_channels=16, out_channels=16, image_dim=None))
    vae = SimpleNamespace(config=SimpleNamespace(scale_factor_temporal=4, scale_factor_spatial=8, z_dim=16),
                          check_latent_stats=lambda: None)
    text_encoder = SimpleNamespace(config=SimpleNamespace(d_model=8))
    scheduler = SimpleNamespace(config=SimpleNamespace())
    pipe = SimpleNamespace(components={"transformer": dit, "vae": vae, "text_encoder": text_encoder,
                                       "scheduler": scheduler},
                           spec=SimpleNamespace(pipeline_class="WanPipeline"))
    request = GenerationRequest(PROMPT, height=32, width=32, num_frames=5, max_sequence_length=16)
    validate(pipe, request)  # 2 latent frames
    request.num_frames = 9
    with pytest.raises(InvalidArgumentError, match="num_frames: 9 frames give 3 latent frames"):
        validate(pipe, request)


def test_non_16_multiples_where_the_checkpoint_allows_them(wan_checkpoint):
    # the 4x-spatial VAE with patch 2 takes multiples of 8; the size rule comes from the components
    out = diffc.load(wan_checkpoint("odd-heads")).generate(PROMPT, height=24, width=40, num_frames=3,
                                                            num_inference_steps=1, seed=0, progress=False)
    assert out.frames.shape == (3, 24, 40, 3)


# ---- the built-in demo through the CLI --------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("diffc-cache")


def test_demo_t2v_runs_through_the_cli(demo_cache, tmp_path, monkeypatch, capsys):
    import imageio.v3 as iio

    from diffc.cli.main import main

    monkeypatch.setenv("DIFFC_CACHE", str(demo_cache))
    out, perf = tmp_path / "fox.mp4", tmp_path / "perf.json"
    code = main(["run", "--task", "t2v", "--prompt", PROMPT, "--output", str(out), "--seed", "3", "--no-progress",
                 "--perf-dump-path", str(perf)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "demo wan model" in captured.err and "RANDOM weights" in captured.err
    assert f"wrote {out} (128x128x9f, 4 steps, seed 3)" in captured.out
    frames = iio.imread(out, plugin="FFMPEG")
    assert frames.shape == (9, 128, 128, 3) and frames.std() > 1.0
    assert iio.immeta(out, plugin="FFMPEG")["fps"] == 16
    dump = json.loads(perf.read_text())
    assert dump["request"]["num_frames"] == 9 and list(dump["stages"]) == STAGES
    assert [p.name for p in tmp_path.iterdir()] and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_demo_checkpoint_is_wan21_and_matches_diffusers(demo_cache, monkeypatch):
    from diffc.demo import demo_checkpoint

    monkeypatch.setenv("DIFFC_CACHE", str(demo_cache))
    root = demo_checkpoint("wan")
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    sched = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "UniPCMultistepScheduler" and sched["prediction_type"] == "flow_prediction"
    assert sched["use_flow_sigmas"] is True and sched["flow_shift"] == 3.0
    kw = dict(height=32, width=48, num_frames=5, num_inference_steps=2, max_sequence_length=16)
    want = _reference(root, PROMPT, [9], **kw)[0]
    out = diffc.load(root).generate(PROMPT, seed=9, progress=False, **kw)
    assert psnr_uint8(out.frames, want) >= MIN_PSNR


@pytest.mark.parametrize("argv,fragment", [
    (["--output", "fox.png"], "--output: a video model writes .mp4 files, got 'fox.png'"),
    (["--fps", "0"], "--fps: must be from 1 to 240"),
    (["--num-frames", "8"], "--num-frames: Wan needs 4k+1 frames"),
    (["--height", "100"], "--height: Wan needs a multiple of 16"),
    (["--guidance", "-2"], "--guidance: must be a number from 0 to 100"),
])
def test_demo_cli_errors(demo_cache, tmp_path, monkeypatch, capsys, argv, fragment):
    from diffc.cli.main import main

    monkeypatch.setenv("DIFFC_CACHE", str(demo_cache))
    monkeypatch.chdir(tmp_path)
    code = main(["run", "--task", "t2v", "--prompt", PROMPT, "--no-progress", *argv])
    assert code == 2 and fragment in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("changes,fragment", [
    ({"transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.875}, "missing folder"),
    ({"boundary_ratio": 1.5}, "boundary_ratio must be a number in [0, 1], got 1.5"),
    ({"boundary_ratio": "high"}, "boundary_ratio must be a number in [0, 1], got 'high'"),
    ({"expand_timesteps": "yes"}, "expand_timesteps must be true or false, got 'yes'"),
])
def test_unsupported_or_broken_wan22_checkpoints_are_refused(wan_checkpoint, tmp_path, changes, fragment):
    root = tmp_path / "ckpt"
    shutil.copytree(wan_checkpoint("base"), root)
    index = json.loads((root / "model_index.json").read_text())
    index.update(changes)
    (root / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(fragment)):
        diffc.load(root)


@pytest.mark.parametrize("changes,fragment", [
    ({"latents_mean": [0.0] * 3}, "latents_mean has 3 values, z_dim is 16"),
    ({"latents_std": [1.0] * 15 + [0.0]}, "latents_std holds 0 (channel 15)"),
])
def test_vae_latent_statistics_that_cannot_be_used_are_refused_before_any_work(wan_checkpoint, tmp_path, changes,
                                                                                fragment):
    """They were read only at the decode: a wrong count refused the request after the whole denoising, and a std of
    0 (latents scaled by 1 / 0) decoded every video to the mean latent without a word."""
    root = tmp_path / "ckpt"
    shutil.copytree(wan_checkpoint("base"), root)
    config = json.loads((root / "vae" / "config.json").read_text())
    (root / "vae" / "config.json").write_text(json.dumps({**config, **changes}))
    pipe = diffc.load(root)
    batches = _count_dit_batches(pipe)
    with pytest.raises(CheckpointError, match=re.escape(fragment)):
        pipe.generate(PROMPT, height=16, width=16, num_frames=1, num_inference_steps=1, progress=False)
    assert batches == []


@pytest.mark.parametrize("swap,fragment", [
    ("text_encoder", "text_encoder's width (d_model) is 24 but the transformer's text_dim is 32"),
    ("vae", "the transformer's out_channels is 16 but the vae's z_dim is 4"),
])
def test_a_component_of_another_checkpoint_is_refused_before_any_work(wan_checkpoint, tmp_path, swap, fragment):
    """A UMT5 of another width stopped in the DiT naming encoder_hidden_states; a VAE of other latent channels was
    torch's RuntimeError from the latent normalisation."""
    root = with_component_of(wan_checkpoint("base"), wan_checkpoint("odd-heads"), swap, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=f"^WanPipeline: {re.escape(fragment)}; the checkpoint's components"):
        diffc.load(root).generate(PROMPT, height=16, width=16, num_frames=1, num_inference_steps=1, progress=False)
