"""Loading compiled graphs into a pipeline's DiT stacks: from an artifact, or compiled in-process and cached.

:func:`load_artifact` checks an artifact against this machine, this diffc and this model, reads each
region's graph once, checks every block has the tensors the graph reads (by name, shape and dtype),
and installs a :class:`~diffc.runtime.compiled.CompiledDiT` per denoiser. :func:`compile_cached` is
``diffc run --compile``: an artifact cached under ``$DIFFC_CACHE/compiled/<key>``, compiled on a miss.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from ..compile import artifact as art
from ..compile.regions import RegionGraph, call_key, dit_regions
from ..fileio import cache_dir
from .compiled import CompiledDiT


def unavailable_kernels(graphs, device) -> dict[str, str]:
    """The external-library ops (FlashAttention-4, flashinfer) the graphs call that cannot run on ``device``
    (op name -> why): those run their torch reference, correct but slower than what was compiled for."""
    import torch

    from ..ops.registry import EXTERNAL

    device = torch.device(device)
    found: dict[str, str] = {}
    for graph in graphs:
        for node in graph.gm.graph.nodes:
            if node.op == "call_function" and node.target in EXTERNAL and str(node.target) not in found:
                why = EXTERNAL[node.target](device)
                if why is not None:
                    found[str(node.target)] = why
    return found


def _warn_unavailable(graphs, device, where: str) -> None:
    import torch

    if torch.device(device).type != "cuda":  # on the CPU every attention op runs its reference by design
        return
    for op, why in unavailable_kernels(graphs, device).items():
        warnings.warn(f"{where}: the compiled graphs call {op}, whose kernel cannot run here ({why}); its torch "
                      f"reference runs instead, which is slower than what was compiled", stacklevel=3)


def compiled_layers(graphs: dict[str, tuple[dict[str, dict[str, RegionGraph]], list[str]]],
                    info: dict[str, Any]) -> dict[str, CompiledDiT]:
    """One :class:`CompiledDiT` per denoiser from ``compile_pipeline``'s graphs."""
    return {name: CompiledDiT(by_region, keys, info) for name, (by_region, keys) in graphs.items()}


def check_artifact(root: str | Path, *, source: str | Path, device, dtype) -> art.Artifact:
    """Every check of the artifact at ``root`` that needs no loaded model: its files against the manifest's hashes,
    this machine, diffc and dtype, the checkpoint's config (``source``), and the manifest's stage, bucket and region
    entries. ``diffc serve --compiled`` runs it before binding its port; :func:`load_artifact` starts with it."""
    from ..compile.compiler import pass_sources

    artifact = art.open_artifact(root)
    manifest, where = artifact.manifest, artifact.where
    art.check_compatible(manifest, device=device, dtype=dtype, model_hash=art.config_hash(Path(source)),
                         where=where, sources=pass_sources())
    stages = manifest.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise art.ArtifactError(f"{where}/{art.MANIFEST}: no compiled stages")
    for name in stages:
        for bucket in artifact.buckets(name):
            entries = bucket.get("regions")
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise art.ArtifactError(f"{where}/{art.MANIFEST}: bucket {bucket['key'][:80]!r} lists no regions")
            for entry in entries:
                file = entry.get("file")
                if not isinstance(file, str) or not isinstance(entry.get("key"), str):
                    raise art.ArtifactError(f"{where}/{art.MANIFEST}: a region entry has no file or key")
                if not file.endswith(".json"):
                    raise art.ArtifactError(f"{where}/{file[:200]}: a compiled graph is a .json file; recompile the "
                                            "artifact")
                if file not in artifact.files:
                    raise art.ArtifactError(f"compiled graph missing from the artifact: {where}/{file[:200]}")
    tier_of(manifest, where)
    # last: every field read above only refuses; the ones acted on (tier, keys, regions) are covered here
    art.check_manifest_digest(manifest, where)
    return artifact


def tier_of(manifest: dict[str, Any], where: str) -> str:
    """The manifest's ``passes.tier``, one of the tiers ``diffc compile`` writes."""
    from ..compile.manager import TIERS

    passes = manifest.get("passes")
    tier = passes.get("tier") if isinstance(passes, dict) else None
    if not isinstance(tier, str) or tier not in TIERS:
        raise art.ArtifactError(f"{where}/{art.MANIFEST}: passes.tier is {str(tier)[:80]!r}, not one of "
                                f"{', '.join(TIERS)}; recompile the artifact")
    return tier


def graph_key(program) -> str:
    """The block call key ``program`` was exported for (:func:`~diffc.compile.regions.call_key` of its inputs), read
    from the graph itself: the manifest's key for it must be this one."""
    from torch.utils import _pytree as pytree

    from ..compile.regions import call_key

    from torch.export.graph_signature import ConstantArgument, InputKind

    placeholders = {node.name: node.meta.get("val") for node in program.graph.nodes if node.op == "placeholder"}
    values = [spec.arg.value if isinstance(spec.arg, ConstantArgument) else placeholders.get(spec.arg.name)
              for spec in program.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT]
    args, kwargs = pytree.tree_unflatten(values, program.call_spec.in_spec)
    return call_key(args, kwargs)


def _region_graph(artifact: art.Artifact, file: str, device) -> RegionGraph:
    """The artifact's graph ``file`` ready to run; what torch raises on a graph the format let through (a crafted
    one, re-signed) is the artifact's error naming it, not a traceback."""
    from ..errors import DiffcError

    program = artifact.load_program(file, device=device)
    try:
        return RegionGraph(program)
    except DiffcError as exc:
        raise art.ArtifactError(f"{artifact.where}/{file}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - fx and torch raise many types on a malformed graph
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise art.ArtifactError(f"cannot use compiled graph {artifact.where}/{file} ({type(exc).__name__}: {first}); "
                                "recompile the artifact") from None


def check_consistent(where: str, tier: str, entries: list[tuple[str, str, RegionGraph]]) -> None:
    """Each graph is the one its manifest entry (``file``, ``key``) says, and the graphs read fp8 weights exactly
    under the fp8 tier: an entry that does not fit its graph ran the graph on inputs of other shapes, or quantized
    (or left unquantized) the weights the graphs read."""
    from .fp8 import WEIGHT

    fp8_files = []
    for file, key, graph in entries:
        own = graph_key(graph.program)
        if own != key:
            raise art.ArtifactError(f"{where}/{art.MANIFEST}: the key of {file} is {key[:120]!r}, but its graph takes "
                                    f"{own[:120]!r}; recompile the artifact")
        if any(name.rsplit(".", 1)[-1] == WEIGHT for name in graph.read_state_names):
            fp8_files.append(file)
    if entries and bool(fp8_files) != (tier == "fp8"):
        raise art.ArtifactError(f"{where}/{art.MANIFEST}: passes.tier is {tier!r}, but "
                                + (f"{fp8_files[0]} reads fp8 weights" if fp8_files else "no graph reads fp8 weights")
                                + "; recompile the artifact")


def load_artifact(executor, root: str | Path | art.Artifact, *, source: str | Path, device, dtype) -> dict[str, Any]:
    """Check the artifact at ``root`` and install its graphs into ``executor``'s stacks; returns the manifest.

    Every file is checked against the manifest's hashes before any is read, and the artifact must come
    from this diffc's passes and ops (:func:`~diffc.compile.compiler.pass_sources`); graphs are read as
    data (:mod:`diffc.compile.program_io`) and kernels go to a cache private to this process. ``root`` may be
    the :class:`~diffc.compile.artifact.Artifact` that :func:`check_artifact` returned for the same ``source``,
    ``device`` and ``dtype`` (``diffc.load`` checks before loading any weight): it is not checked again (each
    file is still checked against its hash as it is read).
    """
    artifact = root if isinstance(root, art.Artifact) else check_artifact(root, source=source, device=device,
                                                                          dtype=dtype)
    manifest, where = artifact.manifest, artifact.where
    stages = manifest["stages"]
    tier = tier_of(manifest, where)
    read: dict[str, RegionGraph] = {}
    layers, checks, entries = {}, [], []
    for name in stages:
        stack = executor.stacks.get(name)
        if stack is None:
            raise art.ArtifactError(f"{where}: compiled for a denoiser '{name}' this pipeline does not have "
                                    f"(it has {', '.join(executor.stacks) or 'none'})")
        regions = {r.name: r for r in dit_regions(stack.module)}
        by_region: dict[str, dict[str, RegionGraph]] = {}
        buckets = artifact.buckets(name)
        for bucket in buckets:
            for entry in bucket["regions"]:  # check_artifact checked their shape
                name_of = entry.get("region")
                region = regions.get(name_of) if isinstance(name_of, str) else None
                if region is None:
                    raise art.ArtifactError(f"{where}: region {str(entry.get('region'))[:80]!r} is not a block list "
                                            f"of {type(stack.module).__name__} ({', '.join(regions)})")
                file = entry["file"]
                if file not in read:
                    read[file] = _region_graph(artifact, file, device)
                graph = read[file]
                checks.append((file, graph, region))
                entries.append((file, entry["key"], graph))
                by_region.setdefault(region.name, {})[entry["key"]] = graph
        layers[name] = CompiledDiT(by_region, [b["key"] for b in buckets], {"artifact": where, "tier": tier})
    check_consistent(where, tier, entries)
    # fp8 graphs read the fp8 weight copies; the bf16 weights they do not read leave the device as they are quantized
    executor.set_weight_quantization("fp8" if tier == "fp8" else None,
                                     graphs={name: layer.graphs for name, layer in layers.items()})
    try:
        for file, graph, region in checks:
            for index in (0, len(region.blocks) - 1):
                problems = graph.check_block(region.blocks[index])
                if problems:
                    raise art.ArtifactError(
                        f"{where}/{file}: the graph's weights do not match {region.name}.{index} of the loaded "
                        f"model ({'; '.join(problems[:3])}); was the artifact compiled for another checkpoint?")
    except BaseException:
        executor.place_originals()  # the graphs are not installed: their weights' originals come back
        raise
    _warn_unavailable(read.values(), device, where)
    artifact.install_kernel_cache()
    executor.install_compiled(layers)
    return manifest


def compile_cached(pipe, bucket: dict[str, Any], *, tier: str = "fast", log=print) -> Any:
    """``diffc run --compile``: load this bucket's artifact from the cache, or compile and cache it.

    The cache key covers the model config, dtype, tier, bucket, pass and kernel sources and the
    environment, so any change compiles anew instead of loading a stale graph.
    """
    from ..compile.compiler import pass_sources

    shape = bucket
    if "prompt" in bucket or "negative_prompt" in bucket:
        # the prompts (a model whose DiT holds them at their own length) count by the DiT inputs they make:
        # another prompt of the same padded length finds this artifact
        from ..compile.pipeline import capture_inputs

        inputs = capture_inputs(pipe, bucket)
        shape = {**{k: v for k, v in bucket.items() if k not in ("prompt", "negative_prompt")},
                 "dit_inputs": {name: call_key((), kwargs) for name, kwargs in sorted(inputs.items())}}
    key_source = json.dumps({"model": art.config_hash(Path(pipe.source)), "dtype": str(pipe.dtype), "tier": tier,
                             "bucket": shape, "passes": pass_sources(), "env": art.environment(pipe.device),
                             "format": art.FORMAT_VERSION}, sort_keys=True, default=str)
    path = cache_dir() / "compiled" / art.sha256_text(key_source)[:20]
    if (path / art.MANIFEST).is_file():
        log(f"diffc: using the compiled DiT cached at {path}")
        try:
            return load_artifact(pipe.executor, path, source=pipe.source, device=pipe.device, dtype=pipe.dtype)
        except art.ArtifactError as exc:  # a damaged entry of diffc's: the compile below replaces it (a folder
            log(f"diffc: the cached entry is damaged ({exc}); compiling it again")  # holding more is refused)
    log(f"diffc: compiling the DiT for {bucket} (cached at {path} for later runs)")
    return pipe.compile([bucket], out=path, quality=tier, log=log)
