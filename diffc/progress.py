"""Other libraries' progress bars (transformers' "Loading weights" and "Writing model shards", huggingface_hub's,
diffusers'), turned off for a while. diffc's own bars follow each call's ``progress`` argument."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Iterator

HUB_VARIABLE = "HF_HUB_DISABLE_PROGRESS_BARS"


@contextlib.contextmanager
def library_bars_off() -> Iterator[None]:
    """transformers', huggingface_hub's and diffusers' progress bars off, each library's switch restored after.

    diffusers is not imported for this (seconds, for a command that may never use it): where it is not imported
    yet, its loading (:mod:`diffc.pipelines.generic.loader`) turns its bars off itself. Processes started meanwhile
    (the ranks of a parallel run) inherit ``HF_HUB_DISABLE_PROGRESS_BARS=1``, which transformers reads at import."""
    import huggingface_hub.utils as hub
    import transformers.utils.logging as transformers_logging

    libraries = [transformers_logging]
    if "diffusers" in sys.modules:
        libraries.append(sys.modules["diffusers"].utils.logging)
    were = [lib.is_progress_bar_enabled() for lib in libraries]
    hub_was_off = hub.are_progress_bars_disabled()
    variable = os.environ.get(HUB_VARIABLE)
    with warnings.catch_warnings():  # huggingface_hub warns where HF_HUB_DISABLE_PROGRESS_BARS=0 overrides it
        warnings.simplefilter("ignore")
        for lib in libraries:
            lib.disable_progress_bar()
        hub.disable_progress_bars()
    os.environ[HUB_VARIABLE] = "1"
    try:
        yield
    finally:
        if variable is None:
            os.environ.pop(HUB_VARIABLE, None)
        else:
            os.environ[HUB_VARIABLE] = variable
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for lib, was in zip(libraries, were):
                if was:
                    lib.enable_progress_bar()
            (hub.disable_progress_bars if hub_was_off else hub.enable_progress_bars)()  # transformers' turns hub's on
