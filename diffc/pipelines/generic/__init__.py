"""The generic backend: any diffusers pipeline class diffc has no native spec for, run through diffusers
itself behind diffc's ``Pipeline`` interface (timings, progress, outputs, serving)."""

from .loader import DIFFUSERS_EXTRA, import_diffusers, load_diffusers_pipeline
from .pipeline import GenericPipeline

__all__ = ["DIFFUSERS_EXTRA", "GenericPipeline", "import_diffusers", "load_diffusers_pipeline"]
