"""The HTTP API of `corral run`: ASGI (Starlette) on hypercorn's trio worker.

Served on a unix socket (mode 0600: only its owner may drive the supervisor) and, optionally,
on 127.0.0.1 with a bearer token read from a file. Bodies are msgspec Structs
(`runtime.apps.apitypes`, and corral's records); every error is JSON `ApiError` with a stable
``code``.

  GET    /v1/tree                        the supervision tree (SupervisorSnapshot)
  POST   /v1/workers                     spawn (body: a WorkerSpec) -> 201 WorkerInfo
  GET    /v1/workers/{id}                one worker: info, backoff, death certificates
  GET    /v1/workers/{id}/logs           its container's output tail (text); ?previous=1: the
                                         last dead generation's, from its certificate;
                                         ?follow=1: then what it writes, as it writes it
  POST   /v1/workers/{id}/restart        replace its container; answers once replaced
  POST   /v1/workers/{id}/stop           stop it, remove its container
  GET    /v1/pools/{name}                a pool (PoolSnapshot)
  POST   /v1/pools/{name}/scale          {"replicas": N} -> PoolSnapshot
  POST   /v1/tasks                       TaskSubmit -> 202 TaskAccepted (through the task journal),
                                         or with "wait": true the TaskResult once ended
  GET    /v1/tasks/{id}?wait=S           the task's journal record (TaskRecord); waits up to S
                                         seconds (at most 300) for it to be done: long-poll
  DELETE /v1/tasks/{id}                  cancel a task this process runs
  GET    /v1/events                      Server-Sent Events: lifecycle events as they happen,
                                         resumable with Last-Event-ID (or ?last_event_id=N: those
                                         kept after N first); ?kinds=a,b filters; ?follow=0 ends
                                         after the kept ones
  GET    /metrics                        Prometheus metrics (runtime.apps.metrics)
  GET    /                               the dashboard (one HTML page, no build step, no CDN)

- Requests that need the configured workers and pools (tasks, restart, stop, scale) wait until
  the configured tree has started; the others are answered at once.
- A client that goes away while its ``"wait": true`` task runs cancels the task (taken out of
  its queue, or cancelled in its container).
- When `corral run` stops, requests still waiting are answered 503 ``shutting_down`` (a journaled
  task stays in the journal and runs after the next start).
"""

from __future__ import annotations

import errno
import hmac
import logging
import os
import socket
import stat
from functools import partial
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs

import msgspec
import outcome
import structlog
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import (ActorStopped, ConfigError, CorralError, EngineUnavailable, ImageBuildError,
                      NoSuchChild, WorkerStartupError)
from ..events import KINDS, EventBus, WorkerOutput
from ..journal import DuplicateTask, NoJournal, UnknownTask
from ..records import WorkerSnapshot
from ..specs import WorkerSpec
from .apitypes import (ApiError, Done, Scale, TaskAccepted, TaskSubmit, _PoolRef, _TaskRef,
                       _WorkerRef, check_param)
from .metrics import CONTENT_TYPE_LATEST, Metrics

log = structlog.get_logger("corral.http")

MAX_BODY = 4 << 20
"""bytes in one request body (a task's prompt and args are limited to 1 MiB of UTF-8 anyway)"""
MAX_WAIT_S = 300.0
KEEPALIVE_S = 15.0
"""an SSE comment this often keeps idle connections (and proxies) open"""
SHUTTING_DOWN = "corral is shutting down"
NO_JOURNAL = ("this `corral run` keeps no task journal (it was started with --no-journal): "
              "task results are not kept, and tasks cannot be detached")
DASHBOARD = Path(__file__).with_name("dashboard.html")

_enc = msgspec.json.Encoder()


class BadRequest(ValueError):
    pass


class ShuttingDown(Exception):
    pass


_STATUS: list[tuple[type[BaseException], int]] = [
    (NoJournal, 409), (DuplicateTask, 409), (UnknownTask, 404), (NoSuchChild, 404),
    (ConfigError, 400), (ActorStopped, 409), (WorkerStartupError, 502), (ImageBuildError, 502),
    (EngineUnavailable, 503),
]


def error_code(exc: BaseException) -> str:
    """A CorralError's stable code: its class name in snake_case (UnknownTask: unknown_task)."""
    name = type(exc).__name__
    return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name))


def _json(value: Any, status: int = 200) -> Response:
    return Response(_enc.encode(value), status_code=status, media_type="application/json")


def _error(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    return Response(_enc.encode(ApiError(code=code, message=message)), status_code=status,
                    media_type="application/json", headers=headers)


async def _body(request: Request, kind: type, *, empty: Any = None) -> Any:
    """The request's JSON body as ``kind``; BadRequest naming the field if it is not one."""
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            raise BadRequest(f"request too large (the limit is {MAX_BODY} bytes)")
    if not data and empty is not None:      # no body at all (whitespace is not JSON)
        return empty
    try:
        return msgspec.json.decode(bytes(data), type=kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if text.startswith("Expected `object`, got"):
            raise BadRequest(f"the body is a JSON object: {text}") from None
        raise BadRequest(text) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"not a JSON object: {exc}") from None
    except ValueError as exc:        # invalid UTF-8
        raise BadRequest(f"not UTF-8 text: {exc}") from None


def _param(kind: type, **values: Any) -> Any:
    try:
        return check_param(kind, **values)
    except msgspec.ValidationError as exc:
        raise BadRequest(str(exc)) from None


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() in ("1", "true", "yes", "on")


class CorralAPI:
    """The ASGI application of one supervisor (``.app``); ``stop()`` answers what waits."""

    def __init__(self, sup, *, bus: EventBus | None = None) -> None:
        self.sup = sup
        self.bus: EventBus = bus if bus is not None else (getattr(sup, "events", None) or EventBus())
        inner = getattr(sup, "_sup", None)
        self.metrics = Metrics(self.bus, snapshot=inner.snapshot if inner is not None else None)
        self.stopping = trio.Event()
        self._waits: set[trio.CancelScope] = set()
        self.clients = 0
        """event streams open now"""
        r = self._route
        self.app = Starlette(routes=[
            r("/v1/tree", self.tree),
            r("/v1/workers", self.spawn, ["POST"]),
            r("/v1/workers/{worker_id}", self.worker),
            r("/v1/workers/{worker_id}/logs", self.logs),
            r("/v1/workers/{worker_id}/restart", self.restart, ["POST"]),
            r("/v1/workers/{worker_id}/stop", self.stop_worker, ["POST"]),
            r("/v1/pools/{pool}", self.pool),
            r("/v1/pools/{pool}/scale", self.scale, ["POST"]),
            r("/v1/tasks", self.submit, ["POST"]),
            r("/v1/tasks/{task_id}", self.task, ["GET"]),
            r("/v1/tasks/{task_id}", self.cancel_task, ["DELETE"]),
            r("/v1/events", self.events),
            r("/metrics", self.metrics_page),
            r("/", self.dashboard),
        ], exception_handlers={HTTPException: self._http_error})

    def stop(self) -> None:
        """corral is stopping: what waits is answered 503 shutting_down, event streams end."""
        self.stopping.set()
        for cs in list(self._waits):
            cs.cancel()

    def close(self) -> None:
        self.stop()
        self.metrics.close()

    # -- plumbing ---------------------------------------------------------------------------------
    def _route(self, path: str, fn, methods: list[str] | None = None) -> Route:
        async def endpoint(request: Request) -> Response:
            try:
                return await fn(request)
            except BadRequest as exc:
                return _error(400, "bad_request", f"bad request: {exc}")
            except ShuttingDown:
                return _error(503, "shutting_down", SHUTTING_DOWN)
            except CorralError as exc:
                status = next((s for t, s in _STATUS if isinstance(exc, t)), 500)
                return _error(status, error_code(exc), f"{type(exc).__name__}: {exc}")
            except Exception as exc:   # a client must never take the supervisor down
                log.exception("api_request_failed", method=request.method, path=request.url.path)
                return _error(500, "internal_error",
                              f"internal error: {type(exc).__name__}: {exc}")
        return Route(path, endpoint, methods=methods or ["GET"], name=fn.__name__)

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, f"{exc.detail}: {request.method} {request.url.path}")

    async def _until_stop(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """``await fn()``, or ShuttingDown once corral stops."""
        with trio.CancelScope() as cs:
            self._waits.add(cs)
            if self.stopping.is_set():
                cs.cancel()
            try:
                return await fn()
            finally:
                self._waits.discard(cs)
        raise ShuttingDown()

    async def _while_connected(self, request: Request, fn: Callable[[], Awaitable[Any]]
                               ) -> tuple[Any, bool]:
        """(``await fn()``, False), or (None, True) if the client went away first (``fn`` is
        cancelled)."""
        result: outcome.Outcome | None = None
        gone = False
        async with trio.open_nursery() as n:
            async def work() -> None:
                nonlocal result
                result = await outcome.acapture(fn)
                n.cancel_scope.cancel()

            async def watch() -> None:
                nonlocal gone
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                gone = True
                n.cancel_scope.cancel()
            n.start_soon(work)
            n.start_soon(watch)
        if result is None:
            return None, True
        return result.unwrap(), gone

    def _tasks(self):
        tasks = getattr(self.sup, "tasks", None)
        if tasks is None:
            raise NoJournal(NO_JOURNAL)
        return tasks

    async def _configured(self) -> None:
        await self._until_stop(self.sup.wait_configured)

    # -- the tree ---------------------------------------------------------------------------------
    async def tree(self, request: Request) -> Response:
        return _json(await self.sup.snapshot())

    async def spawn(self, request: Request) -> Response:
        spec = await _body(request, WorkerSpec, empty=WorkerSpec())
        w = await self._until_stop(partial(self.sup.spawn, spec))
        return _json(await w.info(), 201)

    def _worker(self, request: Request):
        ref = _param(_WorkerRef, worker_id=request.path_params["worker_id"])
        return self.sup.worker(ref.worker_id)

    async def worker(self, request: Request) -> Response:
        return _json(self._worker(request).snapshot_nowait())

    async def restart(self, request: Request) -> Response:
        _param(_WorkerRef, worker_id=request.path_params["worker_id"])
        await self._configured()
        await self._until_stop(self._worker(request).restart)
        return _json(Done())

    async def stop_worker(self, request: Request) -> Response:
        _param(_WorkerRef, worker_id=request.path_params["worker_id"])
        await self._configured()
        await self._until_stop(self._worker(request).stop)
        return _json(Done())

    async def pool(self, request: Request) -> Response:
        ref = _param(_PoolRef, pool=request.path_params["pool"])
        return _json(self.sup.pool(ref.pool).snapshot_nowait())

    async def scale(self, request: Request) -> Response:
        ref = _param(_PoolRef, pool=request.path_params["pool"])
        body = await _body(request, Scale)
        await self._configured()
        pool = self.sup.pool(ref.pool)
        await self._until_stop(partial(pool.scale, body.replicas))
        return _json(pool.snapshot_nowait())

    # -- logs -------------------------------------------------------------------------------------
    async def logs(self, request: Request) -> Response:
        handle = self._worker(request)
        snap: WorkerSnapshot = handle.snapshot_nowait()
        if _flag(request, "previous"):
            if not snap.deaths:
                return _error(404, "no_previous_container",
                              f"worker {handle.id} has no previous container (it never died)")
            cert = snap.deaths[-1]
            return Response(cert.logs_tail, media_type="text/plain; charset=utf-8",
                            headers={"X-Corral-Generation": str(cert.generation)})
        tail = _current_tail(handle)
        if not _flag(request, "follow"):
            return Response(tail, media_type="text/plain; charset=utf-8",
                            headers={"X-Corral-Generation": str(snap.info.generation)})
        send, recv = trio.open_memory_channel[str](1024)

        def on(ev) -> None:
            if isinstance(ev, WorkerOutput) and ev.worker_id == handle.id:
                try:
                    send.send_nowait(ev.data)
                except trio.WouldBlock:
                    pass      # a reader that does not keep up misses output, never blocks corral

        async def stream():
            unsubscribe = self.bus.subscribe(on)
            try:
                yield tail
                while not self.stopping.is_set():
                    with trio.CancelScope() as cs:
                        self._waits.add(cs)
                        cs.deadline = trio.current_time() + KEEPALIVE_S
                        try:
                            yield await recv.receive()
                        finally:
                            self._waits.discard(cs)
                    if handle._actor.finished.is_set():
                        return
            finally:
                unsubscribe()
        return StreamingResponse(stream(), media_type="text/plain; charset=utf-8",
                                 headers={"Cache-Control": "no-cache"})

    # -- tasks ------------------------------------------------------------------------------------
    async def submit(self, request: Request) -> Response:
        req: TaskSubmit = await _body(request, TaskSubmit)
        try:
            task = req.task()
        except ConfigError as exc:
            raise BadRequest(str(exc)) from None
        tasks = getattr(self.sup, "tasks", None)
        if not req.wait:
            tid = await self._until_stop(partial(self._tasks().submit, req.target, task))
            return _json(TaskAccepted(task_id=tid, target=req.target), 202)
        if tasks is not None:
            tid = await self._until_stop(partial(tasks.submit, req.target, task))

            async def wait():
                return (await self._until_stop(partial(tasks.result, tid, wait=True))).result
            try:
                res, gone = await self._while_connected(request, wait)
            except trio.Cancelled:
                # the server cancels a request whose client went away; corral stopping is not
                # its client giving up: the task then stays in the journal
                gone = not self.stopping.is_set()
                if gone:
                    tasks.cancel(tid)
                    log.info("api_client_gone", task_id=tid)
                raise
            if gone:
                tasks.cancel(tid)
                log.info("api_client_gone", task_id=tid)
            return _json(res)

        async def run():
            await self._configured()
            if req.pool is not None:
                target = self.sup.pool(req.pool)
            else:
                target = self.sup.worker(req.worker_id)
            return await self._until_stop(partial(target.run, task))
        res, gone = await self._while_connected(request, run)
        if gone:
            log.info("api_client_gone", task_id=task.task_id)
        return _json(res)

    async def task(self, request: Request) -> Response:
        ref = _param(_TaskRef, task_id=request.path_params["task_id"])
        try:
            wait = min(float(request.query_params.get("wait") or 0), MAX_WAIT_S)
        except ValueError:
            raise BadRequest("`wait` is a number of seconds") from None
        tasks = self._tasks()
        rec = await tasks.result(ref.task_id)
        if rec.state != "done" and wait > 0:
            with trio.move_on_after(wait):
                rec = await self._until_stop(partial(tasks.result, ref.task_id, wait=True))
        return _json(rec)

    async def cancel_task(self, request: Request) -> Response:
        ref = _param(_TaskRef, task_id=request.path_params["task_id"])
        tasks = self._tasks()
        await tasks.result(ref.task_id)            # UnknownTask
        if not tasks.cancel(ref.task_id):
            return _error(409, "not_running", f"task {ref.task_id} is not run by this process "
                                              f"(done, or being resumed)")
        return _json(Done())

    # -- events -----------------------------------------------------------------------------------
    async def events(self, request: Request) -> Response:
        raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        if raw is None and "last_event_id" not in request.query_params:
            last = self.bus.last_id if not _flag(request, "replay") else 0
        else:
            try:
                last = int(raw or 0)
            except ValueError:
                raise BadRequest("Last-Event-ID is the id of an event (a number)") from None
        kinds = None
        if request.query_params.get("kinds"):
            kinds = set(request.query_params["kinds"].split(","))
            unknown = kinds - set(KINDS)
            if unknown:
                raise BadRequest(f"unknown event kind(s) {sorted(unknown)} (known: {', '.join(KINDS)})")
        bus = self.bus
        follow = request.query_params.get("follow", "1").lower() not in ("0", "false", "no")

        async def stream():
            nonlocal last
            self.clients += 1
            try:
                yield "retry: 1000\n\n"
                if last > bus.last_id:
                    last = 0                   # an id of an earlier `corral run`: from the start
                if last + 1 < bus.first_id and last < bus.last_id:
                    yield (f"event: gap\ndata: {{\"missed_from\": {last + 1}, "
                           f"\"resumed_at\": {bus.first_id}}}\n\n")
                while not self.stopping.is_set():
                    out = []
                    for ev in bus.since(last):
                        last = ev.id
                        if kinds is None or ev.__struct_config__.tag in kinds:
                            out.append(f"id: {ev.id}\nevent: {ev.__struct_config__.tag}\n"
                                       f"data: {_enc.encode(ev).decode()}\n\n")
                    if out:
                        yield "".join(out)
                    if not follow:
                        return
                    with trio.CancelScope() as cs:
                        self._waits.add(cs)
                        cs.deadline = trio.current_time() + KEEPALIVE_S
                        try:
                            await bus.wait_after(last)
                        finally:
                            self._waits.discard(cs)
                    if cs.cancelled_caught and not self.stopping.is_set():
                        yield ": keepalive\n\n"
            finally:
                self.clients -= 1
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def metrics_page(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def dashboard(self, request: Request) -> Response:
        return HTMLResponse(DASHBOARD.read_text())


def _current_tail(handle) -> str:
    """What the worker's current container wrote (stderr, and the protocol's notable frames):
    the same tail a death certificate keeps."""
    life = getattr(getattr(handle, "_actor", None), "_life", None)
    tail = getattr(life, "tail", b"")
    return bytes(tail).decode(errors="replace")


# -- authentication on 127.0.0.1 -----------------------------------------------------------------
class BearerAuth:
    """ASGI middleware: every request carries the token, as ``Authorization: Bearer TOKEN``, a
    ``?token=`` query (the dashboard's first load: it is then kept in a same-site cookie, so the
    page's own requests and event stream need no header), or that cookie."""

    COOKIE = "corral_token"

    def __init__(self, app, token: str) -> None:
        self.app = app
        self.token = token.encode()

    def _ok(self, value: str | None) -> bool:
        return value is not None and hmac.compare_digest(value.encode(), self.token)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        auth = headers.get("authorization", "")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:
            pass
        from_query = (query.get("token") or [None])[0]
        if auth.lower().startswith("bearer ") and self._ok(auth[7:].strip()):
            return await self.app(scope, receive, send)
        if self.COOKIE in cookie and self._ok(cookie[self.COOKIE].value):
            return await self.app(scope, receive, send)
        if self._ok(from_query):
            async def send_with_cookie(message) -> None:
                if message["type"] == "http.response.start":
                    message = dict(message)
                    message["headers"] = list(message.get("headers", [])) + [
                        (b"set-cookie", f"{self.COOKIE}={from_query}; HttpOnly; SameSite=Strict; "
                                        f"Path=/".encode())]
                await send(message)
            return await self.app(scope, receive, send_with_cookie)
        response = _error(401, "unauthorized", "this endpoint needs the bearer token "
                                               "(Authorization: Bearer TOKEN)",
                          headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def read_token(path: str) -> str:
    try:
        with open(path) as f:
            token = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the API token file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise ConfigError(f"the API token in {path} is too short (at least 16 characters)")
    return token


# -- the sockets ---------------------------------------------------------------------------------
def check_socket_path(path: str) -> None:
    """Can an API socket be made at ``path``? ConfigError naming the path if not."""
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise ConfigError(f"cannot create the control socket {path}: directory {d} does not exist")
    if len(os.fsencode(path)) > 107:
        raise ConfigError(f"cannot create the control socket {path}: the path is longer than a "
                          f"unix socket path may be (107 bytes)")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"cannot create the control socket {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"cannot create the control socket {path}: it exists and is not a socket")


async def _remove_stale_socket(path: str) -> None:
    check_socket_path(path)
    if not os.path.lexists(path):
        return
    try:
        probe = await trio.open_unix_socket(path)
    except OSError:
        os.unlink(path)        # nobody listens: left behind by a process that is gone
        return
    await probe.aclose()
    raise ConfigError(f"the control socket {path} is in use by another process (another "
                      f"`corral run`?); pass another --socket")


async def _unix_socket(path: str) -> socket.socket:
    await _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        why = exc.strerror or str(exc)
        if exc.errno == errno.ENOENT:
            why = f"directory {os.path.dirname(os.path.abspath(path))} does not exist"
        raise ConfigError(f"cannot create the control socket {path}: {why}") from None
    finally:
        os.umask(old)
    return sock


def _tcp_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}") from None
    return sock


def _hypercorn_config(sock: socket.socket):
    from hypercorn.config import Config

    cfg = Config()
    cfg.bind = [f"fd://{sock.detach()}"]
    cfg.errorlog = logging.getLogger("corral.http")
    cfg.accesslog = None
    cfg.graceful_timeout = 5.0
    cfg.backlog = 4096
    cfg.include_server_header = False
    return cfg


async def serve_api(sup, path: str, *, tcp_port: int | None = None, token_file: str | None = None,
                    api: CorralAPI | None = None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the API of ``sup`` on the unix socket ``path`` (and on 127.0.0.1:``tcp_port`` with
    the bearer token of ``token_file``) until ``api.stop()``; ``task_status.started(api)`` once
    it listens (``api.tcp_port`` is the port bound, if any). The socket file is removed at the
    end."""
    from hypercorn.trio import serve

    token = read_token(token_file) if tcp_port is not None else None
    if tcp_port is not None and token_file is None:
        raise ConfigError("listening on 127.0.0.1 needs a bearer token file (--api-token-file)")
    api = api or CorralAPI(sup)
    usock = await _unix_socket(path)
    ino = os.stat(path).st_ino
    servers: list[tuple[socket.socket, Any]] = [(usock, api.app)]
    api.tcp_port = None
    try:
        if tcp_port is not None:
            assert token is not None
            tsock = _tcp_socket(tcp_port)
            api.tcp_port = tsock.getsockname()[1]
            servers.append((tsock, BearerAuth(api.app, token)))
        async with trio.open_nursery() as n:
            for sock, app in servers:
                await n.start(partial(serve, app, _hypercorn_config(sock),
                                      shutdown_trigger=api.stopping.wait))
            log.info("control_socket_listening", path=path, tcp=f"127.0.0.1:{api.tcp_port}"
                     if api.tcp_port else None)
            task_status.started(api)
    finally:
        api.close()
        try:
            if os.stat(path).st_ino == ino:      # still ours
                os.unlink(path)
        except OSError:
            pass
