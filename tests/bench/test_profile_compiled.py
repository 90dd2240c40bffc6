"""bench/profile_compiled.py's parts that run without a GPU."""

from __future__ import annotations

import pytest
import torch

from bench.families import FAMILIES
from bench.profile_compiled import batched
from bench.specs import SPECS, Workload


@pytest.mark.parametrize("model", ["wan-tiny", "flux-tiny"])
def test_profile_compiled_batches_the_inputs_as_a_cfg_pair(model):
    """--batch 2: every batch-1 tensor repeated along its first dimension; FLUX.1's position ids (no batch
    dimension) unchanged."""
    spec = SPECS[model]
    inputs = FAMILIES[spec.family].dit_inputs(spec, Workload.from_spec(spec), torch.device("cpu"), torch.float32)
    pair = batched(inputs, 2)
    for name, value in inputs.items():
        if value.shape[0] == 1:
            assert pair[name].shape == (2, *value.shape[1:]) and torch.equal(pair[name][1], value[0])
        else:  # img_ids / txt_ids
            assert pair[name] is value
    assert all(batched(inputs, 1)[k] is v for k, v in inputs.items())
    with pytest.raises(ValueError, match="--batch"):
        batched(inputs, 0)
