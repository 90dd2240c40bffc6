"""On a GPU: FLUX.1's single blocks read their predecessor's two output slices as one view, replayed from a CUDA
graph, with the same bytes as the graph that copies them (skipped without CUDA)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffc.compile.pipeline import compile_dit
from diffc.compile.regions import RegionGraph
from diffc.models.flux.transformer import FLUX_TRANSFORMER_SPECS, FluxTransformer2DModel
from diffc.runtime.compiled import CompiledDiT
from diffc.runtime.dit_stack import DiTStack
from tests.runtime.test_cudagraphs_gpu import flux_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CONFIG = dataclasses.replace(FLUX_TRANSFORMER_SPECS["tiny"], num_layers=1, num_single_layers=3,
                             num_attention_heads=3, attention_head_dim=32, axes_dims_rope=(8, 12, 12))


def _forward(monkeypatch, fold: bool, graphs: bool, batch: int) -> torch.Tensor:
    if not fold:
        monkeypatch.setattr(RegionGraph, "_fold_input_concats", lambda self: None)
    torch.manual_seed(0)
    net = FluxTransformer2DModel(CONFIG).eval().requires_grad_(False).to("cuda", torch.bfloat16)
    inputs = flux_inputs(CONFIG, 0, torch.bfloat16, batch=batch)
    device = torch.device("cuda")
    stack = DiTStack("transformer", net, device, cuda_graphs=graphs)
    compiled: dict = {}
    with torch.no_grad():
        with stack.bare() as eager:
            # attention="sdpa": the selection times the kernels, so two compiles may choose different ones (and
            # write different bytes); the fold is what this compares
            report = compile_dit(eager, inputs, graphs=compiled, device=device, dtype=torch.bfloat16, tier="fast",
                                 attention="sdpa")
        single = next(iter(compiled["single_transformer_blocks"].values()))
        assert any(kind == "joined" for kind, _ in single.sources) == fold
        stack.set_compiled(CompiledDiT(compiled, [report.key], {"tier": "fast", "disabled": []}))
        outs = [stack(**inputs) for _ in range(3)]  # eager warm-up, capture, replay
    monkeypatch.undo()
    out = [o if isinstance(o, torch.Tensor) else o[0] if isinstance(o, tuple) else o.sample for o in outs]
    assert all(torch.equal(out[0], o) for o in out[1:]), [(out[0] - o).abs().max().item() for o in out[1:]]
    return out[-1]


@pytest.mark.parametrize("batch", [1, 2])
def test_joined_streams_replay_with_the_copying_graphs_bytes(monkeypatch, batch):
    joined = _forward(monkeypatch, fold=True, graphs=True, batch=batch)
    copied = _forward(monkeypatch, fold=False, graphs=True, batch=batch)
    assert torch.equal(joined, copied), (joined - copied).abs().max().item()
    ungraphed = _forward(monkeypatch, fold=True, graphs=False, batch=batch)
    assert torch.equal(joined, ungraphed), (joined - ungraphed).abs().max().item()
