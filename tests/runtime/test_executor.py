"""The DiT stack: layers compose (compiled + layerwise offload, compiled + CUDA graphs), each layer is
rebuilt alone (no reload, no re-trace), ``describe()`` lists them in order, and the stack is the module's
face for pipelines. CUDA graphs and offload streams run through the CPU stand-ins of their own tests."""

from __future__ import annotations

import pytest
import torch

from diffc.compile.pipeline import compile_dit
from diffc.compile.regions import call_key
from diffc.runtime.compiled import CompiledDiT
from diffc.runtime.dit_stack import DiTStack, unwrap
from diffc.runtime.executor import Executor
from diffc.runtime.options import RuntimeOptions
from tests.runtime.test_cudagraphs import EmulatedGraphs
from tests.runtime.test_offload import RecordingStreams, _run, tiny_flux, tiny_wan

CPU = torch.device("cpu")
# Few blocks: every compiled call runs the fused kernels under Triton's (slow) CPU interpreter.
MODELS = {"flux": lambda: tiny_flux(layers=1, single_layers=2), "wan": lambda: tiny_wan(layers=2)}


@pytest.fixture(scope="module")
def compiled_tiny():
    """Factory: ``compiled_tiny(family) -> (model, inputs, CompiledDiT)``, compiled once per family."""
    cache = {}

    def make(family):
        if family not in cache:
            model, inputs = MODELS[family]()
            graphs: dict = {}
            report = compile_dit(model, inputs, graphs=graphs, device=CPU, dtype=torch.float32)
            assert report.rel_err_vs_eager < 1e-5
            cache[family] = (model, inputs, graphs, report.key)
        model, inputs, graphs, key = cache[family]
        for by_key in graphs.values():
            for g in by_key.values():
                g.forget()
        return model, inputs, CompiledDiT(graphs, [key], {"tier": "fast"})

    return make


def _stack(model, **kw):
    return DiTStack("transformer", model, CPU, cuda_graphs=False, **kw)


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_compiled_layer_matches_eager_and_counts_calls(compiled_tiny, family):
    model, inputs, layer = compiled_tiny(family)
    ref = _run(model, inputs)
    stack = _stack(model)
    stack.set_compiled(layer)
    out = _run(stack, inputs)
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()
    blocks = sum(len(r) for r in (getattr(model, n) for n in model._repeated_blocks))
    assert (layer.counters.compiled_calls, layer.counters.region_calls) == (1, blocks)
    stack.set_compiled(None)
    assert torch.equal(_run(stack, inputs), ref)
    assert not any("forward" in b.__dict__ for n in model._repeated_blocks for b in getattr(model, n))


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_compiled_with_layerwise_offload(compiled_tiny, family):
    """A user with a small GPU need not choose between the compiler and offload."""
    model, inputs, layer = compiled_tiny(family)
    components = {"transformer": model}
    executor = Executor(components, CPU, RuntimeOptions())
    stack = components["transformer"]
    stack.set_compiled(layer)
    compiled_out = _run(stack, inputs)
    weights = [p.data_ptr() for p in model.parameters()]
    executor.place("layerwise", prefetch=1, resident_blocks=0, streams=RecordingStreams())
    for _ in range(2):
        assert torch.equal(_run(stack, inputs), compiled_out)
    counters = executor.offload.counters
    assert counters.blocks_streamed == counters.blocks_total > 0
    assert counters.ring_forwards == 2 and counters.prefetch_copies == 2 * counters.blocks_streamed
    assert layer.counters.region_fallbacks == 0
    assert stack.layers()[1:] == ["compiled (" + ", ".join(layer.graphs) + ")", "placement layerwise",
                                  "no cuda graphs"]
    assert executor.describe()["dit"]["transformer"]["cuda_graphs"]["reason"] == "off on cpu"
    executor.place("none")
    assert torch.equal(_run(stack, inputs), compiled_out)
    assert stack.compiled is layer and [p.data_ptr() for p in model.parameters()] != weights


def test_compiled_with_cuda_graphs(compiled_tiny, monkeypatch):
    import diffc.runtime.dit_stack as dit_stack_module

    monkeypatch.setattr(dit_stack_module, "CudaGraphModule", EmulatedGraphs)
    model, inputs, layer = compiled_tiny("flux")
    stack = _stack(model)
    stack.set_compiled(layer)
    ref = _run(stack, inputs)
    stack.set_cuda_graphs(True)
    assert isinstance(stack.graphs, EmulatedGraphs)
    outs = [_run(stack, inputs) for _ in range(3)]
    assert all(torch.equal(o, ref) for o in outs)
    assert (stack.graphs.counters.captures, stack.graphs.counters.replays) == (1, 2)
    assert layer.counters.compiled_calls == 1 + 3  # replays count as compiled: their capture was
    # a new compiled layer drops the captured graphs (they hold the old forward) but keeps the weights
    ptrs = [p.data_ptr() for p in model.parameters()]
    stack.set_compiled(None)
    assert stack.graphs.counters.captures == 1 and not stack.graphs._graphs
    assert torch.allclose(_run(stack, inputs), ref, atol=1e-4)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    stack.set_cuda_graphs(False)
    assert stack.graphs is None and stack.describe_graphs() == {"enabled": False, "reason": "turned off"}


def test_one_graph_per_compiled_key(compiled_tiny, monkeypatch):
    """A compile of many call keys (Z-Image: one per prompt length) keeps a whole-forward graph for each; the
    default limit stays for fewer; the limit follows the compiled layer in place."""
    import diffc.runtime.dit_stack as dit_stack_module
    from diffc.runtime.cudagraphs import DEFAULT_MAX_GRAPHS

    monkeypatch.setattr(dit_stack_module, "CudaGraphModule", EmulatedGraphs)
    model, inputs, layer = compiled_tiny("flux")
    stack = _stack(model)
    stack.set_cuda_graphs(True)
    assert stack.graphs.max_graphs == DEFAULT_MAX_GRAPHS
    many = CompiledDiT(layer.graphs, [*layer.buckets, *(f"other-{i}" for i in range(2 * DEFAULT_MAX_GRAPHS))],
                       layer.info)
    stack.set_compiled(many)
    assert stack.graphs.max_graphs == len(many.buckets) == 2 * DEFAULT_MAX_GRAPHS + 1
    assert stack.describe_graphs()["max_graphs"] == len(many.buckets)
    stack.set_compiled(layer)
    assert stack.graphs.max_graphs == DEFAULT_MAX_GRAPHS


def test_in_place_weight_change_needs_no_rebuild(compiled_tiny):
    """A weight transform (LoRA) updates tensors in place: the compiled graphs see it at the next call."""
    model, inputs, layer = compiled_tiny("wan")
    stack = _stack(model)
    stack.set_compiled(layer)
    before = _run(stack, inputs)
    weight = next(model.blocks[1].parameters())
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(0.5)
    changed = _run(stack, inputs)
    with stack.bare() as plain:
        reference = _run(plain, inputs)
    assert not torch.allclose(changed, before) and (changed - reference).abs().max() < 1e-4
    with torch.no_grad():
        weight.copy_(saved)
    assert torch.allclose(_run(stack, inputs), before, atol=1e-6)


def test_stack_is_the_module_face(compiled_tiny):
    model, inputs, _ = compiled_tiny("flux")
    stack = _stack(model)
    assert stack.config is model.config and unwrap(stack) is model and unwrap(model) is model
    assert stack.describe()["layers"] == ["eager FluxTransformer2DModel", "placement resident", "no cuda graphs"]
    assert call_key((), inputs) in repr(call_key((), inputs))
    with pytest.raises(AttributeError):
        stack.no_such_attribute


def test_fallback_for_an_uncompiled_shape(compiled_tiny):
    model, inputs, layer = compiled_tiny("flux")
    stack = _stack(model)
    stack.set_compiled(layer)
    other = dict(inputs, hidden_states=inputs["hidden_states"][:, :6], img_ids=inputs["img_ids"][:6])
    out = _run(stack, other)
    with stack.bare() as plain:
        assert torch.equal(out, _run(plain, other))
    assert (layer.counters.compiled_calls, layer.counters.eager_fallbacks) == (0, 1)
    assert layer.counters.region_fallbacks == layer.counters.region_calls > 0


def test_installing_a_compiled_dit_fuses_the_vae_only_on_a_gpu(compiled_tiny):
    """The VAE is lowered with the DiT where its fused kernels pay (a GPU); on the CPU it stays as diffusers runs it."""
    from diffc.models.wan.vae import WAN_VAE_SPECS, AutoencoderKLWan

    from diffc.models.autoencoder_kl import AUTOENCODER_KL_SPECS, AutoencoderKL

    model, _, layer = compiled_tiny("wan")
    vae, image_vae = AutoencoderKLWan(WAN_VAE_SPECS["tiny"]), AutoencoderKL(AUTOENCODER_KL_SPECS["tiny"])
    fused = lambda: {m.fused_kernels for v in (vae, image_vae) for m in v.modules()  # noqa: E731
                     if hasattr(m, "fused_kernels")}
    executor = Executor({"transformer": model, "vae": vae, "image_vae": image_vae}, CPU, RuntimeOptions())
    executor.install_compiled({"transformer": layer})
    assert fused() == {False}
    executor.device = torch.device("cuda")  # what a GPU pipeline's executor holds (nothing runs here)
    executor.install_compiled({"transformer": layer})
    assert fused() == {True}
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last_3d) for m in vae.modules()
               if isinstance(m, torch.nn.Conv3d) and m.in_channels > 1)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in image_vae.modules()
               if isinstance(m, torch.nn.Conv2d))
    executor.set_fused_vae(False)
    assert fused() == {False} and all(m.weight.is_contiguous() for m in vae.modules() if isinstance(m, torch.nn.Conv3d))
    lossless = CompiledDiT(layer.graphs, layer.buckets, {"tier": "lossless"})
    executor.install_compiled({"transformer": lossless})
    assert fused() == {False}  # the lossless tier stays bit-identical to eager, its VAE included
