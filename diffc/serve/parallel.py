"""``diffc serve --num-gpus N``: one engine whose every generation runs on all N ranks.

Rank 0 runs the HTTP server and the :class:`~diffc.serve.engine.Engine`; the Engine's pipeline is a
:class:`ParallelPipeline`, which looks like a pipeline to it. Each call that changes or uses the ranks'
state (a generation, a LoRA load / switch / merge / unmerge / restore) is broadcast as plain data over
a CPU (gloo) control group before rank 0 runs it; ranks 1..N-1 run :func:`follow`, which performs the
same call on their own pipeline in the same order, so the collectives inside ``generate`` line up.
After each call every rank answers with its status (a gather), so a follower that failed, died or hangs
is noticed there, not at the next request. Within a generation rank 0 broadcasts one flag per denoising
step (go on / stop), so a cancelled or aborted job stops on every rank at the same step.

One lock orders the calls of all of rank 0's threads (the engine's worker, LoRA file loads on request
threads, the heartbeat that keeps idle followers' waits under ``--parallel-timeout``). A failed
collective marks the pipeline broken for good: every later call raises the same :class:`ParallelError`
at once and ``on_broken`` tells the engine, which then answers 503 on ``/health``.

Under ``--data-parallel D`` there are D such groups; the first rank of each plays rank 0's part for its
group (see :mod:`.groups`), so ranks below are a group's global ranks, led by its first.
"""

from __future__ import annotations

import abc
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from ..errors import DiffcError
from ..parallel import ParallelConfig, ParallelError
from ..parallel.collectives import guarded

IMAGE = "__diffc_image__"  # marks a PIL image sent as an array
LORA_CALLS = ("load", "set", "merge", "unmerge", "restore")  # LoraManager methods that change a rank's weights
READS = ("spec", "resolve", "check_cache", "device", "dtype", "config", "components", "executor", "_lora")


class _Stopped(Exception):
    """Rank 0 stopped the generation at this step (a cancelled job, a shutdown)."""


def plain(value: Any, field: str) -> Any:
    """``value`` as data every rank can rebuild: None, numbers, strings, lists, tuples, str-keyed dicts, numpy
    arrays, and PIL images (as arrays). Anything else is refused, naming ``field``."""
    if value is None or isinstance(value, (bool, int, float, str, np.ndarray)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v, f"{field}[{i}]") for i, v in enumerate(value))
    if isinstance(value, dict):
        return {str(k): plain(v, f"{field}.{k}") for k, v in value.items()}
    from PIL import Image

    if isinstance(value, Image.Image):
        return {IMAGE: np.asarray(value), "mode": value.mode}
    raise TypeError(f"{field}: {type(value).__name__} values cannot be sent to the other ranks (plain data only)")


def rebuilt(value: Any) -> Any:
    """The inverse of :func:`plain`: PIL images back from their arrays."""
    if isinstance(value, dict):
        if IMAGE in value:
            from PIL import Image

            return Image.fromarray(value[IMAGE], mode=value["mode"])
        return {k: rebuilt(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(rebuilt(v) for v in value)
    return value


def status(error: BaseException | None) -> dict[str, Any]:
    """What a rank reports after a call: whether it succeeded, and whether a collective failed."""
    return {"ok": error is None, "parallel": isinstance(error, ParallelError),
            "error": None if error is None else f"{type(error).__name__}: {error}"}


def report_loaded(channel: "Channel", error: BaseException | None = None) -> list[dict] | None:
    """Every rank's load outcome, with its host and pid, gathered on rank 0 (see ``ParallelPipeline.attach``)."""
    return channel.statuses({**status(error), "host": socket.gethostname(), "pid": os.getpid()})


class Channel:
    """The control group of one engine's ranks (gloo, also beside NCCL) and the four messages sent over it.

    ``ranks``: the group's global ranks, its leader (rank 0's part above) first; by default every rank. Under
    ``--data-parallel`` each group of ``--num-gpus`` ranks has its own channel (see :mod:`.groups`)."""

    def __init__(self, config: ParallelConfig, group=None, ranks: list[int] | None = None):
        self.config = config
        self.ranks = list(range(config.world)) if ranks is None else list(ranks)
        self.leader = self.ranks[0]
        self.group = group if group is not None else dist.new_group(ranks, backend="gloo", timeout=config.timeout)
        self.rank = dist.get_rank()

    def send(self, op: dict) -> None:
        """The leader: broadcast one operation."""
        with guarded("sending the next operation to the workers"):
            dist.broadcast_object_list([op], src=self.leader, group=self.group)

    def receive(self) -> dict:
        """The other ranks: the next operation from the leader."""
        box = [None]
        with guarded(f"worker rank {self.rank} waiting for rank {self.leader}"):
            dist.broadcast_object_list(box, src=self.leader, group=self.group)
        return box[0]

    def flag(self, value: bool = False) -> bool:
        """The leader's ``value``, on every rank (the leader sends it, the others receive it)."""
        box = torch.tensor([int(value)], dtype=torch.int32)
        with guarded("the per-step stop flag"):
            dist.broadcast(box, src=self.leader, group=self.group)
        return bool(box.item())

    def statuses(self, own: dict) -> list[dict] | None:
        """Every rank's ``own`` report, on the leader (in rank order); None on the others."""
        out = [None] * self.config.world if self.rank == self.leader else None
        with guarded("collecting the workers' answers"):
            dist.gather_object(own, out, dst=self.leader, group=self.group)
        return out


def _exited(pid: int, wait_s: float = 1.0) -> bool:
    """Whether process ``pid`` (on this host) has exited, waiting up to ``wait_s`` for a dying one."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                gone = f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except FileNotFoundError:
            return True
        except OSError:  # no /proc: signal 0 says whether it exists
            try:
                os.kill(pid, 0)
                gone = False
            except ProcessLookupError:
                return True
        if gone or time.monotonic() >= deadline:
            return gone
        time.sleep(0.05)


class Leading(abc.ABC):
    """What rank 0's stand-ins for other ranks share (:class:`ParallelPipeline` for its group's followers,
    :class:`~.groups.ProxyPipeline` for another group's leader): one lock ordering the calls, a heartbeat while
    idle, and a broken state that is final (``error``, told once to ``on_broken``). Subclasses give ``_send``
    (one message to the other side) and ``_ping`` (a call that answers whether the other side is well)."""

    def __init__(self, config: ParallelConfig, on_broken: Callable[[ParallelError], None] | None = None):
        self.config, self.on_broken = config, on_broken
        self.error: ParallelError | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.heartbeat_s = min(10.0, config.timeout_s / 4)

    def close(self) -> None:
        """Tell the other side to stop; later calls fail. Waits at most the collective timeout for a call in
        flight; past that the launcher stops the workers."""
        self._closed.set()
        if not self._lock.acquire(timeout=self.config.timeout_s):
            return
        try:
            if self.error is None:
                self._send({"op": "stop"})
        except ParallelError:
            pass
        finally:
            self._lock.release()

    def _usable(self) -> None:
        """Under the lock, before a call: raise the error that broke it, or say it is shutting down."""
        if self.error is not None:
            raise self.error
        if self._closed.is_set():
            raise ParallelError("the multi-GPU engine is shutting down")

    def _broken(self, message: str) -> ParallelError:
        """Mark it broken for good with ``message``; tell ``on_broken``."""
        self.error = ParallelError(message)
        self._closed.set()
        if self.on_broken is not None:
            self.on_broken(self.error)
        return self.error

    def _beat(self) -> None:
        """While idle, a ping every ``heartbeat_s``: the other side's waits stay short and a dead rank is noticed."""
        while not self._closed.wait(self.heartbeat_s):
            try:
                self._ping()
            except DiffcError:  # it broke (a ParallelError), or the other group failed the ping
                return

    @abc.abstractmethod
    def _send(self, op: dict) -> None:
        """Send one message to the other side."""

    @abc.abstractmethod
    def _ping(self) -> None:
        """One call that answers whether the other side is well (raises a ParallelError if not)."""


class ParallelPipeline(Leading):
    """Rank 0's pipeline for the Engine: every state-changing call goes to the followers first (see the module
    docstring). Reads (``spec``, ``resolve``, ``check_cache``, ...) are the local pipeline's."""

    def __init__(self, channel: Channel, on_broken: Callable[[ParallelError], None] | None = None):
        super().__init__(channel.config, on_broken)
        self.channel = channel
        self._pipe = None
        self._workers: dict[int, tuple[str, int]] = {}  # rank -> (host, pid)
        self.attached = threading.Event()  # set once the ranks have loaded (reads work from then on)
        self._first = getattr(channel, "leader", 0)  # the global rank of this group's leader (this process)

    def attach(self, pipe) -> "ParallelPipeline":
        """Take rank 0's loaded ``pipe`` once every follower reports its own load; start the heartbeat."""
        answers = report_loaded(self.channel)
        failed = [f"worker rank {self._first + r}: {a['error']}" for r, a in enumerate(answers) if not a["ok"]]
        if failed:
            raise ParallelError("; ".join(failed))
        self._workers = {self._first + r: (a["host"], a["pid"]) for r, a in enumerate(answers) if r}
        self._pipe = pipe
        self.attached.set()
        threading.Thread(target=self._beat, name="diffc-parallel-heartbeat", daemon=True).start()
        return self

    @property
    def layout(self) -> str:
        return self.config.text()

    def __getattr__(self, name: str):
        if name in READS and self.__dict__.get("_pipe") is not None:
            return getattr(self._pipe, name)
        raise AttributeError(f"{type(self).__name__} has no '{name}' (it forwards only {', '.join(READS)})")

    # ---- the calls every rank makes ----------------------------------------------------------
    def generate(self, prompt, *, progress: bool = True, step_callback=None, decode_callback=None, **kwargs):
        """``Pipeline.generate`` on every rank; rank 0's output. The request is checked here first, so a bad
        one fails before any rank starts."""
        self._pipe.resolve(prompt=prompt, **{k: v for k, v in kwargs.items() if k not in ("cache", "cache_options")})
        self._pipe.check_cache(kwargs.get("cache"), kwargs.get("cache_options"))
        op = {"op": "generate", "kwargs": plain({"prompt": prompt, **kwargs}, "request")}

        def local():
            with guarded(f"rank {self._first}"):
                return self._pipe.generate(prompt, progress=progress, step_callback=self._leading(step_callback),
                                           decode_callback=decode_callback, **kwargs)

        return self._run(op, local, changes_state=False)

    @property
    def lora(self) -> "LoraFanout":
        return LoraFanout(self)

    def set_lora(self, nickname, path=None, strength=1.0, target="all") -> dict[str, Any]:
        return self.lora.set(nickname, path, strength, target)

    def merge_lora_weights(self, strength=None, target="all") -> dict[str, Any]:
        return self.lora.merge(strength, target)

    def unmerge_lora_weights(self, target="all") -> dict[str, Any]:
        return self.lora.unmerge(target)

    def list_loras(self) -> dict[str, Any]:
        return self._pipe.lora.describe()

    # ---- rank 0's side (``close`` stops the followers: they return from :func:`follow`) ---------------
    def _send(self, op: dict) -> None:
        self.channel.send(op)

    def _ping(self) -> None:
        self._run({"op": "ping"}, lambda: None)

    def _run(self, op: dict, local: Callable[[], Any], changes_state: bool = True):
        with self._lock:
            self._usable()
            try:
                self.channel.send(op)
            except ParallelError as exc:
                raise self._break(exc) from None
            try:
                result, error = local(), None
            except Exception as exc:  # noqa: BLE001 - compared with the followers' outcome below
                result, error = None, exc
            if isinstance(error, ParallelError):
                raise self._break(error) from None
            try:
                answers = self.channel.statuses(status(error))
            except ParallelError as exc:
                raise self._break(exc) from None
            for rank, answer in enumerate(answers[1:], self._first + 1):
                if answer["parallel"]:
                    raise self._break(ParallelError(f"worker rank {rank}: {answer['error']}"))
                if changes_state and answer["ok"] != (error is None):
                    theirs = "succeeded" if answer["ok"] else f"failed ({answer['error']})"
                    raise self._break(ParallelError(f"worker rank {rank} {theirs} where rank {self._first} "
                                                    f"{'did not' if error is None else 'failed'} on '{op['op']}': "
                                                    "the ranks' weights may differ"))
            if error is not None:
                raise error
            return result

    def _leading(self, callback):
        """Rank 0's step callback: run the engine's, then tell every rank whether to go on."""
        def step(done: int, total: int) -> None:
            error = None
            if callback is not None:
                try:
                    callback(done, total)
                except Exception as exc:  # noqa: BLE001 - raised after the followers know
                    error = exc
            self.channel.flag(error is not None)
            if error is not None:
                raise error
        return step

    def _break(self, exc: ParallelError) -> ParallelError:
        """Mark the ranks out of step for good, naming the workers that have exited; tell ``on_broken``."""
        here = socket.gethostname()
        gone = [f"worker rank {r} (pid {pid}) has exited" for r, (host, pid) in self._workers.items()
                if host == here and _exited(pid)]
        return self._broken("; ".join([*gone, str(exc)]) +
                            f" (--parallel-timeout {self.config.timeout_s:g} s); restart the server")


class LoraFanout:
    """``ParallelPipeline.lora``: the LoRA manager's changing calls go to every rank, reads are rank 0's."""

    def __init__(self, owner: ParallelPipeline):
        self._owner = owner

    def __getattr__(self, name: str):
        manager = self._owner._pipe.lora
        if name not in LORA_CALLS:
            return getattr(manager, name)

        def call(*args, **kwargs):
            op = {"op": "lora", "method": name, "args": plain(list(args), "lora"), "kwargs": plain(kwargs, "lora")}
            return self._owner._run(op, lambda: getattr(manager, name)(*args, **kwargs))

        return call


def follow(pipe, channel: Channel) -> int:
    """Ranks 1..N-1: perform rank 0's calls on ``pipe`` until it sends stop (0) or is gone (1)."""
    def step(done: int, total: int) -> None:
        if channel.flag():
            raise _Stopped()

    while True:
        try:
            op = channel.receive()
        except ParallelError as exc:
            print(f"diffc serve: worker rank {channel.rank} stops: {exc}", flush=True)
            return 1
        kind, error = op["op"], None
        if kind == "stop":
            return 0
        try:
            if kind == "generate":
                with guarded(f"worker rank {channel.rank}"):
                    pipe.generate(**rebuilt(op["kwargs"]), progress=False, step_callback=step)
            elif kind == "lora" and op["method"] in LORA_CALLS:
                getattr(pipe.lora, op["method"])(*rebuilt(op["args"]), **rebuilt(op["kwargs"]))
            elif kind != "ping":
                raise ParallelError(f"unknown operation {kind!r} from rank {getattr(channel, 'leader', 0)}")
        except Exception as exc:  # noqa: BLE001 - reported to rank 0, which decides
            error = exc
        try:
            channel.statuses(status(None if isinstance(error, _Stopped) else error))
        except ParallelError as exc:
            print(f"diffc serve: worker rank {channel.rank} stops: {exc}", flush=True)
            return 1
