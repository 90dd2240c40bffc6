"""The benchmark's diffc engine runs the text encoders as the configuration says: graphed with CUDA graphs
(as a pipeline loaded with graphs on runs them), eager otherwise, and measures their time once per mode."""

from __future__ import annotations

import torch

from bench.engines import DiffcEngine
from bench.families import FAMILIES
from diffc.runtime.cudagraphs import CudaGraphModule


def test_graph_configurations_graph_the_encoders(flux_checkpoint):
    engine = DiffcEngine.from_checkpoint(FAMILIES["flux"], str(flux_checkpoint()), torch.device("cpu"), torch.float32)
    components = engine.pipe.components
    assert engine.components_key == "diffc" and not isinstance(components["text_encoder_2"], CudaGraphModule)
    engine.cuda_graphs()
    assert engine.components_key == "diffc (graphed encoders)"
    assert all(isinstance(components[n], CudaGraphModule) for n in ("text_encoder", "text_encoder_2"))
    engine.ensure_eager()
    assert engine.components_key == "diffc" and not isinstance(components["text_encoder"], CudaGraphModule)
    engine.cuda_graphs()
    engine.close()
    assert not any(isinstance(c, CudaGraphModule) for c in components.values())
