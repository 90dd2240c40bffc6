"""LoRA on the generic backend: files go through the diffusers pipeline class's ``lora_state_dict``, diffc
merges them; diffusers' own ``load_lora_weights`` (PEFT layers, unmerged) is the oracle."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from diffc.errors import CheckpointError, InvalidArgumentError
from diffc.lora import LoraManager
from tests.generic_pipelines import REQUESTS
from tests.helpers import psnr_uint8
from tests.lora import writers as W

PROMPT, SEED = "a red fox running through snow", 5
PSNR_DB = 40.0
EFFECT_DB = 30.0  # a LoRA under test changes the output far beyond PSNR_DB
OUTPUT = {"sd3": "image", "hunyuan": "video"}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("generic-lora")


@pytest.fixture
def diffc_pipe(generic_pipe):
    """Factory: the shared diffc pipeline, its LoRA state dropped after the test (the session shares it)."""
    used = []

    def get(name: str):
        used.append(generic_pipe(name))
        return used[-1]

    yield get
    for pipe in used:
        if getattr(pipe, "_lora", None) is not None:
            pipe.unmerge_lora_weights()
            pipe._lora = None


def diffc_output(pipe, name: str) -> np.ndarray:
    out = pipe.generate(PROMPT, seed=SEED, progress=False, **REQUESTS[name])
    return np.asarray(out.images[0]) if OUTPUT[name] == "image" else out.frames


def diffusers_output(pipe, name: str, lora: Path | None = None, strength: float = 1.0) -> np.ndarray:
    """diffusers' pipeline with ``lora`` loaded by its own ``load_lora_weights`` (unloaded after)."""
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name="test")
    try:
        if strength != 1.0:
            pipe.set_adapters("test", adapter_weights=strength)
        frames = pipe(prompt=PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
                      return_dict=False, **REQUESTS[name])[0][0]
    finally:
        if lora is not None:
            pipe.unload_lora_weights()
    return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)


def assert_matches(mine: np.ndarray, ref: np.ndarray) -> None:
    assert mine.shape == ref.shape and mine.dtype == np.uint8
    diff = np.abs(mine.astype(np.int16) - ref.astype(np.int16)).max()
    assert diff <= 1 or psnr_uint8(mine, ref) >= PSNR_DB, (diff, psnr_uint8(mine, ref))


def diffusers_lora(dit: torch.nn.Module, seed: int, include=lambda name: True) -> W.RandomLora:
    return W.random_lora(dit, W.linear_modules(dit, include), seed=seed, magnitude=0.3)


# ---- original HunyuanVideo names (as _convert_hunyuan_video_lora_to_diffusers expects them) ----------
def hunyuan_original(dit: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA in the original HunyuanVideo module names, ``diffusion_model.`` prefixed, on the double
    blocks (fused QKV: one shared down, the ups stacked), ``single_blocks.N.linear2`` and the final layer.
    (``single_blocks.N.linear1`` is left out: diffusers splits it at the production width, 3072.)"""
    g = torch.Generator().manual_seed(seed)
    modules = dict(dit.named_modules())
    sources: dict[str, list[str]] = {"final_layer.linear": ["proj_out"]}
    for i in range(len(dit.transformer_blocks)):
        d = f"transformer_blocks.{i}"
        sources.update({
            f"double_blocks.{i}.img_attn_qkv": [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"],
            f"double_blocks.{i}.txt_attn_qkv": [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"],
            f"double_blocks.{i}.img_attn_proj": [f"{d}.attn.to_out.0"],
            f"double_blocks.{i}.txt_attn_proj": [f"{d}.attn.to_add_out"],
            f"double_blocks.{i}.img_mlp.fc1": [f"{d}.ff.net.0.proj"],
            f"double_blocks.{i}.img_mlp.fc2": [f"{d}.ff.net.2"],
            f"double_blocks.{i}.txt_mlp.fc1": [f"{d}.ff_context.net.0.proj"],
            f"double_blocks.{i}.txt_mlp.fc2": [f"{d}.ff_context.net.2"],
            f"double_blocks.{i}.img_mod.linear": [f"{d}.norm1.linear"],
            f"double_blocks.{i}.txt_mod.linear": [f"{d}.norm1_context.linear"],
        })
    for i in range(len(dit.single_transformer_blocks)):
        sources[f"single_blocks.{i}.linear2"] = [f"single_transformer_blocks.{i}.proj_out"]
    tensors = {}
    for source, targets in sources.items():
        weights = [modules[t].weight for t in targets]
        rows, cols = sum(w.shape[0] for w in weights), weights[0].shape[1]
        stem = f"diffusion_model.{source}"
        tensors[f"{stem}.lora_A.weight"] = torch.randn(W.RANK, cols, generator=g) * 0.3
        tensors[f"{stem}.lora_B.weight"] = torch.randn(rows, W.RANK, generator=g) * 0.3
    return tensors


# ---- tests ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, pipeline_class", [("sd3", "StableDiffusion3Pipeline"),
                                                  ("hunyuan", "HunyuanVideoPipeline")])
def test_diffusers_format_matches_load_lora_weights(name, pipeline_class, diffc_pipe, diffusers_pipeline, lora_dir):
    import diffusers

    ref_pipe = diffusers_pipeline(name)
    lora = diffusers_lora(ref_pipe.transformer, seed=1)
    path = W.write_diffusers(lora, lora_dir / f"{name}-diffusers", getattr(diffusers, pipeline_class))
    pipe = diffc_pipe(name)
    base = diffc_output(pipe, name)

    listed = pipe.set_lora("style", path)
    adapter = listed["loaded_adapters"][0]
    assert adapter["format"] == ["diffusers"] and adapter["warnings"] == []  # diffusers left it as it was
    assert adapter["modules"] == len(lora.pairs) and adapter["rank"] == W.RANK
    merged = diffc_output(pipe, name)
    assert psnr_uint8(merged, base) < EFFECT_DB
    assert_matches(merged, diffusers_output(ref_pipe, name, path))

    pipe.set_lora("style", strength=0.5)
    assert_matches(diffc_output(pipe, name), diffusers_output(ref_pipe, name, path, strength=0.5))

    pipe.unmerge_lora_weights()
    assert np.array_equal(diffc_output(pipe, name), base)  # bit for bit


def test_original_hunyuan_names_converted_by_diffusers(diffc_pipe, diffusers_pipeline, lora_dir):
    ref_pipe = diffusers_pipeline("hunyuan")
    path = W.write_keys(hunyuan_original(ref_pipe.transformer, seed=2), lora_dir / "hunyuan-original.safetensors")
    pipe = diffc_pipe("hunyuan")
    base = diffc_output(pipe, "hunyuan")

    # diffc's own converter has no map for HunyuanVideo's original names: the conversion is diffusers'
    with pytest.raises(CheckpointError, match="no key of this LoRA matches"):
        LoraManager(pipe.components).load("raw", path)

    adapter = pipe.set_lora("original", path)["loaded_adapters"][0]
    assert adapter["format"] == ["diffusers:HunyuanVideoPipeline"] and adapter["warnings"] == []
    assert adapter["modules"] == 3 * 2 + 8 + 2  # q/k/v and add_q/k/v split out, 8 double-block linears, 2 more
    merged = diffc_output(pipe, "hunyuan")
    assert psnr_uint8(merged, base) < EFFECT_DB
    assert_matches(merged, diffusers_output(ref_pipe, "hunyuan", path))

    pipe.unmerge_lora_weights()
    assert np.array_equal(diffc_output(pipe, "hunyuan"), base)


def test_text_encoder_keys_reported_as_skipped(diffc_pipe, diffusers_pipeline, lora_dir, caplog):
    ref_pipe = diffusers_pipeline("sd3")
    lora = diffusers_lora(ref_pipe.transformer, seed=3, include=lambda n: ".attn." in n)
    tensors = {}
    for module, (down, up) in lora.pairs.items():
        tensors[f"transformer.{module}.lora_A.weight"], tensors[f"transformer.{module}.lora_B.weight"] = down, up
    q_proj = ref_pipe.text_encoder.text_model.encoder.layers[0].self_attn.q_proj.weight
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    tensors[f"{te}.lora_A.weight"] = torch.randn(W.RANK, q_proj.shape[1])
    tensors[f"{te}.lora_B.weight"] = torch.randn(q_proj.shape[0], W.RANK)
    path = W.write_keys(tensors, lora_dir / "with-text-encoder.safetensors")

    with caplog.at_level(logging.WARNING, logger="diffc.lora"):
        adapter = diffc_pipe("sd3").set_lora("te", path)["loaded_adapters"][0]
    assert adapter["modules"] == len(lora.pairs)
    assert len(adapter["warnings"]) == 1 and "2 text-encoder key(s) are not supported" in adapter["warnings"][0]
    assert te in adapter["warnings"][0] and any("text-encoder" in r.getMessage() for r in caplog.records)


def test_unknown_format_is_a_checkpoint_error_naming_the_file(diffc_pipe, lora_dir):
    path = W.write_keys({"unet.mid.block.lora_A.weight": torch.zeros(4, 8), "unet.mid.block.lora_B.weight":
                         torch.zeros(8, 4)}, lora_dir / "unknown.safetensors")
    with pytest.raises(CheckpointError, match=f"{path}: no key of this LoRA matches transformer"):
        diffc_pipe("sd3").set_lora("unknown", path)


def test_a_format_diffusers_refuses_names_both_failures(diffc_pipe, diffusers_pipeline, lora_dir):
    dit = diffusers_pipeline("hunyuan").transformer
    width = dit.single_transformer_blocks[0].proj_mlp.in_features
    path = W.write_keys({  # original names that diffusers splits at the production width (3072): it raises
        "double_blocks.0.img_attn_qkv.lora_A.weight": torch.zeros(4, width),
        "double_blocks.0.img_attn_qkv.lora_B.weight": torch.zeros(3 * width, 4),
        "single_blocks.0.linear1.lora_A.weight": torch.zeros(4, width),
        "single_blocks.0.linear1.lora_B.weight": torch.zeros(7 * width, 4),
    }, lora_dir / "refused.safetensors")
    with pytest.raises(CheckpointError) as info:
        diffc_pipe("hunyuan").set_lora("refused", path)
    message = str(info.value)
    assert message.startswith(f"{path}: no key of this LoRA matches transformer")
    assert "diffusers:HunyuanVideoPipeline: " in message and "that conversion failed too" in message


def test_pickled_file_refused(diffc_pipe, lora_dir):
    path = lora_dir / "adapter.bin"
    path.write_bytes(b"not read")
    with pytest.raises(InvalidArgumentError, match="pickled checkpoints"):
        diffc_pipe("sd3").set_lora("pickled", path)


# ---- the converter alone (no pipeline) ---------------------------------------------------------------
def _file(tensors: dict[str, torch.Tensor], config=None):
    from diffc.lora.files import LoraFile

    return LoraFile(Path("adapter.safetensors"), tensors, config or {}, 0)


def test_converter_keeps_alphas_config_and_the_files_own_dict():
    import diffusers

    from diffc.pipelines.generic.lora import diffusers_lora_converter

    stem = "transformer.blocks.0.attn.to_q"
    tensors = {f"{stem}.lora_A.weight": torch.ones(2, 4), f"{stem}.lora_B.weight": torch.ones(4, 2),
               f"{stem}.alpha": torch.tensor(8.0)}
    config = {"transformer.lora_alpha": 4}
    # FLUX's mixin takes ``.alpha`` keys apart as network alphas: they come back as the same ``.alpha`` entries
    out = diffusers_lora_converter(diffusers.FluxFillPipeline)(_file(dict(tensors), config))
    assert out.tensors.keys() == tensors.keys() and out.tensors[f"{stem}.alpha"] is tensors[f"{stem}.alpha"]
    assert out.converted_by is None and out.converter_error is None and out.config == config

    block = "diffusion_model.double_blocks.0"  # diffusers converts a file with an ``img_attn_qkv`` key
    original = {f"{block}.img_attn_qkv.lora_A.weight": torch.ones(2, 2), f"{block}.img_attn_qkv.lora_B.weight":
                torch.ones(6, 2), f"{block}.img_attn_proj.lora_A.weight": torch.ones(2, 2),
                f"{block}.img_attn_proj.lora_B.weight": torch.ones(2, 2)}
    file = _file(original, config)
    out = diffusers_lora_converter(diffusers.HunyuanVideoPipeline)(file)  # diffusers' converter pops its input
    assert file.tensors is original and len(original) == 4
    assert sorted(out.tensors) == [f"transformer.transformer_blocks.0.attn.{m}.lora_{ab}.weight"
                                   for m in ("to_k", "to_out.0", "to_q", "to_v") for ab in "AB"]
    assert out.converted_by == "diffusers:HunyuanVideoPipeline" and out.config == config


def test_converter_falls_back_to_the_file_as_read():
    from diffc.pipelines.generic.lora import diffusers_lora_converter

    class Refuses:
        @classmethod
        def lora_state_dict(cls, state_dict, **kwargs):
            raise ValueError("unknown format")

    assert diffusers_lora_converter(object) is None  # no lora_state_dict: the file goes to diffc as read
    file = _file({"x.lora_A.weight": torch.ones(1, 1)})
    out = diffusers_lora_converter(Refuses)(file)
    assert out.tensors is file.tensors and out.converted_by is None
    assert out.converter_error == "diffusers:Refuses: ValueError: unknown format"


def test_merge_reaches_the_compiled_transformer(generic_checkpoint, diffc_pipe, diffusers_pipeline, lora_dir):
    import diffc

    path = W.write_keys(hunyuan_original(diffusers_pipeline("hunyuan").transformer, seed=4),
                        lora_dir / "hunyuan-compiled.safetensors")
    eager = diffc_pipe("hunyuan")
    eager.set_lora("original", path)
    want = diffc_output(eager, "hunyuan")

    pipe = diffc.load(generic_checkpoint("hunyuan"), device="cpu")  # its own: compiling changes the pipeline
    request = {k: v for k, v in REQUESTS["hunyuan"].items() if k != "num_inference_steps"}
    pipe.compile([request], quality="lossless", log=lambda line: None)
    compiled = pipe.generate(PROMPT, seed=SEED, progress=False, **REQUESTS["hunyuan"])
    base = compiled.frames
    assert compiled.timings.runtime["compiled"] is not None
    pipe.set_lora("original", path)  # merged in place: the compiled graphs read the same tensors
    assert np.array_equal(diffc_output(pipe, "hunyuan"), want)
    pipe.unmerge_lora_weights()
    assert np.array_equal(diffc_output(pipe, "hunyuan"), base)
