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

from diffc.models.vae_blocks import has_fused_path, set_fused_vae

from .build import default_dtype, keep_fp32, native_like
from .compare import quiet_libraries
from .families import FAMILIES
from .profile_compiled import parse_variants, profile, top_kernel_lines, write_report
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


VARIANTS = ("eager", "fused")  # fused: the VAE's fused kernels (set_fused_vae), as a compiled pipeline runs it


def _measure(vae, z, device, repeats: int) -> tuple[dict[str, Any], torch.Tensor]:
    """One variant: the warm-up decode's output, the median decode time and, on a GPU, its kernel profile."""
    with torch.no_grad():
        out = vae.decode(z)  # warm-up: cuDNN plans, allocator, kernel builds
        _sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            vae.decode(z)
            _sync(device)
            times.append(time.perf_counter() - start)
        result: dict[str, Any] = {"decode_s": sorted(times)[len(times) // 2]}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            result["kernels"] = profile(lambda: vae.decode(z), 1)
            result["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return result, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_vae", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, choices=sorted(SPECS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", help="cuda (default when present) or cpu")
    p.add_argument("--variants", default="eager",
                   help=f"comma-separated, measured in this order on the same weights: {', '.join(VARIANTS)} "
                        "(fused: the VAE's fused kernels, as a compiled pipeline decodes)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its convolution algorithms")
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    variants = parse_variants(p, args.variants, VARIANTS)
    quiet_libraries()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    spec = SPECS[args.model]
    family = FAMILIES[spec.family]
    vae = build_vae(spec, device, dtype)
    if "fused" in variants and not has_fused_path(vae):
        p.error(f"{spec.name}'s VAE has no fused kernels (variant 'fused')")
    z = torch.randn(family.latent_shape(spec, Workload.from_spec(spec)), device=device, dtype=dtype)
    result: dict[str, Any] = {"model": spec.name, "latent_shape": list(z.shape), "cudnn_benchmark": args.cudnn_benchmark,
                              "env": environment(device, ["-m", "bench.profile_vae", *(argv or [])]), "variants": {}}
    first = None
    for variant in variants:
        if has_fused_path(vae):
            set_fused_vae(vae, variant == "fused")
        measured, out = _measure(vae, z, device, args.repeats)
        out = getattr(out, "sample", out).float()  # a diffusers VAE returns a DecoderOutput
        if first is None:
            first = out
        else:
            measured["rel_err_vs_first"] = float((out - first).norm() / first.norm())
        result["variants"][variant] = measured
    del first, out
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "-vae-profile" if variants == ["eager"] else f"-vae-{'-'.join(variants)}"
    stem = out_dir / f"{gpu_slug(result['env']['gpu'])}-{result['env']['date']}-{spec.name}{suffix}"
    lines = [f"# {spec.name} VAE decode of a {tuple(z.shape)} latent", "",
             f"{result['env']['gpu']}, torch {result['env']['torch']}, cuDNN benchmark "
             f"{'on' if args.cudnn_benchmark else 'off'}; median of {args.repeats} decodes after a warm-up.", "",
             "| variant | decode ms | peak GB | rel err vs first |", "|---|---:|---:|---:|"]
    for variant, m in result["variants"].items():
        peak = f"{m['peak_gb']:.1f}" if "peak_gb" in m else "–"
        err = f"{m['rel_err_vs_first']:.1e}" if "rel_err_vs_first" in m else "–"
        lines.append(f"| {variant} | {m['decode_s'] * 1000:.1f} | {peak} | {err} |")
    for variant, m in result["variants"].items():
        if "kernels" in m:
            lines += ["", f"## {variant}: kernel time per category", "", "| category | ms |", "|---|---:|"]
            lines += [f"| {c} | {ms:.1f} |" for c, ms in m["kernels"]["by_category_ms"].items()]
            lines += top_kernel_lines(m["kernels"]["top_kernels_ms"], f"Top kernels of {variant} (ms per decode)")
    write_report(stem, result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
