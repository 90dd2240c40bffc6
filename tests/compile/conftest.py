"""Tiny native DiTs traced once per session; every test gets its own copy of the exported program.

FLUX "tiny": 1 double-stream + 2 single-stream blocks, 2 heads of 16 (FLUX.1-dev: 19 + 38 blocks,
24 heads of 128). Wan "tiny": 2 blocks, 2 heads of 12, ffn 37 (Wan2.1-1.3B: 30 blocks, 12 heads
of 128, ffn 8960). bf16 models are cast as the loader casts them (``_keep_in_fp32_modules`` stay float32).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from diffc.compile import trace_module
from diffc.models.flux.transformer import FLUX_TRANSFORMER_SPECS, FluxTransformer2DModel
from diffc.models.wan.transformer import WAN_TRANSFORMER_SPECS, WanTransformer3DModel

MODELS = ("flux", "wan")
DTYPES = (torch.float32, torch.bfloat16)


def _flux_inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(1)
    batch, h, w, n_txt = 2, 2, 3, 5  # 6 image tokens, 5 text tokens
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return {
        "hidden_states": torch.randn(batch, h * w, 16, generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(batch, n_txt, 32, generator=g).to(dtype),
        "pooled_projections": torch.randn(batch, 24, generator=g).to(dtype),
        "timestep": torch.tensor([0.3, 0.7]).to(dtype),
        "img_ids": img_ids.reshape(h * w, 3),
        "txt_ids": torch.zeros(n_txt, 3),
        "guidance": torch.full((batch,), 3.5).to(dtype),
    }


def _wan_inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(2, 4, 2, 4, 6, generator=g).to(dtype),  # 2 x 2 x 3 = 12 tokens
        "timestep": torch.tensor([250.0, 750.0]),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=g).to(dtype),
    }


def _cast_like_loader(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    keep = tuple(model._keep_in_fp32_modules)
    with torch.no_grad():
        for name, t in model.named_parameters():
            t.data = t.data.to(torch.float32 if any(f in name.split(".") for f in keep) else dtype)
    return model


def build(model: str, dtype: torch.dtype) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    if model == "flux":
        net, inputs = FluxTransformer2DModel(FLUX_TRANSFORMER_SPECS["tiny"]), _flux_inputs(dtype)
    else:
        net, inputs = WanTransformer3DModel(WAN_TRANSFORMER_SPECS["tiny"]), _wan_inputs(dtype)
    return _cast_like_loader(net.eval(), dtype), inputs


@dataclasses.dataclass
class Traced:
    """A fresh copy of a traced tiny model, its inputs and the unfused graph's output."""

    program: torch.export.ExportedProgram
    inputs: dict
    unfused: torch.Tensor

    def run(self) -> torch.Tensor:
        with torch.no_grad():
            return self.program.module()(**self.inputs)


@pytest.fixture(scope="session")
def _traced_cache():
    return {}


@pytest.fixture
def traced(_traced_cache):
    """Factory: ``traced(model, dtype) -> Traced`` with a deep copy of the session's exported program."""

    def make(model: str, dtype: torch.dtype = torch.float32) -> Traced:
        key = (model, dtype)
        if key not in _traced_cache:
            net, inputs = build(model, dtype)
            program = trace_module(net, inputs)
            with torch.no_grad():
                unfused = program.module()(**inputs)
            _traced_cache[key] = Traced(program, inputs, unfused)
        cached = _traced_cache[key]
        return Traced(copy.deepcopy(cached.program), cached.inputs, cached.unfused)

    return make
