"""Server overhead and throughput of ``diffc serve`` on a real-size checkpoint (random weights).

In one command on one GPU: the same job through ``diffc.load(...).generate`` in-process (what
``diffc run`` does after loading), then through a live ``diffc serve`` over HTTP (sequential
requests: overhead; concurrent requests: images per minute with batching). Writes
``<out-dir>/<gpu>-<date>-serve-<model>.{json,md}``.

    python -m bench.serve_load --model flux-dev --height 1024 --width 1024 --steps 28
    python -m bench.serve_load --model wan-1.3b --height 480 --width 832 --num-frames 81 --steps 30
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .build import ensure_checkpoint
from .specs import SPECS

PROMPT = "a calico cat playing piano on a stage, studio lighting"


def log(msg: str) -> None:
    print(f"[serve-bench] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def direct(ckpt: str, job: dict, video: bool, repeats: int, device: str) -> dict:
    import diffc

    pipe = diffc.load(ckpt, device=device)
    pipe.generate(PROMPT, seed=0, progress=False, **{**job, "num_inference_steps": 1})  # warm-up
    times = []
    for i in range(repeats):
        sync()
        start = time.perf_counter()
        pipe.generate(PROMPT, seed=i, progress=False, **job)
        sync()
        times.append(time.perf_counter() - start)
    result = {"latency_s": times, "median_s": statistics.median(times)}
    if not video:  # one batch of 4 prompts: what batching buys in-process
        start = time.perf_counter()
        pipe.generate([PROMPT] * 4, seed=[0, 1, 2, 3], progress=False, **job)
        sync()
        result["batch4_s"] = time.perf_counter() - start
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def start_server(ckpt: str, port: int, max_batch: int, device: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "diffc.cli.main", "serve", "--model", ckpt, "--port", str(port), "--device", device,
           "--max-batch", str(max_batch), "--max-queue", "256", "--max-frames", "161", "--max-pixels", str(4096 * 4096)]
    proc = subprocess.Popen(cmd, env=os.environ.copy())
    import httpx

    deadline = time.time() + 400
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    raise RuntimeError("server not ready in 400 s")


def image_request(client, base: str, job: dict, seed: int) -> tuple[float, dict]:
    body = {"prompt": PROMPT, "size": f"{job['width']}x{job['height']}", "n": 1, "response_format": "b64_json",
            "num_inference_steps": job["num_inference_steps"], "seed": seed}
    if "guidance_scale" in job:
        body["guidance_scale"] = job["guidance_scale"]
    start = time.perf_counter()
    r = client.post(f"{base}/v1/images/generations", json=body, timeout=600)
    elapsed = time.perf_counter() - start
    r.raise_for_status()
    return elapsed, r.json()


def video_request(client, base: str, job: dict, seed: int) -> tuple[float, dict]:
    body = {"prompt": PROMPT, "size": f"{job['width']}x{job['height']}", "num_frames": job["num_frames"],
            "num_inference_steps": job["num_inference_steps"], "seed": seed}
    start = time.perf_counter()
    r = client.post(f"{base}/v1/videos", json=body, timeout=60)
    r.raise_for_status()
    vid = r.json()["id"]
    while True:
        status = client.get(f"{base}/v1/videos/{vid}", timeout=60).json()
        if status["status"] in ("completed", "failed"):
            break
        time.sleep(0.05)
    content = client.get(f"{base}/v1/videos/{vid}/content", timeout=120)
    elapsed = time.perf_counter() - start
    if status["status"] != "completed" or content.status_code != 200:
        raise RuntimeError(f"video job failed: {status}")
    return elapsed, status


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flux-dev", choices=sorted(SPECS))
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--num-frames", type=int)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=16, help="concurrent image requests for the throughput run")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--ckpt-dir")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)

    import httpx

    spec = SPECS[args.model]
    video = args.num_frames is not None
    job = {"height": args.height, "width": args.width, "num_inference_steps": args.steps}
    if video:
        job["num_frames"] = args.num_frames
    ckpt = ensure_checkpoint(spec, Path(args.ckpt_dir or f"/tmp/diffc-bench/{args.model}"), torch.device(args.device),
                             torch.bfloat16 if args.dtype == "bf16" else torch.float32, log=log)["path"]
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    log(f"{args.model} on {gpu}: {job}")

    res = {"model": args.model, "gpu": gpu, "job": job, "command": " ".join(["python -m bench.serve_load"] + sys.argv[1:]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__}
    res["direct"] = direct(ckpt, job, video, args.repeats, args.device)
    log(f"direct: median {res['direct']['median_s']:.2f} s")

    port = free_port()
    proc = start_server(ckpt, port, args.max_batch, args.device)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client() as client:
            send = video_request if video else image_request
            seq = [send(client, base, job, seed=100 + i) for i in range(args.repeats)]
            lat = [s[0] for s in seq]
            server_inf = [s[1].get("inference_time_s") for s in seq]
            res["server_sequential"] = {"latency_s": lat, "median_s": statistics.median(lat),
                                        "server_inference_time_s": server_inf}
            res["overhead_s"] = res["server_sequential"]["median_s"] - res["direct"]["median_s"]
            log(f"server sequential: median {res['server_sequential']['median_s']:.2f} s "
                f"(overhead {res['overhead_s'] * 1e3:.0f} ms)")
            if not video:
                start = time.perf_counter()
                with cf.ThreadPoolExecutor(args.concurrency) as pool:
                    futures = [pool.submit(image_request, httpx.Client(), base, job, 1000 + i)
                               for i in range(args.requests)]
                    lats = [f.result()[0] for f in futures]
                wall = time.perf_counter() - start
                res["server_concurrent"] = {
                    "requests": args.requests, "concurrency": args.concurrency, "max_batch": args.max_batch,
                    "wall_s": wall, "images_per_min": args.requests * 60 / wall,
                    "p50_s": statistics.median(lats), "max_s": max(lats)}
                res["direct_images_per_min"] = 60 / res["direct"]["median_s"]
                log(f"server concurrent: {res['server_concurrent']['images_per_min']:.1f} images/min "
                    f"(direct, one at a time: {res['direct_images_per_min']:.1f})")
            metrics = client.get(f"{base}/metrics").text
            res["metrics_sample"] = [l for l in metrics.splitlines() if l.startswith("diffc_batch_size")][:6]
    finally:
        proc.terminate()
        proc.wait(timeout=120)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{gpu.split()[-1].lower()}-{res['date'][:10]}-serve-{args.model}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    rows = [f"# diffc serve on {gpu}: {args.model}, {job}", "", f"`{res['command']}` ({res['date']}, torch {res['torch']})", "",
            "| measure | value |", "|---|---:|",
            f"| in-process `generate` (what `diffc run` does after load), median s | {res['direct']['median_s']:.3f} |",
            f"| same job over HTTP, sequential, median s | {res['server_sequential']['median_s']:.3f} |",
            f"| server overhead per request, ms | {res['overhead_s'] * 1e3:.0f} |"]
    if not video:
        c = res["server_concurrent"]
        rows += [f"| in-process batch of 4, s | {res['direct']['batch4_s']:.3f} |",
                 f"| {c['requests']} concurrent requests ({c['concurrency']} clients, max batch {c['max_batch']}): images/min | {c['images_per_min']:.1f} |",
                 f"| one at a time in-process: images/min | {res['direct_images_per_min']:.1f} |",
                 f"| concurrent request latency p50 / max, s | {c['p50_s']:.1f} / {c['max_s']:.1f} |"]
    (out / f"{stem}.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
