"""``python -m bench.profile_vae`` on the tiny Wan and FLUX specs on the CPU: a decode timed, both files written.
(On a GPU it adds the kernel categories; the real-size command is in bench/README.md.)"""

from __future__ import annotations

import json

import pytest

from bench.profile_compiled import category
from bench.profile_vae import main


@pytest.fixture(autouse=True)
def keep_library_logging(monkeypatch):
    """The tool quiets diffc's, diffusers' and transformers' loggers for the process; not for the tests after."""
    monkeypatch.setattr("bench.profile_vae.quiet_libraries", lambda: None)


@pytest.mark.parametrize("model", ["wan-tiny", "flux-tiny"])
def test_profile_vae_times_a_decode_and_writes_its_files(tmp_path, capsys, model):
    assert main(["--model", model, "--device", "cpu", "--repeats", "1", "--out-dir", str(tmp_path)]) == 0
    (written,) = tmp_path.glob(f"cpu-*-{model}-vae-profile.json")
    result = json.loads(written.read_text())
    assert result["model"] == model and result["variants"]["eager"]["decode_s"] > 0
    assert len(result["latent_shape"]) in (4, 5)
    assert written.with_suffix(".md").exists() and "median of 1 decodes" in capsys.readouterr().out


@pytest.mark.parametrize("model", ["wan-tiny", "flux-tiny", "sd3-tiny"])
def test_profile_vae_compares_the_fused_kernels(tmp_path, model):
    """The fused variant (interpreted kernels on the CPU) decodes the same latent within float32 rounding: diffc's
    Wan and 2-D VAEs, and a diffusers VAE the generic backend runs (its group norms)."""
    assert main(["--model", model, "--device", "cpu", "--repeats", "1", "--variants", "eager,fused",
                 "--out-dir", str(tmp_path)]) == 0
    (written,) = tmp_path.glob(f"cpu-*-{model}-vae-eager-fused.json")
    variants = json.loads(written.read_text())["variants"]
    assert list(variants) == ["eager", "fused"] and variants["fused"]["rel_err_vs_first"] < 1e-5


def test_variants_are_checked(capsys, monkeypatch):
    monkeypatch.setattr("bench.profile_vae.has_fused_path", lambda vae: False)  # a VAE with no fused path
    with pytest.raises(SystemExit) as exc:
        main(["--model", "flux-tiny", "--device", "cpu", "--variants", "fused"])
    assert exc.value.code == 2 and "has no fused kernels" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--model", "wan-tiny", "--device", "cpu", "--variants", "eager,fast"])
    assert exc.value.code == 2 and "--variants takes" in capsys.readouterr().err


def test_cudnn_convolutions_are_not_counted_as_attention():
    assert category("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize256x128x64_cudnn") == "conv"
    assert category("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>") == "conv"
    assert category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "attention"


def test_repeats_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--model", "wan-tiny", "--device", "cpu", "--repeats", "0"])
    assert exc.value.code == 2 and "--repeats must be at least 1" in capsys.readouterr().err
