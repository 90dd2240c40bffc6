"""Offload on a CPU with a recording stand-in for the CUDA streams: the hooks issue exactly the plan's
operations, the plan checker accepts what they issued, outputs equal resident outputs bit for bit,
counters are exact, and every error path says what is wrong. The CUDA path: test_offload_gpu.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from diffc.errors import DiffcError, InvalidArgumentError
from diffc.models.flux.transformer import FLUX_TRANSFORMER_SPECS, FluxTransformer2DModel
from diffc.models.wan.transformer import WAN_TRANSFORMER_SPECS, WanTransformer3DModel
from diffc.runtime.offload import (
    ALIGN,
    GiB,
    HostBuffer,
    OffloadCounters,
    apply_offload,
    packed_bytes,
    repeated_blocks,
)
from diffc.runtime.offload_plan import Compute, check_schedule, resident_mask

CPU = torch.device("cpu")


class RecordingStreams:
    """``CudaStreams`` on a CPU: copies happen at once, stream operations are logged as plan ops.

    Fresh device buffers are filled with 0xFF bytes (NaN in float dtypes), so a block that read a
    slot before its copy would poison the output."""

    def __init__(self, available: int = 64 * GiB, total: int = 80 * GiB, allocated: int = 0, fail_pin_after=None):
        self.log: list = []
        self.available, self.total, self.allocated = available, total, allocated
        self.pins, self.fail_pin_after, self.syncs = 0, fail_pin_after, 0

    def pin(self, nbytes):
        if self.fail_pin_after is not None and self.pins >= self.fail_pin_after:
            raise DiffcError("offload: could not page-lock host memory (test)")
        self.pins += 1
        return HostBuffer(torch.empty(nbytes, dtype=torch.uint8))

    def empty(self, nbytes):
        return torch.full((nbytes,), 255, dtype=torch.uint8)

    def event(self, key):
        return key

    def record(self, stream, event, op):
        self.log.append(op)

    def wait(self, stream, event, op):
        self.log.append(op)

    def copy(self, dst, src, op):
        dst.copy_(src)
        self.log.append(op)

    def upload(self, dst, src):
        dst.copy_(src)

    def synchronize(self):
        self.syncs += 1

    def memory(self):
        return self.available, self.total, self.allocated


def tiny_flux(layers=3, single_layers=4, seed=0):
    torch.manual_seed(seed)
    cfg = dataclasses.replace(FLUX_TRANSFORMER_SPECS["tiny"], num_layers=layers, num_single_layers=single_layers)
    model = FluxTransformer2DModel(cfg).eval().requires_grad_(False)
    b, s, t = 2, 12, 5
    inputs = dict(hidden_states=torch.randn(b, s, cfg.in_channels), encoder_hidden_states=torch.randn(b, t, 32),
                  pooled_projections=torch.randn(b, 24), timestep=torch.rand(b), img_ids=torch.randn(s, 3),
                  txt_ids=torch.randn(t, 3), guidance=torch.rand(b))
    return model, inputs


def tiny_wan(layers=5, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = dataclasses.replace(WAN_TRANSFORMER_SPECS["tiny"], num_layers=layers)
    model = WanTransformer3DModel(cfg).eval().requires_grad_(False).to(dtype)
    for name, p in model.named_parameters():  # as the loader does: these stay float32
        if any(f in name.split(".") for f in model._keep_in_fp32_modules):
            p.data = p.data.float()
    inputs = dict(hidden_states=torch.randn(2, 4, 3, 4, 6, dtype=dtype), timestep=torch.rand(2) * 1000,
                  encoder_hidden_states=torch.randn(2, 7, 16, dtype=dtype))
    return model, inputs


MODELS = {"flux": tiny_flux, "wan": tiny_wan}


def _run(model, inputs):
    with torch.inference_mode():
        return model(**inputs)


def _mark_compute(streams, model):
    for i, block in enumerate(repeated_blocks(model)):  # after the ring's own pre-hook: logs once it waited
        block.register_forward_pre_hook(lambda _m, _a, i=i: streams.log.append(Compute(i)))


# ---------------------------------------------------------------------------------------------
# Layerwise
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("prefetch", [1, 2, 3])
@pytest.mark.parametrize("resident", [0, 2])
@pytest.mark.parametrize("placement", ["spread", "first"])
def test_layerwise_matches_resident_and_issues_the_plan(family, prefetch, resident, placement):
    model, inputs = MODELS[family]()
    ref = _run(model, inputs)
    streams = RecordingStreams()
    handle = apply_offload({"transformer": model}, CPU, "layerwise", prefetch, resident, placement=placement,
                           streams=streams)
    _mark_compute(streams, model)
    ring = handle.rings["transformer"]
    num_blocks = len(repeated_blocks(model))
    assert ring.plan.resident == resident_mask(num_blocks, resident, placement)
    for _ in range(2):  # the second forward reuses the ring
        assert torch.equal(_run(model, inputs), ref)
    one = ring.plan.forward_ops()
    assert streams.log == one + one
    check_schedule(ring.plan, streams.log)
    streamed = num_blocks - resident
    assert handle.counters == OffloadCounters(
        blocks_total=num_blocks, blocks_resident=resident, blocks_streamed=streamed,
        ring_slots=min(prefetch + 1, streamed), prefetch_copies=2 * streamed,
        bytes_pinned=sum(ring.block_bytes[b] for b in ring.plan.streamed), ring_forwards=2)


def test_streamed_blocks_are_views_into_their_slot():
    model, _ = tiny_wan(layers=5, dtype=torch.bfloat16)
    handle = apply_offload({"transformer": model}, CPU, "layerwise", 1, 0, streams=RecordingStreams())
    ring = handle.rings["transformer"]
    assert len(ring.slots) == 2
    for k, block in enumerate(repeated_blocks(model)):
        slot = ring.slots[k % 2]
        for p in block.parameters():
            offset = p.data_ptr() - slot.data_ptr()
            assert 0 <= offset < slot.numel() and offset % ALIGN == 0
    dtypes = {p.dtype for p in repeated_blocks(model)[0].parameters()}
    assert dtypes == {torch.bfloat16, torch.float32}  # mixed dtypes share one buffer


def test_mixed_dtype_wan_matches_resident():
    model, inputs = tiny_wan(dtype=torch.bfloat16)
    ref = _run(model, inputs)
    apply_offload({"transformer": model}, CPU, "layerwise", 2, 1, streams=RecordingStreams())
    assert torch.equal(_run(model, inputs), ref)


def test_forward_called_without_module_hooks():
    """``model.forward(...)`` skips the model's pre-hook; the first block starts the forward instead."""
    model, inputs = tiny_flux()
    ref = _run(model, inputs)
    streams = RecordingStreams()
    handle = apply_offload({"transformer": model}, CPU, "layerwise", 1, 0, streams=streams)
    with torch.inference_mode():
        out = model.forward(**inputs)
    assert torch.equal(out, ref)
    check_schedule(handle.rings["transformer"].plan, streams.log)
    assert handle.counters.ring_forwards == 1


def _raise(*_):
    raise RuntimeError("boom")


def test_aborted_forward_then_a_good_one():
    """A forward that fails half-way leaves the ring ready for the next one, with or without module hooks."""
    model, inputs = tiny_flux()
    ref = _run(model, inputs)
    handle = apply_offload({"transformer": model}, CPU, "layerwise", 1, 0, streams=RecordingStreams())
    block = repeated_blocks(model)[3]
    for call in (model, model.forward):
        boom = block.register_forward_pre_hook(_raise)
        with pytest.raises(RuntimeError, match="boom"), torch.inference_mode():
            call(**inputs)
        boom.remove()
        with torch.inference_mode():
            assert torch.equal(call(**inputs), ref)
    assert handle.counters.ring_forwards == 2


def test_block_out_of_order_is_refused():
    model, _ = tiny_wan()
    apply_offload({"transformer": model}, CPU, "layerwise", 1, 0, streams=RecordingStreams())
    with pytest.raises(RuntimeError, match="block 2 of 'transformer' ran where block 0 was expected"):
        blocks = repeated_blocks(model)
        blocks[2](torch.randn(1, 3, 24), torch.randn(1, 2, 24), torch.randn(1, 1, 6, 24),
                  (torch.ones(1, 3, 1, 6), torch.zeros(1, 3, 1, 6)))


def test_remove_restores_resident_weights():
    model, inputs = tiny_flux()
    ref = _run(model, inputs)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    streams = RecordingStreams()
    handle = apply_offload({"transformer": model}, CPU, "layerwise", 2, 1, streams=streams)
    _run(model, inputs)
    slots = handle.rings["transformer"].slots
    handle.remove()
    assert handle.removed and handle.rings == {} and streams.syncs == 1
    slot_ranges = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in slots]
    for name, p in model.state_dict().items():
        assert torch.equal(p, before[name])
        assert not any(lo <= p.data_ptr() < hi for lo, hi in slot_ranges), name
    streams.log.clear()
    assert torch.equal(_run(model, inputs), ref)
    assert streams.log == []  # no hooks left


def test_all_blocks_resident_issues_nothing():
    model, inputs = tiny_wan()
    ref = _run(model, inputs)
    streams = RecordingStreams()
    handle = apply_offload({"transformer": model}, CPU, "layerwise", 1, 5, streams=streams)
    assert torch.equal(_run(model, inputs), ref)
    assert streams.log == []
    assert handle.counters == OffloadCounters(blocks_total=5, blocks_resident=5)


def test_failure_while_offloading_restores_the_model():
    model, inputs = tiny_flux()
    ref = _run(model, inputs)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    with pytest.raises(DiffcError, match="could not page-lock"):
        apply_offload({"transformer": model}, CPU, "layerwise", 1, 0, streams=RecordingStreams(fail_pin_after=3))
    assert torch.equal(_run(model, inputs), ref)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    # rolled back like remove(): the resident tensors got fresh storage (a CUDA graph wrapper sees the change)
    assert all(p.data_ptr() != ptrs[n] for n, p in model.named_parameters() if "transformer_blocks" not in n)


# ---------------------------------------------------------------------------------------------
# Automatic residency
# ---------------------------------------------------------------------------------------------


def test_automatic_residency_fills_the_budget():
    model, inputs = tiny_wan(layers=6)
    ref = _run(model, inputs)
    block = _block_bytes(model)
    reserve = 2 * block
    # the six blocks sit on the "device" now, so what they take there counts as available too; aim at a
    # budget of 5 blocks + 10 bytes: 3 resident + 2 ring slots, not 4 + 2
    streams = RecordingStreams(available=5 * block + 10 + reserve - _on_device(model))
    handle = apply_offload({"transformer": model}, CPU, "layerwise", 1, None, activation_reserve=reserve,
                           streams=streams)
    info = handle.describe()["models"]["transformer"]
    assert handle.counters.blocks_resident == 3
    assert info["resident_choice"] == "auto" and info["activation_reserve_gb"] == reserve / GiB
    assert info["budget_gb"] == (5 * block + 10) / GiB
    assert torch.equal(_run(model, inputs), ref)


def test_automatic_residency_respects_memory_limit_and_text_encoders():
    model, _ = tiny_wan(layers=6)
    encoder = nn.Linear(64, 64)
    block = _block_bytes(model)
    te = 64 * 64 * 4 + 64 * 4
    streams = RecordingStreams(available=100 * GiB)
    # headroom = max(reserve 0, encoder + 1 GiB); the blocks on the "device" are freed: budget = 4 blocks + 5
    limit = 4 * block + 5 + te + GiB - _on_device(model)
    handle = apply_offload({"transformer": model, "text_encoder": encoder}, CPU, "layerwise", 1, None,
                           ("text_encoder",), activation_reserve=0, memory_limit=limit, streams=streams)
    assert handle.counters.blocks_resident == 2  # 2 resident + 2 slots = 4 blocks
    assert handle.describe()["models"]["transformer"]["headroom_gb"] == (te + GiB) / GiB


def test_nothing_fits_streams_everything_and_warns(caplog):
    model, _ = tiny_wan(layers=4)
    handle = apply_offload({"transformer": model}, CPU, "layerwise", 1, None, activation_reserve=GiB,
                           streams=RecordingStreams(available=10))
    assert handle.counters.blocks_resident == 0
    assert "needs" in caplog.text and "for its ring" in caplog.text


def _on_device(model):
    """What the blocks take on the device: each tensor's allocation rounds up to ALIGN bytes."""
    return sum(-(-t.nbytes // ALIGN) * ALIGN for b in repeated_blocks(model) for t in b.parameters())


def _block_bytes(model):
    return packed_bytes(repeated_blocks(model)[0])


# ---------------------------------------------------------------------------------------------
# Whole components: text encoders in layerwise mode, model mode
# ---------------------------------------------------------------------------------------------


class TiedEncoder(nn.Module):
    """A T5-like module whose input and output embeddings are one tensor."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Embedding(11, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.shared.weight
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, ids):
        return self.head(self.shared(ids) * self.scale)


class TinyVae(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)

    def decode(self, z):
        return self.forward(z)

    def forward(self, z):
        return self.conv(z)


def _components():
    torch.manual_seed(0)
    model, inputs = tiny_flux()
    return {"transformer": model, "text_encoder": TiedEncoder(), "vae": TinyVae(), "scheduler": object()}, inputs


def test_text_encoders_visit_the_device_for_their_forward():
    comps, inputs = _components()
    ids, z = torch.tensor([[1, 2, 3]]), torch.randn(1, 2, 4, 4)
    ref_text, ref_flux = comps["text_encoder"](ids), _run(comps["transformer"], inputs)
    handle = apply_offload(comps, CPU, "layerwise", 1, 0, ("text_encoder",), streams=RecordingStreams())
    encoder = handle.components["text_encoder"]
    assert not encoder.loaded
    assert encoder.packing.nbytes == ALIGN + 4  # the tied weight (352 bytes) once, padded; then the scale
    with torch.inference_mode():
        assert torch.equal(comps["text_encoder"](ids), ref_text)
    assert not encoder.loaded
    assert comps["text_encoder"].head.weight is comps["text_encoder"].shared.weight
    assert torch.equal(_run(comps["transformer"], inputs), ref_flux)
    comps["vae"].decode(z)  # not offloaded in layerwise mode
    c = handle.counters
    assert (c.component_loads, c.component_unloads) == (1, 1)
    assert handle.describe()["offloaded_components"] == ["text_encoder"]


def test_a_wrapped_dit_is_refused_not_left_on_the_device():
    """A pipeline's components hold DiT stacks (the module behind them): apply_offload given them says so instead
    of offloading everything but the DiT; the executor's placement hands it the eager modules."""
    from diffc.runtime.dit_stack import DiTStack

    comps, inputs = _components()
    comps["transformer"] = DiTStack("transformer", comps["transformer"], CPU)
    for mode in ("layerwise", "model"):
        with pytest.raises(InvalidArgumentError, match=r"offload: transformer is a wrapper of a module .*executor.place"):
            apply_offload(comps, CPU, mode, streams=RecordingStreams())
    encoder = comps["text_encoder"]  # refused before anything was hooked
    assert not encoder._forward_pre_hooks and not encoder._forward_hooks and "forward" not in vars(encoder)


def test_model_mode_keeps_one_component_on_the_device():
    comps, inputs = _components()
    ids, z = torch.tensor([[1, 2, 3]]), torch.randn(1, 2, 4, 4)
    refs = (comps["text_encoder"](ids), _run(comps["transformer"], inputs), comps["vae"].decode(z))
    handle = apply_offload(comps, CPU, "model", streams=RecordingStreams())
    parts = handle.components
    assert sorted(parts) == ["text_encoder", "transformer", "vae"] and not handle.graph_safe
    def loaded():
        return [n for n, p in sorted(parts.items()) if p.loaded]

    with torch.inference_mode():
        assert torch.equal(comps["text_encoder"](ids), refs[0])
        assert loaded() == ["text_encoder"]
        for _ in range(3):
            assert torch.equal(comps["transformer"](**inputs), refs[1])
        assert loaded() == ["transformer"]
        assert torch.equal(comps["vae"].decode(z), refs[2])  # decode, not forward, starts the VAE
        assert loaded() == ["vae"]
        assert torch.equal(comps["vae"](z), refs[2])
    assert (handle.counters.component_loads, handle.counters.component_unloads) == (3, 2)
    handle.remove()
    assert "decode" not in comps["vae"].__dict__
    assert torch.equal(comps["vae"].decode(z), refs[2])
    assert handle.counters.component_loads == 3


# ---------------------------------------------------------------------------------------------
# Modes, validation and errors
# ---------------------------------------------------------------------------------------------


def test_none_is_a_no_op_everywhere():
    model, _ = tiny_flux()
    ptrs = [p.data_ptr() for p in model.parameters()]
    handle = apply_offload({"transformer": model}, CPU, "none")
    assert handle.counters == OffloadCounters() and handle.graph_safe
    assert handle.describe() == {"mode": "none", "graph_safe": True, "removed": False, "pinned_gb": 0.0,
                                 "models": {}, "offloaded_components": [], "components_on_gpu": [],
                                 "counters": dataclasses.asdict(OffloadCounters())}
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    handle.remove()


@pytest.mark.parametrize("mode", ["layerwise", "model"])
def test_cpu_device_is_refused(mode):
    model, _ = tiny_flux()
    with pytest.raises(InvalidArgumentError, match=f"--offload {mode} needs a CUDA GPU") as e:
        apply_offload({"transformer": model}, CPU, mode)
    assert e.value.field == "offload"


@pytest.mark.parametrize("kwargs, field, message", [
    (dict(mode="disk"), "offload", "'disk' is not an offload mode; accepted: none, layerwise, model"),
    (dict(prefetch=0), "offload_prefetch", "from 1 to 16, got 0"),
    (dict(prefetch=17), "offload_prefetch", "from 1 to 16, got 17"),
    (dict(prefetch=True), "offload_prefetch", "got True"),
    (dict(prefetch=1.5), "offload_prefetch", "got 1.5"),
    (dict(resident_blocks=-1), "resident_blocks", "non-negative integer or None"),
    (dict(resident_blocks="all"), "resident_blocks", "got 'all'"),
    (dict(resident_blocks=8), "resident_blocks", "'transformer' has 7 repeated blocks; got 8"),
    (dict(text_encoders=("text_encoder_2",)), "text_encoders", "'text_encoder_2' is not a model component"),
    (dict(text_encoders="text_encoder"), "text_encoders", "tuple of component names"),
    (dict(placement="middle"), "placement", "'middle' is not accepted"),
    (dict(activation_reserve=-5), "activation_reserve", "number of bytes"),
    (dict(memory_limit=2.5), "memory_limit", "number of bytes"),
])
def test_bad_arguments_name_the_field(kwargs, field, message):
    model, inputs = tiny_flux()
    ref = _run(model, inputs)
    args = dict(mode="layerwise", prefetch=1, resident_blocks=None, text_encoders=())
    args.update(kwargs)
    with pytest.raises(InvalidArgumentError, match=message) as e:
        apply_offload({"transformer": model, "text_encoder": TiedEncoder()}, CPU, streams=RecordingStreams(), **args)
    assert e.value.field == field
    assert torch.equal(_run(model, inputs), ref) and not model._forward_pre_hooks  # nothing half-done


def test_layerwise_needs_a_model_with_repeated_blocks():
    with pytest.raises(InvalidArgumentError, match="none of vae does; use --offload model"):
        apply_offload({"vae": TinyVae()}, CPU, "layerwise", streams=RecordingStreams())


def test_blocks_sharing_weights_are_refused():
    model, _ = tiny_wan(layers=3)
    model.blocks[1].ffn.net[2].weight = model.blocks[0].ffn.net[2].weight
    with pytest.raises(DiffcError, match="shares the tensor blocks.1.ffn.net.2.weight"):
        apply_offload({"transformer": model}, CPU, "layerwise", streams=RecordingStreams())


def test_meta_weights_are_refused():
    with torch.device("meta"):
        model = WanTransformer3DModel(WAN_TRANSFORMER_SPECS["tiny"])
    with pytest.raises(DiffcError, match="weights on the meta device"):
        apply_offload({"transformer": model}, CPU, "layerwise", streams=RecordingStreams())
