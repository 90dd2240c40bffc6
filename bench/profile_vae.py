"""Where a VAE decode spends its time: ``python -m bench.profile_vae --model wan-1.3b``.

Builds the named workload's VAE with random weights (diffusers' class, then diffc's native model on the same
tensors, as ``bench.compare`` does), decodes one random latent of the workload's size and reports the wall time
(median of ``--repeats``) and, on a GPU, CUDA kernel time per category (convolutions and their layout
transposes, elementwise, copies) and the top kernels (``bench.profile_compiled``'s profiler). Writes
``<out-dir>/<gpu or cpu>-<date>-<model>-vae-profile.{json,md}``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from .build import default_dtype, keep_fp32, native_like
from .compare import quiet_libraries
from .families import FAMILIES
from .profile_compiled import profile, top_kernel_lines, write_report
from .report import environment, gpu_slug
from .specs import SPECS, Workload


def build_vae(spec, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """diffc's native VAE (diffusers' own where the family has none) with random weights on ``device``."""
    import diffusers

    family = FAMILIES[spec.family]
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        vae = getattr(diffusers, family.diffusers_vae).from_config(spec.vae.to_dict())
    keep_fp32(vae)
    vae.eval().requires_grad_(False)
    return vae if family.native_vae is None else native_like(vae, family.native_vae, spec.vae).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_vae", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, choices=sorted(SPECS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", help="cuda (default when present) or cpu")
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    quiet_libraries()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = SPECS[args.model]
    family = FAMILIES[spec.family]
    vae = build_vae(spec, device, dtype)
    z = torch.randn(family.latent_shape(spec, Workload.from_spec(spec)), device=device, dtype=dtype)
    result: dict[str, Any] = {"model": spec.name, "latent_shape": list(z.shape),
                              "env": environment(device, ["-m", "bench.profile_vae", *(argv or [])])}
    with torch.no_grad():
        vae.decode(z)  # warm-up: cuDNN plans, allocator
        _sync(device)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            vae.decode(z)
            _sync(device)
            times.append(time.perf_counter() - start)
        result["decode_s"] = sorted(times)[len(times) // 2]
        if device.type == "cuda":
            result["kernels"] = profile(lambda: vae.decode(z), 1)
            result["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{gpu_slug(result['env']['gpu'])}-{result['env']['date']}-{spec.name}-vae-profile"
    lines = [f"# {spec.name} VAE decode of a {tuple(z.shape)} latent", "",
             f"{result['env']['gpu']}, torch {result['env']['torch']}: "
             f"{result['decode_s'] * 1000:.1f} ms a decode (median of {args.repeats})"]
    if "kernels" in result:
        lines += ["", "| category | ms |", "|---|---:|"]
        lines += [f"| {c} | {ms:.1f} |" for c, ms in result["kernels"]["by_category_ms"].items()]
        lines += top_kernel_lines(result["kernels"]["top_kernels_ms"], "Top kernels (ms per decode)")
    write_report(stem, result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
