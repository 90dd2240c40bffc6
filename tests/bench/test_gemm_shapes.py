"""bench/gemm_shapes.py's parts that run without a GPU: the GEMMs it records are the DiT's linear layers."""

from __future__ import annotations

import pytest
import torch

from bench.families import FAMILIES
from bench.gemm_shapes import Gemm, build_dit, main, record_gemms
from bench.specs import SPECS, Workload


@pytest.mark.parametrize("model", ["flux-tiny", "z-image-tiny"])
def test_recorded_gemms_add_up_to_the_architectures_linear_flops(model):
    """One forward's hooked linear layers: their FLOPs are what bench/flops.py counts from the architecture."""
    spec = SPECS[model]
    family, wl = FAMILIES[spec.family], Workload.from_spec(spec)
    dit = build_dit(spec, torch.device("cpu"), torch.float32)
    counts, names = record_gemms(dit, family.dit_inputs(spec, wl, torch.device("cpu"), torch.float32))
    assert sum(g.flop * n for g, n in counts.items()) == family.dit_flops(spec, wl).linear
    assert set(names) == set(counts) and all(names[g] for g in counts)
    assert not any(h for m in dit.modules() for h in m._forward_hooks.values())  # hooks removed


def test_gemm_flop_and_cli_refuses_without_a_gpu(capsys):
    assert Gemm(rows=4, d_in=3, d_out=5, bias=True).flop == 2 * 4 * 3 * 5
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit):
        main(["--model", "flux-tiny"])
    assert "needs a CUDA GPU" in capsys.readouterr().err
