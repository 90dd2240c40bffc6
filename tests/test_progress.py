"""``library_bars_off``: transformers', huggingface_hub's and diffusers' progress bars off, then as they were."""

from __future__ import annotations

import os
import subprocess
import sys

import diffusers.utils.logging as diffusers_logging
import huggingface_hub.utils as hub
import transformers.utils.logging as transformers_logging

from diffc.progress import HUB_VARIABLE, library_bars_off

SWITCHES = (transformers_logging.is_progress_bar_enabled, diffusers_logging.is_progress_bar_enabled,
            lambda: not hub.are_progress_bars_disabled())


def test_every_library_is_off_inside_and_as_before_after(monkeypatch):
    monkeypatch.delenv(HUB_VARIABLE, raising=False)
    assert [on() for on in SWITCHES] == [True, True, True]
    with library_bars_off():
        assert [on() for on in SWITCHES] == [False, False, False]
        # a process started meanwhile (a rank of a parallel run) starts with transformers' bars off
        child = subprocess.run([sys.executable, "-c", "import transformers.utils.logging as t; "
                                "print(t.is_progress_bar_enabled())"], capture_output=True, text=True, check=True)
        assert child.stdout.strip() == "False"
    assert [on() for on in SWITCHES] == [True, True, True] and HUB_VARIABLE not in os.environ


def test_bars_already_off_stay_off(monkeypatch):
    monkeypatch.setenv(HUB_VARIABLE, "0")
    transformers_logging.disable_progress_bar()  # (and huggingface_hub's)
    try:
        with library_bars_off():
            pass
        assert not transformers_logging.is_progress_bar_enabled() and hub.are_progress_bars_disabled()
        assert diffusers_logging.is_progress_bar_enabled() and os.environ[HUB_VARIABLE] == "0"
    finally:
        transformers_logging.enable_progress_bar()
