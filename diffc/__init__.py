"""diffc: a compiler-centric inference engine for diffusion transformers."""

__version__ = "0.1.0"
