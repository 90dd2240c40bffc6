"""Where a prompt encode spends its time: ``python -m bench.profile_encoders --model flux-dev``.

Builds each text encoder of the named workload with random weights (transformers' class and the workload's
config, in bf16 on a GPU, float32 on a CPU) and encodes one batch-1 prompt of random token ids at the length the
pipeline pads to (``max_sequence_length``; CLIP's 77 positions), as a diffc pipeline runs it:

- ``eager``: the encoder's forward;
- ``graphs``: replayed from diffc's encoder CUDA graph (:class:`diffc.runtime.encoders.EncoderGraphs`);
- ``graphs+masks``: the same with contiguous attention masks (``EncoderGraphs.set_fused_attention``, what a
  compiled pipeline on a GPU switches on), so SDPA can choose a fused kernel.

Reports the median time of ``--repeats`` encodes after a warm-up (``bench.measure.time_calls``: CUDA events on a
GPU, wall clock on a CPU), the relative L2 difference of each
variant's last hidden state from eager's, and on a GPU the top CUDA kernels of each variant
(``bench.profile_compiled``'s profiler). Writes ``<out-dir>/<gpu or cpu>-<date>-<model>-encoders.{json,md}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from diffc.runtime.encoders import EncoderGraphs

from .compare import quiet_libraries
from .measure import time_calls
from .profile_compiled import parse_variants, profile, top_kernel_lines, write_report
from .report import environment, gpu_slug
from .specs import SPECS, TextEncoderSpec

VARIANTS = ("eager", "graphs", "graphs+masks")
CLIP_POSITIONS = 77


def build_encoder(spec: TextEncoderSpec, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``spec``'s transformers encoder with random weights (seed 0) on ``device`` in ``dtype``."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, spec.config_class)(**spec.config)
    with torch.device(device):
        model = getattr(transformers, spec.model_class)(config)
    return model.to(dtype).eval().requires_grad_(False)


def prompt_ids(spec: TextEncoderSpec, model: torch.nn.Module, length: int, device: torch.device) -> torch.Tensor:
    """A (1, tokens) batch of random ids below the vocabulary: CLIP's 77 positions, else ``length``."""
    tokens = CLIP_POSITIONS if spec.tokenizer_kind == "clip" else length
    vocab = model.config.vocab_size
    return torch.randint(1, vocab, (1, tokens), generator=torch.Generator().manual_seed(1)).to(device)


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) or hasattr(out, "last_hidden_state") else out


def measure(model: torch.nn.Module, ids: torch.Tensor, variants: list[str], repeats: int,
            device: torch.device) -> dict[str, Any]:
    """Per variant: median ms, relative difference from the first variant's output, top kernels on a GPU."""
    components = {"encoder": model}
    graphs = EncoderGraphs(components, ("encoder",), device, cuda_graphs=False)
    out: dict[str, Any] = {}
    first = None
    for variant in variants:
        graphs.set_cuda_graphs(variant != "eager" if device.type == "cuda" else False)
        graphs.set_fused_attention(variant == "graphs+masks")
        encode = lambda: _hidden(components["encoder"](ids))  # noqa: E731
        with torch.inference_mode():
            timed = time_calls(encode, 1, repeats, device)
            hidden = timed.output.float()
            result: dict[str, Any] = {"ms": timed.median_ms}
            if first is None:
                first = hidden
            else:
                result["rel_diff_vs_first"] = float((hidden - first).norm() / first.norm())
            if device.type == "cuda":
                result["kernels"] = profile(encode, 1)
        out[variant] = result
    graphs.set_fused_attention(False)
    graphs.set_cuda_graphs(False)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_encoders", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, choices=sorted(SPECS))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", help="cuda (default when present) or cpu")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, measured in this order on the same weights: {', '.join(VARIANTS)} "
                        "(graphs and graphs+masks replay CUDA graphs: GPU only)")
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    variants = parse_variants(p, args.variants, VARIANTS)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and variants != ["eager"]:
        p.error("the graphs variants replay CUDA graphs: on a CPU, use --variants eager")
    quiet_libraries()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = SPECS[args.model]
    result: dict[str, Any] = {"model": spec.name, "env": environment(device, ["-m", "bench.profile_encoders",
                                                                              *(argv or [])]), "encoders": {}}
    lines = [f"# {spec.name} text encoders, one batch-1 prompt", "",
             f"{result['env']['gpu']}, torch {result['env']['torch']}; {dtype}; random weights; median of "
             f"{args.repeats} encodes after a warm-up.", "",
             "| encoder | tokens | " + " | ".join(f"{v} ms" for v in variants) + " | rel diff vs first |",
             "|---|---:|" + "---:|" * len(variants) + "---|"]
    for enc in spec.text_encoders:
        model = build_encoder(enc, device, dtype)
        ids = prompt_ids(enc, model, spec.max_sequence_length, device)
        measured = measure(model, ids, variants, args.repeats, device)
        result["encoders"][enc.component] = {"class": enc.model_class, "tokens": ids.shape[1], "variants": measured}
        diffs = ", ".join(f"{v} {m['rel_diff_vs_first']:.1e}" for v, m in measured.items() if "rel_diff_vs_first" in m)
        lines.append(f"| {enc.component} ({enc.model_class}) | {ids.shape[1]} | "
                     + " | ".join(f"{measured[v]['ms']:.2f}" for v in variants) + f" | {diffs or '–'} |")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for name, enc in result["encoders"].items():
        for variant, m in enc["variants"].items():
            if "kernels" in m:
                lines += top_kernel_lines(dict(list(m["kernels"]["top_kernels_ms"].items())[:10]),
                                          f"Top kernels of {name}, {variant} (ms per encode)")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report(out_dir / f"{gpu_slug(result['env']['gpu'])}-{result['env']['date']}-{spec.name}-encoders",
                 result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
