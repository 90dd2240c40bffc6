"""Z-Image end to end against diffusers.ZImagePipeline on the same tiny checkpoint and seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffc
from diffc.errors import InvalidArgumentError
from tests.helpers import psnr_uint8, rel_err

PROMPT = "a red fox in snow"

# (variant, height, width, steps, guidance, max_sequence_length, negative prompt)
CASES = [
    ("tiny", 64, 48, 3, 0.0, 64, None),          # Turbo: no guidance
    ("tiny", 32, 32, 2, 2.5, 48, "blurry, low quality"),  # CFG: cond/uncond captions of other lengths (mask)
    ("odd", 48, 16, 2, 1.0, 40, None),           # 1 head, 2 refiners, 3 latent channels, odd image token count
    ("two-patches", 32, 48, 2, 2.0, 32, None),   # embedders for patches 1 and 2 (was a WeightMismatchError)
]


def _diffusers_images(ckpt, prompt, seeds, **kw):
    import diffusers

    ref = diffusers.ZImagePipeline.from_pretrained(ckpt)
    ref.set_progress_bar_config(disable=True)
    generator = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = ref(prompt, generator=generator if len(generator) > 1 else generator[0], output_type="np", **kw).images
    return [(img * 255).round().astype("uint8") for img in out]


@pytest.mark.parametrize("variant,height,width,steps,guidance,max_len,negative", CASES)
def test_matches_diffusers(zimage_checkpoint, variant, height, width, steps, guidance, max_len, negative):
    ckpt = zimage_checkpoint(variant)
    kw = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
              max_sequence_length=max_len, negative_prompt=negative)
    ref = _diffusers_images(ckpt, PROMPT, [11], **kw)[0]
    out = diffc.load(ckpt, device="cpu").generate(PROMPT, seed=11, progress=False, **kw)
    image = np.asarray(out.images[0])
    assert image.shape == (height, width, 3) and image.dtype == np.uint8
    assert image.std() > 1.0, "degenerate (flat) image: the parity check would prove nothing"
    assert psnr_uint8(image, ref) >= 40.0
    assert len(out.timings.step_ms) == steps


def test_batch_of_prompts_of_other_lengths_matches_diffusers(zimage_checkpoint):
    ckpt = zimage_checkpoint("tiny")
    prompts = ["a red fox", "portrait of an old sailor with a white beard, oil painting, golden hour light"]
    kw = dict(height=32, width=32, num_inference_steps=2, guidance_scale=0.0, max_sequence_length=64)
    refs = _diffusers_images(ckpt, prompts, [3, 4], **kw)
    out = diffc.load(ckpt).generate(prompts, seed=[3, 4], progress=False, **kw)
    for image, ref in zip(out.images, refs):
        assert psnr_uint8(image, ref) >= 40.0


def test_default_text_length_fits_the_checkpoint(zimage_checkpoint):
    """A request without max_sequence_length on a DiT whose caption axis holds fewer than diffusers' default 512
    tokens (axes_lens[0] = 300): diffc defaults to what fits (236) instead of refusing a field the user never set,
    and a short prompt gives diffusers' picture."""
    ckpt = zimage_checkpoint("short-captions")
    kw = dict(height=32, width=48, num_inference_steps=2, guidance_scale=2.0, negative_prompt="blurry")
    ref = _diffusers_images(ckpt, PROMPT, [6], **kw)[0]
    pipe = diffc.load(ckpt)
    assert pipe.resolve(prompt=PROMPT, **kw).max_sequence_length == 236
    image = np.asarray(pipe.generate(PROMPT, seed=6, progress=False, **kw).images[0])
    assert image.std() > 1.0 and psnr_uint8(image, ref) >= 40.0
    with pytest.raises(InvalidArgumentError, match="from 1 to 236") as err:
        pipe.resolve(prompt=PROMPT, max_sequence_length=512, **kw)
    assert err.value.field == "max_sequence_length"


def test_dit_matches_diffusers_with_padding_masks(zimage_checkpoint):
    """The DiT alone on a batch whose captions differ in length: masks and pad tokens as diffusers."""
    import diffusers

    ckpt = zimage_checkpoint("tiny")
    ref = diffusers.ZImageTransformer2DModel.from_pretrained(ckpt / "transformer")
    dit = diffc.load(ckpt).components["transformer"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 6, generator=gen)
    caps = torch.randn(2, 40, dit.config.cap_feat_dim, generator=gen)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, :40], mask[1, 3:20] = True, True  # 40 and 17 tokens (left padding on the second)
    t = torch.tensor([0.3, 0.3])
    with torch.no_grad():
        want = ref(list(x.unsqueeze(2).unbind(0)), t, [caps[0], caps[1][mask[1]]], return_dict=False)[0]
        got = dit(hidden_states=x, timestep=t, encoder_hidden_states=caps, encoder_attention_mask=mask)
    assert rel_err(got, torch.stack(want).squeeze(2)) < 1e-5


def test_defaults_are_turbo():
    from diffc.pipelines.base import pipeline_spec

    spec = pipeline_spec("ZImagePipeline")
    assert spec.defaults["num_inference_steps"] == 8 and spec.defaults["guidance_scale"] == 0.0
    assert spec.image_input == "none"


@pytest.mark.parametrize("kwargs,field,fragment", [
    (dict(height=42), "height", "multiple of 4"),
    (dict(width=260), "width", "at most 256"),
    (dict(max_sequence_length=5000), "max_sequence_length", "integer from 1"),
    (dict(num_frames=5), "num_frames", "image model"),
])
def test_bad_requests_name_the_field(zimage_checkpoint, kwargs, field, fragment):
    pipe = diffc.load(zimage_checkpoint("tiny"))
    with pytest.raises(InvalidArgumentError, match=fragment) as err:
        pipe.generate(PROMPT, progress=False, **{"height": 32, "width": 32, **kwargs})
    assert err.value.field == field


HOST_READS = {"aten._local_scalar_dense.default", "aten.equal.default", "aten.nonzero.default",
              "aten.lift_fresh.default", "aten.is_nonzero.default"}


def _ops_of(fn) -> set[str]:
    """The ATen ops ``fn()`` dispatches (under no_grad)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func))
            return func(*args, **(kwargs or {}))

    ops = Ops()
    with torch.no_grad(), ops:
        fn()
    return ops.seen


@pytest.mark.parametrize("lengths", [(40, 40), (40, 33), (40, 17)], ids=["same", "same-padded", "different"])
def test_dit_shares_rope_tables_without_comparing_device_tensors(zimage_checkpoint, lengths, monkeypatch):
    """Whether one RoPE table serves the batch follows from the padded caption lengths on the host: the forward
    compares no device tensors (aten.equal, a device-to-host read that stalls the stream and breaks CUDA graph
    capture), and decides as comparing the ids would."""
    import diffc.models.zimage.transformer as zimage_transformer

    ids_seen = []
    real = zimage_transformer.rope_tables
    monkeypatch.setattr(zimage_transformer, "rope_tables", lambda ids, *a: (ids_seen.append(ids), real(ids, *a))[1])
    dit = diffc.load(zimage_checkpoint("tiny")).components["transformer"]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 6, generator=gen)
    caps = torch.randn(2, 40, dit.config.cap_feat_dim, generator=gen)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, :lengths[0]], mask[1, :lengths[1]] = True, True
    seen = _ops_of(lambda: dit(hidden_states=x, timestep=torch.tensor([0.3, 0.3]), encoder_hidden_states=caps,
                               encoder_attention_mask=mask))
    assert "aten.equal.default" not in seen
    assert len(ids_seen) == 3  # image, caption and joint tables
    shared = lengths[0] == lengths[1] or (lengths[0] + 31) // 32 == (lengths[1] + 31) // 32
    assert all(torch.equal(ids[0], ids[1]) == shared for ids in ids_seen)


# (caption tokens, each sample's kept positions): all kept, right padding, left padding, more tokens than kept
MASKS = {"all": (40, [range(40), range(40)]), "right": (40, [range(40), range(17)]),
         "left": (40, [range(33), range(3, 20)]), "long": (96, [range(5, 21), range(64)])}


@pytest.mark.parametrize("layout", list(MASKS))
def test_dit_with_padded_caption_lengths_reads_nothing_back_and_matches(zimage_checkpoint, layout):
    """With caption_layout's padded lengths the forward reads nothing from the device (no item/tolist, no
    comparison, no boolean indexing, no host-to-device copy: what a CUDA graph capture refuses) and gives the
    output of the forward that reads the mask itself, bit for bit."""
    from diffc.models.zimage.transformer import caption_layout

    dit = diffc.load(zimage_checkpoint("tiny")).components["transformer"]
    tokens, kept = MASKS[layout]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 6, generator=gen)
    caps = torch.randn(2, tokens, dit.config.cap_feat_dim, generator=gen)
    mask = torch.zeros(2, tokens, dtype=torch.bool)
    for row, positions in enumerate(kept):
        mask[row, list(positions)] = True
    t = torch.tensor([0.3, 0.3])
    captions, prefix, padded = caption_layout(caps, mask)
    assert padded == tuple(-(-len(p) // 32) * 32 for p in kept)
    for row, positions in enumerate(kept):
        assert torch.equal(captions[row, :len(positions)], caps[row, list(positions)])  # kept tokens first, in order
    outs = {}
    host = _ops_of(lambda: outs.setdefault("reads", dit(hidden_states=x, timestep=t, encoder_hidden_states=caps,
                                                        encoder_attention_mask=mask)))
    fixed = _ops_of(lambda: outs.setdefault("fixed", dit(hidden_states=x, timestep=t, encoder_hidden_states=captions,
                                                         encoder_attention_mask=prefix, padded_caption_lengths=padded)))
    assert host & HOST_READS  # the check sees host reads where there are some
    assert not fixed & HOST_READS, fixed & HOST_READS
    assert torch.equal(outs["fixed"], outs["reads"])


@pytest.mark.parametrize("padded,mask_kind,fragment", [
    ((64,), "right", "expected 2 multiple"),
    ((64, 40), "right", "got \\(64, 40\\)"),
    ((64, 96), "right", "from 32 to 64"),
    ((64, True), "right", "multiple"),
    ([32, 32], "none", "expected 64 each"),
    ("64", "right", "multiple"),
])
def test_bad_padded_caption_lengths_name_the_field(zimage_checkpoint, padded, mask_kind, fragment):
    dit = diffc.load(zimage_checkpoint("tiny")).components["transformer"]
    mask = None
    if mask_kind == "right":
        mask = torch.zeros(2, 40, dtype=torch.bool)
        mask[:, :17] = True
    with pytest.raises(InvalidArgumentError, match=fragment) as err:
        dit(hidden_states=torch.zeros(2, 4, 8, 6), timestep=torch.tensor([0.3, 0.3]),
            encoder_hidden_states=torch.zeros(2, 40, dit.config.cap_feat_dim), encoder_attention_mask=mask,
            padded_caption_lengths=padded)
    assert err.value.field == "padded_caption_lengths"


def test_guided_generation_replays_one_dit_graph(zimage_checkpoint, monkeypatch):
    """Prompt and negative prompt of other lengths (a padding mask): the DiT call's signature holds the padded
    caption lengths (host values), so every step after the first replays the graph, with the eager pixels."""
    import diffc.runtime.dit_stack as dit_stack_module
    from tests.runtime.test_cudagraphs import EmulatedGraphs

    pipe = diffc.load(zimage_checkpoint("tiny"), device="cpu")
    kw = dict(height=32, width=32, num_inference_steps=3, guidance_scale=2.5, max_sequence_length=64,
              negative_prompt="blurry", seed=5, progress=False)
    eager = pipe.generate(PROMPT, **kw).images[0]
    monkeypatch.setattr(dit_stack_module, "CudaGraphModule", EmulatedGraphs)
    stack = pipe.components["transformer"]
    stack.set_cuda_graphs(True)
    assert np.array_equal(pipe.generate(PROMPT, **kw).images[0], eager)
    graphs = stack.describe_graphs()
    assert (graphs["captures"], graphs["replays"], graphs["fallbacks"]) == (1, 2, 0)
    assert "padded_caption_lengths=(32, 32)" in graphs["graphs"][0]["key"]


@pytest.mark.parametrize("swap,fragment", [
    ("text_encoder", "text_encoder's width (hidden_size) is 20 but the transformer's cap_feat_dim is 24"),
    ("vae", "the vae's latent_channels is 3 but the transformer's in_channels is 4"),
])
def test_a_component_of_another_checkpoint_is_refused_before_any_work(zimage_checkpoint, tmp_path, swap, fragment):
    """A Qwen3 of another width stopped in the DiT naming encoder_hidden_states; a VAE of other latent channels in
    the VAE naming z, after the whole denoising."""
    import re

    from diffc.errors import CheckpointError
    from tests.helpers import with_component_of

    root = with_component_of(zimage_checkpoint("tiny"), zimage_checkpoint("odd"), swap, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=f"^ZImagePipeline: {re.escape(fragment)}; the checkpoint's components"):
        diffc.load(root).generate(PROMPT, height=16, width=16, num_inference_steps=1, progress=False)
