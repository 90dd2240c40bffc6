"""Loading compiled graphs into a pipeline's DiT stacks: from an artifact, or compiled in-process and cached.

:func:`load_artifact` checks an artifact against this machine, this diffc and this model, reads each
region's graph once, checks every block has the tensors the graph reads (by name, shape and dtype),
and installs a :class:`~diffc.runtime.compiled.CompiledDiT` per denoiser. :func:`compile_cached` is
``diffc run --compile``: an artifact cached under ``$DIFFC_CACHE/compiled/<key>``, compiled on a miss.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..compile import artifact as art
from ..compile.regions import RegionGraph, dit_regions
from ..fileio import cache_dir
from .compiled import CompiledDiT


def compiled_layers(graphs: dict[str, tuple[dict[str, dict[str, RegionGraph]], list[str]]],
                    info: dict[str, Any]) -> dict[str, CompiledDiT]:
    """One :class:`CompiledDiT` per denoiser from ``compile_pipeline``'s graphs."""
    return {name: CompiledDiT(by_region, keys, info) for name, (by_region, keys) in graphs.items()}


def load_artifact(executor, root: str | Path, *, source: str | Path, device, dtype) -> dict[str, Any]:
    """Check the artifact at ``root`` and install its graphs into ``executor``'s stacks; returns the manifest."""
    root = Path(root).expanduser()
    manifest = art.read_manifest(root)
    art.check_compatible(manifest, device=device, dtype=dtype, model_hash=art.config_hash(Path(source)),
                         where=str(root))
    stages = manifest.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise art.ArtifactError(f"{root / art.MANIFEST}: no compiled stages")
    read: dict[str, RegionGraph] = {}
    layers = {}
    for name, stage in stages.items():
        stack = executor.stacks.get(name)
        if stack is None:
            raise art.ArtifactError(f"{root}: compiled for a denoiser '{name}' this pipeline does not have "
                                    f"(it has {', '.join(executor.stacks) or 'none'})")
        regions = {r.name: r for r in dit_regions(stack.module)}
        by_region: dict[str, dict[str, RegionGraph]] = {}
        for bucket in stage.get("buckets", []):
            for entry in bucket.get("regions", []):
                region = regions.get(entry.get("region"))
                if region is None:
                    raise art.ArtifactError(f"{root}: region {entry.get('region')!r} is not a block list of "
                                            f"{type(stack.module).__name__} ({', '.join(regions)})")
                file = entry["file"]
                if file not in read:
                    read[file] = RegionGraph(art.load_program(root / file))
                graph = read[file]
                for index in (0, len(region.blocks) - 1):
                    problems = graph.check_block(region.blocks[index])
                    if problems:
                        raise art.ArtifactError(
                            f"{root / file}: the graph's weights do not match {region.name}.{index} of the loaded "
                            f"model ({'; '.join(problems[:3])}); was the artifact compiled for another checkpoint?")
                by_region.setdefault(region.name, {})[entry["key"]] = graph
        layers[name] = CompiledDiT(by_region, [b["key"] for b in stage.get("buckets", [])],
                                   {"artifact": str(root), "tier": manifest.get("passes", {}).get("tier")})
    art.use_kernel_cache(root / art.TRITON_CACHE)
    executor.install_compiled(layers)
    return manifest


def compile_cached(pipe, bucket: dict[str, Any], *, tier: str = "fast", log=print) -> Any:
    """``diffc run --compile``: load this bucket's artifact from the cache, or compile and cache it.

    The cache key covers the model config, dtype, tier, bucket, pass and kernel sources and the
    environment, so any change compiles anew instead of loading a stale graph.
    """
    from ..compile.compiler import pass_sources

    key_source = json.dumps({"model": art.config_hash(Path(pipe.source)), "dtype": str(pipe.dtype), "tier": tier,
                             "bucket": bucket, "passes": pass_sources(), "env": art.environment(pipe.device),
                             "format": art.FORMAT_VERSION}, sort_keys=True, default=str)
    path = cache_dir() / "compiled" / art.sha256_text(key_source)[:20]
    if (path / art.MANIFEST).is_file():
        log(f"diffc: using the compiled DiT cached at {path}")
        return load_artifact(pipe.executor, path, source=pipe.source, device=pipe.device, dtype=pipe.dtype)
    log(f"diffc: compiling the DiT for {bucket} (cached at {path} for later runs)")
    return pipe.compile([bucket], out=path, quality=tier, log=log)
