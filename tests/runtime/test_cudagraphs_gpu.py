"""CUDA graphs on a GPU: replays equal eager bit for bit, counters, fallbacks, and what a forward may do.

Run with ``python -m pytest tests/runtime/test_cudagraphs_gpu.py -q`` on a CUDA machine; skipped elsewhere.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import diffc
from diffc.demo import demo_checkpoint
from diffc.models.flux.transformer import FLUX_TRANSFORMER_SPECS, FluxTransformer2DModel
from diffc.models.wan.transformer import WAN_TRANSFORMER_SPECS, WanTransformer3DModel
from diffc.runtime.cudagraphs import CudaGraphModule, _tensors

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.bfloat16, torch.float32]
STEPS = 5
# FLUX: tiny but with several GEMM shapes; production flux-dev is 3072 wide with 19 + 38 blocks.
FLUX_SMALL = dataclasses.replace(FLUX_TRANSFORMER_SPECS["tiny"], num_layers=2, num_single_layers=2,
                                 num_attention_heads=3, attention_head_dim=32, axes_dims_rope=(8, 12, 12))
WAN_SMALL = WAN_TRANSFORMER_SPECS["tiny"]  # production 1.3B: 12 heads of 128, ffn 8960, 30 blocks


def counts(wrapper) -> tuple[int, int, int, int]:
    c = wrapper.counters
    return c.captures, c.replays, c.fallbacks, c.invalidations


def assert_bitwise(out, ref, what=""):
    for a, b in zip(_tensors(out), _tensors(ref), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b), f"{what}: max |diff| {(a.float() - b.float()).abs().max().item():.3g}"


def build(cls, config, dtype):
    torch.manual_seed(0)
    return cls(config).eval().requires_grad_(False).to("cuda", dtype)


def flux_inputs(cfg, step, dtype, batch=1, seq_img=64, seq_txt=16):
    g = torch.Generator("cuda").manual_seed(step)
    rand = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype)
    ids = torch.stack(torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat([torch.zeros(seq_img, 1), ids.float()], 1).to("cuda", dtype)
    guidance = torch.full([1], 3.5, device="cuda").expand(batch) if cfg.guidance_embeds else None
    return dict(hidden_states=rand(batch, seq_img, cfg.in_channels),
                timestep=(torch.full([1], 1.0 - step / 10, device="cuda").expand(batch)).to(dtype),
                guidance=guidance, pooled_projections=rand(batch, cfg.pooled_projection_dim),
                encoder_hidden_states=rand(batch, seq_txt, cfg.joint_attention_dim),
                txt_ids=torch.zeros(seq_txt, 3, device="cuda", dtype=dtype), img_ids=img_ids)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_flux_replays_equal_eager(dtype, guidance_embeds):
    model = build(FluxTransformer2DModel, dataclasses.replace(FLUX_SMALL, guidance_embeds=guidance_embeds), dtype)
    wrapper = CudaGraphModule(model)
    with torch.inference_mode():
        for step in range(STEPS):
            kwargs = flux_inputs(model.config, step, dtype)
            assert_bitwise(wrapper(**kwargs), model(**kwargs), f"step {step}")
    assert counts(wrapper) == (1, STEPS - 1, 0, 0), wrapper.describe()


@pytest.mark.parametrize("dtype", DTYPES)
def test_wan_cfg_batch_two_replays_equal_eager(dtype):
    model = build(WanTransformer3DModel, WAN_SMALL, dtype)
    wrapper = CudaGraphModule(model)
    text = torch.randn(2, 7, WAN_SMALL.text_dim, device="cuda", dtype=dtype)
    with torch.inference_mode():
        for step in range(STEPS):
            x = torch.randn(1, WAN_SMALL.in_channels, 3, 8, 12, device="cuda", dtype=dtype)
            t = torch.tensor([999 - 150 * step], device="cuda").expand(2)
            cfg = dict(hidden_states=torch.cat([x, x]), timestep=t, encoder_hidden_states=text)
            single = dict(hidden_states=x, timestep=t[:1], encoder_hidden_states=text[:1])
            assert_bitwise(wrapper(**cfg), model(**cfg), f"cfg step {step}")
            assert_bitwise(wrapper(**single), model(**single), f"single step {step}")
    assert counts(wrapper) == (2, 2 * (STEPS - 1), 0, 0), wrapper.describe()


class SideStream(nn.Module):
    """Forks a side stream from the current one and refreshes a weight from pinned host memory, as
    layerwise offload's prefetch does; both are legal inside a capture."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 32, device="cuda")
        self.host = torch.randn(32, 32).pin_memory()
        self.staged = torch.empty(32, 32, device="cuda")
        self.side = torch.cuda.Stream()

    def forward(self, x):
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            self.staged.copy_(self.host, non_blocking=True)
            prefetched = x @ self.staged
        main.wait_stream(self.side)
        return self.lin(x) + prefetched


def test_side_streams_and_pinned_copies_inside_the_forward():
    model = SideStream().eval().requires_grad_(False)
    wrapper = CudaGraphModule(model)
    with torch.inference_mode():
        for step in range(4):
            model.host.copy_(torch.randn(32, 32))  # new host values: the replayed copy reads them
            x = torch.randn(4, 32, device="cuda")
            assert_bitwise(wrapper(x), model(x), f"step {step}")
    assert counts(wrapper) == (1, 3, 0, 0)


class PageableCopyForThree(nn.Module):
    def forward(self, x):
        if x.shape[0] == 3:  # a pageable host-to-device copy: not capturable
            return x + torch.arange(x.shape[-1]).to(x.device)
        return x * 2


@pytest.mark.parametrize("clone_outputs", [True, False])  # a shared pool, a pool per graph
def test_failed_capture_falls_back_and_later_captures_work(clone_outputs):
    model = PageableCopyForThree()
    wrapper = CudaGraphModule(model, clone_outputs=clone_outputs)
    stream = torch.cuda.current_stream()
    x, y = torch.randn(3, 5, device="cuda"), torch.randn(4, 5, device="cuda")
    with torch.inference_mode():
        with pytest.warns(RuntimeWarning, match="capture of PageableCopyForThree failed"):
            assert torch.equal(wrapper(x), model(x))
        assert torch.cuda.current_stream() == stream
        torch.cuda.empty_cache()  # fails an allocator assert if the failed capture still counts as underway
        assert torch.equal(wrapper(x * 2), model(x * 2))
        for step in range(3):  # same wrapper, same capture stream, another key
            assert torch.equal(wrapper(y + step), model(y + step))
    assert counts(wrapper) == (1, 2, 2, 0)
    (reason,) = wrapper.counters.fallback_reasons
    assert reason.startswith("capture failed: ") and wrapper.counters.fallback_reasons[reason] == 2
    assert wrapper.describe()["failed_captures"][0]["key"] == "#0=(3, 5) float32 cuda:0"
    wrapper.reset()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def test_many_keys_share_one_pool_in_any_replay_order():
    model = build(FluxTransformer2DModel, FLUX_SMALL, torch.bfloat16)
    wrapper = CudaGraphModule(model, max_graphs=3)
    shapes = [(1, 64, 16), (2, 64, 16), (1, 64, 8), (2, 64, 8)]  # (batch, seq_img, seq_txt)
    order = [0, 1, 2, 3, 2, 0, 1, 1, 3, 0, 2]
    with torch.inference_mode():
        for i, s in enumerate(order):
            batch, seq_img, seq_txt = shapes[s]
            kwargs = flux_inputs(model.config, i, torch.bfloat16, batch, seq_img, seq_txt)
            assert_bitwise(wrapper(**kwargs), model(**kwargs), f"call {i} shape {shapes[s]}")
    assert counts(wrapper) == (3, 6, 2, 0)
    assert wrapper.counters.fallback_reasons == {"max_graphs=3 reached": 2}


def test_static_outputs_without_clones_have_their_own_pools():
    model = build(FluxTransformer2DModel, FLUX_SMALL, torch.bfloat16)
    wrapper = CudaGraphModule(model, clone_outputs=False)
    with torch.inference_mode():
        a, b = flux_inputs(model.config, 0, torch.bfloat16, 1), flux_inputs(model.config, 1, torch.bfloat16, 2)
        wrapper(**a), wrapper(**b)
        out_a = wrapper(**a)
        wrapper(**b)  # another key's replay must not overwrite a's static output
        assert_bitwise(out_a, model(**a))
    assert counts(wrapper) == (2, 2, 0, 0)


def test_inference_mode_capture_then_other_modes_and_moved_weights():
    model = build(FluxTransformer2DModel, FLUX_SMALL, torch.float32)
    wrapper = CudaGraphModule(model)
    kwargs = flux_inputs(model.config, 0, torch.float32)
    with torch.inference_mode():
        wrapper(**kwargs)
    with torch.no_grad():
        assert_bitwise(wrapper(**kwargs), model(**kwargs), "no_grad")
    assert_bitwise(wrapper(**kwargs), model(**kwargs), "grad mode, nothing trainable")
    with torch.no_grad():
        model.load_state_dict({k: v * 0.5 for k, v in model.state_dict().items()})  # in place
        assert_bitwise(wrapper(**kwargs), model(**kwargs), "new values, same addresses")
        assert counts(wrapper) == (1, 3, 0, 0)
        wrapper.to(torch.float64).to(torch.float32)  # new addresses: every graph is dropped
        assert_bitwise(wrapper(**kwargs), model(**kwargs), "moved")
        assert_bitwise(wrapper(**kwargs), model(**kwargs), "moved, replayed")
    assert counts(wrapper) == (2, 4, 0, 1)


@pytest.mark.slow
def test_compiled_module_is_captured():
    model = build(FluxTransformer2DModel, FLUX_SMALL, torch.bfloat16)
    compiled = torch.compile(model)
    wrapper = CudaGraphModule(compiled)
    with torch.inference_mode():
        for step in range(3):
            kwargs = flux_inputs(model.config, step, torch.bfloat16)
            assert_bitwise(wrapper(**kwargs), compiled(**kwargs), f"step {step}")
    assert counts(wrapper) == (1, 2, 0, 0)


@pytest.mark.parametrize("family, request_kwargs, forwards", [
    ("flux", dict(height=128, width=128, num_inference_steps=4, max_sequence_length=32), 4),
    ("wan", dict(height=64, width=64, num_frames=5, num_inference_steps=3, guidance_scale=5.0,
                 max_sequence_length=32), 3),  # CFG: one batch-2 forward per step
])
def test_pipeline_output_identical_with_graphs(family, request_kwargs, forwards):
    pipe = diffc.load(demo_checkpoint(family), device="cuda", cuda_graphs=False)
    plain = pipe.generate("a red fox in snow", seed=5, progress=False, **request_kwargs)
    assert plain.timings.runtime["cuda_graphs"] == {"enabled": False, "reason": "turned off"}
    stack = pipe.components["transformer"]
    stack.set_cuda_graphs(None)
    wrapper = stack.graphs
    assert isinstance(wrapper, CudaGraphModule) and wrapper.module is stack.module
    graphed = pipe.generate("a red fox in snow", seed=5, progress=False, **request_kwargs)
    again = pipe.generate("a red fox in snow", seed=6, progress=False, **request_kwargs)
    if family == "flux":
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain.images, graphed.images))
    else:
        assert all(np.array_equal(a, b) for a, b in zip(plain.videos, graphed.videos))
    assert again.timings.step_ms
    assert counts(wrapper) == (1, 2 * forwards - 1, 0, 0), wrapper.describe()
    assert again.timings.runtime["cuda_graphs"]["replays"] == 2 * forwards - 1
    stack.set_cuda_graphs(False)
    assert stack.graphs is None and stack.describe_graphs() == {"enabled": False, "reason": "turned off"}


def test_graphs_are_on_by_default_on_a_gpu():
    pipe = diffc.load(demo_checkpoint("flux"), device="cuda")
    assert isinstance(pipe.components["transformer"].graphs, CudaGraphModule)
    out = pipe.generate("a red fox", seed=1, progress=False, height=64, width=64, num_inference_steps=3)
    assert out.timings.runtime["cuda_graphs"]["captures"] == 1
    assert out.timings.runtime["cuda_graphs"]["replays"] == 2


@pytest.mark.parametrize("family, request_kwargs", [
    ("flux", dict(height=128, width=128, max_sequence_length=32)),
    ("wan", dict(height=64, width=64, num_frames=5, guidance_scale=5.0, max_sequence_length=32)),
])
def test_compiled_regions_under_cuda_graphs(family, request_kwargs):
    """Compiled regions inside the whole-forward CUDA graph: same image as the compiled DiT without graphs."""
    pipe = diffc.load(demo_checkpoint(family), device="cuda", cuda_graphs=False)
    pipe.compile([request_kwargs], log=lambda line: None)
    plain = pipe.generate("a red fox", seed=5, progress=False, num_inference_steps=3, **request_kwargs)
    pipe.components["transformer"].set_cuda_graphs(True)
    graphed = pipe.generate("a red fox", seed=5, progress=False, num_inference_steps=3, **request_kwargs)
    a = plain.images[0] if plain.images else plain.videos[0]
    b = graphed.images[0] if graphed.images else graphed.videos[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    runtime = graphed.timings.runtime
    assert runtime["cuda_graphs"]["captures"] == 1 and runtime["cuda_graphs"]["replays"] == 2
    assert runtime["compiled"]["eager_fallbacks"] == 0
