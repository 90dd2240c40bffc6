"""bench.ops.attention_selection_spread: bad arguments are refused by name (the timing itself needs a GPU)."""

from __future__ import annotations

import pytest
import torch

from bench.ops.attention_selection_spread import main


@pytest.mark.parametrize(("argv", "field"), [
    (["--shape", "1,12,128"], "--shape"),
    (["--shape", "1,12,x,128,64"], "--shape"),
    (["--shape", "1,0,128,128,64"], "--shape"),
    (["--candidates", "sdpa,flash3"], "--candidates"),
])
def test_bad_arguments_name_the_field(argv, field):
    with pytest.raises(SystemExit, match=field):
        main(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_needs_a_gpu():
    with pytest.raises(SystemExit, match="CUDA GPU"):
        main(["--candidates", "sdpa"])
