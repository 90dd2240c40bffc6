"""How much the compile-time attention selection's timings spread at one shape, and whether its pick is stable.

Runs :func:`diffc.compile.attention_select.select_attention_backend` ``--repeats`` times on one attention shape
(default Wan2.1-1.3B's self-attention: 12 heads x 32,760 tokens x 128), then times each candidate in ``--rounds``
rounds that alternate the candidates' order, each timing a fresh CUDA graph after ``--warmup`` replays, as the
selection timed one candidate before 2026-12-07. Prints both and writes them as JSON (``--out``)::

    python -m bench.ops.attention_selection_spread --candidates sdpa,sdpa_cudnn,fa4,flashinfer --out spread.json

``bench/results/h100-2026-12-07-attention-selection-probe.json`` came from the first form of this script.
"""

from __future__ import annotations

import argparse
import json

import torch

from diffc.compile.attention_select import (
    BACKENDS,
    AttentionShape,
    _median_ms,
    _random_qkv,
    _timed_call,
    select_attention_backend,
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="1,12,32760,32760,128", help="batch,heads,seq_q,seq_kv,head_dim")
    p.add_argument("--candidates", default="sdpa,sdpa_cudnn,fa4,flashinfer")
    p.add_argument("--repeats", type=int, default=3, help="whole selections run")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    try:
        shape = AttentionShape(*(int(x) for x in args.shape.split(",")))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--shape: expected five positive integers batch,heads,seq_q,seq_kv,head_dim ({e})") from e
    names = args.candidates.split(",")
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise SystemExit(f"--candidates: unknown {unknown}; accepted: {', '.join(BACKENDS)}")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    dev = torch.device("cuda")
    out: dict = {"shape": shape.to_dict(), "device": torch.cuda.get_device_name(dev), "selections": []}
    for rep in range(args.repeats):
        s = select_attention_backend([shape], dev, torch.bfloat16, candidates=names).shapes[0]
        times = {n: r.median_ms for n, r in s.candidates.items()}
        print("selection", rep, s.backend, times, flush=True)
        out["selections"].append({"backend": s.backend, "ms": times})
    q, k, v = _random_qkv(shape, dev, torch.bfloat16, 0)
    rounds: dict[str, list[float]] = {n: [] for n in names if BACKENDS[n].unavailable(dev) is None}
    with torch.no_grad():
        for r in range(args.rounds):
            for n in (list(rounds) if r % 2 == 0 else list(rounds)[::-1]):
                call = _timed_call(lambda n=n: BACKENDS[n](q, k, v, None), dev)
                for _ in range(args.warmup):
                    call()
                rounds[n].append(_median_ms(call, dev, args.iters))
    print("rounds", json.dumps(rounds), flush=True)
    out["rounds_ms"] = rounds
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
