"""Multi-GPU scaling: the same random-weight checkpoint run by ``diffc run`` on 1 GPU and on each layout.

    python -m bench.parallel --model wan-1.3b --layouts "1;2:--enable-cfg-parallel;4:--enable-cfg-parallel --ulysses-degree 2"

Each entry of ``--layouts`` is ``N[:flags]`` (N GPUs, ``diffc run`` parallel flags). Every run is a separate
``diffc run`` with ``--perf-dump-path``; the result (seconds end to end and in the denoise loop, ms per step,
speed-up and scaling efficiency against the first entry, PSNR of each output against the first's) goes to
``bench/results/parallel-<model>-<date>.json`` with ``nvidia-smi topo -m``. ``--device cpu`` runs the same
on gloo processes (a smoke test of the harness: no speed figures to read there).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .build import ensure_checkpoint
from .specs import SPECS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.parallel", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=sorted(SPECS))
    p.add_argument("--layouts", default="1;2", help="';'-separated N[:diffc run flags] (first one: the baseline)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--num-frames", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--extra", default="--compile", help="flags for every run (default: --compile)")
    p.add_argument("--ckpt-dir")
    p.add_argument("--out-dir", default="bench/results")
    return p.parse_args(argv)


def _frames(path: Path) -> np.ndarray:
    if path.suffix == ".png":
        from PIL import Image

        return np.asarray(Image.open(path))
    import imageio.v3 as iio

    return iio.imread(path)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _topology() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    spec = SPECS[args.model]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    root = Path(args.ckpt_dir or f"/tmp/diffc-bench/{spec.name}")
    ckpt = ensure_checkpoint(spec, root, torch.device(args.device), dtype)["path"]
    video = spec.family == "wan"
    work = Path(args.out_dir) / f"parallel-{args.model}-work"
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for entry in args.layouts.split(";"):
        n, _, flags = entry.partition(":")
        out = work / f"n{n}-{len(runs)}.{'mp4' if video else 'png'}"
        dump = out.with_suffix(".json")
        cmd = [sys.executable, "-m", "diffc", "run", "--model", str(ckpt), "--prompt", "a benchmark prompt",
               "--seed", "0", "--device", args.device, "-o", str(out), "--perf-dump-path", str(dump), "--no-progress",
               *shlex.split(args.extra), *shlex.split(flags)]
        if int(n) > 1:
            cmd += ["--num-gpus", n]
        for flag, value in (("--height", args.height), ("--width", args.width), ("--num-frames", args.num_frames),
                            ("--steps", args.steps)):
            if value is not None:
                cmd += [flag, str(value)]
        print("$", shlex.join(cmd), file=sys.stderr)
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode:
            runs.append({"layout": entry, "error": proc.stderr[-2000:]})
            continue
        d = json.loads(dump.read_text())
        runs.append({"layout": entry, "gpus": int(n), "wall_s": wall, "total_s": d.get("total_s"),
                     "stages": d.get("stages"), "step_ms": d.get("step_ms"), "output": str(out),
                     "parallel": d["runtime"]["dit"]["transformer"].get("parallel")})
    base = runs[0]
    for r in runs:
        if "error" in r or "error" in base:
            continue
        denoise, base_denoise = (r["stages"] or {}).get("denoise"), (base["stages"] or {}).get("denoise")
        if denoise and base_denoise:
            r["speedup_denoise"] = base_denoise / denoise
            r["efficiency_denoise"] = r["speedup_denoise"] * base["gpus"] / r["gpus"]
        r["psnr_vs_first"] = _psnr(_frames(Path(r["output"])), _frames(Path(base["output"])))
    result = {"model": args.model, "device": args.device, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "torch": torch.__version__,
              "topology": _topology(), "runs": runs}
    path = Path(args.out_dir) / f"parallel-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    for r in runs:
        print(json.dumps({k: r.get(k) for k in ("layout", "total_s", "speedup_denoise", "efficiency_denoise",
                                                "psnr_vs_first", "error")}, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
