"""Stage timings, per-step times and progress for one diffusers ``__call__``.

The call runs as one piece; :func:`instrument` marks its phases from the outside, where every
diffusers pipeline has the same seams:

- ``encode_prompt``: the pipeline's ``encode_prompt`` method (or, lacking one, its text encoders' forwards);
- ``denoise``: inside ``self.progress_bar(...)``, which diffusers pipelines open around the denoising
  loop; each ``update()`` (or item of an iterated bar) ends one step;
- ``decode``: ``vae.decode``;
- ``prepare``: what runs before denoising outside the encoders (latents, timesteps); ``postprocess``:
  what runs after it outside the VAE (unpacking, conversion to images).

The phases partition the call, so the stage times add up to its wall time.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

from tqdm.auto import tqdm

from ..stages import RunContext

ORDER = ("encode_prompt", "prepare", "denoise", "decode", "postprocess")


class PhaseClock:
    """The running phase of the call; entering a nested phase remembers the one to return to."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.stack: list[str] = []

    def enter(self, name: str) -> None:
        self.stack.append(name)
        self.ctx.perf.begin(name)

    def leave(self, then: str | None = None) -> None:
        """Close the running phase; go back to the enclosing one, or on to ``then``."""
        if self.stack:
            self.stack.pop()
        if then is not None:
            self.stack.append(then)
        if self.stack:
            self.ctx.perf.begin(self.stack[-1])
        else:
            self.ctx.perf.end()

    def around(self, name: str, fn):
        """``fn`` wrapped so that its calls run in phase ``name`` (re-entrant calls stay in it)."""

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            if self.stack and self.stack[-1] == name:
                return fn(*args, **kwargs)
            self.enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.leave()

        return wrapped


class StepBar:
    """Stands in for the tqdm bar a diffusers pipeline opens around its denoising loop: shows diffc's
    progress, times each step and reports it to ``ctx.step_callback``."""

    def __init__(self, clock: PhaseClock, iterable=None, total: int | None = None):
        self.clock, self.iterable = clock, iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.done = 0
        self.bar = None
        self.stepping = False  # a step's timer is running

    def _begin(self) -> None:
        if not self.stepping and (self.total is None or self.done < self.total):
            self.clock.ctx.perf.step_begin()
            for hook in self.clock.ctx.step_hooks:  # the step cache: a denoising step starts
                hook(self.done)
            self.stepping = True

    def _end(self) -> None:
        if self.stepping:
            self.clock.ctx.perf.step_end()
            self.stepping = False

    def __enter__(self) -> "StepBar":
        self.clock.leave(then="denoise")
        ctx = self.clock.ctx
        self.bar = tqdm(total=self.total, desc="denoising", unit="step", disable=not ctx.progress, leave=False)
        self._begin()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        self._end()  # the step under way when the loop ended early (a break, an error)
        self.clock.leave(then="postprocess")

    def update(self, n: int = 1) -> None:
        ctx = self.clock.ctx
        for _ in range(n):
            self._end()
            self.done += 1
            self.bar.update(1)
            if ctx.step_callback is not None:
                ctx.step_callback(self.done, max(self.total or 0, self.done))
            self._begin()

    def __iter__(self) -> Iterator[Any]:
        with self:
            for item in self.iterable:
                yield item
                self.update(1)

    def __len__(self) -> int:
        return self.total or 0

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


_ABSENT = object()


@contextlib.contextmanager
def instrument(pipe, ctx: RunContext) -> Iterator[PhaseClock]:
    """Install the phase seams on ``pipe`` for one call (removed afterwards, whatever happens)."""
    clock = PhaseClock(ctx)
    patched: list[tuple[Any, str, Any]] = []
    hooks = []

    def patch(owner, name: str, value) -> None:
        # an instance attribute already there (offload's upload-on-decode wrapper) comes back afterwards
        patched.append((owner, name, owner.__dict__.get(name, _ABSENT)))
        owner.__dict__[name] = value

    patch(pipe, "progress_bar", lambda iterable=None, total=None: StepBar(clock, iterable, total))
    vae = getattr(pipe, "vae", None)
    if vae is not None and callable(getattr(vae, "decode", None)):
        patch(vae, "decode", clock.around("decode", vae.decode))
    if callable(getattr(pipe, "encode_prompt", None)):
        patch(pipe, "encode_prompt", clock.around("encode_prompt", pipe.encode_prompt))
    else:
        for name, module in pipe.components.items():
            if name.startswith("text_encoder") and hasattr(module, "register_forward_pre_hook"):
                hooks.append(module.register_forward_pre_hook(lambda *_: clock.enter("encode_prompt")))
                hooks.append(module.register_forward_hook(lambda *_: clock.leave()))
    clock.enter("prepare")
    try:
        yield clock
    finally:
        ctx.perf.end()
        for owner, name, before in reversed(patched):
            if before is _ABSENT:
                del owner.__dict__[name]
            else:
                owner.__dict__[name] = before
        for hook in hooks:
            hook.remove()
        stages = ctx.perf.timings.stages
        ordered = {k: stages.pop(k) for k in ORDER if k in stages}
        ordered.update(stages)
        stages.clear()
        stages.update(ordered)
