"""LoRA on a real-size DiT (random weights): load, switch, unmerge, and the speed of a merged model.

A rank-``--rank`` adapter on every attention and MLP projection of the repeated blocks (FLUX.1-dev:
QKV, outputs, FFNs, ``proj_mlp``/``proj_out`` of the single blocks) is written in diffusers format,
and a second one beside it. Measured, on one GPU:

- ``first_load_s``: ``set_lora`` of a file not read before (read, convert, first host copy of the
  touched weights, merge);
- ``switch_cached_s``: ``set_lora`` of an adapter already cached (restore what the other touched, merge);
- ``unmerge_s``: back to the original weights (checked bit-exact);
- ``dit_forward_ms`` base / merged / after unmerge (median of ``--repeats``), and with ``--e2e`` a whole
  generation base vs merged through ``diffc.load`` on a saved checkpoint (``bench.build``).

Writes ``<out-dir>/<gpu>-<date>-lora-<model>.{json,md}``.

    python -m bench.lora --model flux-dev --rank 64
    python -m bench.lora --model flux-dev --rank 64 --e2e --steps 28
    python -m bench.lora --model flux-tiny --device cpu --repeats 2      # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from diffc.lora import LoraManager
from diffc.models import registry

from .families import FAMILIES
from .measure import free_memory, sync, time_calls
from .report import _clean, environment, gpu_slug
from .specs import SPECS, Workload

DEFAULT_TARGETS = "targets: every Linear of the repeated blocks except the adaLN modulations"


def log(msg: str) -> None:
    print(f"[lora-bench] {msg}", flush=True)


def build_dit(spec, family, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The native DiT at the spec's size with random weights (fp32 where the model keeps fp32)."""
    cls = registry.native_model_class(family.native_transformer)
    with torch.device("meta"):
        model = cls(spec.transformer)
    keep = tuple(getattr(cls, "_keep_in_fp32_modules", ()) or ())
    model = model.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fp32 = any(k in name.split(".") for k in keep)
            p.data = p.data.to(torch.float32 if fp32 else dtype)
            p.normal_(0.0, 0.02, generator=gen)
    if hasattr(model, "init_non_persistent_buffers"):
        model.init_non_persistent_buffers(device)
    return model.eval().requires_grad_(False)


def lora_modules(model: torch.nn.Module) -> list[str]:
    blocks = tuple(f"{b}." for b in getattr(model, "_repeated_blocks", ()))
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith(blocks) and "norm" not in n]


def write_adapter(model: torch.nn.Module, modules: list[str], rank: int, path: Path, seed: int,
                  dtype: torch.dtype) -> int:
    """A diffusers-format LoRA file (with its PEFT config as metadata); returns its size in bytes."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    linears = dict(model.named_modules())
    tensors = {}
    for name in modules:
        out_f, in_f = linears[name].weight.shape
        tensors[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, in_f, generator=gen) * 0.01).to(dtype)
        tensors[f"transformer.{name}.lora_B.weight"] = (torch.randn(out_f, rank, generator=gen) * 0.01).to(dtype)
    config = {"transformer.r": rank, "transformer.lora_alpha": rank, "transformer.target_modules": modules}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    return path.stat().st_size


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def _reserve(gigabytes: float | None) -> int | None:
    return None if gigabytes is None else int(gigabytes * (1 << 30))


def bench_dit(args, spec, family, device, dtype, work: Path) -> dict[str, Any]:
    wl = Workload.from_spec(spec, height=args.height, width=args.width, num_frames=args.num_frames)
    model = build_dit(spec, family, device, dtype)
    modules = lora_modules(model)
    sizes = {name: write_adapter(model, modules, args.rank, work / f"{name}.safetensors", seed, dtype)
             for name, seed in (("a", 1), ("b", 2))}
    log(f"{len(modules)} LoRA modules, rank {args.rank}, file {sizes['a'] / 1e6:.0f} MB")
    inputs = family.dit_inputs(spec, wl, device, dtype)
    manager = LoraManager({"transformer": model}, stash_reserve=_reserve(args.stash_reserve_gb))
    addresses = {n: p.data_ptr() for n, p in model.named_parameters()}

    def forward():
        with torch.inference_mode():
            return model(**inputs)

    def forward_ms():
        return statistics.median(time_calls(forward, args.warmup, args.repeats, device).times_ms)

    base_ms = forward_ms()
    first_load_s = timed(lambda: manager.set("a", work / "a.safetensors"), device)
    counters = dict(read_convert_s=manager.counters.last_load_s, merge_s=manager.counters.last_write_s)
    merged_ms = forward_ms()
    second_load_s = timed(lambda: manager.set("b", work / "b.safetensors"), device)
    switches = [timed(lambda n=n: manager.set(n), device) for n in ("a", "b") * args.switches]
    unmerge_s = timed(manager.unmerge, device)
    exact = all(torch.equal(p, manager.stash.get(("transformer", n)).to(p.device))
                for n, p in model.named_parameters() if ("transformer", n) in manager.stash)
    after_ms = forward_ms()
    host_path = None
    if device.type == "cuda" and manager.stash.device_bytes and args.stash_reserve_gb is None:
        # the same first load on a GPU without room for the copies: every copy page-locked on the host
        host_manager = LoraManager({"transformer": model}, stash_reserve=1 << 62)
        host_path = {"first_load_s": timed(lambda: host_manager.set("a", work / "a.safetensors"), device)}
        host_path["unmerge_s"] = timed(host_manager.unmerge, device)
        host_path["host_copy_bytes"] = host_manager.stash.host_bytes
        del host_manager
    return {
        "modules": len(modules), "rank": args.rank, "file_bytes": sizes["a"], "host_copy_bytes": manager.stash.host_bytes,
        "device_copy_bytes": manager.stash.device_bytes,
        "first_load_s": first_load_s, "first_load_breakdown": counters, "second_load_s": second_load_s,
        "switch_cached_s": {"median": statistics.median(switches), "max": max(switches), "all": switches},
        "unmerge_s": unmerge_s, "unmerge_bit_exact": exact, "host_stash": host_path,
        "addresses_unchanged": addresses == {n: p.data_ptr() for n, p in model.named_parameters()},
        "dit_forward_ms": {"base": base_ms, "merged": merged_ms, "after_unmerge": after_ms},
        "request": {"height": wl.height, "width": wl.width, "num_frames": wl.num_frames},
    }


def bench_e2e(args, spec, family, device, dtype, work: Path) -> dict[str, Any]:
    import diffc

    from .build import ensure_checkpoint

    wl = Workload.from_spec(spec, height=args.height, width=args.width, num_frames=args.num_frames, steps=args.steps)
    ckpt = Path(args.ckpt_dir or f"/tmp/diffc-bench/{spec.name}")
    ensure_checkpoint(spec, ckpt, device, dtype, log=log)
    pipe = diffc.load(ckpt, device=device, dtype=dtype)
    kwargs = family.call_kwargs(wl)

    def generate() -> float:
        return timed(lambda: pipe.generate(wl.prompt, seed=wl.seed, progress=False, **kwargs), device)

    pipe.generate(wl.prompt, seed=0, progress=False, **{**kwargs, "num_inference_steps": 1})
    base = [generate() for _ in range(args.e2e_repeats)]
    pipe.set_lora("a", work / "a.safetensors")
    merged = [generate() for _ in range(args.e2e_repeats)]
    pipe.unmerge_lora_weights()
    return {"steps": wl.steps, "base_s": statistics.median(base), "merged_s": statistics.median(merged),
            "all": {"base": base, "merged": merged}}


def markdown(result: dict[str, Any]) -> str:
    env, dit = result["environment"], result["dit"]
    fwd = dit["dit_forward_ms"]
    lines = [f"# LoRA on {result['model']} ({env.get('gpu')}, {env['date']})", "",
             f"rank {dit['rank']} on {dit['modules']} projections ({DEFAULT_TARGETS}); adapter file "
             f"{dit['file_bytes'] / 1e6:.0f} MB; copies of the touched weights "
             f"{dit['host_copy_bytes'] / 1e9:.1f} GB on the host, {dit.get('device_copy_bytes', 0) / 1e9:.1f} GB on the GPU",
             "",
             "| measure | value | target |", "|---|---|---|",
             f"| set_lora, first load from disk | {dit['first_load_s']:.2f} s | ≤ 3 s |",
             f"| set_lora, second file from disk (switch) | {dit['second_load_s']:.2f} s | |",
             f"| set_lora of a cached adapter (median of {len(dit['switch_cached_s']['all'])}) | "
             f"{dit['switch_cached_s']['median']:.2f} s | ≤ 1 s |",
             f"| unmerge | {dit['unmerge_s']:.2f} s (bit-exact: {dit['unmerge_bit_exact']}) | ≤ 1 s |",
             f"| DiT forward base / merged / after unmerge | {fwd['base']:.1f} / {fwd['merged']:.1f} / "
             f"{fwd['after_unmerge']:.1f} ms | merged = base |"]
    if dit.get("host_stash"):
        h = dit["host_stash"]
        lines.append(f"| without room on the GPU (copies page-locked on the host): first load / unmerge | "
                     f"{h['first_load_s']:.2f} / {h['unmerge_s']:.2f} s | |")
    if result.get("e2e"):
        e = result["e2e"]
        lines.append(f"| generation, {e['steps']} steps, base / merged | {e['base_s']:.2f} / {e['merged_s']:.2f} s | "
                     "merged = base |")
    lines += ["", f"Weights kept their addresses: {dit['addresses_unchanged']}.", "",
              f"Command: `{env['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="flux-dev", choices=sorted(SPECS))
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--num-frames", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--switches", type=int, default=3, help="cached a->b switch pairs to time")
    p.add_argument("--e2e", action="store_true", help="also time whole generations base vs merged")
    p.add_argument("--e2e-repeats", type=int, default=2)
    p.add_argument("--stash-reserve-gb", type=float,
                   help="free GPU memory the copies of touched weights must leave (default: diffc's own)")
    p.add_argument("--ckpt-dir")
    p.add_argument("--work-dir", default="/tmp/diffc-bench/lora")
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    spec = SPECS[args.model]
    family = FAMILIES[spec.family]
    work = Path(args.work_dir) / spec.name
    env = environment(device, ["-m", "bench.lora", *(argv if argv is not None else sys.argv[1:])])
    result: dict[str, Any] = {"model": spec.name, "environment": env}
    result["dit"] = bench_dit(args, spec, family, device, dtype, work)
    free_memory(device)
    if args.e2e:
        result["e2e"] = bench_e2e(args, spec, family, device, dtype, work)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{gpu_slug(env['gpu'])}-{env['date']}-lora-{spec.name}"
    stem.with_suffix(".json").write_text(json.dumps(_clean(result), indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
