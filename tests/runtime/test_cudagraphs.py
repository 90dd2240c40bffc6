"""CUDA-graph wrapper on the CPU: keys, fallbacks, counters, errors, attribute forwarding.

The capture itself needs a GPU (tests/runtime/test_cudagraphs_gpu.py). Here ``EmulatedGraphs``
replaces only the two CUDA calls (warm-up on a stream, capture) with a stand-in whose ``replay()``
recomputes the forward from the static input buffers into the static outputs, so that everything
else (keys, static buffers, copies, clones, counters, invalidation) runs as on a GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from diffc.errors import InvalidArgumentError
from diffc.models.flux.transformer import FLUX_TRANSFORMER_SPECS, FluxTransformer2DModel
from diffc.models.wan.transformer import WAN_TRANSFORMER_SPECS, WanTransformer3DModel
from diffc.runtime.cudagraphs import (
    CudaGraphCounters,
    CudaGraphModule,
    _tensors,
    describe_cuda_graphs,
    unwrap,
)

# Toy shapes (batch, tokens, channels); the DiT shapes are in the native-model tests below.
TOY_SHAPES = [(1, 5, 8), (2, 5, 8), (1, 7, 8)]


class Toy(nn.Module):
    """Returns a tuple, takes an optional tensor and a Python scalar, like a DiT's signature."""

    config = ("toy",)
    _repeated_blocks = ("blocks",)

    def __init__(self, channels: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(channels, channels), nn.Linear(channels, channels)])

    def forward(self, x, t, guidance=None, scale=1.0):
        h = self.blocks[0](x) * (1 + t[:, None, None])
        if guidance is not None:
            h = h + guidance[:, None, None]
        h = self.blocks[1](torch.tanh(h)) * scale
        return h, h.sum(-1)


class _RecomputeGraph:
    def __init__(self, module, args, kwargs, out):
        self.module, self.args, self.kwargs, self.out = module, args, kwargs, out

    def replay(self):
        with torch.inference_mode():  # writes the static outputs in place, as a graph does
            fresh = self.module(*self.args, **self.kwargs)
            for dst, src in zip(_tensors(self.out), _tensors(fresh)):
                dst.copy_(src)


class EmulatedGraphs(CudaGraphModule):
    _device_types = ("cpu",)
    fail_capture: str | None = None

    def _warmup(self, device, args, kwargs):
        return self.module(*args, **kwargs)

    def _capture(self, device, args, kwargs):
        if type(self).fail_capture:
            raise RuntimeError(type(self).fail_capture)
        out = self.module(*args, **kwargs)
        return _RecomputeGraph(self.module, args, kwargs, out), out


class FailingGraphs(EmulatedGraphs):
    fail_capture = "operation not permitted when stream is capturing\nmore detail"


def toy_inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    return x, torch.rand(shape[0], generator=g) + 0.1


def counts(wrapper) -> tuple[int, int, int, int]:
    c = wrapper.counters
    return c.captures, c.replays, c.fallbacks, c.invalidations


def assert_same(out, ref):
    out_t, ref_t = _tensors(out), _tensors(ref)
    assert type(out) is type(ref) and len(out_t) == len(ref_t)
    for a, b in zip(out_t, ref_t):
        assert torch.equal(a, b)


@pytest.fixture
def toy():
    torch.manual_seed(0)
    return Toy().eval().requires_grad_(False)


def test_capture_then_replay_matches_eager_with_changing_values(toy):
    wrapper = EmulatedGraphs(toy)
    with torch.inference_mode():
        for step in range(5):
            x, t = toy_inputs(TOY_SHAPES[0], seed=step)
            out = wrapper(x=x, t=t, scale=0.5)
            assert_same(out, toy(x=x, t=t, scale=0.5))
    assert counts(wrapper) == (1, 4, 0, 0)
    static = wrapper._graphs[next(iter(wrapper._graphs))].static_output
    assert out[0].data_ptr() != static[0].data_ptr()  # a clone, not the buffer the next replay overwrites


def test_static_output_returned_without_clone(toy):
    wrapper = EmulatedGraphs(toy, clone_outputs=False)
    with torch.inference_mode():
        wrapper(*toy_inputs(TOY_SHAPES[0], 0))
        first = wrapper(*toy_inputs(TOY_SHAPES[0], 1))
        second = wrapper(*toy_inputs(TOY_SHAPES[0], 2))
    assert first[0] is second[0]  # the same static buffer: documented, overwritten by the next replay
    assert_same(second, toy(*toy_inputs(TOY_SHAPES[0], 2)))


def test_keys_separate_shapes_optional_tensors_and_values(toy):
    wrapper = EmulatedGraphs(toy, max_graphs=10)
    x1, t1 = toy_inputs(TOY_SHAPES[0], 0)
    x2, t2 = toy_inputs(TOY_SHAPES[1], 1)  # batch 2, as CFG runs
    calls = [
        dict(x=x1, t=t1), dict(x=x2, t=t2),  # batch 1 vs 2
        dict(x=x1, t=t1, guidance=torch.ones(1)), dict(x=x1, t=t1, guidance=None),  # tensor vs None vs absent
        dict(x=x1, t=t1, scale=2.0), dict(x=x1, t=t1, scale=2), dict(x=x1, t=t1, scale=True),  # typed values
        dict(x=x1, t=(t1 * 10).long()),  # dtype
    ]
    with torch.inference_mode():
        for kwargs in calls + calls:
            assert_same(wrapper(**kwargs), toy(**kwargs))
        assert_same(wrapper(x1, guidance=None, t=t1), toy(x1, t1))  # positional: its own key
    assert counts(wrapper) == (len(calls) + 1, len(calls), 0, 0)


def test_keyword_order_does_not_matter(toy):
    wrapper = EmulatedGraphs(toy)
    x, t = toy_inputs(TOY_SHAPES[0], 0)
    with torch.inference_mode():
        wrapper(x=x, t=t, scale=0.5)
        wrapper(scale=0.5, t=t, x=x)
    assert counts(wrapper) == (1, 1, 0, 0)


def test_views_and_noncontiguous_inputs(toy):
    wrapper = EmulatedGraphs(toy)
    base = torch.randn(1, 8, 5)
    with torch.inference_mode():
        for step in range(3):
            x = (base + step).transpose(1, 2)  # (1, 5, 8), non-contiguous
            t = torch.full([1], 0.3 + step).expand(1)  # an expanded timestep, as the pipelines pass it
            g = torch.tensor([2.0 + step])[:1]
            assert_same(wrapper(x=x, t=t, guidance=g), toy(x=x, t=t, guidance=g))
        x_contiguous = x.contiguous()  # other strides: another key, never a wrong layout
        assert_same(wrapper(x=x_contiguous, t=t, guidance=g), toy(x=x_contiguous, t=t, guidance=g))
    assert counts(wrapper) == (2, 2, 0, 0)


def test_max_graphs_falls_back_eagerly(toy):
    wrapper = EmulatedGraphs(toy, max_graphs=2)
    with torch.inference_mode():
        for shape in TOY_SHAPES + TOY_SHAPES:
            x, t = toy_inputs(shape, 3)
            assert_same(wrapper(x, t), toy(x, t))
    assert counts(wrapper) == (2, 2, 2, 0)
    assert wrapper.counters.fallback_reasons == {"max_graphs=2 reached": 2}


@pytest.mark.parametrize("make_call, reason", [
    (lambda x, t: ((x, t), {}), "argument 'x' is on cpu, not a CUDA device"),
    (lambda x, t: ((), {"x": x, "t": t, "guidance": None}), "argument 't' is on cpu, not a CUDA device"),
])
def test_real_wrapper_refuses_cpu_tensors(toy, make_call, reason):
    wrapper = CudaGraphModule(toy)
    args, kwargs = make_call(*toy_inputs(TOY_SHAPES[0], 0))
    with torch.inference_mode():
        assert_same(wrapper(*args, **kwargs), toy(*args, **kwargs))
    assert counts(wrapper) == (0, 0, 1, 0)
    assert wrapper.counters.fallback_reasons == {reason: 1}


class Loose(nn.Module):
    def forward(self, x, extra=None):
        return x * 2


def test_fallback_reasons(toy):
    x, t = toy_inputs(TOY_SHAPES[0], 0)
    wrapper = EmulatedGraphs(Loose())
    with torch.no_grad():
        wrapper(x.clone().requires_grad_(True))
        wrapper(x, extra=[1.0, torch.ones(1, requires_grad=True)])  # a tensor inside a list
        wrapper(x, extra={1: 1.0})  # a dict keyed by something else than names
        wrapper(x, extra={"a": object()})
        wrapper(x, extra=[1.0, (2, "a", None)])  # plain values: a key
    assert wrapper.counters.fallback_reasons == {
        "argument 'x' requires grad": 1,
        "argument 'extra' holds a tensor that requires grad": 1,
        "argument 'extra' is a dict, which cannot be part of a graph key": 2,
    }
    assert counts(wrapper) == (1, 0, 4, 0)
    trainable = EmulatedGraphs(Toy())
    with torch.enable_grad():
        trainable(x, t)  # parameters require grad and autograd is on
        EmulatedGraphs(toy)(x, t)  # autograd on, but nothing requires grad: captured
    assert trainable.counters.fallback_reasons == {"autograd is on and the module has parameters that require grad": 1}


class Nested(nn.Module):
    """Takes its RoPE tables as a ``(cos, sin)`` tuple and options as a dict, as diffusers models do."""

    def forward(self, x, rope, options=None):
        cos, sin = rope
        out = x * cos + x.flip(-1) * sin
        if options is not None:
            out = out * options["scale"] + options["bias"]
        return out


def test_tensors_inside_tuples_and_dicts_are_graph_inputs():
    wrapper, model = EmulatedGraphs(Nested()), Nested()
    with torch.inference_mode():
        for seed in (0, 1, 2):  # capture, then replays that must see the new values of the nested tensors
            g = torch.Generator().manual_seed(seed)
            x, cos, sin, bias = (torch.randn(2, 4, 8, generator=g) for _ in range(4))
            options = {"scale": 0.5, "bias": bias}
            assert torch.equal(wrapper(x, (cos, sin), options=options), model(x, (cos, sin), options=options))
        g = torch.Generator().manual_seed(3)
        x, cos, sin = (torch.randn(2, 4, 8, generator=g) for _ in range(3))
        assert torch.equal(wrapper(x, [cos, sin]), model(x, [cos, sin]))  # a list: another key
        assert torch.equal(wrapper(x, (cos, sin[:, :1])), model(x, (cos, sin[:, :1])))  # another shape inside
    assert counts(wrapper) == (3, 2, 0, 0)
    keys = [g["key"] for g in wrapper.describe()["graphs"]]
    assert keys[0] == ("#0=(2, 4, 8) float32 cpu, #1=((2, 4, 8) float32 cpu, (2, 4, 8) float32 cpu), "
                       "options={bias: (2, 4, 8) float32 cpu, scale: 0.5}")


def test_graph_wrapper_rejects_calls_without_tensors():
    wrapper = EmulatedGraphs(nn.Identity())
    assert wrapper(3) == 3
    assert wrapper.counters.fallback_reasons == {"no tensor arguments": 1}


def test_failed_capture_falls_back_visibly(toy):
    wrapper = FailingGraphs(toy)
    with torch.inference_mode():
        with pytest.warns(RuntimeWarning, match="capture of Toy failed"):
            first = wrapper(*toy_inputs(TOY_SHAPES[0], 0))
        second = wrapper(*toy_inputs(TOY_SHAPES[0], 1))
        assert wrapper.warmup(*toy_inputs(TOY_SHAPES[0], 2)) is False
    assert_same(first, toy(*toy_inputs(TOY_SHAPES[0], 0)))
    assert_same(second, toy(*toy_inputs(TOY_SHAPES[0], 1)))
    reason = "capture failed: RuntimeError: operation not permitted when stream is capturing"
    assert wrapper.counters.fallback_reasons == {reason: 2}
    assert counts(wrapper) == (0, 0, 2, 0)
    described = wrapper.describe()
    assert described["failed_captures"] == [{"key": "#0=(1, 5, 8) float32 cpu, #1=(1,) float32 cpu",
                                             "reason": reason}]
    assert described["graphs"] == []


def test_moved_weights_drop_every_graph(toy):
    wrapper = EmulatedGraphs(toy)
    x, t = toy_inputs(TOY_SHAPES[0], 0)
    with torch.inference_mode():
        wrapper(x, t)
        wrapper(x, t)
        with torch.no_grad():  # in place: same addresses, the next replay sees the new values
            wrapper.load_state_dict({k: v * 2 for k, v in toy.state_dict().items()})
        assert_same(wrapper(x, t), toy(x, t))
        assert counts(wrapper) == (1, 2, 0, 0)
        toy.blocks[1].bias.data = toy.blocks[1].bias.data + 1  # a new tensor, as .to() makes
        assert_same(wrapper(x, t), toy(x, t))
        assert counts(wrapper) == (2, 2, 0, 1)
        toy.blocks[0].weight = nn.Parameter(toy.blocks[0].weight.data.clone(), requires_grad=False)  # replaced
        wrapper(x, t)
    assert counts(wrapper) == (3, 2, 0, 2)


def test_inference_mode_capture_then_no_grad_and_grad_calls(toy):
    wrapper = EmulatedGraphs(toy)
    with torch.inference_mode():
        wrapper(*toy_inputs(TOY_SHAPES[0], 0))
    with torch.no_grad():
        assert_same(wrapper(*toy_inputs(TOY_SHAPES[0], 1)), toy(*toy_inputs(TOY_SHAPES[0], 1)))
    assert_same(wrapper(*toy_inputs(TOY_SHAPES[0], 2)), toy(*toy_inputs(TOY_SHAPES[0], 2)))
    assert counts(wrapper) == (1, 2, 0, 0)


def test_warmup_and_reset(toy):
    wrapper = EmulatedGraphs(toy)
    x, t = toy_inputs(TOY_SHAPES[0], 0)
    with torch.inference_mode():
        assert wrapper.warmup(x, t) is True
        assert wrapper.warmup(x, t) is True  # already captured: no replay
        assert counts(wrapper) == (1, 0, 0, 0)
        wrapper.reset()
        assert wrapper.describe()["graphs"] == []
        wrapper(x, t)
    assert counts(wrapper) == (2, 0, 0, 0)


def test_attributes_forward_to_the_module(toy):
    wrapper = CudaGraphModule(toy)
    assert wrapper.config is toy.config and wrapper._repeated_blocks == ("blocks",)
    assert list(wrapper.parameters()) == list(toy.parameters())
    assert list(wrapper.state_dict()) == list(toy.state_dict())  # no "module." prefix
    assert wrapper.eval() is wrapper and wrapper.to(torch.float32) is wrapper and wrapper.requires_grad_(False) is wrapper
    assert wrapper.blocks[0] is toy.blocks[0]
    wrapper.custom_flag = 3
    assert toy.custom_flag == 3
    assert unwrap(wrapper) is toy and unwrap(toy) is toy
    assert CudaGraphModule(wrapper).module is toy  # wrapping twice wraps the module once
    with pytest.raises(AttributeError):
        _ = wrapper.no_such_attribute
    assert "Toy" in repr(wrapper)


@pytest.mark.parametrize("max_graphs", [-1, 1.5, True, "4"])
def test_bad_max_graphs(toy, max_graphs):
    with pytest.raises(InvalidArgumentError, match="max_graphs"):
        CudaGraphModule(toy, max_graphs=max_graphs)


def test_describe_and_counters(toy):
    wrapper = EmulatedGraphs(toy, max_graphs=1)
    before = wrapper.counters.copy()
    with torch.inference_mode():
        x, t = toy_inputs(TOY_SHAPES[0], 0)
        wrapper(x=x, t=t[0].expand(1), guidance=None, scale=0.5)
        wrapper(x=x, t=t[0].expand(1), guidance=None, scale=0.5)
        wrapper(*toy_inputs(TOY_SHAPES[1], 0))
    d = wrapper.describe()
    assert d["enabled"] is True and d["max_graphs"] == 1 and d["clone_outputs"] is True
    assert (d["captures"], d["replays"], d["fallbacks"]) == (1, 1, 1)
    assert d["fallback_reasons"] == {"max_graphs=1 reached": 1}
    assert d["graphs"][0]["key"] == ("guidance=None, scale=0.5, t=(1,) float32 cpu, "  # a size-1 stride: no layout
                                     "x=(1, 5, 8) float32 cpu")
    assert d["graphs"][0]["replays"] == 1 and d["graphs"][0]["capture_ms"] >= 0
    assert wrapper.counters.since(before) == CudaGraphCounters(1, 1, 1, 0, {"max_graphs=1 reached": 1})
    assert describe_cuda_graphs(wrapper) == d and describe_cuda_graphs(toy) == {"enabled": False}


# ---- the native DiTs' own signatures (tiny, fp32, CPU) --------------------------------------------

FLUX_TINY = FLUX_TRANSFORMER_SPECS["tiny"]  # production: flux-dev, 3072 wide, 19 + 38 blocks
WAN_TINY = WAN_TRANSFORMER_SPECS["tiny"]  # production: 1.3B (12 heads of 128, 30 blocks), 14B


def flux_call(cfg, step, batch=1, seq_img=12, seq_txt=5):
    g = torch.Generator().manual_seed(step)
    return dict(
        hidden_states=torch.randn(batch, seq_img, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, seq_txt, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.full([1], 1.0 - step / 10).expand(batch),
        img_ids=torch.randint(0, 4, (seq_img, 3), generator=g).float(),
        txt_ids=torch.zeros(seq_txt, 3),
        guidance=torch.full([1], 3.5).expand(batch) if cfg.guidance_embeds else None,
    )


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_native_flux_signature(guidance_embeds):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(dataclasses.replace(FLUX_TINY, guidance_embeds=guidance_embeds)).eval()
    wrapper = EmulatedGraphs(model.requires_grad_(False))
    with torch.inference_mode():
        for step in range(4):
            kwargs = flux_call(model.config, step)
            assert torch.equal(wrapper(**kwargs), model(**kwargs))
    assert counts(wrapper) == (1, 3, 0, 0)


def test_native_wan_cfg_batch_two():
    torch.manual_seed(0)
    model = WanTransformer3DModel(WAN_TINY).eval().requires_grad_(False)
    wrapper = EmulatedGraphs(model)
    text = torch.randn(2, 6, WAN_TINY.text_dim)
    with torch.inference_mode():
        for step in range(3):
            x = torch.randn(1, WAN_TINY.in_channels, 3, 4, 6)
            t = torch.tensor([900 - 300 * step]).expand(2)  # int64, as UniPC's timesteps
            for kwargs in (dict(hidden_states=torch.cat([x, x]), timestep=t, encoder_hidden_states=text),
                           dict(hidden_states=x, timestep=t[:1], encoder_hidden_states=text[:1])):
                assert torch.equal(wrapper(**kwargs), model(**kwargs))
    assert counts(wrapper) == (2, 4, 0, 0)


def test_batch_one_slice_and_fresh_tensor_share_a_graph(toy):
    """A size-1 dimension's stride moves no address: a batch-1 slice of a larger tensor (FLUX's split
    streams) and a fresh tensor of the same shape replay one graph instead of capturing twice."""
    wrapper = EmulatedGraphs(toy)
    shape = (1,) + tuple(TOY_SHAPES[0][1:])
    with torch.inference_mode():
        x, t = toy_inputs(shape, seed=0)
        big = torch.cat([x, x], dim=1)[:, : shape[1]]  # a view: batch stride of the larger tensor
        assert big.stride(0) != x.stride(0) and big.is_contiguous()
        assert_same(wrapper(x=big, t=t), toy(x=big, t=t))
        assert_same(wrapper(x=x + 1, t=t), toy(x=x + 1, t=t))
    assert counts(wrapper) == (1, 1, 0, 0)


class DiffusersOutputToy(Toy):
    """Returns a diffusers output (a dataclass that is also a dict), as a generic-backend DiT does."""

    def forward(self, x, t, guidance=None, scale=1.0):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=super().forward(x, t, guidance, scale)[0])


@pytest.mark.parametrize("clone_outputs", [True, False])
def test_diffusers_output_objects_keep_their_type(clone_outputs):
    torch.manual_seed(0)
    model = DiffusersOutputToy().eval().requires_grad_(False)
    wrapper = EmulatedGraphs(model, clone_outputs=clone_outputs)
    with torch.inference_mode():
        for seed in (0, 1, 2):  # capture, then replays with new values
            x, t = toy_inputs(TOY_SHAPES[0], seed)
            out, ref = wrapper(x, t), model(x, t)
            assert type(out) is type(ref) and isinstance(out.sample, torch.Tensor)
            assert torch.equal(out.sample, ref.sample) and torch.equal(out[0], ref[0])
    assert counts(wrapper)[:2] == (1, 2)
