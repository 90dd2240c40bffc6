"""diffc: a compiler-centric inference engine for diffusion transformers.

``diffc.load(path, device=None, dtype=None)`` returns a pipeline whose ``generate(...)`` makes images
or videos; see README.md.
"""

from . import blas_env

blas_env.configure()  # before the process's first GEMM: see diffc/blas_env.py

from .errors import CheckpointError, DiffcError, InvalidArgumentError, WeightMismatchError  # noqa: E402


def load(path, device=None, dtype=None, scheduler=None, **runtime):
    """Load a diffusers-format checkpoint directory; see ``diffc.loader.pipeline.load``.

    ``runtime`` keywords: ``offload``, ``offload_prefetch``, ``resident_blocks``, ``cuda_graphs``, ``compiled``.
    """
    from .loader.pipeline import RUNTIME_KEYWORDS, load as _load

    unknown = sorted(set(runtime) - set(RUNTIME_KEYWORDS))
    if unknown:
        import difflib

        accepted = ("path", "device", "dtype", "scheduler", *RUNTIME_KEYWORDS)
        close = difflib.get_close_matches(unknown[0], accepted, 1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidArgumentError(unknown[0], f"is not an option of diffc.load{hint}; accepted: {', '.join(accepted)}")
    return _load(path, device=device, dtype=dtype, scheduler=scheduler, **runtime)


from .version import __version__  # noqa: E402

__all__ = ["load", "DiffcError", "CheckpointError", "InvalidArgumentError", "WeightMismatchError", "__version__"]
