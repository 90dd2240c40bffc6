"""adaLN over an affine LayerNorm (diffusers' ``CogVideoXLayerNormZero``): the affine folds into the modulation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffc.compile.passes import AdaLNModulatePass, CanonicalizeCasts, graph_targets
from diffc.compile.trace import trace_module
from tests.helpers import REL_TOL, rel_err


class LayerNormZero(nn.Module):
    """``norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]`` with an affine ``nn.LayerNorm``."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5, elementwise_affine=True)
        nn.init.normal_(self.norm.weight, 1.0, 0.3)
        nn.init.normal_(self.norm.bias, 0.0, 0.3)

    def forward(self, x, temb):
        shift, scale = self.linear(torch.nn.functional.silu(temb)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_affine_layer_norm_modulated(dtype):
    torch.manual_seed(0)
    model = LayerNormZero(16).to(dtype).eval()
    kwargs = {"x": torch.randn(2, 7, 16).to(dtype), "temb": torch.randn(2, 16).to(dtype)}
    with torch.no_grad():
        program = trace_module(model, kwargs)
        gm = program.graph_module
        CanonicalizeCasts()(gm)
        assert AdaLNModulatePass()(gm) == 1
        targets = graph_targets(gm)
        out, ref = program.module()(**kwargs), model(**kwargs)
    assert "aten.layer_norm.default" not in targets and targets["diffc.adaln_modulate.default"] == 1
    assert out.dtype == ref.dtype == dtype
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else REL_TOL[torch.bfloat16])
