"""Functions the spawned ranks of tests/parallel run (importable by name: spawn pickles them by reference)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F


def attention_cases(out_dir: str, layouts: list[tuple[int, int]]) -> int:
    """For each (ulysses, ring) layout of the world, USP attention of this rank's shard vs the whole attention;
    rank 0 writes the worst relative error per case to ``out_dir/attention.json``."""
    from diffc.parallel import ParallelConfig, init_mesh
    from diffc.parallel.attention import USPAttention, set_runtime

    results = {}
    for ulysses, ring in layouts:
        mesh = init_mesh(ParallelConfig(world=ulysses * ring, ulysses=ulysses, ring=ring, timeout_s=60),
                         torch.device("cpu"))
        attn = USPAttention(mesh)
        set_runtime(attn)
        n = ulysses * ring
        for prefix in (0, 3):
            gen = torch.Generator().manual_seed(prefix)
            b, h, s, d = 2, 4, 8 * n, 16
            q, k, v = (torch.randn(b, h, prefix + s, d, generator=gen) for _ in range(3))
            ref = F.scaled_dot_product_attention(q, k, v)
            lo = prefix + mesh.seq_index * (s // n)
            local = [torch.cat([x[:, :, :prefix], x[:, :, lo:lo + s // n]], dim=2) for x in (q, k, v)]
            attn.prefix = prefix
            out = attn(*local)
            want = torch.cat([ref[:, :, :prefix], ref[:, :, lo:lo + s // n]], dim=2)
            err = float((out - want).norm() / want.norm())
            worst = torch.tensor([err])
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            results[f"u{ulysses}r{ring}p{prefix}"] = float(worst)
        cross_k = torch.randn(2, 4, 5, 16)
        out = attn(q[:, :, :8], cross_k, cross_k, True)
        results[f"u{ulysses}r{ring}cross"] = float((out - F.scaled_dot_product_attention(q[:, :, :8], cross_k, cross_k)).abs().max())
    if dist.get_rank() == 0:
        Path(out_dir, "attention.json").write_text(json.dumps(results))
    return 0


def die_or_wait(out_dir: str, timeout_s: float) -> int:
    """Rank 1 never joins the collective; rank 0's all-reduce must fail within the timeout (not hang)."""
    from diffc.parallel import ParallelConfig, init_mesh
    from diffc.parallel.collectives import guarded

    init_mesh(ParallelConfig(world=2, ulysses=2, timeout_s=timeout_s), torch.device("cpu"))
    if dist.get_rank() == 1:
        time.sleep(timeout_s * 2)
        return 0
    started = time.monotonic()
    try:
        with guarded("test all-reduce"):
            dist.all_reduce(torch.ones(1))
        message = "no error"
    except Exception as exc:  # noqa: BLE001 - the test reads the message
        message = f"{type(exc).__name__}: {exc}"
    Path(out_dir, "timeout.json").write_text(json.dumps({"message": message, "s": time.monotonic() - started}))
    os._exit(0)


FLUX_REQUEST = dict(prompt=["a red fox", "a blue bird"], seed=[3, 4], height=32, width=32, num_inference_steps=2,
                    max_sequence_length=16)
WAN_REQUEST = dict(prompt="a cat walking", seed=5, height=32, width=32, num_frames=5, num_inference_steps=2,
                   guidance_scale=5.0, max_sequence_length=16)


def _frames(out) -> list:
    import numpy as np

    return [np.asarray(im) for im in out.images] if out.images is not None else list(out.videos)


def pipeline_cases(out_dir: str, checkpoints: dict[str, str], layouts: list[dict], compiled: list[str] = ()) -> int:
    """Each family's pipeline once on one process (the reference), then under each layout; rank 0 writes the
    PSNR of every case against the reference and each layout's parallel counters to ``out_dir/pipelines.json``.

    ``layouts``: ParallelConfig fields; ``compiled``: families also run with in-process compiled region graphs
    (compiled on each rank for its shard) under the first layout."""
    import diffc
    from diffc.parallel import ParallelConfig, init_mesh
    from tests.helpers import psnr_uint8

    requests = {"flux": FLUX_REQUEST, "wan": WAN_REQUEST}
    results: dict = {}
    for family, ckpt in checkpoints.items():
        pipe = diffc.load(ckpt, device="cpu")
        request = requests[family]
        ref = _frames(pipe.generate(progress=False, **request))
        for fields in layouts:
            mesh = init_mesh(ParallelConfig(**fields, timeout_s=120), torch.device("cpu"))
            pipe.executor.set_parallel(mesh)
            out = pipe.generate(progress=False, **request)
            name = f"{family}:cfg{mesh.config.cfg}u{mesh.config.ulysses}r{mesh.config.ring}"
            results[name] = {"psnr": min(psnr_uint8(a, b) for a, b in zip(_frames(out), ref)),
                             "parallel": out.timings.runtime["dit"]["transformer"]["parallel"],
                             "layers": out.timings.runtime["dit"]["transformer"]["layers"]}
            if family in compiled and fields is layouts[0]:
                pipe.compile([{k: v for k, v in request.items() if k in ("prompt", "height", "width", "num_frames",
                                                                          "guidance_scale", "max_sequence_length")}],
                             log=lambda line: None)
                out = pipe.generate(progress=False, **request)
                results[name + ":compiled"] = {"psnr": min(psnr_uint8(a, b) for a, b in zip(_frames(out), ref)),
                                               "compiled": out.timings.runtime["compiled"]}
                pipe.executor.install_compiled({"transformer": None})
            pipe.executor.set_parallel(None)
    if dist.get_rank() == 0:
        Path(out_dir, "pipelines.json").write_text(json.dumps(results, default=str))
    return 0


def exit_with(code: int) -> int:
    """Rank 1 dies at once; rank 0 waits in a collective that can never complete."""
    from diffc.parallel import ParallelConfig, init_mesh

    init_mesh(ParallelConfig(world=2, ulysses=2, timeout_s=60), torch.device("cpu"))
    if dist.get_rank() == 1:
        os._exit(code)
    dist.all_reduce(torch.ones(1))
    return 0


def report_and_fail(messages: list[str]) -> int:
    """Each rank fails as a diffc error does in a spawned rank: it leaves ``messages[rank]`` for the parent."""
    from diffc.cli.parallel import report_rank_error, torchrun_env

    assert report_rank_error(messages[torchrun_env()[0]])
    return 2
