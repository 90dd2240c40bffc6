"""Where the fp8 tier's released bf16 originals go: views of the checkpoint file (``diffc/stored.py``), or copies
in host memory where it has room, and back to the device.

A tiny Wan DiT saved in bf16 and loaded with diffc's loader: the layers' weights are still the file's tensors, so
releasing them maps the file instead of copying (no host memory, no copy time); anything written or swapped since
the load, or a file rewritten on disk, is copied or refused instead, never silently different. Copies that the
host has no room for stay on the device; no room on the device to bring them back is a clear error.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

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


def test_copies_that_do_not_fit_in_host_memory_stay_on_the_device(monkeypatch):
    """Copying more than the host has available would end the process: what does not fit (less the reserve) stays
    on the device, with one warning, and goes once there is room."""
    from diffc.runtime import fp8 as fp8_module

    torch.manual_seed(0)
    config = dataclasses.replace(WAN_TRANSFORMER_SPECS["tiny"], attention_head_dim=16, ffn_dim=64)
    net = _cast_like_loader(WanTransformer3DModel(config).eval(), BF16)
    fp8 = Fp8Weights(net).apply()
    names = sorted(fp8.linears)
    sizes = {n: fp8.linears[n].weight.numel() * 2 for n in names}
    room = sizes[names[0]] + sizes[names[1]]
    monkeypatch.setattr(fp8_module, "host_available_bytes", lambda: fp8_module.HOST_RESERVE_BYTES + room)
    with pytest.warns(UserWarning, match="stay on the GPU: the host has too little memory"):
        moved = fp8.release(names, host="cpu")
    assert moved == sum(sizes[n] for n in fp8.released) <= room and len(fp8.released) >= 2
    assert fp8.kept == set(names) - fp8.released and fp8.describe()["kept_for_host_memory"] == len(fp8.kept)
    assert all("forward" not in fp8.linears[n].__dict__ for n in fp8.kept)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same layers kept again: no second warning
        fp8.release(sorted(fp8.kept), host="cpu")
    monkeypatch.setattr(fp8_module, "host_available_bytes", lambda: None)  # unknown: no limit
    fp8.release(sorted(fp8.kept), host="cpu")
    assert fp8.released == set(names) and not fp8.kept


def test_host_memory_available_is_read_on_linux():
    from diffc.runtime.staged_copy import host_available_bytes

    found = host_available_bytes()
    assert found is None if not os.path.exists("/proc/meminfo") else found > 0


def test_no_room_on_the_device_to_restore_is_a_clear_error_and_changes_nothing(checkpoint, monkeypatch):
    from diffc.errors import DiffcError
    from diffc.runtime.staged_copy import Ring

    folder, state = checkpoint
    net, fp8 = _loaded(folder)
    names = sorted(fp8.linears)
    fp8.release(names, host="cpu")

    def out_of_memory(self, tensors, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate ...")

    monkeypatch.setattr(Ring, "to_device", out_of_memory)
    with pytest.raises(DiffcError, match=r"fp8: bringing \d+ bf16 weights .* needs more GPU memory than is free"):
        fp8.restore()
    assert fp8.released == fp8.mapped == set(names)
    assert all("forward" in fp8.linears[n].__dict__ for n in names)
