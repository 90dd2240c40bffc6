"""Run the fused ops' Triton kernels on CPU under Triton's interpreter, as CI does.

``TRITON_INTERPRET=1`` is set before anything imports Triton; diffc's kernels are jitted at first
launch, so they run interpreted even if another test imported :mod:`diffc.ops` earlier.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest

from diffc.ops.registry import COUNTERS, triton
from tests.ops.common import round_interpreter_bf16_to_nearest

BF16_ROUNDS_TO_NEAREST = round_interpreter_bf16_to_nearest()


@pytest.fixture
def counters():
    """The op counters, zeroed; skips the test where Triton is not importable (nothing to interpret)."""
    if triton is None:
        pytest.skip("triton is not installed: fused ops run their torch reference only")
    COUNTERS.reset()
    yield COUNTERS
    COUNTERS.reset()
