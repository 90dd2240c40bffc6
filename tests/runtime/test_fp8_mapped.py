"""The fp8 tier's released bf16 originals as views of the checkpoint file (``diffc/stored.py``).

A tiny Wan DiT saved in bf16 and loaded with diffc's loader: the layers' weights are still the file's tensors, so
releasing them maps the file instead of copying (no host memory, no copy time); anything written or swapped since
the load, or a file rewritten on disk, is copied or refused instead, never silently different.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from diffc.demo.writer import save_native
from diffc.errors import CheckpointError
from diffc.loader.components import load_native_model
from diffc.models.wan.transformer import WAN_TRANSFORMER_SPECS, WanTransformer3DModel
from diffc.runtime.fp8 import Fp8Weights
from diffc.stored import stored_weights
from tests.compile.conftest import _cast_like_loader

CPU, BF16 = torch.device("cpu"), torch.bfloat16
CLASS = "WanTransformer3DModel"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = dataclasses.replace(WAN_TRANSFORMER_SPECS["tiny"], attention_head_dim=16, ffn_dim=64)
    net = _cast_like_loader(WanTransformer3DModel(config).eval(), BF16)
    folder = tmp_path_factory.mktemp("wan") / "transformer"
    save_native(folder, CLASS, net)
    return folder, {k: v.detach().clone() for k, v in net.state_dict().items()}


def _loaded(folder):
    net = load_native_model(folder, CLASS, CPU, BF16)
    return net, Fp8Weights(net).apply()


def test_the_loader_records_the_tensors_it_kept_as_stored(checkpoint):
    folder, state = checkpoint
    net = load_native_model(folder, CLASS, CPU, BF16)
    stored = stored_weights(net)
    assert stored is not None
    assert set(stored.entries) == {n for n, _ in net.named_parameters()}  # bf16 and fp32 alike, as stored
    converted = load_native_model(folder, CLASS, CPU, torch.float32)  # the bf16 tensors converted: not the file's
    assert set(stored_weights(converted).entries) == {n for n, p in state.items() if p.dtype == torch.float32}


def test_released_originals_map_the_checkpoint_and_restore_exactly(checkpoint):
    folder, state = checkpoint
    net, fp8 = _loaded(folder)
    names = sorted(fp8.linears)
    moved = fp8.release(names, host="cpu")
    assert moved == sum(state[f"{n}.weight"].numel() * 2 for n in names)
    assert fp8.mapped == fp8.released == set(names)
    described = fp8.describe()
    assert described["host_bytes"] == 0 and described["mapped_bytes"] == moved
    assert described["originals_mapped"] == len(names)
    for n in names:
        assert torch.equal(fp8.linears[n].weight, state[f"{n}.weight"])
    fp8.restore()
    assert not fp8.mapped and not fp8.released
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items() if k in state)
    fp8.release(names, host="cpu")  # restored from the file, the weights are still its tensors
    assert fp8.mapped == set(names)


def test_written_or_swapped_weights_are_copied_not_mapped(checkpoint):
    folder, state = checkpoint
    net, fp8 = _loaded(folder)
    written, swapped, *rest = sorted(fp8.linears)
    with torch.no_grad():
        fp8.linears[written].weight.mul_(2)  # in place: a newer version than the file's
        fp8.linears[swapped].weight.data = torch.zeros_like(fp8.linears[swapped].weight)
    fp8.release([written, swapped, *rest], host="cpu")
    assert fp8.mapped == set(rest) and fp8.released == {written, swapped, *rest}
    assert fp8.host_bytes() == 2 * sum(fp8.linears[n].weight.numel() for n in (written, swapped))
    assert torch.equal(fp8.linears[written].weight, 2 * state[f"{written}.weight"])
    assert not fp8.linears[swapped].weight.any()


def test_a_lora_style_write_after_a_restore_is_not_mapped_again(checkpoint):
    folder, state = checkpoint
    net, fp8 = _loaded(folder)
    name = sorted(fp8.linears)[0]
    fp8.release([name], host="cpu")
    fp8.weights_needed([f"{name}.weight"])  # what the LoRA manager calls before it writes
    with torch.no_grad():
        fp8.linears[name].weight.add_(1)
    fp8.held.clear()
    fp8.release([name], host="cpu")
    assert name in fp8.released and name not in fp8.mapped
    assert torch.equal(fp8.linears[name].weight, state[f"{name}.weight"] + 1)


def test_a_checkpoint_rewritten_on_disk_is_copied_before_and_refused_after(checkpoint, tmp_path):
    src, state = checkpoint
    folder = tmp_path / "transformer"
    folder.mkdir()
    for f in src.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    file = folder / "diffusion_pytorch_model.safetensors"
    net, fp8 = _loaded(folder)
    first, second, *_ = sorted(fp8.linears)
    fp8.release([first], host="cpu")
    assert fp8.mapped == {first}
    stat = file.stat()
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rewritten, as far as anyone can tell
    fp8.release([second], host="cpu")
    assert fp8.mapped == {first} and second in fp8.released  # copied: the file may no longer hold its values
    with pytest.raises(CheckpointError, match="changed on disk") as err:
        fp8.restore([first])
    assert str(file) in str(err.value) and f"{first}.weight" in str(err.value)
    fp8.restore([second])
    assert torch.equal(fp8.linears[second].weight, state[f"{second}.weight"])


def test_a_model_built_in_memory_copies_its_originals():
    torch.manual_seed(0)
    config = dataclasses.replace(WAN_TRANSFORMER_SPECS["tiny"], attention_head_dim=16, ffn_dim=64)
    net = _cast_like_loader(WanTransformer3DModel(config).eval(), BF16)
    fp8 = Fp8Weights(net).apply()
    fp8.release(sorted(fp8.linears), host="cpu")
    assert stored_weights(net) is None and not fp8.mapped and fp8.host_bytes() > 0
