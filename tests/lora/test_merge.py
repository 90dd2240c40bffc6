"""Merge semantics: in place, bit-exact unmerge, switching, the host cache, targets, compiled graphs kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffc
from diffc.errors import InvalidArgumentError
from diffc.lora import LoraManager
from tests.lora import writers as W
from tests.lora.conftest import PROMPT


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _addresses(module) -> dict[str, int]:
    return {k: v.data_ptr() for k, v in module.named_parameters()}


def test_switching_then_unmerging_restores_every_weight_bit_for_bit(flux):
    dit = flux.pipe.components["transformer"]
    addresses = _addresses(dit)
    flux.pipe.set_lora("a", flux.files["diffusers"], strength=0.9)
    flux.pipe.set_lora("b", flux.files["kohya"], strength=-1.7)  # the same weights again, from their originals
    flux.pipe.set_lora(["c", "a"], [flux.files["second"], None], strength=[2.0, 0.3])
    flux.pipe.set_lora("c")  # fewer weights: the rest go back to their originals
    changed = {k for k, v in dit.state_dict().items() if not torch.equal(v, flux.base[k])}
    assert changed == {f"{m}.weight" for m in flux.loras["second"].pairs}
    flux.pipe.unmerge_lora_weights()
    assert all(torch.equal(v, flux.base[k]) for k, v in dit.state_dict().items())
    assert _addresses(dit) == addresses, "a merge must write in place, never re-create a weight"
    assert flux.pipe.lora.counters.files_read == 3


def test_adapters_on_one_weight_sum_in_order_with_one_cast(flux):
    flux.pipe.set_lora(["full", "second"], [flux.files["diffusers"], flux.files["second"]], strength=[0.5, -2.0])
    full, second = flux.loras["full"], flux.loras["second"]
    expected = full.expected(flux.base, 0.5)
    for name, w in second.expected(flux.base, -2.0).items():
        expected[name] = expected[name] + (w - flux.base[name].double())
    for name, tensor in flux.pipe.components["transformer"].named_parameters():
        if name in expected:
            torch.testing.assert_close(tensor.double(), expected[name], rtol=0, atol=2e-6)


def test_cached_adapters_are_not_read_again(flux):
    flux.pipe.set_lora("a", flux.files["diffusers"], strength=0.4)
    merged = _state(flux.pipe.components["transformer"])
    flux.pipe.set_lora("b", flux.files["second"])
    flux.pipe.set_lora("a", flux.files["diffusers"], strength=0.4)  # same path: the cached copy
    flux.pipe.set_lora("a", strength=0.4)  # nickname only
    assert flux.pipe.lora.counters.files_read == 2
    assert all(torch.equal(v, merged[k]) for k, v in flux.pipe.components["transformer"].state_dict().items())
    listed = flux.pipe.list_loras()
    assert [a["nickname"] for a in listed["loaded_adapters"]] == ["a", "b"]
    assert listed["active"] == {"transformer": [{"nickname": "a", "path": str(flux.files["diffusers"]),
                                                 "strength": 0.4, "merged": True}]}


def test_merge_and_unmerge_keep_the_set_adapters(flux):
    with pytest.raises(InvalidArgumentError, match="no adapter is set"):
        flux.pipe.merge_lora_weights()
    dit = flux.pipe.components["transformer"]
    flux.pipe.set_lora("a", flux.files["double-diffusers"], strength=0.8)
    merged = _state(dit)
    info = flux.pipe.unmerge_lora_weights()
    assert info["active"]["transformer"][0]["merged"] is False
    assert all(torch.equal(v, flux.base[k]) for k, v in dit.state_dict().items())
    flux.pipe.merge_lora_weights()
    assert all(torch.equal(v, merged[k]) for k, v in dit.state_dict().items())
    flux.pipe.merge_lora_weights(strength=-0.25)
    assert flux.pipe.list_loras()["active"]["transformer"][0]["strength"] == -0.25
    expected = flux.loras["double"].expected(flux.base, -0.25)
    for name, tensor in dit.named_parameters():
        if name in expected:
            torch.testing.assert_close(tensor.double(), expected[name], rtol=0, atol=2e-6)


def test_a_replaced_file_under_a_cached_nickname_is_reloaded(flux, tmp_path):
    dit = flux.pipe.components["transformer"]
    path = W.write_keys(W.diffusers_with_alpha_keys(flux.loras["second"]), tmp_path / "one.safetensors")
    flux.pipe.set_lora("style", path)
    other = tmp_path / "two.safetensors"
    W.write_keys(W.diffusers_with_alpha_keys(flux.loras["double"]), other)
    flux.pipe.set_lora("style", other)  # same nickname, another file: the new one, merged from the originals
    expected = flux.loras["double"].expected(flux.base, 1.0)
    for name, tensor in dit.state_dict().items():
        if name in expected:
            torch.testing.assert_close(tensor.double(), expected[name], rtol=0, atol=2e-6)
        else:
            assert torch.equal(tensor, flux.base[name]), name


def _tiny_wan(seed: int):
    from diffc.models.wan.transformer import WAN_TRANSFORMER_SPECS, WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(WAN_TRANSFORMER_SPECS["tiny"]).eval().requires_grad_(False)


def test_targets_select_the_wan22_experts(tmp_path):
    components = {"transformer": _tiny_wan(0), "transformer_2": _tiny_wan(1)}
    base = {name: _state(components[name]) for name in components}
    lora = W.random_lora(components["transformer"], ["blocks.0.attn1.to_q", "blocks.1.ffn.net.2"], seed=3)
    path = W.write_wan_original(lora, tmp_path / "wan22.safetensors")
    manager = LoraManager(components)

    def changed(name):
        return {k for k, v in components[name].state_dict().items() if not torch.equal(v, base[name][k])}

    touched = {"blocks.0.attn1.to_q.weight", "blocks.1.ffn.net.2.weight"}
    manager.set("low", path, target="transformer_2")
    assert changed("transformer") == set() and changed("transformer_2") == touched
    manager.set(["high", "low"], [path, None], strength=[1.0, 0.5], target=["transformer", "transformer_2"])
    assert changed("transformer") == touched and changed("transformer_2") == touched
    manager.unmerge(target="transformer")
    assert changed("transformer") == set() and changed("transformer_2") == touched
    manager.set("low", target="all")
    assert changed("transformer") == touched and changed("transformer_2") == touched
    manager.unmerge()
    assert changed("transformer") == set() and changed("transformer_2") == set()
    with pytest.raises(InvalidArgumentError, match="target: must be one of all, transformer, transformer_2"):
        manager.set("low", target="critic")


def test_a_compiled_dit_is_not_compiled_again_and_sees_each_switch(flux_lora, monkeypatch):
    """Weights change in place, so the compiled graphs (sharing them) follow every switch with no re-trace."""
    import diffc.compile.compiler as compiler

    traces = []
    trace = compiler.trace_module
    monkeypatch.setattr(compiler, "trace_module", lambda *a, **k: traces.append(1) or trace(*a, **k))
    kw = {**flux_lora.kw, "num_inference_steps": 1}
    eager = diffc.load(flux_lora.ckpt, device="cpu")
    eager.set_lora("a", flux_lora.files["double-diffusers"], strength=1.0)
    want_a = np.asarray(eager.generate(PROMPT, seed=3, progress=False, **kw).images[0])
    eager.set_lora("b", flux_lora.files["second"], strength=1.5)
    want_b = np.asarray(eager.generate(PROMPT, seed=3, progress=False, **kw).images[0])

    pipe = diffc.load(flux_lora.ckpt, device="cpu")
    bucket = {k: kw[k] for k in ("height", "width", "guidance_scale", "max_sequence_length")}
    pipe.compile([bucket], quality="lossless", log=lambda line: None)
    traced = len(traces)
    assert traced >= 1
    stack = pipe.components["transformer"]
    compiled = stack.compiled
    assert compiled is not None
    pipe.set_lora("a", flux_lora.files["double-diffusers"], strength=1.0)
    got_a = np.asarray(pipe.generate(PROMPT, seed=3, progress=False, **kw).images[0])
    pipe.set_lora("b", flux_lora.files["second"], strength=1.5)
    got_b = np.asarray(pipe.generate(PROMPT, seed=3, progress=False, **kw).images[0])
    pipe.unmerge_lora_weights()
    assert len(traces) == traced, "switching a LoRA re-ran the compiler"
    assert pipe.components["transformer"] is stack and stack.compiled is compiled
    assert compiled.counters.eager_fallbacks == 0 and compiled.counters.compiled_calls > 0
    assert np.array_equal(got_a, want_a) and np.array_equal(got_b, want_b)


def test_the_lora_is_a_weight_transform_of_the_executor_stack(flux):
    flux.pipe.set_lora("a", flux.files["second"], strength=0.5)
    stack = flux.pipe.components["transformer"]
    transforms = stack.describe()["transforms"]
    assert {"kind": "lora", "merged": [{"nickname": "a", "strength": 0.5}]}.items() <= transforms[0].items()
    assert "weights: lora" in stack.layers()


def test_weight_copies_of_cpu_weights_stay_on_the_host_and_a_negative_reserve_is_refused():
    from diffc.lora.stash import WeightStash

    stash = WeightStash()
    w = torch.randn(4, 3)
    original = w.clone()
    stash.save(("transformer", "w"), w)
    w.fill_(7.0)
    assert torch.equal(stash.get(("transformer", "w")), original)
    assert (stash.host_bytes, stash.device_bytes) == (w.numel() * 4, 0)
    with pytest.raises(ValueError, match="reserve"):
        WeightStash(reserve=-1)


def test_a_lora_saved_again_over_its_path_is_read_again(flux, tmp_path):
    """Found by an audit: set_lora with the same nickname and path reused the cached tensors of the first file, so a
    LoRA trained further and saved over the same path kept merging the old one."""
    import os

    dit = flux.pipe.components["transformer"]
    path = tmp_path / "evolving.safetensors"
    first = W.random_lora(dit, ["proj_out"], seed=21)
    second = W.random_lora(dit, ["proj_out"], seed=22)
    W.write_keys(W.diffusers_with_alpha_keys(first), path)
    flux.pipe.set_lora("evolving", path)
    W.write_keys(W.diffusers_with_alpha_keys(second), path)
    os.utime(path, ns=(1, 1))  # a new modification time even on a filesystem with coarse timestamps
    flux.pipe.set_lora("evolving", path)
    want = second.expected(flux.base, 1.0)["proj_out.weight"]
    torch.testing.assert_close(dit.proj_out.weight.double(), want, rtol=0, atol=2e-6)
