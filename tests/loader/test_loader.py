"""The diffusers-format loader: layouts, dtypes, and every error a broken checkpoint can raise."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffc
from diffc.errors import CheckpointError, InvalidArgumentError, WeightMismatchError
from diffc.loader.weights import weight_files


@pytest.fixture
def ckpt_copy(flux_checkpoint, tmp_path):
    def make(sharded: bool = False):
        dst = tmp_path / "ckpt"
        shutil.copytree(flux_checkpoint("dev-tiny", sharded=sharded), dst)
        return dst
    return make


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_sharded_and_single_file_load_the_same_tensors(flux_checkpoint):
    single = diffc.load(flux_checkpoint("dev-tiny"))
    sharded = diffc.load(flux_checkpoint("dev-tiny", sharded=True))
    assert len(weight_files(flux_checkpoint("dev-tiny", sharded=True) / "transformer")) > 1
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        a, b = single.components[name].state_dict(), sharded.components[name].state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_weights_keep_checkpoint_values_and_take_the_requested_dtype(flux_checkpoint):
    ckpt = flux_checkpoint("dev-tiny")
    stored = load_file(str(ckpt / "transformer" / "diffusion_pytorch_model.safetensors"))
    pipe = diffc.load(ckpt, dtype="bf16")
    state = pipe.components["transformer"].state_dict()
    assert set(state) == set(stored)
    for name, tensor in stored.items():
        assert state[name].dtype == torch.bfloat16 and torch.equal(state[name], tensor.to(torch.bfloat16))
    assert pipe.components["text_encoder_2"].dtype == torch.bfloat16
    assert pipe.dtype == torch.bfloat16 and pipe.device.type == "cpu"


def test_fp32_modules_stay_fp32(flux_checkpoint, monkeypatch):
    from diffc.models.flux.transformer import FluxTransformer2DModel

    monkeypatch.setattr(FluxTransformer2DModel, "_keep_in_fp32_modules", ("norm_out", "time_text_embed"), raising=False)
    state = diffc.load(flux_checkpoint("dev-tiny"), dtype="bf16").components["transformer"].state_dict()
    kept = [k for k in state if k.startswith(("norm_out.", "time_text_embed."))]
    assert kept and all(state[k].dtype == torch.float32 for k in kept)
    assert all(state[k].dtype == torch.bfloat16 for k in state if k not in kept)


def test_missing_directory_and_index():
    with pytest.raises(CheckpointError, match="checkpoint directory not found: /nonexistent"):
        diffc.load("/nonexistent/ckpt")


def test_missing_model_index(ckpt_copy):
    root = ckpt_copy()
    (root / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="missing file: .*model_index.json"):
        diffc.load(root)


def test_unknown_pipeline_class(ckpt_copy):
    root = ckpt_copy()
    _edit_json(root / "model_index.json", _class_name="NotAPipeline")
    with pytest.raises(CheckpointError, match="'NotAPipeline' is neither native to diffc nor a pipeline of the installed diffusers"):
        diffc.load(root)


def test_diffusers_class_with_the_wrong_components(ckpt_copy):
    """A class diffc has no native spec for goes to the generic backend; diffusers' refusal becomes a CheckpointError."""
    root = ckpt_copy()
    _edit_json(root / "model_index.json", _class_name="StableDiffusionPipeline")
    with pytest.raises(CheckpointError, match="diffusers could not load StableDiffusionPipeline"):
        diffc.load(root)


def test_unknown_component_class_lists_supported(ckpt_copy):
    root = ckpt_copy()
    _edit_json(root / "model_index.json", transformer=["diffusers", "SD3Transformer2DModel"])
    with pytest.raises(CheckpointError) as info:
        diffc.load(root)
    message = str(info.value)
    assert "unknown class 'SD3Transformer2DModel'" in message
    assert "FluxTransformer2DModel" in message and "WanTransformer3DModel" in message and "T5EncoderModel" in message


def test_missing_component_folder(ckpt_copy):
    root = ckpt_copy()
    shutil.rmtree(root / "vae")
    with pytest.raises(CheckpointError, match=r"missing folder: .*vae \(named 'vae' in model_index.json\)"):
        diffc.load(root)


def test_missing_component_entry(ckpt_copy):
    root = ckpt_copy()
    _edit_json(root / "model_index.json", vae=[None, None])
    with pytest.raises(CheckpointError, match="component 'vae' is missing or empty"):
        diffc.load(root)


@pytest.mark.parametrize("component,filename", [("transformer", "config.json"), ("text_encoder", "config.json"),
                                                ("scheduler", "scheduler_config.json")])
def test_missing_config(ckpt_copy, component, filename):
    root = ckpt_copy()
    (root / component / filename).unlink()
    with pytest.raises(CheckpointError, match=f"missing file: .*{component}/{filename}"):
        diffc.load(root)


@pytest.mark.parametrize("component", ["transformer", "text_encoder_2"])
def test_missing_weights(ckpt_copy, component):
    root = ckpt_copy()
    for f in (root / component).glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match=f"{component}: no safetensors weights found"):
        diffc.load(root)


def test_missing_shard_is_named(ckpt_copy):
    root = ckpt_copy(sharded=True)
    shard = sorted((root / "transformer").glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names shard\\(s\\) that are not on disk: {shard.name}"):
        diffc.load(root)


def test_corrupt_json(ckpt_copy):
    root = ckpt_copy()
    (root / "transformer" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="transformer/config.json: invalid JSON"):
        diffc.load(root)


def test_mismatched_weight_names_list_missing_and_unexpected(ckpt_copy):
    root = ckpt_copy()
    path = root / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    state["proj_out.weight_renamed"] = state.pop("proj_out.weight")
    state["extra.bias"] = torch.zeros(3)
    save_file(state, str(path))
    with pytest.raises(WeightMismatchError) as info:
        diffc.load(root)
    assert info.value.missing == ["proj_out.weight"]
    assert info.value.unexpected == ["extra.bias", "proj_out.weight_renamed"]
    assert "missing keys (1): proj_out.weight" in str(info.value)
    assert "unexpected keys (2): extra.bias, proj_out.weight_renamed" in str(info.value)


def test_mismatched_text_encoder_weights(ckpt_copy):
    root = ckpt_copy()
    path = next((root / "text_encoder").glob("*.safetensors"))
    state = load_file(str(path))
    name = next(k for k in state if k.endswith("final_layer_norm.weight"))
    state[name + "_x"] = state.pop(name)
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(WeightMismatchError) as info:
        diffc.load(root)
    assert name in str(info.value) and name + "_x" in str(info.value)


def test_missing_required_config_field(ckpt_copy):
    root = ckpt_copy()
    data = json.loads((root / "transformer" / "config.json").read_text())
    data["axes_dims_rope"] = [4, 4, 4]
    (root / "transformer" / "config.json").write_text(json.dumps(data))
    with pytest.raises(diffc.DiffcError, match="axes_dims_rope"):
        diffc.load(root)


@pytest.mark.parametrize("kwargs,field", [({"device": "tpu"}, "device"), ({"device": "cuda:0"}, "device"),
                                          ({"dtype": "int8"}, "dtype"), ({"scheduler": "ddim"}, "scheduler"),
                                          ({"scheduler": "unipc"}, "scheduler"), ({"device": "cpu:5"}, "device"),
                                          ({"dtype": ["fp32"]}, "dtype"), ({"scheduler": ["euler"]}, "scheduler")])
def test_bad_load_options(flux_checkpoint, kwargs, field):
    if kwargs.get("device", "").startswith("cuda") and torch.cuda.is_available():
        pytest.skip("machine has a GPU")
    with pytest.raises(InvalidArgumentError) as info:
        diffc.load(flux_checkpoint("dev-tiny"), **kwargs)
    assert info.value.field == field


@pytest.mark.parametrize("path", [None, 5, "", ["ckpt"]])
def test_a_path_that_is_not_one_is_named(path):
    with pytest.raises(InvalidArgumentError, match="path: must be a checkpoint folder"):
        diffc.load(path)


def test_a_path_the_os_refuses_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"cannot be read \(File name too long\)"):  # was an OSError
        diffc.load(tmp_path / ("x" * 300))


@pytest.mark.parametrize("kwargs,hint", [({"foo": 1}, None), ({"ofload": "layerwise"}, "offload"),
                                         ({"cuda_graph": False}, "cuda_graphs"), ({"dtypes": "fp32"}, "dtype")])
def test_an_unknown_load_option_is_named(tmp_path, kwargs, hint):
    # refused before the folder is read: no checkpoint needed, and no Python TypeError
    with pytest.raises(InvalidArgumentError) as info:
        diffc.load(tmp_path / "missing", **kwargs)
    assert info.value.field == next(iter(kwargs))
    assert "accepted: path, device, dtype, scheduler, offload" in info.value.message
    assert (f"did you mean {hint!r}" in info.value.message) == (hint is not None)


def test_cpu_0_is_the_cpu(flux_checkpoint):
    assert diffc.load(flux_checkpoint("dev-tiny"), device="cpu:0").device == torch.device("cpu")


@pytest.mark.parametrize("kwargs,field,fragment", [
    ({"cuda_graphs": True}, "cuda_graphs", "need a CUDA GPU"),
    ({"cuda_graphs": "yes"}, "cuda_graphs", "must be True, False or None"),
    ({"offload": "layerwise"}, "offload", "needs a CUDA GPU"),
    ({"offload": "disk"}, "offload", "accepted: none, layerwise, model"),
    ({"offload_prefetch": 0}, "offload_prefetch", "from 1 to 16"),
    ({"resident_blocks": -1}, "resident_blocks", "non-negative integer"),
])
def test_runtime_options_are_checked_before_loading(flux_checkpoint, kwargs, field, fragment):
    if torch.cuda.is_available():
        pytest.skip("machine has a GPU")
    with pytest.raises(InvalidArgumentError) as info:
        diffc.load(flux_checkpoint("dev-tiny"), **kwargs)
    assert info.value.field == field and fragment in str(info.value)


@pytest.mark.parametrize("compiled,error,fragment", [
    (5, InvalidArgumentError, "compiled: must be the path of an artifact"),  # was a TypeError after loading
    ("", InvalidArgumentError, "compiled: must be the path of an artifact"),  # was the current folder
    ("{tmp}/missing", diffc.DiffcError, "compiled artifact not found"),
    ("{tmp}/" + "x" * 300, diffc.DiffcError, "cannot be read \\(File name too long\\)"),  # was an OSError
    ("{tmp}/foreign", diffc.DiffcError, "compiled for another setup"),
])
def test_a_compiled_artifact_is_checked_before_any_weight_loads(flux_checkpoint, tmp_path, monkeypatch, compiled,
                                                                 error, fragment):
    """Found by an audit: a wrong ``compiled=`` was found only once the whole pipeline had loaded."""
    from diffc.compile import artifact as art
    from diffc.loader import pipeline as loader

    (tmp_path / "foreign").mkdir()
    manifest = {"format_version": art.FORMAT_VERSION, "dtype": "float32", "files": {},
                "environment": {**art.environment(torch.device("cpu")), "torch": "0.0.0"},
                "stages": {"transformer": {"buckets": [{"key": "k", "regions": []}]}}}
    (tmp_path / "foreign" / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(loader, "load_component", lambda *a, **k: pytest.fail("a component loaded first"))
    if isinstance(compiled, str):
        compiled = compiled.replace("{tmp}", str(tmp_path))
    with pytest.raises(error, match=fragment):
        diffc.load(flux_checkpoint("dev-tiny"), device="cpu", compiled=compiled)


def test_cpu_default_runs_without_cuda_graphs(flux_checkpoint):
    pipe = diffc.load(flux_checkpoint("dev-tiny"))
    out = pipe.generate("a fox", height=16, width=16, num_inference_steps=1, progress=False, seed=0)
    runtime = out.timings.runtime
    assert runtime["cuda_graphs"] == {"enabled": False, "reason": "off on cpu"} and runtime["compiled"] is None
    assert runtime["dit"]["transformer"]["layers"] == ["eager FluxTransformer2DModel", "placement resident",
                                                      "no cuda graphs"]
    from diffc.runtime.dit_stack import DiTStack, unwrap

    assert isinstance(pipe.components["transformer"], DiTStack)
    assert type(unwrap(pipe.components["transformer"])).__name__ == "FluxTransformer2DModel"


def test_cuda_graphs_with_layerwise_offload_is_refused(flux_checkpoint):
    with pytest.raises(InvalidArgumentError) as info:
        diffc.load(flux_checkpoint("dev-tiny"), offload="layerwise", cuda_graphs=True)
    assert info.value.field == "cuda_graphs" and "cannot capture layerwise offload" in str(info.value)
