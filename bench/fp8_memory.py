"""The fp8 tier's GPU memory with the bf16 originals on the GPU and in host memory (FLUX.1-dev's DiT).

A FLUX.1-dev-size DiT (random weights, built on the GPU in bf16) alone in a DiT stack: the allocated memory
with bf16 weights, with the fp8 copies beside them, and once the compiled fp8 graphs are installed (the
weights they do not read moved to the host, ``diffc/runtime/fp8.py``); the forward's time and peak with
the graphs before and after the move (CUDA graphs off, torch's attention, so both run the same kernels);
how long the move and the way back take. Nothing is shared with another engine (``bench.compare`` shares
the weights between diffusers and diffc, so its peak keeps the originals alive). ``--from-checkpoint``: the
DiT is saved in bf16 and loaded back with diffc's loader first, as ``diffc run`` loads a checkpoint, so the
originals map the file (``diffc/stored.py``) instead of being copied.

Run: ``python -m bench.fp8_memory [--from-checkpoint] [--side 64] [--text 512] [--repeats 5] [--out-dir bench/results]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    from diffc.compile.pipeline import _installed, compile_dit
    from diffc.compile.regions import dit_regions
    from diffc.models.flux.transformer import FLUX_TRANSFORMER_SPECS, FluxTransformer2DModel
    from diffc.runtime.compiled import CompiledDiT
    from diffc.runtime.dit_stack import DiTStack

    from .measure import GB, allocated_gb, peak_memory, sync, time_calls

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=64, help="latent tokens per side (64: 1024x1024)")
    ap.add_argument("--text", type=int, default=512, help="text tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out-dir", default=None, help="write <gpu>-<date>-flux-dev-fp8-memory[-checkpoint].json there")
    ap.add_argument("--from-checkpoint", action="store_true",
                    help="save the DiT (bf16) and load it back with diffc's loader: the originals map the file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.fp8_memory measures GPU memory: it needs a CUDA GPU")
    C, B = torch.device("cuda"), torch.bfloat16
    spec = next(s for k, s in FLUX_TRANSFORMER_SPECS.items() if "dev" in k)
    torch.manual_seed(0)
    torch.set_default_dtype(B)
    try:
        with torch.device(C):
            net = FluxTransformer2DModel(spec)
    finally:
        torch.set_default_dtype(torch.float32)
    net = net.to(B).eval().requires_grad_(False)
    folder = tempfile.TemporaryDirectory(prefix="fp8-memory-") if args.from_checkpoint else None
    if folder is not None:
        from diffc.demo.writer import save_native
        from diffc.loader.components import load_native_model

        save_native(Path(folder.name) / "transformer", "FluxTransformer2DModel", net)
        del net
        started = time.perf_counter()
        net = load_native_model(Path(folder.name) / "transformer", "FluxTransformer2DModel", C, B)
        load_s = round(time.perf_counter() - started, 2)
    side, text = args.side, args.text
    ids = torch.zeros(side, side, 3)
    ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
    g = torch.Generator().manual_seed(0)
    x = {"hidden_states": torch.randn(1, side * side, spec.in_channels, generator=g).to(C, B),
         "encoder_hidden_states": torch.randn(1, text, spec.joint_attention_dim, generator=g).to(C, B),
         "pooled_projections": torch.randn(1, spec.pooled_projection_dim, generator=g).to(C, B),
         "timestep": torch.tensor([0.5], device=C, dtype=B), "img_ids": ids.reshape(-1, 3).to(C, B),
         "txt_ids": torch.zeros(text, 3, device=C, dtype=B), "guidance": torch.tensor([3.5], device=C, dtype=B)}
    r = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
         "workload": f"FLUX.1-dev DiT, {side * side} image + {text} text tokens, batch 1, random weights",
         "source": "checkpoint (diffc's loader)" if folder is not None else "built in memory"}
    if folder is not None:
        r["load_s"] = load_s

    def mem(key):
        sync(C)
        r[key] = round(allocated_gb(C), 2)

    def timed(f, n):
        with torch.no_grad():
            return round(time_calls(f, warmup=1, repeats=n, device=C).median_ms, 2)

    def peak(f):
        with torch.no_grad(), peak_memory(C) as box:
            f()
        return round(box["peak_gb"], 2)

    mem("bf16_weights_gb")
    stack = DiTStack("transformer", net, C, cuda_graphs=False)
    stack.set_weight_quantization("fp8")
    mem("bf16_plus_fp8_gb")
    graphs: dict = {}
    with stack.bare() as eager:
        report = compile_dit(eager, x, graphs=graphs, device=C, dtype=B, tier="fp8", attention="sdpa")
    with _installed(dit_regions(net), graphs):
        r["fwd_ms_originals_on_gpu"] = timed(lambda: net(**x), args.repeats)
        r["fwd_peak_gb_originals_on_gpu"] = peak(lambda: net(**x))
    mem("before_install_gb")
    started = time.perf_counter()
    stack.set_compiled(CompiledDiT(graphs, [report.key], {"tier": "fp8"}))
    r["install_s"] = round(time.perf_counter() - started, 2)
    mem("after_release_gb")
    fp8 = stack._fp8()
    described = fp8.describe()
    r.update(originals_on_host=described["originals_on_host"], originals_mapped=described["originals_mapped"],
             linears=described["linears"], host_gb=round(described["host_bytes"] / GB, 2),
             mapped_gb=round(described["mapped_bytes"] / GB, 2), release_s=described["release_s"])
    r["fwd_ms_originals_on_host"] = timed(lambda: stack(**x), args.repeats)
    r["fwd_peak_gb_originals_on_host"] = peak(lambda: stack(**x))
    started = time.perf_counter()
    stack.set_weight_quantization(None)
    r["restore_s"] = round(time.perf_counter() - started, 2)
    mem("after_tier_off_gb")
    if folder is not None:
        folder.cleanup()
    print(json.dumps(r, indent=1))
    if args.out_dir:
        gpu = "-".join(r["gpu"].lower().replace("nvidia", "").split())
        suffix = "-checkpoint" if folder is not None else ""
        path = Path(args.out_dir) / f"{gpu}-{r['date']}-flux-dev-fp8-memory{suffix}.json"
        path.write_text(json.dumps(r, indent=1) + "\n")
        print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
