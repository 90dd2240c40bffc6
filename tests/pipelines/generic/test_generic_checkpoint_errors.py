"""A malformed checkpoint on the generic (diffusers) backend is one CheckpointError line naming the file (and key),
never a traceback from inside diffusers, transformers, safetensors or torch; absurd sizes are refused at once."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

import diffc
from diffc.errors import CheckpointError
from diffc.pipelines.generic.checks import COUNT, TABLE, WIDTH, check_sizes, size_bound
from tests.helpers import assert_planted_code_never_runs


def _edit_json(path, **fields):
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _drop_tensor(root):
    from safetensors.torch import load_file, save_file

    path = root / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    del tensors[sorted(tensors)[0]]
    save_file(tensors, path, metadata={"format": "pt"})


def _integer_weight(root):
    from safetensors.torch import load_file, save_file

    path = root / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    name = next(n for n in sorted(tensors) if tensors[n].ndim == 2)
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, path, metadata={"format": "pt"})


def _truncate(path, cut=50):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - cut])


def _empty_folder(path):
    shutil.rmtree(path)
    path.mkdir()


# (mutation of a copy of the tiny SD3 checkpoint, a pattern the one-line message must match)
MUTATIONS = {
    "layers_not_int": (lambda r: _edit_json(r / "transformer/config.json", num_layers="two"),
                       r"transformer/config\.json: 'num_layers': expected an integer from 0 to 1024.*got 'two'"),
    "heads_negative": (lambda r: _edit_json(r / "transformer/config.json", num_attention_heads=-2),
                       r"transformer/config\.json: 'num_attention_heads': expected an integer .*got -2"),
    "layers_1e9": (lambda r: _edit_json(r / "transformer/config.json", num_layers=1_000_000_000),
                   r"transformer/config\.json: 'num_layers': .*got 1000000000"),
    "layers_1e5": (lambda r: _edit_json(r / "transformer/config.json", num_layers=100_000),
                   r"transformer/config\.json: 'num_layers': .*got 100000"),
    "heads_bool": (lambda r: _edit_json(r / "transformer/config.json", num_attention_heads=True),
                   r"transformer/config\.json: 'num_attention_heads': .*got True"),
    "vae_channels_str": (lambda r: _edit_json(r / "vae/config.json", block_out_channels="abc"),
                         r"vae/config\.json: 'block_out_channels': expected an integer from 0 to 65536"),
    "vae_channels_huge": (lambda r: _edit_json(r / "vae/config.json", block_out_channels=[8, 1 << 20]),
                          r"vae/config\.json: 'block_out_channels'"),
    "text_encoder_width_str": (lambda r: _edit_json(r / "text_encoder/config.json", hidden_size="x"),
                               r"text_encoder/config\.json: 'hidden_size': .*got 'x'"),
    "scheduler_shift_str": (lambda r: _edit_json(r / "scheduler/scheduler_config.json", shift="x"),
                            r"/scheduler: diffusers could not load scheduler \(FlowMatchEulerDiscreteScheduler\) "
                            r"\(TypeError: "),
    "text_encoder_truncated": (lambda r: _truncate(r / "text_encoder/model.safetensors"),
                               r"/text_encoder: diffusers could not load text_encoder .*SafetensorError"),
    "transformer_tensor_missing": (_drop_tensor,
                                   r"/transformer: the weights hold no tensor for 1 of SD3Transformer2DModel's"),
    "transformer_weight_int": (_integer_weight, r"/transformer: 1 weight\(s\) stored as integers or booleans, not "
                                                r"floating point: .* \(I32\)"),
    "transformer_wrong_class": (lambda r: _edit_json(r / "model_index.json", transformer=["diffusers", "AutoencoderKL"]),
                                r"/transformer: the weights hold no tensor for \d+ of AutoencoderKL's"),
    "class_not_a_string": (lambda r: _edit_json(r / "model_index.json", vae=["diffusers", ["AutoencoderKL"]]),
                           r"model_index\.json: component 'vae' must be \[library, class name\] \(two strings, .*\), "
                           r'got \["diffusers", \["AutoencoderKL"\]\]'),
    "class_a_number": (lambda r: _edit_json(r / "model_index.json", vae=["diffusers", 6]),
                       r"model_index\.json: component 'vae' must be \[library, class name\] .*" r'got \["diffusers", 6\]'),
    "tokenizer_empty": (lambda r: _empty_folder(r / "tokenizer"),
                        r"/tokenizer: no tokenizer vocabulary"),
    "tokenizer_without_vocabulary": (lambda r: (r / "tokenizer/tokenizer.json").unlink(),
                                     r"/tokenizer: no tokenizer vocabulary"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_malformed_checkpoint_is_one_line_naming_the_file(mutation, generic_checkpoint, tmp_path):
    edit, message = MUTATIONS[mutation]
    root = shutil.copytree(generic_checkpoint("sd3"), tmp_path / "ckpt")
    edit(root)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=message) as info:
        diffc.load(root, device="cpu")
    assert time.perf_counter() - start < 30  # refused, not built (1e9 layers ran for minutes)
    text = str(info.value)
    assert "\n" not in text and str(root) in text
    error = info.value  # no chained library traceback under the line
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_the_unmutated_copy_loads(generic_checkpoint, tmp_path):
    root = shutil.copytree(generic_checkpoint("sd3"), tmp_path / "ckpt")
    assert diffc.load(root, device="cpu").spec.pipeline_class == "StableDiffusion3Pipeline"


# Structural sizes of released checkpoints (their config.json files): each must stay within the bounds.
REAL_CONFIGS = {
    "flux1-transformer": dict(attention_head_dim=128, axes_dims_rope=[16, 56, 56], in_channels=64,
                              joint_attention_dim=4096, num_attention_heads=24, num_layers=19, num_single_layers=38,
                              out_channels=None, pooled_projection_dim=768, patch_size=1, guidance_embeds=True),
    "sd35-large-transformer": dict(attention_head_dim=64, caption_projection_dim=2432, in_channels=16,
                                   joint_attention_dim=4096, num_attention_heads=38, num_layers=38, out_channels=16,
                                   pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm",
                                   dual_attention_layers=[]),
    "sd35-medium-transformer": dict(attention_head_dim=64, num_attention_heads=24, num_layers=24,
                                    dual_attention_layers=list(range(13)), caption_projection_dim=1536),
    "hunyuanvideo-transformer": dict(attention_head_dim=128, in_channels=16, mlp_ratio=4.0, num_attention_heads=24,
                                     num_layers=20, num_single_layers=40, num_refiner_layers=2, out_channels=16,
                                     pooled_projection_dim=768, rope_axes_dim=[16, 56, 56], text_embed_dim=4096,
                                     image_condition_type=None),
    "cogvideox5b-transformer": dict(attention_head_dim=64, in_channels=16, num_attention_heads=48, num_layers=42,
                                    text_embed_dim=4096, time_embed_dim=512, ofs_embed_dim=None, patch_size_t=None,
                                    max_text_seq_length=226, spatial_interpolation_scale=1.875),
    "ltx-transformer": dict(attention_head_dim=64, caption_channels=4096, cross_attention_dim=2048, in_channels=128,
                            num_attention_heads=32, num_layers=28, out_channels=128),
    "ltx-vae": dict(block_out_channels=[128, 256, 512, 512], decoder_block_out_channels=[128, 256, 512, 512],
                    layers_per_block=[4, 3, 3, 3, 4], decoder_layers_per_block=[4, 3, 3, 3, 4], latent_channels=128,
                    spatio_temporal_scaling=[True, True, True, False], upsample_factor=[1, 1, 1, 1]),
    "wan14b-transformer": dict(added_kv_proj_dim=None, attention_head_dim=128, ffn_dim=13824, freq_dim=256,
                               in_channels=16, num_attention_heads=40, num_layers=40, out_channels=16, text_dim=4096,
                               image_dim=None, rope_max_seq_len=1024, qk_norm="rms_norm_across_heads"),
    "wan-vae": dict(attn_scales=[], base_dim=96, dim_mult=[1, 2, 4, 4], num_res_blocks=2, z_dim=16,
                    temperal_downsample=[False, True, True]),
    "qwen-image-transformer": dict(attention_head_dim=128, axes_dims_rope=[16, 56, 56], in_channels=64,
                                   joint_attention_dim=3584, num_attention_heads=24, num_layers=60, out_channels=16),
    "sdxl-unet": dict(attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                      transformer_layers_per_block=[1, 2, 10], addition_time_embed_dim=256, layers_per_block=2,
                      projection_class_embeddings_input_dim=2816, num_attention_heads=None),
    "sana-dc-ae": dict(encoder_layers_per_block=[0, 0, 0, 3, 3, 3], latent_channels=32,
                       encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024]),
    "t5-xxl": dict(d_ff=10240, d_kv=64, d_model=4096, num_heads=64, num_layers=24, vocab_size=32128,
                   dense_act_fn="gelu_new", layer_norm_epsilon=1e-6),
    "t5-11b": dict(d_ff=65536, d_kv=128, d_model=1024, num_heads=128, num_layers=24),
    "umt5-xxl": dict(d_ff=10240, d_kv=64, d_model=4096, num_heads=64, num_layers=24, vocab_size=256384),
    "clip-l": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                   max_position_embeddings=77, projection_dim=768, vocab_size=49408, hidden_act="quick_gelu"),
    "clip-g": dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                   projection_dim=1280),
    "qwen25-vl-7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_hidden_layers=28,
                         num_key_value_heads=4, max_position_embeddings=128000, vocab_size=152064,
                         max_window_layers=28, vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420,
                                                                  num_heads=16, out_hidden_size=3584,
                                                                  fullatt_block_indexes=[7, 15, 23, 31])),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_hidden_layers=32,
                      num_key_value_heads=8, max_position_embeddings=8192, vocab_size=128320),
    "gemma3-text": dict(vocab_size=262208, max_position_embeddings=131072, head_dim=256,
                        layer_types=["sliding_attention", "full_attention"]),
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_released_model_sizes_are_within_the_bounds(name):
    check_sizes(REAL_CONFIGS[name], name)


@pytest.mark.parametrize("key, bound", [
    ("num_layers", COUNT), ("num_single_layers", COUNT), ("layers_per_block", COUNT), ("num_res_blocks", COUNT),
    ("num_attention_heads", COUNT), ("num_key_value_heads", COUNT), ("attention_head_dim", WIDTH),
    ("block_out_channels", WIDTH), ("hidden_size", WIDTH), ("intermediate_size", WIDTH), ("d_ff", WIDTH),
    ("vocab_size", TABLE), ("ffn_dim_multiplier", None), ("encoder_hid_dim_type", None), ("mlp_ratio", None),
    ("layer_norm_eps", None), ("sample_size", None), ("shift", None),
])
def test_size_keys_are_told_by_their_words(key, bound):
    assert size_bound(key) == bound


@pytest.mark.parametrize("value", [-1, 1025, "two", 2.0, True, [1, "a"], [[[[1]]]], [None], {"n": 1}])
def test_bad_layer_counts_are_refused_naming_file_and_key(value):
    with pytest.raises(CheckpointError, match=r"^x/config\.json: 'num_layers': expected an integer from 0 to 1024"):
        check_sizes({"num_layers": value}, "x/config.json")
    with pytest.raises(CheckpointError, match="'num_layers'"):  # also inside a transformers sub-config
        check_sizes({"text_config": {"num_layers": value}}, "x/config.json")


def test_a_component_naming_code_in_its_folder_never_runs_it(generic_checkpoint, tmp_path, monkeypatch):
    """Found by an audit: diffusers loads a transformers component without trust_remote_code, and a processor loads
    its tokenizer through AutoTokenizer; a tokenizer_config.json naming a class of its own .py file (auto_map) made
    transformers ask "Do you wish to run the custom code? [y/N]" on the terminal, and a yes ran it. Now refused,
    naming the file, before diffusers reads the folder."""
    root = shutil.copytree(generic_checkpoint("sd3"), tmp_path / "ckpt")
    _edit_json(root / "model_index.json", tokenizer=["transformers", "CLIPProcessor"])
    processor = {"image_processor_type": "CLIPImageProcessor"}  # the tokenizer folder is a CLIPProcessor's
    (root / "tokenizer" / "preprocessor_config.json").write_text(json.dumps(processor))
    assert_planted_code_never_runs(root, "tokenizer", "CLIPTokenizer", monkeypatch)


@pytest.mark.parametrize("exc,reason", [
    (TypeError("unsupported operand\nmore"), "TypeError: unsupported operand"),  # the type says what went wrong
    (KeyError(), "KeyError"),
    # transformers' refusal (trust_remote_code=False) of a folder refuse_folder_code did not catch: explained
    (ValueError("The repository /ckpt/tokenizer contains custom code which must be executed to correctly load the "
                "model. You can inspect the repository content at /ckpt/tokenizer .\n"),
     "its configuration names a class defined by Python code in the folder (auto_map); diffc never runs code from a "
     "checkpoint"),
])
def test_a_failure_inside_diffusers_is_one_line(exc, reason):
    from diffc.pipelines.generic.loader import load_failure

    index = {"tokenizer": ["transformers", "CLIPTokenizer"]}
    assert load_failure(exc, Path("/ckpt"), index, "StableDiffusion3Pipeline") == \
        f"/ckpt: diffusers could not load StableDiffusion3Pipeline ({reason})"


@pytest.mark.parametrize("name, text, refused", [
    ("config.json", '{"auto_map": {"AutoModel": "planted.Planted"}}', True),
    ("processor_config.json", '{"auto_map": {"AutoProcessor": "planted.Planted"}}', True),
    ("tokenizer_config.json", '{"auto_map": ["planted.Planted", null]}', True),  # the older list form
    ("tokenizer_config.json", '{"\\u0061uto\\u005fmap": {"AutoTokenizer": ["planted.Planted", null]}}', True),
    ("vocab.json", '{"auto_map": 17, "hello": 18}', False),  # a word of the vocabulary, not code
    ("config.json", '{"auto_map": {}}', False),
    ("config.json", '{"auto_map": {', False),  # not JSON: left to the library that reads it (one line too)
])
def test_a_json_file_naming_code_is_refused_however_it_spells_the_key(tmp_path, name, text, refused):
    from diffc.checkpoints import refuse_folder_code

    (tmp_path / name).write_text(text)
    if refused:
        with pytest.raises(CheckpointError, match=rf"^{tmp_path / name}: 'auto_map' names a class defined by Python"):
            refuse_folder_code(tmp_path)
    else:
        refuse_folder_code(tmp_path)


@pytest.mark.parametrize("library, refused", [("kolors", False), ("transformers", True), ("diffusers", True),
                                              ("pipeline_utils", True), ("os", True)])
def test_a_class_diffusers_ships_in_a_pipeline_package_may_carry_an_auto_map(tmp_path, library, refused):
    """Kolors' ChatGLM text encoder and tokenizer (``["kolors", "ChatGLMModel"]``) are diffusers' own classes, loaded
    by name: the auto_map their published folders carry for transformers' Auto classes is never read, so the
    checkpoint loads; any other library's folder with one is refused."""
    from diffc.pipelines.generic.checks import check_component_files

    folder = tmp_path / "text_encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_chatglm.ChatGLMModel"}}))
    index = {"_class_name": "KolorsPipeline", "text_encoder": [library, "ChatGLMModel"]}
    if refused:
        with pytest.raises(CheckpointError, match="'auto_map' names a class defined by Python code"):
            check_component_files(tmp_path, index)
    else:
        check_component_files(tmp_path, index)
