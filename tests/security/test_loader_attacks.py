"""Attacks and accidents on a checkpoint folder: loading is strict, runs no code and stays inside the folder.

Each case is one clear ``CheckpointError`` line naming the file the user gave: pickled weights,
malformed JSON and safetensors headers, absurd config values (refused before anything is built),
shard names and symbolic links that lead outside the folder, weights that do not fit the config.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffc
from diffc.errors import CheckpointError


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "payload-ran"
    yield path
    assert not path.exists(), "the payload ran"


@pytest.fixture
def ckpt(flux_checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(flux_checkpoint("dev-tiny"), dst)
    return dst


@pytest.fixture
def sharded(flux_checkpoint, tmp_path):
    dst = tmp_path / "sharded"
    shutil.copytree(flux_checkpoint("dev-tiny", sharded=True), dst)
    return dst


def refused(root, fragment: str) -> str:
    with pytest.raises(CheckpointError) as info:
        diffc.load(root, device="cpu")
    message = str(info.value)
    assert fragment in message and "\n" not in message, message
    return message


def _edit(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ---- pickled weights ------------------------------------------------------------------------

def test_a_text_encoder_with_only_a_pickle_is_refused(ckpt, marker):
    folder = ckpt / "text_encoder"
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    refused(ckpt, "text_encoder: no safetensors weights found")


def test_a_model_with_only_a_pickle_names_it(ckpt, marker):
    folder = ckpt / "transformer"
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    refused(ckpt, "; diffusion_pytorch_model.bin is pickled and never loaded: convert the weights to safetensors")


@pytest.mark.parametrize("content", ["state_dict", "payload"])
def test_transformers_never_falls_back_to_a_pickle(ckpt, marker, content):
    """Safetensors under a name transformers does not look for, a .bin it does: refused, not unpickled."""
    folder = ckpt / "text_encoder"
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").rename(folder / "weights.safetensors")
    torch.save(state if content == "state_dict" else {"x": Payload(marker)}, folder / "pytorch_model.bin")
    refused(ckpt, f"{folder}: cannot load CLIPTextModel with safetensors weights")


# ---- malformed files --------------------------------------------------------------------------

@pytest.mark.parametrize("file", ["model_index.json", "transformer/config.json", "text_encoder/config.json",
                                  "scheduler/scheduler_config.json"])
@pytest.mark.parametrize("content,fragment", [
    (b"\xff\xfe\x00binary", "invalid JSON"),
    (b"[1, 2]", "invalid JSON (expected an object, got list)"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid JSON"),
    (b'{"a": ', "invalid JSON"),
])
def test_malformed_json_is_one_line(ckpt, file, content, fragment):
    (ckpt / file).write_bytes(content)
    message = refused(ckpt, fragment)
    assert message.startswith(f"{ckpt / file}: ")


@pytest.mark.parametrize("content", [
    b"",  # empty
    b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json",  # header of 8 bytes that is not JSON
    (10**12).to_bytes(8, "little") + b"{}",  # a header length larger than the file
    b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"w": {"dtype": "F32", "shape": [1000000], "data_offsets": [0, 4000000]}}',
], ids=["empty", "bad-header", "huge-header-length", "offsets-past-the-end"])
def test_a_malformed_safetensors_header_is_one_line(ckpt, content):
    path = ckpt / "transformer" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(content)
    refused(ckpt, f"{path}: not a valid safetensors file")


def test_a_malformed_index_is_one_line(sharded):
    index = sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": ["not", "a", "map"]}))
    refused(sharded, f"{index}: not a valid safetensors index")


# ---- absurd config values, refused before anything is built -----------------------------------

@pytest.mark.parametrize("component,changes,fragment", [
    ("transformer", {"num_layers": 1e9}, "'num_layers': expected an integer, got 1000000000.0"),
    ("transformer", {"num_layers": 10**9}, "'num_layers': expected an integer from 0 to 1024, got 1000000000"),
    ("transformer", {"num_single_layers": -1}, "'num_single_layers': expected an integer from 0 to 1024, got -1"),
    ("transformer", {"attention_head_dim": -16}, "'attention_head_dim': expected an integer from 1 to 1048576"),
    ("transformer", {"patch_size": 0}, "'patch_size': expected an integer from 1 to 1048576, got 0"),
    ("transformer", {"num_attention_heads": 0}, "'num_attention_heads': expected an integer from 1 to 1024, got 0"),
    ("transformer", {"joint_attention_dim": 1 << 40}, "'joint_attention_dim': expected an integer from 1 to 1048576"),
    ("transformer", {"in_channels": "64"}, "'in_channels': expected an integer, got '64'"),
    ("transformer", {"guidance_embeds": "yes"}, "'guidance_embeds': expected true or false, got 'yes'"),
    ("transformer", {"axes_dims_rope": [4, "x", 4]}, "'axes_dims_rope': expected an integer, got 'x'"),
    ("vae", {"scaling_factor": float("nan")}, "'scaling_factor': expected a finite number, got nan"),
    ("vae", {"block_out_channels": [8, -16]}, "'block_out_channels': expected an integer from 1 to"),
    ("vae", {"latent_channels": 0}, "'latent_channels': expected an integer from 1 to 1048576, got 0"),
    ("vae", {"layers_per_block": 5000}, "'layers_per_block': expected an integer from 0 to 1024, got 5000"),
    ("text_encoder", {"num_hidden_layers": 1e9}, "'num_hidden_layers': expected an integer from 0 to 1024"),
    ("text_encoder_2", {"d_model": -4}, "'d_model': expected an integer from 0 to 1048576, got -4"),
    ("scheduler", {"num_train_timesteps": -5}, "'num_train_timesteps': expected an integer from 0 to"),
])
def test_absurd_config_values_are_refused_at_once(ckpt, component, changes, fragment):
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    _edit(ckpt / component / name, **changes)
    started = time.perf_counter()
    message = refused(ckpt, fragment)
    assert message.startswith(f"{ckpt / component / name}: ") and time.perf_counter() - started < 30


def test_weights_that_do_not_fit_the_config_are_named(ckpt):
    config = ckpt / "transformer" / "config.json"
    data = json.loads(config.read_text())
    _edit(config, num_attention_heads=data["num_attention_heads"] * 2, axes_dims_rope=data["axes_dims_rope"])
    message = refused(ckpt, f"{ckpt / 'transformer'}: ")
    assert "weight shape(s) do not match config.json" in message and "(config.json gives" in message


# ---- paths that leave the checkpoint folder -----------------------------------------------------

@pytest.mark.parametrize("name", ["../../outside.safetensors", "/etc/passwd", "a/../../b.safetensors", "",
                                  "C:\\x.safetensors", 7])
def test_shard_names_stay_inside_the_folder(sharded, name):
    index = sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = name
    index.write_text(json.dumps(data))
    refused(sharded, f"{index}: shard name")


def test_a_shard_linking_outside_is_refused(sharded, tmp_path):
    folder = sharded / "transformer"
    shard = sorted(folder.glob("*-00001-of-*.safetensors"))[0]
    outside = tmp_path / "outside.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    refused(sharded, f"{shard.name} points outside the checkpoint folder")


def test_a_weights_file_linking_outside_is_refused(ckpt, tmp_path):
    path = ckpt / "transformer" / "diffusion_pytorch_model.safetensors"
    shutil.move(path, tmp_path / "elsewhere.safetensors")
    path.symlink_to(tmp_path / "elsewhere.safetensors")
    refused(ckpt, "diffusion_pytorch_model.safetensors points outside the checkpoint folder")


def test_a_weights_file_linking_to_a_device_is_refused(ckpt):
    path = ckpt / "transformer" / "diffusion_pytorch_model.safetensors"
    path.unlink()
    path.symlink_to("/dev/zero")
    refused(ckpt, f"{path} is not a file")


def test_a_hub_cache_snapshot_with_linked_blobs_loads(flux_checkpoint, tmp_path):
    """huggingface_hub's cache links every file of a snapshot into the repository's blobs/: that is allowed."""
    repo = tmp_path / "hub" / "models--org--flux-tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    source = flux_checkpoint("dev-tiny", sharded=True)
    for i, file in enumerate(sorted(p for p in source.rglob("*") if p.is_file())):
        blob = repo / "blobs" / f"blob{i}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, blob)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    pipe = diffc.load(snapshot, device="cpu")
    reference = diffc.load(source, device="cpu")
    a, b = pipe.components["transformer"].state_dict(), reference.components["transformer"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- messages name what the user gave ------------------------------------------------------------

def test_messages_name_the_path_the_user_gave(ckpt, tmp_path, monkeypatch):
    (ckpt / "transformer" / "config.json").write_text("{broken")
    link = tmp_path / "my-model"
    link.symlink_to(ckpt)
    refused(link, f"{link}/transformer/config.json: invalid JSON")
    monkeypatch.chdir(tmp_path)
    message = refused("my-model", "my-model/transformer/config.json: invalid JSON")
    assert str(tmp_path) not in message


def test_a_safetensors_file_with_extra_tensors_is_still_named(ckpt):
    path = ckpt / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["decoder.extra"] = torch.zeros(2)
    save_file(state, path)
    refused(ckpt, "unexpected keys (1): decoder.extra")


# ---- found by an audit: each one line, not a traceback or a silently broken pipeline ---------------------

@pytest.mark.parametrize("entry", [["diffusers", ["FluxTransformer2DModel"]], ["diffusers", {"a": 1}],
                                   [["diffusers"], "FluxTransformer2DModel"], ["diffusers", "Flux Transformer"]])
def test_a_component_class_that_is_not_a_string_is_refused(ckpt, entry):
    """One check for both backends (``diffc.checkpoints.component_entry``): the generic one says the same."""
    _edit(ckpt / "model_index.json", transformer=entry)
    refused(ckpt, "component 'transformer' must be [library, class name] (two strings, such as")


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_a_weight_stored_as_integers_is_named(ckpt, dtype):
    path = ckpt / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    name = next(n for n, t in tensors.items() if t.ndim == 2)
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, path)
    message = refused(ckpt, "stored as integers or booleans, not floating point")
    assert f"{name} ({'I32' if dtype is torch.int32 else 'BOOL'})" in message  # read from the header, not loaded


def test_a_truncated_text_encoder_file_is_one_line(ckpt):
    path = ckpt / "text_encoder" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    refused(ckpt, f"{ckpt / 'text_encoder'}")


@pytest.mark.parametrize("damage", ["no vocabulary", "empty folder", "vocabulary is a device"])
def test_a_tokenizer_without_its_vocabulary_is_refused(ckpt, damage):
    folder = ckpt / "tokenizer_2"
    if damage == "empty folder":
        shutil.rmtree(folder)
        folder.mkdir()
    else:
        (folder / "tokenizer.json").unlink()
        if damage == "vocabulary is a device":
            (folder / "tokenizer.json").symlink_to("/dev/zero")
    refused(ckpt, f"{folder}: no tokenizer vocabulary (tokenizer.json")


def test_a_weights_name_that_is_a_folder_is_named(ckpt):
    path = ckpt / "transformer" / "diffusion_pytorch_model.safetensors"
    path.unlink()
    path.mkdir()
    refused(ckpt, f"{path} is not a file")


# ---- weights stored in kinds that are not the weights' own (found by an audit) ----------------------------------------

def _store_as(path: Path, dtype: torch.dtype) -> str:
    """Store the first matrix of ``path`` as ``dtype``; returns its name."""
    tensors = load_file(path)
    name = next(n for n, t in tensors.items() if t.ndim == 2)
    if dtype == torch.float4_e2m1fn_x2:  # packed two to a byte: torch has no conversion to it
        tensors[name] = torch.zeros(tensors[name].shape, dtype=torch.uint8).view(dtype)
    else:
        tensors[name] = tensors[name].to(dtype)
    save_file(tensors, path)
    return name


@pytest.mark.parametrize("component", ["transformer", "vae", "text_encoder", "text_encoder_2"])
@pytest.mark.parametrize("dtype,kind", [(torch.float4_e2m1fn_x2, "F4"), (torch.complex64, "C64"),
                                        (torch.float8_e8m0fnu, "F8_E8M0")])
def test_a_weight_stored_in_another_kind_is_named(ckpt, component, dtype, kind):
    """F4 was a shape mismatch of twice the width (a text encoder: transformers' reshape error), complex64 was
    'integers or booleans' (a text encoder: cast to real with torch's warning) and F8_E8M0, exponents only, loaded."""
    path = next((ckpt / component).glob("*.safetensors"))
    name = _store_as(path, dtype)
    refused(ckpt, f"{ckpt / component}: 1 weight(s) stored in a kind diffc does not load as weights: "
                            f"{name} ({kind}) (accepted: F16, BF16, F32, F64, F8_E4M3, F8_E5M2)")


@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_2"])
def test_a_text_encoder_weight_stored_as_integers_is_named(ckpt, component):
    """transformers converted it to floats without a word (the native models' check did not cover text encoders)."""
    path = next((ckpt / component).glob("*.safetensors"))
    name = _store_as(path, torch.int32)
    refused(ckpt, f"{ckpt / component}: 1 weight(s) stored as integers or booleans, not floating point: {name} (I32)")


def test_fp8_stored_weights_still_load(ckpt):
    """F8_E4M3 converts exactly to the model's dtype: accepted as before."""
    path = ckpt / "transformer" / "diffusion_pytorch_model.safetensors"
    name = _store_as(path, torch.float8_e4m3fn)
    pipe = diffc.load(ckpt, device="cpu")
    assert torch.equal(pipe.components["transformer"].state_dict()[name],
                       load_file(path)[name].to(torch.float32))


def test_a_tokenizer_naming_code_in_its_folder_never_runs_it(ckpt, marker, monkeypatch):
    """Found by an audit: a tokenizer_config.json whose class is defined by a .py file in the folder (auto_map)
    made transformers ask "Do you wish to run the custom code? [y/N]" on the terminal, and a yes ran it."""
    monkeypatch.setattr("builtins.input", lambda *args: "y")  # the user at the terminal says yes
    _edit(ckpt / "model_index.json", tokenizer_2=["transformers", "AutoTokenizer"])
    folder = ckpt / "tokenizer_2"
    _edit(folder / "tokenizer_config.json", tokenizer_class="Planted",
          auto_map={"AutoTokenizer": ["planted.Planted", "planted.Planted"]})
    (folder / "planted.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                       "from transformers import T5TokenizerFast as Planted\n")
    refused(ckpt, f"{folder}: cannot load tokenizer AutoTokenizer (its configuration names a class defined by Python "
                  "code in the folder (auto_map); diffc never runs code from a checkpoint)")


@pytest.mark.parametrize("kind", ["device", "folder", "dangling link"])
def test_a_config_that_is_not_a_file_says_so(ckpt, kind):
    """A config.json that is a folder or links to /dev/zero was reported as a 'missing file'."""
    path = ckpt / "transformer" / "config.json"
    path.unlink()
    if kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to(ckpt / "gone.json")
    expected = {"device": f"{path} is not a file; a config is a JSON file",
                "folder": f"{path} is not a file; a config is a JSON file",
                "dangling link": f"missing file: {path} (a symbolic link to a missing file)"}[kind]
    refused(ckpt, expected)


def test_a_weight_stored_in_two_shards_is_refused(sharded):
    """Both were read and the later one kept without a word."""
    folder = sharded / "transformer"
    first, second = sorted(folder.glob("*-of-*.safetensors"))[:2]
    tensors = load_file(second)
    name, value = next(iter(load_file(first).items()))
    tensors[name] = value
    save_file(tensors, second)
    refused(sharded, f"{second}: tensor {name!r} is also in {first.name}; each weight must be stored in one shard")


def test_a_component_that_is_a_file_says_so(ckpt):
    """It was reported as a 'missing folder'."""
    shutil.rmtree(ckpt / "vae")
    (ckpt / "vae").write_text("{}")
    refused(ckpt, f"{ckpt / 'vae'} is not a folder (named 'vae' in model_index.json)")


def test_a_text_encoder_of_another_kind_is_one_line_without_transformers_report(ckpt):
    """transformers printed its load report (a table of every missing and unexpected key) and 'a model of type
    clip_text_model to instantiate a model of type t5' before diffc's one-line error."""
    import logging

    from transformers.utils import logging as transformers_logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = transformers_logging.get_logger("transformers")
    logger.addHandler(handler)
    _edit(ckpt / "model_index.json", text_encoder=["transformers", "T5EncoderModel"])
    try:
        with pytest.raises(diffc.errors.WeightMismatchError, match="weights of 'text_encoder' do not match the model"):
            diffc.load(ckpt, device="cpu")
    finally:
        logger.removeHandler(handler)
    said = [r.getMessage() for r in records]
    assert not any("LOAD REPORT" in m or "to instantiate a model of type" in m for m in said), said
