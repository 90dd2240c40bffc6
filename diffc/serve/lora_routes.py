"""LoRA over HTTP: ``POST /v1/set_lora``, ``/v1/merge_lora_weights``, ``/v1/unmerge_lora_weights``, ``GET /v1/list_loras``.

Files are read and converted on a request thread; merging runs on the engine's worker between two
batches (``Engine.call``), so a switch never lands in the middle of a generation. ``lora_path`` must
resolve (symlinks and ``..`` followed) inside one of the operator's ``--lora-dir`` directories, else
403; a relative one is looked up in those directories. After each call the engine's default adapters
(those of requests naming no ``lora``) are what is merged now.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, field_validator
from starlette.concurrency import run_in_threadpool

from ..errors import CheckpointError, InvalidArgumentError
from ..lora.files import resolve_lora_file
from ..lora.spec import lora_requests, targets_of
from .engine import Engine, NotReady
from .protocol import APIError, _first_error, invalid, read_payload
from .routes import engine_of, require_api_key

lora_router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


class UnmergeLora(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: Any = "all"

    @field_validator("target", mode="before")
    @classmethod
    def _null_is_all(cls, value: Any) -> Any:  # null is the default, as for every optional field of the API
        return "all" if value is None else value


class MergeLora(UnmergeLora):
    strength: Any = None


class SetLora(MergeLora):
    lora_nickname: Any
    lora_path: Any = None
    strength: Any = 1.0


def allowed_dirs(dirs) -> tuple[Path, ...]:
    return tuple(Path(os.path.realpath(os.path.expanduser(str(d)))) for d in dirs or ())


def check_path(path: str, dirs: tuple[Path, ...]) -> str:
    """``path`` with symlinks and ``..`` resolved, if that lies inside an allowed directory; else a 403."""
    if not dirs:
        raise APIError(403, "This server loads no LoRA files over HTTP (start it with --lora-dir DIR to allow a "
                       "directory); set_lora with a nickname alone reuses the adapters it already holds.",
                       type="permission_error", param="lora_path", code="lora_path_forbidden")
    if "\0" in str(path):  # os.path.realpath's ValueError would be a 500
        raise invalid("lora_path", "lora_path holds a NUL character, which no file name can hold")
    try:
        real = Path(os.path.realpath(_in_lora_dirs(str(path), dirs)))
        if real.is_dir() and _inside(real, dirs):  # a folder: the file in it that would be read must be inside too
            real = Path(os.path.realpath(resolve_lora_file(real)))
    except InvalidArgumentError as exc:
        raise invalid("lora_path", str(exc)) from None
    except OSError as exc:  # a name too long, ...
        raise invalid("lora_path", f"lora_path cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not _inside(real, dirs):
        raise APIError(403, f"lora_path '{path}' is outside the directories this server loads LoRA files from "
                       "(--lora-dir).", type="permission_error", param="lora_path", code="lora_path_forbidden")
    return str(real)


def _in_lora_dirs(path: str, dirs: tuple[Path, ...]) -> str:
    """A relative ``lora_path`` names a file in the ``--lora-dir`` directories (the first that holds it), not one in
    the server's working directory, which no client can know; an absolute one (or ``~/...``) is itself."""
    expanded = os.path.expanduser(path)
    if os.path.isabs(expanded):
        return expanded
    return next((str(d / expanded) for d in dirs if os.path.lexists(d / expanded)), str(dirs[0] / expanded))


def _inside(real: Path, dirs: tuple[Path, ...]) -> bool:
    return any(real == d or d in real.parents for d in dirs)


async def _body(request: Request, model):
    raw = await request.body()
    data = {} if not raw.strip() else await read_payload(request)
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except Exception as exc:  # pydantic.ValidationError
        if hasattr(exc, "errors"):
            raise _first_error(exc) from None
        raise


def _api_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, NotReady):
        return APIError(503, str(exc), type="server_error", code="model_not_ready", headers={"Retry-After": "5"})
    if isinstance(exc, InvalidArgumentError):
        return invalid(exc.field, str(exc))
    if isinstance(exc, CheckpointError):
        return invalid("lora_path", str(exc), code="invalid_lora")
    return APIError(500, f"the LoRA operation failed: {type(exc).__name__}: {exc}", type="server_error",
                    code="lora_failed")


async def _on_worker(engine: Engine, fn):
    """Run ``fn`` on the engine's worker, then make what is merged the default of requests naming no LoRA."""
    def op():
        result = fn()
        engine.lora_default = engine.pipe.lora.snapshot()
        return result

    try:
        return await asyncio.wrap_future(engine.call(op))
    except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error body
        raise _api_error(exc) from None


def _manager(engine: Engine):
    if engine.state != "ready":
        raise _api_error(NotReady(engine.not_ready_message()))
    try:
        return engine.pipe.lora
    except InvalidArgumentError as exc:
        raise _api_error(exc) from None


@lora_router.post("/set_lora")
async def set_lora(request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    req: SetLora = await _body(request, SetLora)
    manager = _manager(engine)
    try:
        wanted = lora_requests(req.lora_nickname, req.lora_path, req.strength, req.target, manager.available)
    except InvalidArgumentError as exc:
        raise _api_error(exc) from None
    dirs = request.app.state.lora_dirs
    wanted = [(n, None if p is None else check_path(p, dirs), s, t) for n, p, s, t in wanted]

    def load():
        for name, path, _, target in wanted:
            manager.load(name, path, targets_of(target, manager.available))

    async with request.app.state.lora_loading:  # one load at a time, so concurrent requests cannot pass --max-loras
        new = {n for n, *_ in wanted} - set(manager.adapters)
        if len(manager.adapters) + len(new) > request.app.state.max_loras:
            raise invalid("lora_nickname", f"this server caches at most {request.app.state.max_loras} adapters "
                          f"(--max-loras) and holds {len(manager.adapters)}; reuse a nickname to replace one",
                          code="too_many_loras")
        try:
            await run_in_threadpool(load)
        except Exception as exc:  # noqa: BLE001
            raise _api_error(exc) from None
    names, strengths, targets = [w[0] for w in wanted], [w[2] for w in wanted], [w[3] for w in wanted]
    info = await _on_worker(engine, lambda: manager.set(names, None, strengths, targets))
    warnings = [f"{a['nickname']}: {w}" for a in info["loaded_adapters"] if a["nickname"] in names
                for w in a["warnings"]]
    return {**info, "warnings": warnings}


@lora_router.post("/merge_lora_weights")
async def merge_lora_weights(request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    req: MergeLora = await _body(request, MergeLora)
    manager = _manager(engine)
    return await _on_worker(engine, lambda: manager.merge(req.strength, req.target))


@lora_router.post("/unmerge_lora_weights")
async def unmerge_lora_weights(request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    req: UnmergeLora = await _body(request, UnmergeLora)
    manager = _manager(engine)
    return await _on_worker(engine, lambda: manager.unmerge(req.target))


@lora_router.get("/list_loras")
async def list_loras(request: Request) -> dict[str, Any]:
    return _manager(engine_of(request)).describe()
