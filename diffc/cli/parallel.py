"""Multi-GPU launching for ``diffc run`` / ``diffc serve``: ``--num-gpus N`` spawns N workers itself.

The parent validates the layout, builds what every rank reads (the demo checkpoint), fixes the seed,
then starts N processes with ``torch.multiprocessing`` (spawn), each running the same command as one
rank (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` set, as ``torchrun`` sets them: ``torchrun
--nproc-per-node N -m diffc run ...`` takes the same path inside each process). Rank 0 alone writes
outputs and prints progress. If a worker dies, the others are stopped and the command fails naming
it; a diffc error the ranks find themselves (a request the loaded model refuses) is printed once, by the
parent; a collective that waits longer than ``--parallel-timeout`` seconds fails the same way. ``diffc serve``
is the exception (:func:`launch_server`): rank 0, the server, outlives a dead worker to report it.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any, Callable

from ..errors import InvalidArgumentError
from ..parallel import ParallelConfig, resolve

if TYPE_CHECKING:  # torch loads when a command runs, not for --help
    import torch

WORKER_ENV = "DIFFC_PARALLEL_WORKER"
# Set by :func:`spawn` for its ranks: a folder where a rank that fails with a diffc error writes the message instead of
# printing it (N ranks finding the same bad request would print it N times); the parent prints it once
RANK_ERRORS_ENV = "DIFFC_RANK_ERRORS"
# How long the other ranks may take to end by themselves once one has failed (they often fail the same way at the
# same moment) before they are stopped
RANK_GRACE_S = 5.0


def add_parallel_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-gpus", type=int, help="spread each request over N GPUs (N processes; with --device cpu, "
                                               "N CPU processes on gloo); N = cfg x ulysses x ring")
    p.add_argument("--enable-cfg-parallel", action="store_const", const=True,
                   help="split the conditional / unconditional batch over two GPU groups")
    p.add_argument("--ulysses-degree", type=int, help="Ulysses sequence parallelism (all-to-all over heads)")
    p.add_argument("--ring-degree", type=int, help="ring attention degree (key/value blocks passed around a ring)")
    p.add_argument("--parallel-timeout", type=float, help="seconds a collective may wait for a peer before the run "
                                                         "fails (default 600)")


def in_worker() -> bool:
    """Whether this process is one rank of a parallel run (spawned by diffc or by torchrun)."""
    return os.environ.get(WORKER_ENV) == "1" or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                  and "LOCAL_RANK" in os.environ)


def _env_int(name: str, low: int, high: int | None, default: str | None = None) -> int:
    """A launcher's variable (torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) as an integer in range."""
    text = os.environ.get(name, default)
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = None
    if value is None or value < low or (high is not None and value > high):
        accepted = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise InvalidArgumentError(name, f"must be an integer {accepted} (the launcher sets it), got {text!r}")
    return value


def torchrun_env() -> tuple[int, int, int]:
    """``(RANK, WORLD_SIZE, LOCAL_RANK)`` as a launcher set them, checked once: 0 <= RANK < WORLD_SIZE."""
    world = _env_int("WORLD_SIZE", 1, None)
    return _env_int("RANK", 0, world - 1), world, _env_int("LOCAL_RANK", 0, world - 1)


def parallel_config(args: argparse.Namespace) -> ParallelConfig | None:
    """The layout the flags ask for (None: one process). Under torchrun the world size is torchrun's."""
    world = getattr(args, "num_gpus", None)
    env_world = torchrun_env()[1] if in_worker() else None
    if world is None and env_world is not None and env_world > 1:
        world = env_world
    given = [f for f in ("enable_cfg_parallel", "ulysses_degree", "ring_degree", "parallel_timeout")
             if getattr(args, f, None) is not None]
    if world is None:
        if given:
            raise InvalidArgumentError("--" + given[0].replace("_", "-"), "needs --num-gpus N (or torchrun)")
        return None
    groups = getattr(args, "data_parallel", 1) or 1  # serve --data-parallel D: D groups of N ranks
    if env_world is not None and env_world != world * groups:
        raise InvalidArgumentError("--num-gpus", f"{world} given{f' x {groups} groups' if groups > 1 else ''}, but "
                                   f"{env_world} processes were started")
    config = resolve(world, bool(getattr(args, "enable_cfg_parallel", None)), getattr(args, "ulysses_degree", None),
                     getattr(args, "ring_degree", None), getattr(args, "parallel_timeout", None))
    return None if config.world == 1 else config


def check_devices(config: ParallelConfig, device: str | None, groups: int = 1) -> str:
    """"cuda" or "cpu" for the workers; N GPUs (N x ``groups`` under serve --data-parallel) must exist for a
    CUDA run."""
    import torch

    try:
        kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, TypeError):
        raise InvalidArgumentError("--device", f"'{device}' is not a device; with --num-gpus use 'cuda' or 'cpu'") \
            from None
    if device and torch.device(device).index is not None:
        raise InvalidArgumentError("--device", f"with --num-gpus give 'cuda' or 'cpu', not one device ({device}); "
                                   "rank r runs on cuda:r")
    if kind == "cuda" and torch.cuda.device_count() < config.world * groups:
        asked = (f"{config.world} GPUs asked for" if groups == 1 else
                 f"{config.world} x --data-parallel {groups} = {config.world * groups} GPUs needed")
        raise InvalidArgumentError("--num-gpus", f"{asked}, {torch.cuda.device_count()} visible (use --device cpu "
                                   "for CPU processes)")
    if kind not in ("cuda", "cpu"):
        raise InvalidArgumentError("--device", f"multi-GPU runs on cuda (NCCL) or cpu (gloo), not {kind}")
    limit = max(8, 2 * (os.cpu_count() or 1))  # each rank a process holding the whole model: a typo starts them all
    if kind == "cpu" and config.world * groups > limit:
        raise InvalidArgumentError("--num-gpus", f"{config.world * groups} CPU processes asked for; at most {limit} "
                                   f"on this machine ({os.cpu_count()} cores)")
    return kind


def rank_device(kind: str) -> torch.device:
    import torch

    if kind == "cuda":
        local = torchrun_env()[2] if in_worker() else 0
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, fn_args: tuple, world: int, port: int, env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       WORKER_ENV: "1"})
    try:  # tqdm's default lock is a multiprocessing semaphore, which the os._exit below would leave registered
        import threading  # (the resource tracker then warns of "leaked semaphore objects"); a rank needs none

        import tqdm

        tqdm.tqdm.set_lock(threading.RLock())
    except ImportError:
        pass
    if env.get("DIFFC_CPU_THREADS"):
        import torch

        torch.set_num_threads(int(env["DIFFC_CPU_THREADS"]))
    rc = fn(*fn_args)
    # A clean exit leaves without the interpreter's teardown: gloo's process groups, torn down by their C++
    # destructors then (or by destroy_process_group while the other ranks leave too), could abort the process
    # ("terminate called without an active exception", signal 6) after everything had finished. What the rank
    # wrote is flushed first; the OS closes its sockets. An exception still goes to torch's spawn wrapper.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc or 0)


def start(fn: Callable, fn_args: tuple, world: int, env: dict[str, str] | None = None):
    """Start ``fn(*fn_args)`` in ``world`` spawned ranks; their ``torch.multiprocessing`` context."""
    import torch.multiprocessing as mp

    env = {**(env or {}), "PYTHONUNBUFFERED": "1"}
    return mp.start_processes(_entry, args=(fn, fn_args, world, free_port(), env), nprocs=world, join=False,
                              start_method="spawn")


def spawned_rank() -> bool:
    """Whether this process is a rank started by :func:`spawn` (whose parent reports for it)."""
    return bool(os.environ.get(RANK_ERRORS_ENV)) and in_worker()


def report_rank_error(message: str) -> bool:
    """In a rank started by :func:`spawn`: leave ``message`` (a diffc error's text) for the parent to print, and
    True; elsewhere False (the caller prints it)."""
    folder = os.environ.get(RANK_ERRORS_ENV)
    if not spawned_rank():
        return False
    try:
        rank = torchrun_env()[0]
        with open(os.path.join(folder, f"{rank}.txt"), "w", encoding="utf-8") as f:
            f.write(message)
    except (OSError, InvalidArgumentError):
        return False
    return True


def _rank_errors(folder: str) -> dict[int, str]:
    """The messages the ranks left in ``folder`` (:func:`report_rank_error`), by rank."""
    found = {}
    for name in os.listdir(folder):
        stem = name.removesuffix(".txt")
        if stem.isdigit():
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                found[int(stem)] = f.read().strip()
    return dict(sorted(found.items()))


def _first_failure(processes) -> int | None:
    """Wait until every rank has ended (None) or one has failed: its index."""
    import multiprocessing.connection

    while True:
        failed = _root_cause(processes)
        if failed is not None:
            return failed
        running = [p for p in processes if p.exitcode is None]
        if not running:
            return None
        multiprocessing.connection.wait([p.sentinel for p in running], timeout=1.0)


def _root_cause(processes) -> int | None:
    """Of the ranks that have failed, the one that most likely failed first: one that died by itself (an exit code
    other than 1, or a signal other than the SIGTERM / SIGKILL that stop the others) before one that raised, as
    torch's spawn exits 1 after an exception and a rank whose peer died raises ("Connection reset by peer"); None
    while none has failed."""
    failed = [i for i, p in enumerate(processes) if p.exitcode]
    died = [i for i in failed if processes[i].exitcode not in (1, -signal.SIGTERM, -signal.SIGKILL)]
    return (died or failed or [None])[0]


def _let_the_others_end(processes, grace_s: float) -> None:
    """Give the ranks still running ``grace_s`` to end by themselves (a bad request fails every rank at once and each
    reports it) before torch's join stops them."""
    import time

    deadline = time.monotonic() + grace_s
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))


def _stop(processes) -> None:
    """End the ranks still running: SIGTERM (a rank's default action: it ends even inside a collective), then
    SIGKILL for one still there after ``RANK_GRACE_S``."""
    import time

    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + RANK_GRACE_S
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def spawn(fn: Callable, fn_args: tuple, world: int, env: dict[str, str] | None = None) -> None:
    """Run ``fn(*fn_args)`` in ``world`` spawned ranks and wait; a rank that raises or exits non-zero stops
    the others and raises :class:`ParallelError`: the diffc error the ranks reported (once, however many ranks
    found it), else one naming the rank."""
    import logging
    import shutil
    import tempfile

    import torch.multiprocessing as mp

    from ..parallel import ParallelError

    folder = tempfile.mkdtemp(prefix="diffc-rank-errors-")
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")  # its "Terminating process ..." warning: ours says it
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)
    ctx = None
    try:
        ctx = start(fn, fn_args, world, {**(env or {}), RANK_ERRORS_ENV: folder})
        first = _first_failure(ctx.processes)
        if first is not None and os.path.exists(os.path.join(folder, f"{first}.txt")):
            _let_the_others_end(ctx.processes, RANK_GRACE_S)  # a diffc error: the others may report theirs
        while not ctx.join():  # a rank that died otherwise is named at once (before the others fail through it)
            pass
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as exc:
        reported = _rank_errors(folder)
        if reported:
            messages = list(dict.fromkeys(reported.values()))
            if len(messages) == 1:
                raise ParallelError(messages[0]) from None
            raise ParallelError("; ".join(f"rank {rank}: {m}" for rank, m in reported.items())) from None
        root = _root_cause(ctx.processes)
        code = None if root is None else ctx.processes[root].exitcode
        if root != exc.error_index and code not in (None, 1, -signal.SIGTERM, -signal.SIGKILL):
            # it died by itself first; the rank torch names failed through it
            signal_note = " (killed by a signal)" if code < 0 else ""
            raise ParallelError(f"worker rank {root} exited with code {code}{signal_note}; the other workers were "
                                "stopped") from None
        if isinstance(exc, mp.ProcessExitedException):
            raise ParallelError(f"worker rank {exc.error_index} exited with code {exc.exit_code}"
                                f"{' (killed by a signal)' if exc.signal_name else ''}; the other workers were "
                                "stopped") from None
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ParallelError(f"worker rank {exc.error_index} failed: {last}; the other workers were stopped") from None
    except BaseException:
        # Ctrl-C or SIGTERM of this process: the ranks stop now (multiprocessing would wait for them at exit, and
        # rank 0 would still write its output after 'terminated')
        if ctx is not None:
            _stop(ctx.processes)
        raise
    finally:
        spawn_log.setLevel(level)
        shutil.rmtree(folder, ignore_errors=True)  # ours: made above


def _run_main(argv: list[str]) -> int:
    from .main import main

    return main(argv)


def _worker_env(device_kind: str) -> dict[str, str]:
    if device_kind == "cpu":  # N processes on the same cores: one thread each unless told otherwise
        return {"DIFFC_CPU_THREADS": os.environ.get("DIFFC_CPU_THREADS", "1")}
    return {}


def launch_command(argv: list[str], config: ParallelConfig, device_kind: str) -> int:
    """The parent of ``diffc <command> --num-gpus N``: spawn N ranks running ``argv`` and wait."""
    print(f"diffc: starting {config.text()} on {device_kind}", file=sys.stderr)
    spawn(_run_main, (argv,), config.world, _worker_env(device_kind))
    return 0


STOP_GRACE_S = 30.0  # how long the parent of a server waits for workers to leave once rank 0 has exited


def launch_server(argv: list[str], config: ParallelConfig, device_kind: str, groups: int = 1) -> int:
    """The parent of ``diffc serve --num-gpus N``: spawn N ranks (N x ``groups`` under --data-parallel) running
    ``argv``; rank 0 is the server.

    Unlike a run, a worker that dies does not take rank 0 down: rank 0 fails the request that needed it and
    reports it on /health until it is stopped. SIGINT and SIGTERM are passed to rank 0, which stops the
    others. Returns rank 0's exit status once every rank has exited (stragglers are killed after
    ``STOP_GRACE_S``)."""
    import signal
    import time

    layout = config.text() if groups == 1 else f"{groups} groups of {config.text()}"
    print(f"diffc: starting {layout} on {device_kind}", file=sys.stderr, flush=True)
    ctx = start(_run_main, (argv,), config.world * groups, _worker_env(device_kind))
    server, workers = ctx.processes[0], ctx.processes[1:]

    def forward(signum, frame):
        if server.is_alive():
            os.kill(server.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    reported: set[int] = set()
    try:
        while server.is_alive():
            server.join(0.2)
            for rank, proc in enumerate(workers, 1):
                if rank not in reported and proc.exitcode not in (None, 0):
                    reported.add(rank)
                    print(f"diffc serve: worker rank {rank} exited with code {proc.exitcode}", file=sys.stderr,
                          flush=True)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in workers:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in workers:
            if proc.is_alive():
                proc.kill()
                proc.join()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    code = server.exitcode
    if code is not None and code < 0:
        from ..parallel import ParallelError

        raise ParallelError(f"rank 0 (the HTTP server) was killed by signal {-code}; the workers were stopped")
    return code or 0


def with_seed(argv: list[str], seed: int | None) -> list[str]:
    """``argv`` with a fixed ``--seed`` so that every rank draws the same noise."""
    if seed is not None:
        return argv
    return [*argv, "--seed", str(random.randrange(2**31))]


def shared_seed() -> int:
    """A random seed drawn on rank 0 and broadcast to every rank (the process group is up)."""
    import torch.distributed as dist

    box = [random.randrange(2**31)]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def rank() -> int:
    return torchrun_env()[0] if in_worker() else 0


def is_main() -> bool:
    return rank() == 0


def describe_env() -> dict[str, Any]:
    return {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
