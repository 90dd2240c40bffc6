"""Shared helpers for the test suite: numeric ones and tolerance tables, the planted-code check."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

# Relative-error bounds ||out - ref|| / ||ref|| per dtype for single-module parity with diffusers.
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "output has non-finite values"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def psnr_uint8(a, b) -> float:
    """PSNR in dB between two uint8 images/videos (numpy arrays or PIL images)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


class ServeStopped(Exception):
    """Raised by the ``serve_engine_args`` fixture (tests/conftest.py) where ``diffc serve`` would build its app."""


def with_component_of(base: Path, other: Path, component: str, root: Path) -> Path:
    """A copy of checkpoint ``base`` at ``root`` whose ``component`` folder is ``other``'s (a component of another
    checkpoint, as a user might mix them); ``root``."""
    import shutil

    shutil.copytree(base, root)
    shutil.rmtree(root / component)
    shutil.copytree(other / component, root / component)
    return root


def assert_planted_code_never_runs(root: Path, folder: str, base: str, monkeypatch) -> None:
    """Plant code in the checkpoint ``root``: ``folder``'s tokenizer_config.json names a class of the folder's own
    ``planted.py`` (auto_map), which touches a file beside ``root`` when imported and is transformers' ``base``
    tokenizer class otherwise. With the user answering "y" to transformers' "Do you wish to run the custom code?
    [y/N]", ``diffc.load(root)`` refuses the file in one line and the code never runs."""
    import diffc
    from diffc.errors import CheckpointError

    monkeypatch.setattr("builtins.input", lambda *args: "y")  # the user at the terminal says yes
    config, marker = root / folder / "tokenizer_config.json", root.parent / "payload-ran"
    config.write_text(json.dumps({**json.loads(config.read_text()), "tokenizer_class": "Planted",
                                  "auto_map": {"AutoTokenizer": ["planted.Planted", "planted.Planted"]}}))
    (root / folder / "planted.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                              f"from transformers import {base} as Planted\n")
    try:
        with pytest.raises(CheckpointError) as info:
            diffc.load(root, device="cpu")
    finally:
        assert not marker.exists(), "the folder's code ran"
    assert str(info.value) == (f"{config}: 'auto_map' names a class defined by Python code in the folder; diffc "
                               "never runs code from a checkpoint"), info.value
