"""``diffc serve --num-gpus N --data-parallel D``: D engines on disjoint groups of N ranks, one HTTP front.

The world is ``N * D`` ranks; group g is ranks ``g*N .. g*N+N-1`` with its own process groups (the mesh
built per group) and its own control :class:`~.parallel.Channel`, led by rank ``g*N`` as rank 0 leads a
plain ``--num-gpus`` server. Rank 0 runs HTTP and one Engine with D replicas: replica 0 is group 0's
:class:`~.parallel.ParallelPipeline`; replica g > 0 is a :class:`ProxyPipeline` that sends each call as
plain data over a :class:`Link` (a gloo pair of rank 0 and rank ``g*N``) to the leader of group g, which
runs :func:`lead`: it performs the call on its own ParallelPipeline (fanning out to its followers) and
answers with the result (images and frames as arrays, timings as numbers). During a generation the
leader sends each step's progress and waits for rank 0's go-on / stop, so cancellation and shutdown
reach every group at its next step. A failed link or a broken group marks its proxy broken for good;
the engine then fails as a whole (503 on /health, naming the replica and the rank).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
from typing import Any, Callable

import torch.distributed as dist

from ..errors import DiffcError, InvalidArgumentError
from ..parallel import Mesh, ParallelConfig, ParallelError, init_mesh
from ..parallel.collectives import guarded
from .parallel import LORA_CALLS, Channel, Leading, _exited, plain, rebuilt, status


class ReplicaError(DiffcError):
    """A call failed on another group's ranks (not a broken collective: that is a :class:`ParallelError`)."""


class _Stopped(Exception):
    """Rank 0 stopped this generation at a step (a cancelled job, a shutdown)."""


def layout_text(config: ParallelConfig, replicas: int) -> str:
    return config.text() if replicas == 1 else f"{replicas} groups of {config.text()}"


class Link:
    """Objects between rank 0 and the leader of one group, over their own two-rank gloo group."""

    def __init__(self, leader: int, group):
        self.leader, self.group = leader, group
        self.rank = dist.get_rank()
        self.peer = leader if self.rank == 0 else 0

    def send(self, message: dict) -> None:
        with guarded(f"sending to rank {self.peer}"):
            dist.broadcast_object_list([message], src=self.rank, group=self.group)

    def receive(self) -> dict:
        box = [None]
        with guarded(f"rank {self.rank} waiting for rank {self.peer}"):
            dist.broadcast_object_list(box, src=self.peer, group=self.group)
        return box[0]


@dataclasses.dataclass
class Network:
    """This rank's groups: its mesh, its group's control channel, and its links (rank 0: one per other group;
    a group's leader: the one to rank 0)."""

    mesh: Mesh
    channel: Channel
    links: dict[int, Link]

    @property
    def replica(self) -> int:
        return self.mesh.replica

    @property
    def role(self) -> str:
        """"front" (rank 0), "leader" (the first rank of another group) or "follower"."""
        if self.mesh.rank == 0:
            return "front"
        return "leader" if self.mesh.rank == self.channel.leader else "follower"


def connect(config: ParallelConfig, device, replicas: int) -> Network:
    """Build every group of the ``replicas`` x ``config`` layout (every rank creates every group, in one order)."""
    mesh = init_mesh(config, device, replicas)
    rank, n = mesh.rank, config.world
    channel, links = None, {}
    for g in range(replicas):
        ranks = list(range(g * n, (g + 1) * n))
        group = dist.new_group(ranks, backend="gloo", timeout=config.timeout)
        if rank in ranks:
            channel = Channel(config, group=group, ranks=ranks)
    for g in range(1, replicas):
        group = dist.new_group([0, g * n], backend="gloo", timeout=config.timeout)
        if rank in (0, g * n):
            links[g] = Link(g * n, group)
    return Network(mesh, channel, links)


def answer(error: BaseException | None, **extra) -> dict[str, Any]:
    """A leader's reply: :func:`~.parallel.status` plus what rebuilds a bad-request error on rank 0."""
    out = {**status(error), **extra}
    if isinstance(error, InvalidArgumentError):
        out["field"], out["message"] = error.field, str(error)[len(error.field) + 2:]
    return out


def output_data(out) -> dict[str, Any]:
    """A ``GenerationOutput`` as plain data (the inverse is :func:`output_from`)."""
    timings = {f.name: getattr(out.timings, f.name) for f in dataclasses.fields(out.timings)}
    try:
        timings = plain(timings, "timings")
    except TypeError:  # runtime counters that are not plain data stay on the leader
        timings = plain({**timings, "runtime": {}}, "timings")
    return {"images": plain(out.images, "images"), "videos": plain(out.videos, "videos"), "timings": timings,
            "seeds": plain(out.seeds, "seeds"), "warnings": list(out.warnings),
            "sample_warnings": plain(dict(out.sample_warnings or {}), "sample_warnings")}


def output_from(data: dict[str, Any]):
    from ..pipelines.base import GenerationOutput
    from ..runtime.perf import Timings

    return GenerationOutput(images=rebuilt(data["images"]), videos=data["videos"], timings=Timings(**data["timings"]),
                            seeds=data["seeds"], warnings=data["warnings"],
                            sample_warnings={int(k): v for k, v in data["sample_warnings"].items()})


class ProxyPipeline(Leading):
    """Rank 0's stand-in for the pipeline of group ``replica``, whose leader is at the other end of ``link``.

    ``reference()`` gives a local pipeline of the same model (replica 0's) for reads the engine makes
    (``spec`` for the warm-up); ``attach`` waits for the group's load report and is the replica's loader.
    ``close`` tells the leader to stop its group."""

    def __init__(self, link, replica: int, config: ParallelConfig, reference: Callable[[], Any],
                 on_broken: Callable[[ParallelError], None] | None = None):
        super().__init__(config, on_broken)
        self.link, self.replica, self.reference = link, replica, reference
        self._leader_pid: tuple[str, int] | None = None
        self._loaded: dict[str, str] = {}  # nickname -> the file the group's leader loaded it from

    @property
    def where(self) -> str:
        first = self.link.leader
        return f"replica {self.replica} (ranks {first}..{first + self.config.world - 1})"

    def attach(self) -> "ProxyPipeline":
        """Wait for the group's leader to report its group loaded; start the heartbeat."""
        try:
            report = self.link.receive()
        except ParallelError as exc:
            raise ParallelError(f"{self.where} did not report its load: {exc}") from None
        if not report["ok"]:
            raise ParallelError(f"{self.where}: {report['error']}")
        self._leader_pid = (report["host"], report["pid"])
        threading.Thread(target=self._beat, name=f"diffc-replica-{self.replica}-heartbeat", daemon=True).start()
        return self

    def __getattr__(self, name: str):
        if name in ("spec", "resolve", "check_cache", "device", "dtype", "config"):
            return getattr(self.reference(), name)
        raise AttributeError(f"{type(self).__name__} has no '{name}'")

    def generate(self, prompt, *, progress: bool = True, step_callback=None, decode_callback=None, **kwargs):
        """``generate`` on group ``replica``; the engine's callbacks run here at each step the leader reports."""
        op = {"op": "generate", "kwargs": plain({"prompt": prompt, **kwargs}, "request")}
        callbacks = {"step": step_callback, "decode": decode_callback}
        raised: list[BaseException] = []

        def progress_of(message: dict) -> None:
            callback = callbacks.get(message["phase"])
            if not raised and callback is not None:
                try:
                    callback(message["done"], message["total"])
                except Exception as exc:  # noqa: BLE001 - raised once the group has stopped
                    raised.append(exc)
            self.link.send({"stop": bool(raised)})

        reply = self._call(op, progress_of, check=False)
        if raised and not reply["parallel"]:
            raise raised[0]  # the group stopped at this step: the engine's own reason (cancelled, aborted)
        return output_from(self._check(reply)["result"])

    @property
    def lora(self) -> "_LoraForward":
        return _LoraForward(self)

    @property
    def _lora(self):
        """What :func:`~diffc.lora.apply_snapshot` asks: None while the group's leader has loaded no adapter (a
        batch without adapters then has nothing to undo), else the adapters it loaded (:meth:`provide`)."""
        return self._loaded or None

    def provide(self, snapshot) -> None:
        """Have the group's leader load the adapters ``snapshot`` (a LoRA state the engine restores before a
        batch) names, each once per file: the HTTP routes and ``--lora-path`` load them into replica 0's
        cache, which says where each nickname's file is (a path the routes already checked)."""
        names = {name for _, state in snapshot or () for name, _ in state if name}
        if not names:
            return
        adapters = self.reference().lora.adapters
        for name in sorted(names):
            adapter = adapters.get(name)
            if adapter is None:
                continue  # the leader's restore names the missing adapter
            path = str(adapter.path)
            if self._loaded.get(name) != path:
                self._call({"op": "lora", "method": "load", "args": [name, path], "kwargs": {}})
                self._loaded[name] = path

    def _send(self, op: dict) -> None:
        self.link.send(op)

    def _ping(self) -> None:
        self._call({"op": "ping"})

    def _call(self, op: dict, on_progress: Callable[[dict], None] | None = None, check: bool = True) -> dict:
        with self._lock:
            self._usable()
            try:
                self.link.send(op)
                reply = self.link.receive()
                while "phase" in reply:
                    on_progress(reply)
                    reply = self.link.receive()
            except ParallelError as exc:
                raise self._break(exc) from None
        return self._check(reply) if check else reply

    def _check(self, reply: dict) -> dict:
        """``reply`` if the call succeeded; else its error, rebuilt (a broken group breaks this proxy)."""
        if reply["ok"]:
            return reply
        if reply["parallel"]:
            raise self._break(ParallelError(reply["error"].removeprefix(f"{ParallelError.__name__}: ")))
        if reply.get("field") is not None:
            raise InvalidArgumentError(reply["field"], reply["message"])
        raise ReplicaError(f"{self.where}: {reply['error']}")

    def _break(self, exc: ParallelError) -> ParallelError:
        gone = ""
        if self._leader_pid is not None and self._leader_pid[0] == socket.gethostname() and _exited(self._leader_pid[1]):
            gone = f"rank {self.link.leader} (pid {self._leader_pid[1]}) has exited; "
        text = str(exc)
        if "restart the server" not in text:
            text += f" (--parallel-timeout {self.config.timeout_s:g} s); restart the server"
        return self._broken(f"{self.where}: {gone}{text}")


class _LoraForward:
    """``ProxyPipeline.lora``: the LoRA manager's changing calls, performed by the group's leader."""

    def __init__(self, owner: ProxyPipeline):
        self._owner = owner

    def __getattr__(self, name: str):
        if name not in LORA_CALLS:
            raise AttributeError(f"the LoRA manager of {self._owner.where} answers only {', '.join(LORA_CALLS)}")

        def call(*args, **kwargs):
            if name == "restore":
                self._owner.provide(args[0] if args else kwargs.get("snapshot"))
            op = {"op": "lora", "method": name, "args": plain(list(args), "lora"), "kwargs": plain(kwargs, "lora")}
            return rebuilt(self._owner._call(op)["result"])

        return call


def report_to_front(link, error: BaseException | None = None) -> None:
    """A group's leader: tell rank 0 whether the group loaded (:meth:`ProxyPipeline.attach` waits for it)."""
    link.send(answer(error, host=socket.gethostname(), pid=os.getpid()))


def lead(pipe, link) -> int:
    """A group's leader: perform rank 0's calls on ``pipe`` (its ParallelPipeline) until stop (0) or a lost
    link (1)."""
    def relay(phase: str):
        def callback(done: int, total: int) -> None:
            link.send({"phase": phase, "done": done, "total": total})
            if link.receive()["stop"]:
                raise _Stopped()
        return callback

    while True:
        try:
            op = link.receive()
        except ParallelError as exc:
            print(f"diffc serve: rank {link.leader} (group leader) stops: {exc}", file=sys.stderr, flush=True)
            return 1
        kind, result, error = op["op"], None, None
        if kind == "stop":
            return 0
        try:
            if kind == "generate":
                out = pipe.generate(**rebuilt(op["kwargs"]), progress=False, step_callback=relay("step"),
                                    decode_callback=relay("decode"))
                result = output_data(out)
            elif kind == "lora" and op["method"] in LORA_CALLS:
                result = getattr(pipe.lora, op["method"])(*rebuilt(op["args"]), **rebuilt(op["kwargs"]))
                result = plain(result.describe() if hasattr(result, "describe") else result, "lora")  # an Adapter
            elif kind == "ping":  # a group broken while idle (its heartbeat found a dead rank) answers broken
                if getattr(pipe, "error", None) is not None:
                    raise pipe.error
            else:
                raise ParallelError(f"unknown operation {kind!r} from rank 0")
        except Exception as exc:  # noqa: BLE001 - reported to rank 0, which decides
            error = exc
        try:
            link.send({**answer(error), "result": result})
        except ParallelError as exc:
            print(f"diffc serve: rank {link.leader} (group leader) stops: {exc}", file=sys.stderr, flush=True)
            return 1
