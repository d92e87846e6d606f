"""The control socket of `corral run`: JSON lines over a unix socket (no TCP, no network).

Requests, one JSON object per line, tagged by "op" (unknown fields are errors):
  {"op": "snapshot"}
  {"op": "spawn", "spec": {...WorkerSpec}}
  {"op": "stop", "worker_id": ...} | {"op": "restart", "worker_id": ...}
  {"op": "task", "worker_id": ... | "pool": ..., "prompt": ..., "args": [...], "timeout_s": ...,
   "max_attempts": ..., "max_output_bytes": ..., "task_id": ..., "detach": false}
  {"op": "result", "task_id": ..., "wait": false}
Every answer is one line: {"ok": true, "result": ...} or {"ok": false, "error": "..."}.

With a task journal (`corral run --state-dir`, the default), a task is recorded when it is
accepted and its result when it ends, so that the result survives a restart of `corral run`:
- `task` answers the TaskResult once the task has ended; with `"detach": true` it answers
  {"task_id": ...} at once and the task runs on.
- `result` answers the task's journal record (`runtime.journal.TaskRecord`: task, target, state
  queued | dispatched | done, dispatches, attempts, result); with `"wait": true`, once it is done.
Without a journal, `detach` and `result` are errors that say so.

- A request is decoded into typed Structs at the edge: anything invalid is an error answer for
  that request naming the field, and never reaches a worker.
- Requests that need the configured workers and pools (task, stop, restart) wait until the
  configured tree has started; snapshot and spawn are answered at once.
- A client that disconnects (or closes its writing half) while its request runs cancels it: a
  task is taken out of its queue, or cancelled in its container (a `result` wait just ends).
- When `corral run` stops, requests still in flight are answered "corral is shutting down".
The socket file is created mode 0600: only its owner may drive the supervisor.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Annotated, Any, Union

import msgspec
import structlog
import trio
from msgspec import Meta, Struct, field

from ..errors import ConfigError, CorralError
from ..journal import NoJournal
from ..specs import Name, Task, TaskId, WorkerId, WorkerSpec

log = structlog.get_logger("corral.control")

MAX_REQUEST = 4 << 20
"""bytes in one request line (a task's prompt and args are limited to 1 MiB of UTF-8 anyway)"""
BACKLOG = 4096
"""listen backlog: connections waiting to be accepted (the kernel caps it at somaxconn)"""
SHUTTING_DOWN = "corral is shutting down"


# -- the requests ------------------------------------------------------------------------------
class _Request(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="op"):
    pass


class SnapshotOp(_Request, tag="snapshot"):
    pass


class SpawnOp(_Request, tag="spawn"):
    spec: WorkerSpec = field(default_factory=WorkerSpec)


class StopOp(_Request, tag="stop"):
    worker_id: WorkerId


class RestartOp(_Request, tag="restart"):
    worker_id: WorkerId


class TaskOp(_Request, tag="task"):
    prompt: str
    worker_id: WorkerId | None = None
    pool: Name | None = None
    args: list[str] = field(default_factory=list)
    timeout_s: float | None = None
    max_attempts: int = 1
    max_output_bytes: int | None = None
    task_id: str | None = None
    detach: bool = False
    """answer {"task_id": ...} at once (needs the task journal); the task runs on"""

    @property
    def target(self) -> str:
        return f"pool:{self.pool}" if self.pool is not None else f"worker:{self.worker_id}"

    def __post_init__(self) -> None:
        if (self.worker_id is None) == (self.pool is None):
            raise ValueError("a task names exactly one of `worker_id` and `pool`")

    def task(self) -> Task:
        """The Task; its own validation (Task's constraints) raises ConfigError naming the field."""
        extra: dict[str, Any] = {}
        if self.max_output_bytes is not None:
            extra["max_output_bytes"] = self.max_output_bytes
        if self.task_id is not None:
            extra["task_id"] = self.task_id
        return Task(prompt=self.prompt, args=self.args, timeout_s=self.timeout_s,
                    max_attempts=self.max_attempts, **extra)


class ResultOp(_Request, tag="result"):
    task_id: TaskId
    wait: bool = False


ControlRequest = Union[SnapshotOp, SpawnOp, StopOp, RestartOp, TaskOp, ResultOp]
OPS = "snapshot, spawn, stop, restart, task, result"

_decoder = msgspec.json.Decoder(ControlRequest)
_any_decoder = msgspec.json.Decoder()
_enc = msgspec.json.Encoder()


class Answer(Struct, frozen=True, kw_only=True):
    ok: bool
    result: Any = None
    error: str = ""


_answer_decoder = msgspec.json.Decoder(Answer)


class BadRequest(ValueError):
    pass


def decode_request(line: bytes) -> ControlRequest:
    """One request line -> a typed request, or BadRequest saying what is wrong with it."""
    try:
        return _decoder.decode(line)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if text == "Object missing required field `op`":
            raise BadRequest(f"missing `op` (one of {OPS})") from None
        if text.endswith("at `$.op`"):
            try:
                op = _any_decoder.decode(line).get("op")
            except (ValueError, AttributeError):
                op = None
            raise BadRequest(f"unknown op {op!r} (one of {OPS})") from None
        if text.startswith("Expected `object`, got"):
            raise BadRequest(f"a request is a JSON object with an `op` ({OPS}): {text}") from None
        raise BadRequest(text) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"not a JSON object: {exc}") from None
    except ValueError as exc:        # invalid UTF-8
        raise BadRequest(f"not UTF-8 text: {exc}") from None


# -- the handler -------------------------------------------------------------------------------
NO_JOURNAL = ("this `corral run` keeps no task journal (it was started with --no-journal): "
              "task results are not kept, and tasks cannot be detached")


def _journaled(sup):
    """The supervisor's TaskService, or NoJournal."""
    tasks = getattr(sup, "tasks", None)
    if tasks is None:
        raise NoJournal(NO_JOURNAL)
    return tasks


async def handle(sup, line: bytes, *, client_gone=None) -> dict[str, Any]:
    """Answer one request line: {"ok": true, "result": ...} or {"ok": false, "error": ...}.

    ``client_gone()``: True once the client has gone away. A journaled task whose request is
    cancelled is cancelled only then; otherwise (corral is stopping) it stays in the journal."""
    try:
        req = decode_request(line)
        if isinstance(req, TaskOp):
            try:
                task = req.task()
            except ConfigError as exc:
                raise BadRequest(str(exc)) from None
    except BadRequest as exc:
        return {"ok": False, "error": f"bad request: {exc}"}
    try:
        match req:
            case SnapshotOp():
                return {"ok": True, "result": msgspec.to_builtins(await sup.snapshot())}
            case SpawnOp(spec=spec):
                w = await sup.spawn(spec)
                return {"ok": True, "result": msgspec.to_builtins(await w.info())}
            case StopOp(worker_id=wid) | RestartOp(worker_id=wid):
                await sup.wait_configured()
                w = sup.worker(wid)
                await (w.stop() if isinstance(req, StopOp) else w.restart())
                return {"ok": True, "result": None}
            case TaskOp() if req.detach or getattr(sup, "tasks", None) is not None:
                tasks = _journaled(sup)
                tid = await tasks.submit(req.target, task)
                if req.detach:
                    return {"ok": True, "result": {"task_id": tid}}
                try:
                    rec = await tasks.result(tid, wait=True)
                except trio.Cancelled:
                    if client_gone is not None and client_gone():
                        tasks.cancel(tid)
                    raise
                return {"ok": True, "result": msgspec.to_builtins(rec.result)}
            case ResultOp(task_id=tid, wait=wait):
                rec = await _journaled(sup).result(tid, wait=wait)
                return {"ok": True, "result": msgspec.to_builtins(rec)}
            case TaskOp():
                await sup.wait_configured()
                if req.pool is not None:
                    res = await sup.pool(req.pool).run(task)
                else:
                    res = await sup.worker(req.worker_id).run(task)
                return {"ok": True, "result": msgspec.to_builtins(res)}
    except CorralError as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:   # a client must never take the supervisor down
        log.exception("control_request_failed", request=_describe(line))
        return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
    raise AssertionError(f"unhandled request {req!r}")   # pragma: no cover


def encode_answer(answer: dict[str, Any]) -> bytes:
    try:
        return _enc.encode(answer) + b"\n"
    except (UnicodeEncodeError, TypeError, OverflowError) as exc:
        log.error("control_answer_unencodable", error=str(exc))
        return _enc.encode({"ok": False, "error": f"internal error: the answer could not be "
                                                  f"encoded: {ascii(str(exc))}"}) + b"\n"


# -- the server --------------------------------------------------------------------------------
class _Lines:
    """Reads request lines from a stream; remembers what it has read beyond the current line."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.eof = False

    async def fill(self) -> bool:
        """Read more; False once the peer has closed (or reset) the connection."""
        if self.eof:
            return False
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def next_line(self) -> bytes | None:
        """The next line; None at EOF. Raises BadRequest past MAX_REQUEST bytes."""
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 1]
                return line
            if len(self.buf) > MAX_REQUEST:
                raise BadRequest(f"request too large (the limit is {MAX_REQUEST} bytes per line)")
            if not await self.fill():
                return None    # a last line without its newline is not a request

    async def wait_eof(self) -> None:
        """Return when the peer closes; what it sends meanwhile is kept for later."""
        while len(self.buf) <= MAX_REQUEST and await self.fill():
            pass
        if not self.eof:
            await trio.sleep_forever()      # over the limit: next_line() will say so


async def _answer(sup, line: bytes, lines: _Lines) -> dict[str, Any] | None:
    """Handle one request while watching its connection: None if the client went away (its
    request is cancelled)."""
    answer: dict[str, Any] | None = None
    async with trio.open_nursery() as n:
        async def work() -> None:
            nonlocal answer
            answer = await handle(sup, line, client_gone=lambda: lines.eof)
            n.cancel_scope.cancel()

        async def watch() -> None:
            await lines.wait_eof()
            n.cancel_scope.cancel()

        n.start_soon(work)
        n.start_soon(watch)
    return answer


async def _send(stream: trio.abc.SendStream, answer: dict[str, Any]) -> None:
    await stream.send_all(encode_answer(answer))


async def serve_connection(sup, stream: trio.abc.Stream) -> None:
    """Serve one client: request lines in, answer lines out, one request at a time."""
    lines = _Lines(stream)
    async with stream:
        try:
            while True:
                try:
                    line = await lines.next_line()
                except BadRequest as exc:
                    await _send(stream, {"ok": False, "error": f"bad request: {exc}"})
                    return
                if line is None:
                    return
                if not line.strip():
                    continue
                try:
                    answer = await _answer(sup, line, lines)
                except BaseException:
                    # cancelled from outside: corral is stopping. Answer; don't leave the client
                    # in silence (a request cancelled by its own client never gets here)
                    with trio.CancelScope(shield=True), trio.move_on_after(1):
                        try:
                            await _send(stream, {"ok": False, "error": SHUTTING_DOWN})
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
                    raise
                if answer is None:
                    log.info("control_client_gone", request=_describe(line))
                    return
                await _send(stream, answer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass     # the client went away while we answered


def check_socket_path(path: str) -> None:
    """Can a control socket be made at ``path``? ConfigError naming the path if not."""
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


def _describe(line: bytes) -> str:
    """What a log line may say of a request: its op and size, never its body (a spawn request
    may carry secrets)."""
    try:
        op = msgspec.json.decode(line).get("op")
    except Exception:
        op = None
    return f"{op if isinstance(op, str) else '?'} ({len(line)} bytes)"


async def serve_control(sup, path: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    await _remove_stale_socket(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    except OSError as exc:
        sock.close()
        why = exc.strerror or str(exc)
        if exc.errno == errno.ENOENT:
            why = f"directory {os.path.dirname(os.path.abspath(path))} does not exist"
        raise ConfigError(f"cannot create the control socket {path}: {why}") from None
    finally:
        os.umask(old)
    ino = os.stat(path).st_ino
    sock.listen(BACKLOG)
    listener = trio.SocketListener(sock)
    log.info("control_socket_listening", path=path)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(path)
            await trio.serve_listeners(lambda s: serve_connection(sup, s), [listener],
                                       handler_nursery=nursery)
    finally:
        with trio.CancelScope(shield=True):
            try:
                if os.stat(path).st_ino == ino:      # still ours
                    os.unlink(path)
            except OSError:
                pass


# -- the client --------------------------------------------------------------------------------
async def call(path: str, request: dict[str, Any]) -> Any:
    """Client side: one request, one answer. Every failure is a CorralError saying what happened."""
    try:
        data = _enc.encode(request) + b"\n"
    except UnicodeEncodeError as exc:
        raise ConfigError(f"the request is not valid Unicode text ({exc.reason}: "
                          f"{ascii(exc.object[exc.start:exc.end])}); pass UTF-8 text") from None
    try:
        stream = await trio.open_unix_socket(path)
    except OSError as exc:
        raise CorralError(f"cannot reach `corral run` at {path}: {exc.strerror or exc}") from None
    gone = CorralError(f"`corral run` at {path} closed the connection before answering "
                       f"(it stopped or crashed)")
    buf = bytearray()
    async with stream:
        try:
            await stream.send_all(data)
            while b"\n" not in buf:
                chunk = await stream.receive_some(1 << 20)
                if not chunk:
                    raise gone
                buf += chunk
        except trio.BrokenResourceError:
            raise gone from None
    try:
        answer = _answer_decoder.decode(buf[:buf.index(b"\n")])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CorralError(f"`corral run` at {path} sent a malformed answer: {exc}") from None
    if not answer.ok:
        raise CorralError(answer.error or "unknown error")
    return answer.result
