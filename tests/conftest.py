"""Tiny random pipelines saved with diffusers' own ``save_pretrained`` (the exact on-disk layout)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

# Without a GPU, the fused ops' Triton kernels run under Triton's CPU interpreter. Triton decides when
# triton.language is first imported, which any test may trigger, so it is set for the whole session here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

INTERPRETED_GPU_REASON = (
    "Triton runs interpreted in this process (TRITON_INTERPRET=1, which tests/ops/conftest.py sets when tests/ops is "
    "collected), so the GPU tests cannot compile its kernels: run them in a pytest process of their own, without "
    "tests/ops (python -m pytest tests/runtime)")


def interpreted_gpu_tests(paths: list[Path], cuda: bool, interpret: str | None) -> list[bool]:
    """Which test files (by path) to skip: on a CUDA machine with Triton's interpreter on, every ``*_gpu.py``
    outside tests/ops (whose GPU checks run in a subprocess of their own), which would fail inside Triton."""
    if not cuda or interpret != "1":
        return [False] * len(paths)
    tests = Path(__file__).resolve().parent
    return [p.name.endswith("_gpu.py") and not p.resolve().is_relative_to(tests / "ops") for p in paths]


def pytest_collection_modifyitems(config, items):
    skips = interpreted_gpu_tests([Path(str(item.fspath)) for item in items], torch.cuda.is_available(),
                                  os.environ.get("TRITON_INTERPRET"))
    for item, skip in zip(items, skips):
        if skip:
            item.add_marker(pytest.mark.skip(reason=INTERPRETED_GPU_REASON))


@dataclasses.dataclass(frozen=True)
class TinyFlux:
    """A tiny FLUX pipeline variant. Production FLUX.1-dev: 19 double + 38 single blocks, 24 heads of 128,
    joint_attention_dim 4096, pooled 768, axes (16, 56, 56), VAE (128, 256, 512, 512) with 16 latent channels."""

    name: str
    heads: int = 2
    head_dim: int = 16
    axes: tuple[int, int, int] = (4, 4, 8)
    layers: int = 1
    single_layers: int = 2
    guidance: bool = True
    latent_channels: int = 4
    vae_blocks: tuple[int, ...] = (8, 16)
    text_dim: int = 32  # T5 d_model = joint_attention_dim
    clip_dim: int = 32  # CLIP hidden = pooled_projection_dim


FLUX_VARIANTS = {
    "dev-tiny": TinyFlux("dev-tiny"),
    "schnell-odd": TinyFlux("schnell-odd", heads=3, head_dim=8, axes=(2, 2, 4), layers=2, single_layers=1,
                            guidance=False, latent_channels=3, vae_blocks=(8,), text_dim=24, clip_dim=40),
    "dev-wide": TinyFlux("dev-wide", heads=1, head_dim=24, axes=(8, 8, 8), layers=1, single_layers=1,
                         latent_channels=2, vae_blocks=(4, 8, 8), text_dim=16, clip_dim=24),
}


def build_flux_pipeline(v: TinyFlux, tok_dir: Path, seed: int = 0):
    import diffusers
    import transformers

    from diffc.demo.tokenizers import train_clip_tokenizer, train_t5_tokenizer

    clip_tok = train_clip_tokenizer(tok_dir / "clip")
    t5_tok = train_t5_tokenizer(tok_dir / "t5")
    torch.manual_seed(seed)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=v.latent_channels * 4, num_layers=v.layers, num_single_layers=v.single_layers,
        attention_head_dim=v.head_dim, num_attention_heads=v.heads, joint_attention_dim=v.text_dim,
        pooled_projection_dim=v.clip_dim, guidance_embeds=v.guidance, axes_dims_rope=list(v.axes))
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * len(v.vae_blocks),
        up_block_types=["UpDecoderBlock2D"] * len(v.vae_blocks), block_out_channels=list(v.vae_blocks),
        layers_per_block=1, latent_channels=v.latent_channels, norm_num_groups=4, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=v.clip_dim, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=v.clip_dim))
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(t5_tok), d_model=v.text_dim, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    return diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok,
                                  text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)


@pytest.fixture
def serve_engine_args(monkeypatch):
    """Run ``diffc serve`` up to building the engine and the app (then ``tests.helpers.ServeStopped`` is raised);
    return what they were given: ``{"engine": Engine's keyword arguments, "app": create_app's}``."""
    import diffc.serve.app as app_module
    import diffc.serve.engine as engine_module
    from tests.helpers import ServeStopped

    seen: dict = {}

    def engine(load, **kwargs):
        seen["engine"] = kwargs
        return object()

    def create_app(engine, **kwargs):
        seen["app"] = kwargs
        raise ServeStopped()

    monkeypatch.setattr(engine_module, "Engine", engine)
    monkeypatch.setattr(app_module, "create_app", create_app)
    return seen


@pytest.fixture(scope="session")
def flux_checkpoint(tmp_path_factory):
    """Factory: ``flux_checkpoint(variant, sharded=False) -> Path``, cached for the session."""
    cache: dict[tuple[str, bool], Path] = {}

    def make(variant: str = "dev-tiny", sharded: bool = False) -> Path:
        key = (variant, sharded)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"flux-{variant}{'-sharded' if sharded else ''}")
            pipe = build_flux_pipeline(FLUX_VARIANTS[variant], root / "tok")
            kwargs = {"max_shard_size": "20KB"} if sharded else {}
            pipe.save_pretrained(root / "ckpt", safe_serialization=True, **kwargs)
            cache[key] = root / "ckpt"
        return cache[key]

    return make


@pytest.fixture(scope="session")
def generic_checkpoint(tmp_path_factory):
    """Factory: ``generic_checkpoint(name) -> Path`` of a saved tiny pipeline of a class diffc has no native
    spec for ("sd3", "hunyuan", "ltx", "cogvideox"; see tests/generic_pipelines.py), cached for the session."""
    from tests.generic_pipelines import BUILDERS

    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            root = tmp_path_factory.mktemp(f"generic-{name}")
            BUILDERS[name](root / "tok").save_pretrained(root / "ckpt", safe_serialization=True)
            cache[name] = root / "ckpt"
        return cache[name]

    return make


@pytest.fixture(scope="session")
def zimage_checkpoint(tmp_path_factory):
    """Factory: ``zimage_checkpoint(variant="tiny") -> Path`` of a tiny Z-Image pipeline, cached for the session."""
    from tests.image_models import save_zimage

    cache: dict[str, Path] = {}

    def make(variant: str = "tiny") -> Path:
        if variant not in cache:
            cache[variant] = save_zimage(tmp_path_factory.mktemp(f"zimage-{variant}"), variant)
        return cache[variant]

    return make
