"""Copying many large bf16 weights between the GPU and pageable host memory: ``python -m bench.runtime.bench_staged_copy``.

The fp8 tier sends the bf16 originals no compiled graph reads to host memory (``diffc/runtime/fp8.py``) and
brings them back for a compile, a LoRA merge or offload. This times that copy both ways for ``--gb`` GB of
FLUX.1-dev-shaped weights (3072 x 12288 and 9216 x 3072): a plain ``.to()`` per tensor against diffc's
staging ring (``diffc/runtime/staged_copy.py``), each checked bit for bit. Prints one line a variant and,
with ``--out``, writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.report import environment
from diffc.runtime.staged_copy import Ring


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=8.0, help="GB of weights to copy each way")
    ap.add_argument("--out", help="write the figures there (JSON)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.runtime.bench_staged_copy times GPU <-> host copies: it needs a CUDA GPU")
    device = torch.device("cuda")
    shapes, total = [], 0
    while total < args.gb * 1e9:
        shape = (3072, 12288) if len(shapes) % 2 == 0 else (9216, 3072)
        shapes.append(shape)
        total += shape[0] * shape[1] * 2
    weights = [torch.randn(s, device=device, dtype=torch.bfloat16) for s in shapes]
    rows = []

    def timed(name, copy, reference):
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = copy()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        exact = all(torch.equal(o.cpu() if o.is_cuda else o, r.cpu() if r.is_cuda else r)
                    for o, r in zip(out[::17], reference[::17]))
        rows.append({"copy": name, "s": round(seconds, 3), "GB/s": round(total / 1e9 / seconds, 2), "exact": exact})
        print(f"{name:34s} {seconds:7.2f} s {total / 1e9 / seconds:7.2f} GB/s exact={exact}", flush=True)
        return out

    plain = timed("to host: .to('cpu')", lambda: [w.to("cpu") for w in weights], weights)
    del plain
    with Ring() as ring:
        hosted = timed("to host: staging ring", lambda: ring.to_host(weights), weights)
    del weights
    back = timed("to device: .to('cuda')", lambda: [h.to(device) for h in hosted], hosted)
    del back
    with Ring() as ring:
        timed("to device: staging ring", lambda: ring.to_device(hosted, device), hosted)
    result = {"env": environment(device, ["-m", "bench.runtime.bench_staged_copy", *argv]),
              "gb": round(total / 1e9, 2), "tensors": len(shapes), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
