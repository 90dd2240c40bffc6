"""The fusion passes on diffusers' own transformer blocks (tiny SD3, HunyuanVideo, LTX-Video, CogVideoX).

Regional compilation traces one block of each repeated class alone: here each block class the model
lists in ``_repeated_blocks`` (else ``_no_split_modules``) is captured with the keyword arguments the
pipeline really passes it (a forward pre-hook during one denoising step of the generic backend), then
``compile_module`` runs the default passes. Counts are exact per block; each pass whose pattern the
block contains matches at least once; the rewritten graph computes what the block computes.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils._pytree import tree_map_only

import diffc
from diffc.compile.compiler import compile_module

# Small requests: the capture needs one step of the pipeline, not a good picture.
CAPTURE = {
    "sd3": dict(height=16, width=16, max_sequence_length=8),
    "hunyuan": dict(height=32, width=32, num_frames=5, max_sequence_length=8),
    "ltx": dict(height=32, width=32, num_frames=9, max_sequence_length=8),
    "cogvideox": dict(height=16, width=16, num_frames=5, max_sequence_length=8),
}
PASSES = ("rms_norm", "qk_norm_rope", "rms_norm_kernel", "adaln_modulate", "gated_residual", "gelu_tanh", "timestep_embedding",
          "silu_mul", "gated_residual_adaln", "key_padding_attention")
ZERO = dict.fromkeys(PASSES, 0)
# Sites per block (float32 and bf16 alike):
# SD3 JointTransformerBlock (SD3.5: qk_norm="rms_norm", no RoPE): rms_norm on q, k, added q, added k = 4;
#   AdaLayerNormZero on both streams + both MLP norms = 4 adaln; residuals after attention and MLP on both
#   streams = 4; FeedForward GELU-tanh on both = 2; both attention residuals feed their MLP norm = 2 pairs.
# HunyuanVideoTransformerBlock (dual stream): rms_norm 4 as SD3; the image stream's q/k RMSNorm + RoPE
#   (sequence_dim=1) = 1 qk_norm_rope; adaln 4, gated 4, gelu 2, pairs 2 as SD3.
# HunyuanVideoSingleTransformerBlock: q/k RMSNorm = 2 (RoPE runs on the image slice of the joint sequence,
#   not this pattern); AdaLayerNormZeroSingle = 1; ``gate * proj_out(h) + residual`` = 1; proj_mlp GELU-tanh 1.
# HunyuanVideoTokenRefiner: its own timestep sinusoid = 1; the refiner block's two gated residuals = 2; its
#   two affine float32 LayerNorms (norm1, norm2) = 2 adaln (scale w - 1, shift b); the attention residual
#   feeds norm2 = 1 pair.
# LTXVideoTransformerBlock: affine-free RMSNorm before attention and FF = 2 rms_norm (its q/k norm is
#   torch.nn.RMSNorm, already aten.rms_norm; its RoPE spans all heads' channels, which the op does not
#   take); gated residuals after attn1 and FF = 2, and RoPE's ``x * cos + rot * sin`` on q and k, whose
#   (1, S, C) tables are a valid gate of the op (the same multiply-add) = 2 more: 4; GELU-tanh 1.
# CogVideoXBlock: CogVideoXLayerNormZero (affine LayerNorm, modulated) on both streams twice = 4 adaln;
#   gated residuals 4; GELU-tanh 1; the attention residuals feed norm2 = 2 pairs.
# Patch embedders (HunyuanVideoPatchEmbed, CogVideoXPatchEmbed): convolutions only, no pattern.
# rms_norm_kernel: every aten.rms_norm left after qk_norm_rope whose rows are narrow or a strided view goes to
#   diffc.rms_norm: SD3's four q/k norms, HunyuanVideo's text q/k norms (the image ones take RoPE) and the
#   single block's two, LTX's two hidden-state norms plus its four q/k torch RMSNorms (narrow at this size).
# key_padding_attention: 0 at these sizes (below MIN_KEYS); HunyuanVideo's joint blocks' padding mask is lowered in
#   tests/pipelines/generic/test_generic_compile.py with the threshold lowered.
EXPECTED = {
    ("sd3", "JointTransformerBlock"): {**ZERO, "rms_norm": 4, "rms_norm_kernel": 4, "adaln_modulate": 4, "gated_residual": 4,
                                       "gelu_tanh": 2, "gated_residual_adaln": 2},
    ("hunyuan", "HunyuanVideoTransformerBlock"): {**ZERO, "rms_norm": 4, "qk_norm_rope": 1, "rms_norm_kernel": 2,
                                                  "adaln_modulate": 4,
                                                  "gated_residual": 4, "gelu_tanh": 2, "gated_residual_adaln": 2},
    ("hunyuan", "HunyuanVideoSingleTransformerBlock"): {**ZERO, "rms_norm": 2, "rms_norm_kernel": 2, "adaln_modulate": 1,
                                                        "gated_residual": 1, "gelu_tanh": 1},
    ("hunyuan", "HunyuanVideoTokenRefiner"): {**ZERO, "gated_residual": 2, "timestep_embedding": 1,
                                               "adaln_modulate": 2, "gated_residual_adaln": 1},
    ("hunyuan", "HunyuanVideoPatchEmbed"): ZERO,
    ("ltx", "LTXVideoTransformerBlock"): {**ZERO, "rms_norm": 2, "rms_norm_kernel": 6, "gated_residual": 4,
                                          "gelu_tanh": 1},
    ("cogvideox", "CogVideoXBlock"): {**ZERO, "adaln_modulate": 4, "gated_residual": 4, "gelu_tanh": 1,
                                      "gated_residual_adaln": 2},
    ("cogvideox", "CogVideoXPatchEmbed"): ZERO,
}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


class _Stop(Exception):
    pass


def block_classes(transformer) -> list[str]:
    """The repeated block classes, as regional compilation reads them from the model."""
    return list(getattr(transformer, "_repeated_blocks", None) or transformer._no_split_modules or ())


def capture_blocks(pipe, request: dict) -> dict[str, tuple[torch.nn.Module, dict]]:
    """The first block of each repeated class and the keyword arguments it was called with (inputs
    made contiguous, as the compiler captures them), from one denoising step stopped after the DiT."""
    dit = pipe.components["transformer"]
    classes, captured, hooks = block_classes(dit), {}, []

    def pre_hook(module, args, kwargs):
        name = type(module).__name__
        if name not in captured:
            bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
            captured[name] = (module, {k: tree_map_only(torch.Tensor, lambda t: t.detach().contiguous().clone(), v)
                                       for k, v in bound.items()})

    def stop(*_):
        raise _Stop

    hooks = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in dit.modules()
             if type(m).__name__ in classes]
    hooks.append(dit.register_forward_hook(stop))
    try:
        pipe.generate("a fox in the snow", seed=0, progress=False, num_inference_steps=1, **request)
    except _Stop:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    assert set(captured) == set(classes), f"blocks never called: {set(classes) - set(captured)}"
    return captured


@pytest.fixture(scope="module")
def blocks(generic_checkpoint):
    cache = {}

    def get(model: str, dtype: torch.dtype = torch.float32):
        if (model, dtype) not in cache:
            pipe = diffc.load(generic_checkpoint(model), device="cpu", dtype=dtype)
            cache[model, dtype] = capture_blocks(pipe, CAPTURE[model])
        return cache[model, dtype]

    return get


@pytest.mark.parametrize("model, block", sorted(EXPECTED), ids=lambda v: v)
def test_block_pass_counts_and_numerics(blocks, model, block):
    module, kwargs = blocks(model)[block]
    _program, report, _graph = compile_module(module, kwargs, device=torch.device("cpu"), dtype=torch.float32,
                                              attention="sdpa")
    matches = {name: report.matches[name] for name in PASSES}
    assert matches == EXPECTED[model, block]
    assert report.rel_err_vs_eager is not None and report.rel_err_vs_eager < TOL[torch.float32]
    fused = sum(n for k, n in report.fused_ops.items() if k.startswith("diffc."))
    assert (fused > 0) == any(EXPECTED[model, block].values())


@pytest.mark.parametrize("model, block", [("hunyuan", "HunyuanVideoTransformerBlock")])
def test_bf16_blocks_take_the_cast_variants(blocks, model, block):
    """In bf16, diffusers' norms and RoPE upcast to float32 and cast back; the cast variants match the same sites."""
    module, kwargs = blocks(model, torch.bfloat16)[block]
    _program, report, _graph = compile_module(module, kwargs, device=torch.device("cpu"), dtype=torch.bfloat16,
                                              attention="sdpa")
    assert {name: report.matches[name] for name in PASSES} == EXPECTED[model, block]
    assert report.rel_err_vs_eager < TOL[torch.bfloat16]

