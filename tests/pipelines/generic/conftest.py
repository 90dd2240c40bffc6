"""Shared loads of the tiny generic-backend pipelines (tests/generic_pipelines.py) and diffusers' own output."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def generic_pipe(generic_checkpoint):
    """Factory: ``generic_pipe(name)``: the tiny checkpoint loaded by ``diffc.load`` on CPU (fp32), shared."""
    import diffc

    cache = {}

    def make(name: str):
        if name not in cache:
            cache[name] = diffc.load(generic_checkpoint(name), device="cpu")
        return cache[name]

    return make


@pytest.fixture(scope="session")
def diffusers_pipeline(generic_checkpoint):
    """Factory: ``diffusers_pipeline(name)``: diffusers' own pipeline loaded from the same folder (float32),
    shared; a test that changes it (a LoRA) undoes the change."""
    import diffusers

    pipes = {}

    def make(name: str):
        if name not in pipes:
            pipe = diffusers.DiffusionPipeline.from_pretrained(generic_checkpoint(name))
            pipe.set_progress_bar_config(disable=True)
            pipes[name] = pipe
        return pipes[name]

    return make


@pytest.fixture(scope="session")
def diffusers_reference(diffusers_pipeline):
    """Factory: ``diffusers_reference(name, seed=0, **request) -> numpy output``: diffusers' own pipeline
    called as a diffusers user would (CPU generator, numpy output)."""

    def run(name: str, seed: int = 0, **request):
        generator = torch.Generator("cpu").manual_seed(seed)
        return diffusers_pipeline(name)(generator=generator, output_type="np", return_dict=False, **request)[0]

    return run
