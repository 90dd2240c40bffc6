"""Attention selection on a GPU: candidates are timed replayed from a CUDA graph, as the runtime runs a compiled
DiT, so a kernel's Python launch cost does not count against it; a kernel that cannot be captured is rejected
and leaves the allocator usable.

Run with ``python -m pytest tests/compile/test_attention_select_gpu.py -q`` on a CUDA machine; skipped elsewhere.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from diffc.compile.attention_select import (BACKENDS, TIMING_ROUNDS, AttentionBackend, AttentionShape,
                                            select_attention_backend)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPE = AttentionShape(1, 8, 1024, 1024, 64)  # a short kernel (tens of microseconds), where launch cost shows
HOST_DELAY_S = 0.002


def _slow_launch(q, k, v, scale):
    time.sleep(HOST_DELAY_S)  # host work before the launch: a graph replay skips it
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _reads_back(q, k, v, scale):
    if float(q.abs().amax()) < 0:  # a device-to-host read: not allowed while capturing
        raise AssertionError
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def test_host_launch_cost_is_not_timed_and_uncapturable_kernels_are_rejected():
    table = {**BACKENDS, "slow_launch": AttentionBackend("slow_launch", "cuda", adapter=_slow_launch),
             "reads_back": AttentionBackend("reads_back", "cuda", adapter=_reads_back)}
    choice = select_attention_backend([SHAPE], "cuda", torch.bfloat16, ["reads_back", "sdpa", "slow_launch"],
                                      backends=table, warmup=2, iters=10)
    results = choice.shapes[0].candidates
    assert results["sdpa"].status == "ok" and results["slow_launch"].status == "ok"
    timed = (results["sdpa"], results["slow_launch"])  # interleaved rounds: the faster one in all of them
    assert len(min(timed, key=lambda r: r.rounds_ms[0]).rounds_ms) == TIMING_ROUNDS
    # the same kernel: equal within noise, and far below the 2 ms a plainly timed call would add
    assert results["slow_launch"].median_ms < results["sdpa"].median_ms * 1.5 + 0.05 < HOST_DELAY_S * 1e3
    assert results["reads_back"].status == "error" and "captur" in results["reads_back"].reason.lower()
    torch.cuda.empty_cache()  # the failed capture was undone: the allocator is not left mid-capture
    x = torch.randn(4, 4, device="cuda")
    assert torch.isfinite(x @ x).all()


class _Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("name", ["sdpa_flash", "sdpa_cudnn", "sdpa_efficient"])
def test_lowered_torch_kernels_write_artifacts_and_match_sdpa(name, tmp_path):
    """A program lowered onto each of torch's kernels is written and read back as an artifact (aten's flash
    op returned a uint64 RNG state older torch could not write) and computes SDPA's attention; onto the
    kernel torch's dispatcher picks, bit for bit."""
    from diffc.compile.attention_select import dispatcher_pick
    from diffc.compile.passes.attention import AttentionLoweringPass
    from tests.compile.common import save_and_load

    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(2, SHAPE.heads, SHAPE.seq_q, SHAPE.head_dim, device="cuda", dtype=torch.bfloat16,
                           generator=g).transpose(1, 2).contiguous().transpose(1, 2) for _ in range(3))
    program = torch.export.export(_Attention(), (q, k, v))
    fusion = AttentionLoweringPass(name)
    if fusion(program.graph_module) == 0:
        pytest.skip(f"{name}: {fusion.report.refused}")
    program.graph_module.recompile()
    _loaded, module = save_and_load(program, tmp_path)
    want = _Attention()(q, k, v)
    with torch.no_grad():
        got = module(q, k, v)
    assert got.shape == want.shape and (got.float() - want.float()).norm() / want.float().norm() < 2e-2
    if dispatcher_pick(q, k, v) == name:
        assert torch.equal(got, want)


def test_key_masked_shapes_measure_the_masked_sdpa_and_fa4():
    """A key-masked shape (Qwen-Image's kind, scaled down): torch's masked kernel and FA4 over the compacted kept
    keys, both captured and correct against the masked reference; backends with no key-mask form are
    unavailable for it. Where flash-attn-4 is missing, fa4 is reported unavailable with its reason."""
    from diffc.ops.attention_fa4 import fa4_unavailable

    shape = AttentionShape(2, 8, 2176, 2176, 128, key_mask=True)
    choice = select_attention_backend([shape], "cuda", torch.bfloat16, ["sdpa", "sdpa_cudnn", "fa4"], warmup=2,
                                      iters=5)
    results = choice.shapes[0].candidates
    assert results["sdpa"].status == "ok"
    assert results["sdpa_cudnn"].status == "unavailable" and results["sdpa_cudnn"].reason == "no key-mask form"
    if fa4_unavailable() is None:
        assert results["fa4"].status == "ok", results["fa4"]
        assert results["fa4"].rel_err < 2e-2
    else:
        assert results["fa4"].status == "unavailable"
    assert choice.shapes[0].backend in ("sdpa", "fa4")
