"""Attention under a prompt-padding mask, per SDPA backend, against attention over the kept keys only:
``python -m bench.key_padding_attention`` (HunyuanVideo's joint-attention shape at 544x960x61 by default;
``--text-first`` puts the prompt before the image, its padding between the two, as Qwen-Image's joint
attention has it: ``--name qwen-image --text-first --image-tokens 4096 --text-tokens 128 --kept 40``).

Times (CUDA events, the mean of ``--repeats`` calls after two warm-ups, replayed from a CUDA graph as a
compiled DiT runs them, except ``diffc.attention_key_padding``, whose host read no graph can hold) torch's
SDPA with the boolean ``(B, 1, 1, S)`` mask a padded prompt gives (default dispatch, and each backend forced:
a backend that refuses the mask is reported with its error), the unmasked attention over the kept keys that
``diffc.attention_key_padding`` runs, and ``diffc.attention_fa4_key_mask`` (the kept keys compacted on the
device, FlashAttention-4 over them; where flash-attn-4 runs), each with its relative error against the masked
result. Writes ``<out-dir>/<gpu>-<date>-<name>-attention.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffc.capture import replayer

from .measure import Interval
from .report import environment, gpu_slug


def _time(fn, repeats: int, graph: bool = True) -> float:
    """Mean ms of ``repeats`` calls issued back to back after two warm-ups (one pair of CUDA events); with
    ``graph``, each call a replay of ``fn`` captured in a CUDA graph."""
    if graph:
        fn = replayer(fn, torch.device("cuda"))
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    interval = Interval(torch.device("cuda"))
    interval.start()
    for _ in range(repeats):
        fn()
    interval.stop()
    return interval.ms() / repeats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.key_padding_attention", description=__doc__.split("\n")[0])
    p.add_argument("--name", default="hunyuanvideo")
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--image-tokens", type=int, default=32640, help="16 latent frames of 34 x 60 patches")
    p.add_argument("--text-tokens", type=int, default=256, help="the padded prompt length")
    p.add_argument("--kept", type=int, default=180, help="the prompt's real tokens")
    p.add_argument("--text-first", action="store_true", help="the prompt before the image (Qwen-Image)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    import diffc.ops  # noqa: F401  (registers torch.ops.diffc.attention_key_padding)
    from diffc.ops.attention_fa4 import fa4_unavailable

    device = torch.device("cuda")
    n = args.image_tokens + args.text_tokens
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, n, args.heads, args.head_dim, device=device, dtype=torch.bfloat16, generator=g)
               .transpose(1, 2) for _ in range(3))
    positions = torch.arange(n, device=device)
    if args.text_first:  # [prompt | its padding | image]
        mask = ((positions < args.kept) | (positions >= args.text_tokens))[None, None, None, :]
    else:  # [image | prompt | its padding]
        mask = (positions < args.image_tokens + args.kept)[None, None, None, :]
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    flops = 4 * args.heads * n * n * args.head_dim
    results = {}

    def measure(label, fn, graph=True):
        try:
            out = fn()
            err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
            ms = _time(fn, args.repeats, graph)
            results[label] = {"ms": round(ms, 2), "tflops_of_the_full_attention": round(flops / ms / 1e9, 1),
                              "rel_err_vs_masked": err}
        except RuntimeError as exc:
            results[label] = {"error": str(exc).strip().splitlines()[0][:200]}
        print(label, results[label], flush=True)

    measure("masked sdpa (default dispatch)", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    for backend in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "FLASH_ATTENTION"):
        def forced(backend=backend):
            with sdpa_kernel(getattr(SDPBackend, backend)):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        measure(f"masked sdpa, {backend}", forced)
    kept = args.image_tokens + args.kept
    keys = mask[0, 0, 0].nonzero().squeeze(1)
    kk, vk = k[:, :, keys], v[:, :, keys]  # the kept keys, gathered once outside the timing
    measure("unmasked sdpa over the kept keys", lambda: F.scaled_dot_product_attention(q, kk, vk))
    measure("diffc.attention_key_padding", lambda: torch.ops.diffc.attention_key_padding(q, k, v, mask, None),
            graph=False)
    why = fa4_unavailable()
    if why is None:
        measure("fa4 unmasked over the kept keys", lambda: torch.ops.diffc.attention_fa4(q, kk, vk, None))
        measure("diffc.attention_fa4_key_mask", lambda: torch.ops.diffc.attention_fa4_key_mask(q, k, v, mask, None))
    else:
        results["diffc.attention_fa4_key_mask"] = {"error": why}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device, ["-m", "bench.key_padding_attention", *(argv or [])])
    path = out / f"{gpu_slug(env['gpu'])}-{env['date']}-{args.name}-attention.json"
    path.write_text(json.dumps({"env": env, "shape": {"heads": args.heads, "head_dim": args.head_dim, "tokens": n,
                                                      "kept": kept}, "results": results}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
