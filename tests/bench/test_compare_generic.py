"""Benchmark workloads on diffc's generic (diffusers) backend: CPU smoke runs of the tiny specs, and the
real-size specs built on the meta device (their parameter counts are the published models')."""

from __future__ import annotations

import pytest
import torch

from tests.bench.test_compare import CONFIG_KEYS, results, run_compare

pytest.importorskip("diffusers")


# SD3 runs diffc alone (its family's functions serve both engines); HunyuanVideo runs both, compared.
@pytest.mark.parametrize("model, configs", [("sd3-tiny", ["diffc-eager"]),
                                            ("hunyuanvideo-tiny", ["diffusers-eager", "diffc-eager"])])
def test_generic_spec_end_to_end_on_cpu(tmp_path, model, configs):
    out, ckpt = tmp_path / "results", tmp_path / "ckpt" / model
    run_compare("--model", model, "--out-dir", str(out), "--ckpt-dir", str(ckpt), "--steps", "2", "--repeats", "1",
                "--warmup", "1", "--configs", ",".join(configs))
    data, _path = results(out, model)
    assert list(data["configs"]) == configs and data["flops"]["total_tflop"] > 0
    for r in data["configs"].values():
        assert "error" not in r, r.get("traceback")
        assert CONFIG_KEYS <= set(r) and r["dit_output_finite"] and r["step_ms"]["n"] == 2
    diffc = data["configs"]["diffc-eager"]
    assert {"encode_prompt", "denoise", "decode"} <= set(diffc["stages_s"])
    if "diffusers-eager" in configs:
        assert float(diffc["psnr_db"]) == float("inf")  # the generic backend is diffusers' own computation
        assert diffc["dit_rel_err"] == 0.0 and diffc["vae_rel_err"] == 0.0


@pytest.mark.parametrize("model, billions", [("sd3.5-large", 8.06), ("hunyuanvideo", 12.82)])
def test_real_size_specs_build_the_published_models(model, billions):
    import diffusers

    from bench.families import FAMILIES
    from bench.specs import SPECS, Workload

    spec = SPECS[model]
    family = FAMILIES[spec.family]
    with torch.device("meta"):
        transformer = getattr(diffusers, family.diffusers_transformer).from_config(spec.transformer.to_dict())
        getattr(diffusers, family.diffusers_vae).from_config(spec.vae.to_dict())
    params = sum(p.numel() for p in transformer.parameters()) / 1e9
    assert params == pytest.approx(billions, rel=0.01)
    assert family.dit_flops(spec, Workload.from_spec(spec)).total > 0


def test_diffusers_compile_of_a_class_without_repeated_blocks_compiles_each_block():
    """SD3's diffusers class names no ``_repeated_blocks``: ``diffusers-compile`` then compiles each block of
    its block lists (``compile_repeated_blocks`` alone refuses the class)."""
    import diffusers

    from bench.engines import DiffusersEngine
    from bench.families import FAMILIES

    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4)
    assert not transformer._repeated_blocks
    engine = DiffusersEngine(FAMILIES["sd3"], torch.device("cpu"), torch.float32, transformer, vae=None)
    description = engine.regional_compile()
    assert "2 repeated blocks" in description
    assert all(b._compiled_call_impl is not None for b in transformer.transformer_blocks)
    assert transformer._compiled_call_impl is None  # the blocks, not the whole model
