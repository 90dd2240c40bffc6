"""``diffc.linear_accumulate`` on a GPU at FLUX.1's single-block ``proj_out`` (4608 x [3072 | 12288] -> 3072):
the split projection against the concatenated one through cuBLAS, weight column slices read in place, and the
accumulation captured in a CUDA graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffc.capture import capture
from diffc.ops.linear_accumulate import linear_accumulate, linear_accumulate_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rows,widths,n", [(4608, (3072, 12288), 3072), (77, (40, 91), 33)])
def test_split_projection_matches_the_concatenated_one(rows, widths, n, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    parts = [torch.randn(1, rows, k, device="cuda", generator=g).to(dtype) for k in widths]
    w = (torch.randn(n, sum(widths), device="cuda", generator=g) * 0.02).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype)
    exact = F.linear(torch.cat(parts, -1).double(), w.double(), b.double())
    fused = F.linear(torch.cat(parts, -1), w, b)
    out = F.linear(parts[0], w[:, :widths[0]], b)
    linear_accumulate(parts[1], w[:, widths[0]:], out)
    # one rounding more than the single GEMM: within a few times its error
    assert _rel(out, exact) <= 4 * _rel(fused, exact) + 1e-6
    ref = linear_accumulate_ref(parts[1], w[:, widths[0]:], F.linear(parts[0], w[:, :widths[0]], b))
    assert _rel(out, ref) <= 1e-2 if dtype != torch.float32 else _rel(out, ref) <= 1e-5


def test_replays_in_a_cuda_graph():
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(256, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(32, 96, device="cuda", generator=g, dtype=torch.bfloat16)[:, 32:]
    start = torch.randn(256, 32, device="cuda", generator=g, dtype=torch.bfloat16)
    out = start.clone()
    linear_accumulate(x, w, out)  # warm-up: cuBLAS picks its plan outside the capture
    expected = out.clone()
    out.copy_(start)
    graph, _ = capture(lambda: linear_accumulate(x, w, out), torch.device("cuda"))
    out.copy_(start)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("batch", [1, 2])
def test_linear_into_writes_flux_values_rows_as_the_linear_does(batch):
    """``diffc.linear_into`` at FLUX.1's double-block value projections (512 text + 4096 image rows, 3072 wide)
    into one joint buffer: at batch 1 the very bytes of ``F.linear`` (the same GEMM, the output given), at batch 2
    (one GEMM a batch item) within bf16 rounding of it; captured in a CUDA graph it replays the same."""
    from diffc.ops.linear_into import linear_into

    g = torch.Generator(device="cuda").manual_seed(2)
    txt, img = (torch.randn(batch, s, 3072, device="cuda", generator=g).to(torch.bfloat16) for s in (512, 4096))
    w_t, w_i = ((torch.randn(3072, 3072, device="cuda", generator=g) * 0.02).to(torch.bfloat16) for _ in range(2))
    b_t, b_i = (torch.randn(3072, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
    want = torch.cat([F.linear(txt, w_t, b_t), F.linear(img, w_i, b_i)], 1)
    joint = torch.empty(batch, 4608, 3072, device="cuda", dtype=torch.bfloat16)

    def write():
        linear_into(txt, w_t, b_t, joint[:, :512])
        linear_into(img, w_i, b_i, joint[:, 512:])

    write()
    assert torch.equal(joint, want) if batch == 1 else _rel(joint, want) < 1e-2
    first = joint.clone()
    joint.zero_()
    graph = capture(write, torch.device("cuda"))[0]
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(joint, first)
