"""The phase clock and step bar of the generic backend, driven the ways diffusers pipelines drive tqdm."""

from __future__ import annotations

import torch

from diffc.pipelines.generic.timing import instrument
from diffc.pipelines.stages import RunContext
from diffc.runtime.perf import PerfRecorder


class FakePipe:
    """Encodes, opens a progress bar (``total`` or iterable form), decodes; counts its own calls."""

    def __init__(self, steps: int, updates: int, iterate: bool):
        self.steps, self.updates, self.iterate = steps, updates, iterate
        self.components = {}

    def encode_prompt(self):
        return "embeds"

    def progress_bar(self, iterable=None, total=None):
        raise AssertionError("replaced by diffc's bar during the call")

    def __call__(self):
        self.encode_prompt()
        if self.iterate:
            for _ in self.progress_bar(range(self.steps)):
                pass
        else:
            with self.progress_bar(total=self.steps) as bar:
                for _ in range(self.updates):
                    bar.update()


def _run(pipe) -> tuple[PerfRecorder, list]:
    calls = []
    ctx = RunContext({}, torch.device("cpu"), torch.float32, PerfRecorder(torch.device("cpu")), progress=False,
                     step_callback=lambda done, total: calls.append((done, total)))
    with instrument(pipe, ctx):
        pipe()
    ctx.perf.finish()
    return ctx.perf, calls


def test_total_form_counts_each_update():
    perf, calls = _run(FakePipe(3, 3, iterate=False))
    assert list(perf.timings.stages) == ["encode_prompt", "prepare", "denoise", "postprocess"]
    assert len(perf.timings.step_ms) == 3 and calls == [(1, 3), (2, 3), (3, 3)]


def test_iterable_form_and_extra_updates_never_double_count():
    perf, calls = _run(FakePipe(2, 0, iterate=True))
    assert len(perf.timings.step_ms) == 2 and calls == [(1, 2), (2, 2)]
    perf, calls = _run(FakePipe(2, 4, iterate=False))  # a pipeline updating past its total
    assert len(perf.timings.step_ms) == 2 and [d for d, _ in calls] == [1, 2, 3, 4]


def test_the_pipeline_is_left_as_it_was():
    pipe = FakePipe(1, 1, iterate=False)
    _run(pipe)
    assert "progress_bar" not in vars(pipe) and "encode_prompt" not in vars(pipe)
