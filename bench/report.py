"""Benchmark results as JSON, a Markdown table, a plot of per-step time, and a compact console summary."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import shlex
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

EAGER, COMPILED = "diffusers-eager", "diffusers-compile"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device, argv: list[str]) -> dict[str, Any]:
    """GPU, library versions, date and the exact command, for the record."""
    import diffc

    now = datetime.datetime.now(datetime.timezone.utc)
    env: dict[str, Any] = {
        "date": now.strftime("%Y-%m-%d"), "time_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
        "diffusers": _version("diffusers"), "transformers": _version("transformers"), "diffc": diffc.__version__,
        "device": str(device),
        "cublaslt_workspace_kib": os.environ.get("CUBLASLT_WORKSPACE_SIZE", "torch's default"),
        "command": "python3 " + shlex.join(argv if argv[:1] == ["-m"] else ["-m", "bench.compare", *argv[1:]]),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 1024**3, 1),
                   compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    else:
        env.update(gpu="cpu", cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


def gpu_slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    return slug or "unknown"


def output_paths(out_dir: Path, env: dict[str, Any], model: str) -> dict[str, Path]:
    stem = f"{gpu_slug(env['gpu'])}-{env['date']}-{model}"
    return {ext: out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png")}


def _clean(value: Any) -> Any:
    """JSON has no inf/NaN: write them as strings ("inf", "nan")."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_results(result: dict[str, Any], paths: dict[str, Path]) -> None:
    """Write (or rewrite) the JSON, the Markdown and the plot; each file appears whole or not at all."""
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    for ext, text in (("json", json.dumps(_clean(result), indent=1) + "\n"), ("md", markdown(result))):
        tmp = paths[ext].with_name(paths[ext].name + ".tmp")
        tmp.write_text(text)
        tmp.replace(paths[ext])
    try:
        plot(result, paths["png"])
    except ImportError:
        pass  # matplotlib is optional: no plot


# ----------------------------------------------------------------------------------- formatting


def _get(r: dict[str, Any], key: str, field: str | None = "median") -> float | None:
    value = r.get(key)
    if isinstance(value, dict):
        value = value.get(field)
    return value if isinstance(value, (int, float)) else None


def _f(value: float | None, fmt: str = "{:.1f}", none: str = "–") -> str:
    if value is None:
        return none
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return fmt.format(value)


def _speedup(ref: float | None, value: float | None) -> str:
    return f"{ref / value:.2f}×" if ref and value else "–"


def _rows(result: dict[str, Any]) -> list[dict[str, str]]:
    configs = result["configs"]
    ref = {name: configs.get(name, {}) for name in (EAGER, COMPILED)}
    rows = []
    for name, r in _display_order(configs):
        fwd, step, e2e = _get(r, "dit_forward_ms"), _get(r, "step_ms"), _get(r, "e2e_s", None)
        frac = r.get("dit_ceiling_frac")
        peak = r.get("e2e_peak_gb") if r.get("e2e_peak_gb") is not None else r.get("dit_peak_gb")
        psnr = r.get("psnr_db")
        rows.append({
            "config": name,
            "DiT fwd ms": _f(fwd),
            "× eager": _speedup(_get(ref[EAGER], "dit_forward_ms"), fwd),
            "× compile": _speedup(_get(ref[COMPILED], "dit_forward_ms"), fwd),
            "TFLOP/s": _f(r.get("dit_tflops"), "{:.0f}"),
            "% ceiling": _f(frac * 100 if frac else None, "{:.0f}%"),
            "step ms": _f(step),
            "step × eager": _speedup(_get(ref[EAGER], "step_ms"), step),
            "e2e s": _f(e2e, "{:.2f}"),
            "e2e × eager": _speedup(_get(ref[EAGER], "e2e_s", None), e2e),
            "peak GB": _f(peak, "{:.1f}"),
            "PSNR dB": "ref" if name == result.get("reference") else _f(psnr if psnr != "inf" else math.inf, "{:.1f}"),
            "error": r.get("error", ""),
        })
        base = r.get("psnr_vs_base_db")  # e.g. diffc-compiled-fp8 against diffc-compiled's bf16 output
        if base is not None:
            rows[-1]["PSNR dB"] += f" ({_f(base if base != 'inf' else math.inf, '{:.1f}')} vs bf16)"
    return rows


def _display_order(configs: dict[str, Any]) -> list[tuple[str, Any]]:
    """The diffusers baselines first, then diffc's configurations, each in run order."""
    items = list(configs.items())
    return sorted(items, key=lambda item: (item[1].get("engine") != "diffusers", items.index(item)))


def _table(rows: list[dict[str, str]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if c == "config" else "---:" for c in columns) + "|"]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return "\n".join(lines)


MAIN_COLUMNS = ["config", "DiT fwd ms", "× eager", "× compile", "TFLOP/s", "% ceiling", "step ms", "step × eager",
                "e2e s", "e2e × eager", "peak GB", "PSNR dB"]


def _workload_line(result: dict[str, Any]) -> str:
    wl = result["workload"]
    size = f"{wl['width']}×{wl['height']}" + (f"×{wl['num_frames']} frames" if wl.get("num_frames") else "")
    return (f"{size}, {wl['steps']} steps, guidance {wl['guidance_scale']}, {wl['max_sequence_length']} text tokens, "
            f"{result['dtype']}, seed {wl['seed']}")


def markdown(result: dict[str, Any]) -> str:
    env, fl, ceil = result["env"], result["flops"], result.get("matmul_ceiling", {})
    out = [
        f"# {result['model']} — diffc vs diffusers on {env['gpu']}",
        "",
        f"{result['source']}, random weights; {_workload_line(result)}.",
        f"Measured {env['time_utc']} with torch {env['torch']}, triton {env.get('triton')}, "
        f"diffusers {env.get('diffusers')}, transformers {env.get('transformers')}"
        + (f", CUDA {env['cuda']}" if env.get("cuda") else "") + ".",
        "",
        f"`{env['command']}`",
        "",
        "DiT forward: batch 1, median of the timed repeats after warm-up. ×: speed-up over diffusers eager / "
        "diffusers + regional torch.compile (higher is better). Step and e2e: one whole generation after a "
        "one-step warm-up. PSNR: the generated output against the reference configuration's (same seed, "
        "same weights).",
        "",
        _table(_rows(result), MAIN_COLUMNS),
        "",
        f"One DiT forward is {fl['total_tflop']:.1f} TFLOP ({fl['linear_tflop']:.1f} in linear layers, "
        f"{fl['attention_tflop']:.1f} in attention); a step does {fl['forwards_per_step']} forward(s)' worth. "
        f"Matmul ceiling ({ceil.get('size')}³ {ceil.get('dtype')}): {_f(ceil.get('tflops'), '{:.0f}')} TFLOP/s.",
        *[line for note in result.get("notes", []) for line in ("", note)],
        "",
        "## Components and memory",
        "",
        "Text encode and VAE decode are measured once per engine, VAE variant and encoder mode (a compiled diffc "
        "pipeline on a GPU decodes with the VAE's fused kernels; with CUDA graphs, diffc's text encoders replay "
        "graphs too). "
        "Peak memory is what was allocated on the GPU during that stage, resident weights included. "
        "Rel err: relative L2 distance of the output from the reference configuration's on the same inputs.",
        "",
        _components_table(result),
    ]
    caches = cache_table(result)
    if caches:
        out += ["", "## Step cache", "",
                "Each cache runs on the DiT of its base configuration (diffc-eager or diffc-compiled); skipped: DiT "
                "forwards whose middle blocks reused the cached residual, and their share of the middle-block runs; "
                "× uncached: end-to-end speed-up over the base configuration's generation; PSNR: the output against "
                "that uncached output (same engine, seed and weights). Random weights: judge quality on real ones.",
                "", caches]
    stages = _stages_table(result)
    if stages:
        out += ["", "## diffc stages (s)", "", stages]
    selection = _attention_rows(result)
    if selection:
        out += ["", "## Attention selection", "",
                "What each compiled configuration's attention selection measured per attention shape (batch, heads, "
                "query x key tokens, head dim; masked: a key mask): the kernel it chose and every correct "
                "candidate's time a call in ms, replayed from a CUDA graph (median of interleaved rounds).",
                "", selection]
    errors = [(n, r["error"]) for n, r in result["configs"].items() if r.get("error")]
    if errors:
        out += ["", "## Errors", ""] + [f"- **{n}**: `{e[:500]}`" for n, e in errors]
    return "\n".join(out) + "\n"


def candidate_times(selection: dict[str, Any]) -> str:
    """One attention shape's timed candidates as ``name ms, ...`` (those not timed left out)."""
    return ", ".join(f"{n} {v:.3f}" for n, v in selection["candidates"].items() if isinstance(v, (int, float)))


def _attention_rows(result: dict[str, Any]) -> str:
    lines = []
    for name, r in result["configs"].items():
        for sel in r.get("attention_selection") or []:
            sh = sel["shape"]
            shape = (f"{sh['batch']} x {sh['heads']} x {sh['seq_q']} x {sh['seq_kv']} x {sh['head_dim']}"
                     + (" masked" if sh.get("key_mask") else ""))
            lines.append(f"| {name} | {shape} | {sel['backend']} | {candidate_times(sel)} |")
    if not lines:
        return ""
    return "\n".join(["| config | shape | chosen | candidates (ms) |", "|---|---|---|---|", *lines])


def _cache_rows(result: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for name, r in result["configs"].items():
        cache = r.get("cache")
        if not cache:
            continue
        f, m = cache["forwards"], cache["middle_blocks"]
        middle = m["computed"] + m["skipped"]
        options = ", ".join(f"{k}={v}" for k, v in cache["options"].items())
        psnr = r.get("psnr_vs_uncached_db")
        rows.append({
            "config": name, "cache": f"{cache['kind']}({options})" if options else cache["kind"],
            "threshold": _f(cache.get("threshold"), "{:g}"),
            "F/M/B": "{first}/{middle}/{last}".format(**cache["blocks"]),
            "skipped": f"{f['skipped']}/{f['computed'] + f['skipped']}",
            "middle skipped": _f(100 * m["skipped"] / middle if middle else None, "{:.0f}%"),
            "e2e s": _f(r.get("e2e_s"), "{:.2f}"), "uncached s": _f(r.get("uncached_e2e_s"), "{:.2f}"),
            "× uncached": _f(r.get("speedup_vs_uncached"), "{:.2f}×"),
            "PSNR vs uncached": _f(psnr if psnr != "inf" else math.inf, "{:.1f}"),
        })
    return rows


CACHE_COLUMNS = ["config", "cache", "threshold", "F/M/B", "skipped", "middle skipped", "e2e s", "uncached s",
                 "× uncached", "PSNR vs uncached"]


def cache_table(result: dict[str, Any]) -> str:
    """The step-cache configurations: what they skipped, how much faster, how far from uncached."""
    rows = _cache_rows(result)
    return _table(rows, CACHE_COLUMNS) if rows else ""


def _components_table(result: dict[str, Any]) -> str:
    columns = ["config", "load s", "weights GB", "first fwd s", "DiT peak GB", "text enc ms", "text peak GB",
               "VAE dec ms", "VAE peak GB", "e2e peak GB", "DiT rel err", "VAE rel err"]
    rows = []
    for name, r in _display_order(result["configs"]):
        load = r.get("load") or {}
        rows.append({
            "config": name, "load s": _f(load.get("load_s")), "weights GB": _f(load.get("weights_gb"), "{:.1f}"),
            "first fwd s": _f(r.get("dit_first_call_s"), "{:.1f}"), "DiT peak GB": _f(r.get("dit_peak_gb"), "{:.1f}"),
            "text enc ms": _f(_get(r, "text_encode_ms")), "text peak GB": _f(r.get("text_peak_gb"), "{:.1f}"),
            "VAE dec ms": _f(_get(r, "vae_decode_ms")), "VAE peak GB": _f(r.get("vae_peak_gb"), "{:.1f}"),
            "e2e peak GB": _f(r.get("e2e_peak_gb"), "{:.1f}"),
            "DiT rel err": _f(r.get("dit_rel_err"), "{:.1e}"), "VAE rel err": _f(r.get("vae_rel_err"), "{:.1e}"),
        })
    return _table(rows, columns)


def _stages_table(result: dict[str, Any]) -> str:
    runs = {n: r["stages_s"] for n, r in result["configs"].items() if r.get("stages_s")}
    if not runs:
        return ""
    stages = list(next(iter(runs.values())))
    rows = [{"config": n, **{s: _f(v.get(s), "{:.3f}") for s in stages}} for n, v in runs.items()]
    return _table(rows, ["config", *stages])


def summary_text(result: dict[str, Any]) -> str:
    """A compact fixed-width table for the console (the GPU tool returns only the output's tail)."""
    columns = ["config", "DiT fwd ms", "× eager", "× compile", "TFLOP/s", "% ceiling", "step ms", "e2e s", "peak GB",
               "PSNR dB"]
    rows = _rows(result)
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = [f"== {result['model']} on {result['env']['gpu']}: {_workload_line(result)}",
             "  ".join(c.rjust(widths[c]) for c in columns)]
    lines += ["  ".join(r[c].rjust(widths[c]) for c in columns) for r in rows]
    cache_rows = _cache_rows(result)
    if cache_rows:
        widths = {c: max(len(c), *(len(r[c]) for r in cache_rows)) for c in CACHE_COLUMNS if c != "cache"}
        lines.append("step cache:")
        lines.append("  ".join(c.rjust(w) for c, w in widths.items()))
        lines += ["  ".join(r[c].rjust(w) for c, w in widths.items()) for r in cache_rows]
    fl, ceil = result["flops"], result.get("matmul_ceiling", {})
    lines.append(f"DiT forward {fl['total_tflop']:.1f} TFLOP; matmul ceiling {_f(ceil.get('tflops'), '{:.0f}')} TFLOP/s; "
                 f"total {_f(result.get('total_s'), '{:.0f}')} s")
    for r in rows:
        if r["error"]:
            lines.append(f"ERROR {r['config']}: {r['error'][:400]}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Per-step time of each configuration's generation (left) and median DiT forward / step (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.ticker
    import matplotlib.pyplot as plt

    runs = {n: r for n, r in _display_order(result["configs"]) if r.get("dit_forward_ms") or r.get("step_ms")}
    configs = {n: r for n, r in runs.items() if r.get("dit_forward_ms")}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for name, r in runs.items():
        steps = (r.get("step_ms") or {}).get("all")
        if steps:
            left.plot(range(1, len(steps) + 1), steps, marker="o", markersize=3, label=name)
    left.set(xlabel="denoising step", ylabel="ms per step", title="per-step time (one generation)")
    left.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    left.set_ylim(bottom=0)
    if left.lines:
        left.legend()
    else:
        left.text(0.5, 0.5, "no end-to-end run", ha="center", va="center", transform=left.transAxes)
    names = list(configs)
    y = range(len(names))
    fwd = [_get(configs[n], "dit_forward_ms") or 0 for n in names]
    step = [_get(configs[n], "step_ms") or 0 for n in names]
    right.barh([i + 0.2 for i in y], fwd, height=0.4, label="DiT forward")
    right.barh([i - 0.2 for i in y], step, height=0.4, label="step (median)")
    right.set_yticks(list(y), names)
    right.invert_yaxis()
    right.set(xlabel="ms", title="median times")
    right.legend()
    fig.suptitle(f"{result['model']} on {result['env']['gpu']} — {_workload_line(result)}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
