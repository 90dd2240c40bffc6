"""Every mistake a user can make with set_lora is a clear error naming the field; nothing is unpickled."""

from __future__ import annotations

import pytest
import torch

import diffc
from diffc.errors import CheckpointError, InvalidArgumentError
from tests.lora import writers as W


@pytest.mark.parametrize("kwargs,field,message", [
    (dict(nickname=""), "lora_nickname", "non-empty string"),
    (dict(nickname=3), "lora_nickname", "non-empty string"),
    (dict(nickname=["a", "a"], path=["x", "y"]), "lora_nickname", "twice"),
    (dict(nickname="new"), "lora_path", "no adapter named 'new' is loaded"),
    (dict(nickname=["a", "b"], path="x.safetensors"), "lora_path", "list of 2 paths"),
    (dict(nickname=["a", "b"], path=["x"]), "lora_path", "one path per nickname"),
    (dict(nickname="a", path=5), "lora_path", "file or folder path"),
    (dict(nickname="a", path="P", strength=float("nan")), "strength", "finite"),
    (dict(nickname="a", path="P", strength=True), "strength", "a number"),
    (dict(nickname="a", path="P", strength="1"), "strength", "a number"),
    (dict(nickname=["a", "b"], path=["P", "P"], strength=[1.0, 2.0, 3.0]), "strength", "one per adapter"),
    (dict(nickname="a", path="P", target="unet"), "target", "all, transformer, transformer_2"),
    (dict(nickname="a", path="P", target="transformer_2"), "target", "no 'transformer_2'"),
])
def test_bad_arguments(flux, kwargs, field, message):
    if kwargs.get("path") == "P" or kwargs.get("path") == ["P", "P"]:
        kwargs["path"] = flux.files["second"] if kwargs["path"] == "P" else [flux.files["second"]] * 2
    with pytest.raises(InvalidArgumentError, match=message) as info:
        flux.pipe.set_lora(**kwargs)
    assert info.value.field == field
    assert all(torch.equal(v, flux.base[k]) for k, v in flux.pipe.components["transformer"].state_dict().items())


def test_bad_files(flux, tmp_path):
    with pytest.raises(InvalidArgumentError, match="lora_path: file not found"):
        flux.pipe.set_lora("a", tmp_path / "missing.safetensors")
    pickled = tmp_path / "lora.bin"
    pickled.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(InvalidArgumentError, match=r"pickled checkpoints \(\.bin\) are never loaded"):
        flux.pipe.set_lora("a", pickled)
    with pytest.raises(InvalidArgumentError, match="holds no .safetensors file.*lora.bin"):
        flux.pipe.set_lora("a", tmp_path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="garbage.safetensors: not a readable safetensors file"):
        flux.pipe.set_lora("a", garbage)
    W.write_keys({"x.lora_A.weight": torch.zeros(1, 1)}, tmp_path / "other.safetensors")
    with pytest.raises(InvalidArgumentError, match="several .safetensors files"):
        flux.pipe.set_lora("a", tmp_path)
    half = W.write_keys({"transformer.proj_out.lora_A.weight": torch.zeros(2, 64)}, tmp_path / "d" / "half.safetensors")
    with pytest.raises(CheckpointError, match="proj_out has only one of its two LoRA matrices"):
        flux.pipe.set_lora("a", half)
    assert flux.pipe.list_loras()["loaded_adapters"] == []


def test_offload_is_refused_until_the_runtime_hosts_lora(flux_lora):
    import dataclasses

    pipe = diffc.load(flux_lora.ckpt, device="cpu")
    pipe.runtime_options = dataclasses.replace(pipe.runtime_options, offload="layerwise")
    with pytest.raises(InvalidArgumentError, match="cannot be merged with --offload layerwise"):
        pipe.set_lora("a", flux_lora.files["second"])
