"""diffc::timestep_embedding against FLUX's and Wan's sinusoidal timestep projections."""

from __future__ import annotations

import pytest
import torch

import diffc.models.flux.blocks as flux_blocks
import diffc.models.wan.blocks as wan_blocks
from diffc.errors import InvalidArgumentError
from diffc.ops.timestep_embedding import MODEL_SETTINGS, timestep_embedding_ref
from tests.ops.common import DTYPES, assert_kernel_ran, assert_matches, poisoned

# (timesteps, dim). Production: FLUX.1 dim 256 for batch timesteps (and guidance); Wan2.1 freq_dim 256,
# one timestep per sample or per token (32,760 for Wan2.2's per-token timesteps).
SHAPES = {
    "n2d256": (2, 256),
    "n3d33": (3, 33),  # odd width: one zero column
    "n5d16": (5, 16),
    "n7d15": (7, 15),
}
SETTINGS = {
    **MODEL_SETTINGS,
    "sin_first_shifted": {"flip_sin_to_cos": False, "downscale_freq_shift": 1.0, "scale": 2.0, "max_period": 1000.0},
}
# Angles reach 1000 rad: one float32 ulp in a frequency moves the angle by ~6e-5 (reference and
# kernel compute exp with different libraries), hence a wider float32 bound than TOL's.
FP32_ANGLE_ATOL = 2e-4


def timesteps(n: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Timesteps in [0, 1000) as the pipelines pass them (FLUX's are sigma * 1000 in the activations' dtype)."""
    return (torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 1000).to(dtype)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(counters, shape, settings, out_dtype):
    n, dim = shape
    t = timesteps(n)
    out = poisoned(n, dim, dtype=out_dtype)
    torch.ops.diffc.timestep_embedding(
        t, settings["flip_sin_to_cos"], settings["downscale_freq_shift"], settings["scale"], settings["max_period"], out
    )
    assert_kernel_ran()
    ref = timestep_embedding_ref(t, dim, **settings).to(out_dtype)
    assert_matches(out, ref, **({"atol": FP32_ANGLE_ATOL} if out_dtype == torch.float32 else {}))


def test_bf16_timesteps_and_strided_output(counters):
    """FLUX hands bf16 timesteps; the output may be a column slice of a wider buffer."""
    t = timesteps(4, torch.bfloat16)
    buffer = poisoned(4, 40, dtype=torch.float32)
    torch.ops.diffc.timestep_embedding(t, True, 0.0, 1.0, 10000.0, buffer[:, 4:36])
    assert_kernel_ran()
    assert buffer[:, :4].isnan().all() and buffer[:, 36:].isnan().all(), "wrote outside the slice"
    assert_matches(buffer[:, 4:36], timestep_embedding_ref(t, 32), atol=FP32_ANGLE_ATOL)


def test_opcheck(counters):
    for dim in (16, 15):
        args = (timesteps(3), True, 0.0, 1.0, 10000.0, torch.empty(3, dim))
        torch.library.opcheck(torch.ops.diffc.timestep_embedding.default, args)


@pytest.mark.parametrize("t_dtype", DTYPES, ids=str)
def test_reference_is_the_models_projection(t_dtype):
    t = timesteps(5, t_dtype)
    flux = flux_blocks.timestep_sinusoid(t)
    torch.testing.assert_close(timestep_embedding_ref(t, 256, **MODEL_SETTINGS["flux"]), flux, rtol=0, atol=0)
    for dim in (16, 15):
        wan = wan_blocks.timestep_sinusoids(t, dim)
        torch.testing.assert_close(timestep_embedding_ref(t, dim, **MODEL_SETTINGS["wan"]), wan, rtol=0, atol=0)


def test_bad_arguments_name_the_field():
    op = torch.ops.diffc.timestep_embedding
    with pytest.raises(InvalidArgumentError, match=r"^t: expected shape \(N,\)"):
        op(timesteps(4)[None], True, 0.0, 1.0, 10000.0, torch.empty(4, 16))
    with pytest.raises(InvalidArgumentError, match=r"^out: expected shape \(4, dim\) with dim >= 2"):
        op(timesteps(4), True, 0.0, 1.0, 10000.0, torch.empty(3, 16))
    with pytest.raises(InvalidArgumentError, match="^downscale_freq_shift: must differ from dim // 2 = 8"):
        op(timesteps(4), True, 8.0, 1.0, 10000.0, torch.empty(4, 16))
    with pytest.raises(InvalidArgumentError, match="^out: expected a floating-point tensor"):
        op(timesteps(4), True, 0.0, 1.0, 10000.0, torch.empty(4, 16, dtype=torch.int32))
