"""``diffc serve``: an OpenAI-compatible HTTP server for one image or video model."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from ..errors import DiffcError, InvalidArgumentError
from .lora_flags import add_lora_flags, lora_settings
from .options import (add_cache_flags, add_compiled_flag, add_model_flags, add_progress_flag, add_runtime_flags,
                      cache_flag_errors, cache_settings, progress_shown, resolve_model, runtime_options)
from . import parallel as par

SERVE_EXTRA = "pip install 'diffc[serve]'"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API", description=__doc__)
    add_model_flags(p, "serve")
    p.add_argument("--model-name", help="model id reported by /v1/models (default: the checkpoint folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=30000, help="port to bind (default 30000)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--data-parallel", type=_positive, default=1, metavar="D",
                   help="D copies of the model serving one queue behind one HTTP front, one per GPU from --device "
                        "(cuda:N..N+D-1); with --device cpu, D CPU copies; with --num-gpus N, D groups of N GPUs (N*D "
                        "ranks, group g on cuda:g*N..) (default 1)")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    add_runtime_flags(p)
    add_cache_flags(p)
    add_compiled_flag(p)
    p.add_argument("--api-key", default=os.environ.get("DIFFC_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every /v1 route (default: $DIFFC_API_KEY)")
    p.add_argument("--max-batch", type=_positive, default=4, help="samples run together in one batch (default 4)")
    p.add_argument("--max-queue", type=_positive, default=64, help="waiting requests before answering 429 (default 64)")
    p.add_argument("--max-pixels", type=_positive, default=2048 * 1024, help="largest width*height (default 2097152)")
    p.add_argument("--max-n", type=_positive, default=4, help="most images per request (default 4)")
    p.add_argument("--max-steps", type=_positive, default=100, help="most denoising steps per request (default 100)")
    p.add_argument("--max-frames", type=_positive, default=129, help="most video frames per request (default 129)")
    p.add_argument("--fps", type=_positive, default=16, help="frames per second of written videos (default 16)")
    p.add_argument("--keep-outputs", type=_positive, default=100,
                   help="finished outputs kept for download; older ones are deleted (default 100)")
    p.add_argument("--output-ttl", type=float, help="also delete outputs older than this many seconds")
    p.add_argument("--output-dir", help="where outputs are written (default: a private temporary directory); "
                                        "files are deleted by retention and at shutdown")
    p.add_argument("--max-body-bytes", type=_positive, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--shutdown-timeout", type=float, default=60.0,
                   help="seconds to let running jobs finish at shutdown before failing them (default 60)")
    p.add_argument("--max-prompt-chars", type=_positive, default=32000,
                   help="longest prompt or negative prompt, in characters (default 32000); longer ones get a 400")
    p.add_argument("--allowed-hosts", action="append", metavar="HOST[,HOST...]",
                   help="host names the Host header may name (repeatable; '*.example.com' for subdomains, '*' for "
                        "any). Default: on a loopback --host, only localhost, 127.0.0.1 and ::1, which keeps web "
                        "pages from reaching the server through DNS rebinding; elsewhere any")
    p.add_argument("--no-warmup", action="store_true",
                   help="report ready without a warm-up generation (on a CPU there is none anyway)")
    add_progress_flag(p, "loading weights, building the demo model; requests show none")
    add_lora_flags(p)
    par.add_parallel_flags(p)
    p.add_argument("--lora-dir", action="append", metavar="DIR",
                   help="directory POST /v1/set_lora may load LoRA files from (repeatable; default: none, so set_lora "
                        "only reuses adapters preloaded with --lora-path)")
    p.add_argument("--max-loras", type=_positive, default=32, help="LoRA adapters cached in host memory at most (default 32)")
    p.set_defaults(func=serve, _parser=p)


def _import_serving():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise DiffcError(f"diffc serve needs FastAPI, uvicorn, prometheus-client and python-multipart ({exc}); "
                         f"install them with: {SERVE_EXTRA}") from None
    return uvicorn


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated()


def _checking_cache(load, cache):
    """``load``, then refuse a ``--cache`` setting the loaded model cannot take (naming the flag)."""
    def checked():
        pipe = load()
        with cache_flag_errors():
            pipe.check_cache(cache)
        return pipe
    return checked


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, opened before the model loads so a port in use is a one-line error."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn picks it ("localhost": IPv4)
        infos = socket.getaddrinfo(host.strip("[]"), port, family=family, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InvalidArgumentError("--host", f"cannot resolve {host!r}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        field = "--port" if exc.errno in (errno.EADDRINUSE, errno.EACCES) else "--host"
        raise InvalidArgumentError(field, f"cannot listen on {_url_host(host)}:{port}: "
                                          f"{exc.strerror or exc}") from None
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class _RequestLines(logging.Handler):
    """Prints the engine's request log as ``diffc serve: ...`` lines on the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(f"diffc serve: {record.getMessage()}", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - a closed stderr must not fail a request
            self.handleError(record)


def _print_requests() -> None:
    """``diffc serve`` prints one line per finished request (the engine's request log), whatever -v says."""
    logger = logging.getLogger("diffc.serve.requests")
    if not any(isinstance(h, _RequestLines) for h in logger.handlers):
        logger.addHandler(_RequestLines())
    logger.setLevel(logging.INFO)
    logger.propagate = False  # printed once, in this form, not again by the root logger's handler


def _announce_ready(engine, server, url: str) -> None:
    """Print the ready line once the engine is ready and uvicorn listens (from a thread: the model loads while
    uvicorn already answers /health)."""
    def wait():
        if not engine.wait_ready():
            return
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.05)
        print(f"diffc serve: ready on {url} (model {engine.model_id})", file=sys.stderr, flush=True)

    threading.Thread(target=wait, name="diffc-ready", daemon=True).start()


def _preloading(load, lora: dict):
    """``load`` followed by merging the ``--lora-path`` adapters (they become the requests' default)."""
    def load_with_lora():
        pipe = load()
        for adapter in pipe.set_lora(**lora)["loaded_adapters"]:
            for w in adapter["warnings"]:
                print(f"warning: LoRA '{adapter['nickname']}': {w}", file=sys.stderr)
        return pipe

    return load_with_lora


def replica_devices(device, count: int) -> list:
    """The devices of ``count`` data-parallel replicas: consecutive GPUs from ``device``, or ``count`` CPU copies."""
    import torch

    if count == 1:
        return [device]
    if device.type != "cuda":
        return [device] * count
    first = device.index if device.index is not None else 0
    available = torch.cuda.device_count()
    if first + count > available:
        raise InvalidArgumentError("--data-parallel", f"{count} replicas need GPUs cuda:{first}..cuda:{first + count - 1}"
                                   f"; this machine has {available} (cuda:0..cuda:{available - 1})")
    return [torch.device("cuda", first + i) for i in range(count)]


def _once(fn):
    """``fn()`` computed once, whichever thread asks first; the others wait for it."""
    lock, result = threading.Lock(), []

    def call():
        with lock:
            if not result:
                result.append(fn())
            return result[0]

    return call


def _check_parallel(args: argparse.Namespace) -> None:
    """Flags that one engine over several GPUs cannot take yet."""
    if args.cache not in (None, "none"):
        raise InvalidArgumentError("--cache", "the step cache decides per rank, which --num-gpus cannot keep in "
                                   "step yet; serve multi-GPU without --cache")
    if args.offload not in (None, "none"):
        raise InvalidArgumentError("--offload", f"'{args.offload}' offload with --num-gpus is not supported yet: "
                                   "each rank holds the whole DiT; use --offload none")


MAX_SHUTDOWN_TIMEOUT_S = 7 * 24 * 3600  # a week; beyond threading's longest wait is an OverflowError at shutdown


def _check_flags(args: argparse.Namespace) -> None:
    """Flag values argparse's types let through, refused in one line before anything loads or binds."""
    from ..pipelines.video import MAX_FPS  # as diffc run --fps and a request's fps

    if not 0 <= args.port <= 65535:
        raise InvalidArgumentError("--port", f"must be from 0 to 65535, got {args.port}")
    if args.output_ttl is not None and not (math.isfinite(args.output_ttl) and args.output_ttl > 0):
        raise InvalidArgumentError("--output-ttl", f"must be a positive number of seconds, got {args.output_ttl}")
    if not (math.isfinite(args.shutdown_timeout) and 0 <= args.shutdown_timeout <= MAX_SHUTDOWN_TIMEOUT_S):
        raise InvalidArgumentError("--shutdown-timeout", f"must be a number of seconds from 0 to "
                                   f"{MAX_SHUTDOWN_TIMEOUT_S} (a week), got {args.shutdown_timeout}")
    if args.fps > MAX_FPS:
        raise InvalidArgumentError("--fps", f"must be from 1 to {MAX_FPS}, got {args.fps}")
    if args.output_dir is not None and not args.output_dir.strip():
        raise InvalidArgumentError("--output-dir", "is empty; give a directory, or leave it out for a private "
                                   "temporary one")
    if args.model_name is not None and not args.model_name.strip():
        raise InvalidArgumentError("--model-name", "is empty; give the id /v1/models reports, or leave it out for "
                                   "the checkpoint folder's name")
    key = args.api_key
    if key is not None and (not key.strip() or key != key.strip() or not key.isascii() or not key.isprintable()):
        what = "is empty" if not key.strip() else "holds spaces at its ends or characters an HTTP header cannot carry"
        raise InvalidArgumentError("--api-key", f"{what} (the flag, or $DIFFC_API_KEY without it); give a key of "
                                   "printable ASCII characters, or unset both to serve without a key")


def _check_output_dir(directory: Path, inputs: dict[str, Path | str | None]) -> None:
    """``--output-dir``: a writable directory, or one that can be created (the store creates it), outside the
    checkpoint and artifact the server reads. Nothing is created here."""
    from .outputs import check_outside, check_writable_dir

    check_outside(directory, "--output-dir", inputs)
    existing = directory
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if existing != directory and existing.is_dir():
        try:
            check_writable_dir(existing, "--output-dir")
        except InvalidArgumentError as exc:
            raise InvalidArgumentError("--output-dir", f"cannot create {directory}: {exc.message}") from None
        return
    if existing != directory:
        raise InvalidArgumentError("--output-dir", f"cannot create {directory}: {existing} is not a directory")
    check_writable_dir(directory, "--output-dir")


def serve(args: argparse.Namespace) -> int:
    import torch

    uvicorn = _import_serving()
    from ..loader.pipeline import load as load_pipeline

    from ..loader.pipeline import resolve_device, resolve_dtype

    _check_flags(args)
    progress_shown(args)
    layout = par.parallel_config(args)  # None: one process (--num-gpus 1 is plain serve)
    if layout is not None:
        _check_parallel(args)
    parent = not par.in_worker()  # the command the user started (it prints notices); not a spawned rank
    cache = cache_settings(args)  # for requests that do not set their own
    choice = resolve_model(args)
    if choice.notice and parent:
        print(choice.notice, file=sys.stderr)
    # requests that give no size or guidance get the compiled ones (Wan's guidance decides its CFG batch), or the
    # demo's (and so does the warm-up); the HTTP API has no text-length field, so every request keeps the compiled
    # text length
    defaults = {k: v for k, v in choice.defaults.items()
                if k in ("height", "width", "num_frames", "guidance_scale", "max_sequence_length")
                or (choice.demo and k == "num_inference_steps")}
    model_id = args.model_name or (f"diffc-demo-{choice.demo}" if choice.path is None else choice.path.resolve().name)
    device = resolve_device(choice.device)
    if layout is not None:
        kind = par.check_devices(layout, choice.device, args.data_parallel)
        device = torch.device(kind) if parent else par.rank_device(kind)
    devices = [device] if layout is not None else replica_devices(device, args.data_parallel)
    checkpoint = _once(choice.checkpoint)  # replicas load on their own threads; the demo is built once
    dtype = resolve_dtype(args.dtype, device)
    if parent:  # before the port is bound: the checkpoint's index, component folders and classes (no weights read)
        from ..loader.pipeline import check_checkpoint

        check_checkpoint(checkpoint())
        if args.compiled:  # every check that needs no loaded model (files, versions, GPU, dtype, model config)
            from ..runtime.artifacts import check_artifact

            check_artifact(args.compiled, source=checkpoint(), device=devices[0], dtype=dtype)
    if cache is not None:
        defaults["cache"] = cache
    if args.output_dir is not None:
        _check_output_dir(Path(args.output_dir).expanduser(), {"checkpoint": choice.path, "artifact": args.compiled})
    lora = lora_settings(args)
    for directory in args.lora_dir or ():
        if not directory.strip():  # Path("") is the current directory: an unset variable would allow it
            raise InvalidArgumentError("--lora-dir", "is empty; give the directory LoRA files may be loaded from")
        if not Path(directory).expanduser().is_dir():
            raise InvalidArgumentError("--lora-dir", f"not a directory: {directory}")

    fanout = mesh = None
    proxies = []  # rank 0 under --data-parallel: one stand-in per other group of ranks
    if layout is not None and not parent:
        from ..serve.groups import ProxyPipeline, connect
        from ..serve.parallel import ParallelPipeline

        net = connect(layout, device, args.data_parallel)
        mesh = net.mesh
        if net.role == "follower":
            return _follow(args, mesh, net.channel, checkpoint)
        if net.role == "leader":
            return _lead(args, net, checkpoint)
        fanout = ParallelPipeline(net.channel)

        def replica_0():  # a loaded local pipeline for the proxies' reads (the warm-up's spec)
            fanout.attached.wait(layout.timeout_s)
            return fanout

        proxies = [ProxyPipeline(link, g, layout, replica_0) for g, link in sorted(net.links.items())]

    def loader(dev):
        def load():
            pipe = load_pipeline(checkpoint(), device=dev, dtype=args.dtype, compiled=args.compiled,
                                 **runtime_options(args))
            if fanout is not None:
                pipe.executor.set_parallel(mesh)
                return fanout.attach(pipe)
            return pipe
        if cache is not None:
            load = _checking_cache(load, cache)
        return _preloading(load, lora) if lora is not None else load

    loads = [loader(dev) for dev in devices] + [p.attach for p in proxies]  # one per replica
    if not args.api_key and not _is_loopback(args.host) and parent:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    from ..serve.hardening import default_allowed_hosts, parse_allowed_hosts

    allowed_hosts = (parse_allowed_hosts(args.allowed_hosts) if args.allowed_hosts
                     else default_allowed_hosts(args.host))
    if allowed_hosts == []:
        raise InvalidArgumentError("--allowed-hosts", "names no host; give host names, or '*' for any")
    if layout is not None and parent:
        _listen(args.host, args.port).close()  # a port in use is reported before any worker starts
        checkpoint()  # the demo is built once, before the workers read it
        return par.launch_server(args._argv, layout, kind, args.data_parallel)
    sock = _listen(args.host, args.port)  # before anything loads: a port in use is reported at once
    try:
        return _serve(args, uvicorn, sock, loads, model_id, device, defaults, allowed_hosts, fanout, proxies)
    finally:
        sock.close()


def _follow(args, mesh, channel, checkpoint) -> int:
    """Ranks 1..N-1 of ``serve --num-gpus``: load the pipeline, report to rank 0, then perform its calls."""
    from ..loader.pipeline import load as load_pipeline
    from ..serve.parallel import follow, report_loaded

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches rank 0 too, which stops the workers
    try:
        pipe = load_pipeline(checkpoint(), device=mesh.device, dtype=args.dtype, compiled=args.compiled,
                             **runtime_options(args))
        pipe.executor.set_parallel(mesh)
    except Exception as exc:
        report_loaded(channel, exc)
        raise
    report_loaded(channel)
    return follow(pipe, channel)


def _lead(args, net, checkpoint) -> int:
    """The first rank of group g > 0 under ``--data-parallel``: load, lead the group's ranks as rank 0 leads
    group 0, and perform the calls rank 0 sends over the group's link."""
    from ..loader.pipeline import load as load_pipeline
    from ..serve.groups import lead, report_to_front
    from ..serve.parallel import ParallelPipeline, report_loaded

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches rank 0 too, which stops the groups
    link, attached = net.links[net.replica], False
    try:
        pipe = load_pipeline(checkpoint(), device=net.mesh.device, dtype=args.dtype, compiled=args.compiled,
                             **runtime_options(args))
        pipe.executor.set_parallel(net.mesh)
        attached = True  # from here attach() gathers the followers' reports itself
        fanout = ParallelPipeline(net.channel).attach(pipe)
    except Exception as exc:
        if not attached:
            report_loaded(net.channel, exc)
        report_to_front(link, exc)
        raise
    report_to_front(link)
    try:
        return lead(fanout, link)
    finally:
        fanout.close()


def _serve(args, uvicorn, sock: socket.socket, loads: list, model_id: str, device, defaults: dict,
           allowed_hosts: list[str] | None, fanout=None, proxies=()) -> int:
    """Build the engine and the app, and serve on the already bound ``sock`` until shutdown. ``fanout``: rank 0's
    :class:`~diffc.serve.parallel.ParallelPipeline` under ``--num-gpus`` (stopped, with the workers, at the end);
    ``proxies``: the other groups' :class:`~diffc.serve.groups.ProxyPipeline` under ``--data-parallel``."""
    from ..serve.groups import layout_text
    from ..serve.app import create_app
    from ..serve.engine import Engine, Limits

    url = f"http://{_url_host(args.host)}:{sock.getsockname()[1]}"
    server = None

    def on_fatal(exc: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    limits = Limits(max_batch=args.max_batch, max_queue=args.max_queue, max_pixels=args.max_pixels, max_n=args.max_n,
                    max_steps=args.max_steps, max_frames=args.max_frames, max_prompt_chars=args.max_prompt_chars)
    # A warm-up pays a GPU's first-call costs (kernels, CUDA graphs) before the first request; on a CPU there
    # are none worth a full-size generation (minutes for a real model), so the server is ready once loaded.
    warmup = None if args.no_warmup or device.type == "cpu" else {}
    engine = Engine(loads[0], model_id=model_id, limits=limits, defaults=defaults, warmup=warmup,
                    output_dir=args.output_dir, keep_outputs=args.keep_outputs, output_ttl_s=args.output_ttl,
                    fps=args.fps, on_fatal=on_fatal, replicas=loads[1:],
                    parallel=None if fanout is None else layout_text(fanout.config, len(loads)))
    for part in ([fanout] if fanout is not None else []) + list(proxies):
        part.on_broken = engine.fail
    app = create_app(engine, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                     shutdown_timeout_s=args.shutdown_timeout, lora_dirs=args.lora_dir or (), max_loras=args.max_loras,
                     allowed_hosts=allowed_hosts)
    config = uvicorn.Config(app, log_level="info" if args.verbose else "warning",
                            timeout_graceful_shutdown=max(1, int(args.shutdown_timeout)))
    server = uvicorn.Server(config)
    _print_requests()
    where = device if len(loads) == 1 else f"{len(loads)} replicas from {device}"
    if fanout is not None:
        where = f"{device.type}, {engine.parallel}"
    print(f"diffc serve: loading {model_id} on {where}; {url} (GET /health answers 200 once ready"
          f"{'' if warmup is None else ' and warmed up'})", file=sys.stderr, flush=True)
    _announce_ready(engine, server, url)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it; that second one ends the command with 0.
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        server.run(sockets=[sock])
    except _Terminated:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        for part in list(proxies) + ([fanout] if fanout is not None else []):
            part.close()
    if engine.load_error is not None:
        raise DiffcError(f"the model failed to load: {engine.load_error}")
    if engine.fault is not None:
        raise DiffcError(f"the server stopped after a failure: {engine.fault}")
    c = engine.counters
    print(f"diffc serve: shut down ({c.completed} completed, {c.failed} failed, {c.rejected} refused as the queue "
          "was full)", file=sys.stderr, flush=True)
    return 0
