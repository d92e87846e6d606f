"""The control socket of `corral run`: JSON lines over a unix socket (no TCP, no network).

Requests: {"op": "snapshot"} | {"op": "spawn", "spec": {...WorkerSpec}} |
{"op": "stop", "worker_id": ...} | {"op": "restart", "worker_id": ...} |
{"op": "task", "worker_id": ... | "pool": ..., "prompt": ..., "timeout_s": ...}.
Every answer is {"ok": true, "result": ...} or {"ok": false, "error": "..."}.
The socket file is created mode 0600: only its owner may drive the supervisor.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec
import structlog
import trio

from .errors import CorralError
from .specs import Task, WorkerSpec

log = structlog.get_logger("corral.control")
MAX_REQUEST = 1 << 20
_enc = msgspec.json.Encoder()


async def serve_control(sup, path: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    if os.path.exists(path):
        os.unlink(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    log.info("control_socket_listening", path=path)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(path)
            await trio.serve_listeners(lambda s: _serve_one(sup, s), [listener],
                                       handler_nursery=nursery)
    finally:
        with trio.CancelScope(shield=True):
            try:
                os.unlink(path)
            except OSError:
                pass


async def _serve_one(sup, stream: trio.SocketStream) -> None:
    buf = b""
    async with stream:
        async for chunk in stream:
            buf += chunk
            if len(buf) > MAX_REQUEST:
                await stream.send_all(_enc.encode({"ok": False, "error": "request too large"}) + b"\n")
                return
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    await stream.send_all(_enc.encode(await handle(sup, line)) + b"\n")


async def handle(sup, line: bytes) -> dict[str, Any]:
    try:
        req = msgspec.json.decode(line)
        op = req.get("op")
        if op == "snapshot":
            return {"ok": True, "result": msgspec.to_builtins(await sup.snapshot())}
        if op == "spawn":
            spec = msgspec.convert(req.get("spec") or {}, WorkerSpec)
            w = await sup.spawn(spec)
            return {"ok": True, "result": msgspec.to_builtins(await w.info())}
        if op in ("stop", "restart"):
            w = sup.worker(req["worker_id"])
            await (w.stop() if op == "stop" else w.restart())
            return {"ok": True, "result": None}
        if op == "task":
            task = Task(prompt=req["prompt"], timeout_s=req.get("timeout_s"),
                        max_attempts=req.get("max_attempts", 1))
            if req.get("pool"):
                pool = sup.pool(req["pool"])
                res = await pool.run(task)
            else:
                res = await sup.worker(req["worker_id"]).run(task)
            return {"ok": True, "result": msgspec.to_builtins(res)}
        return {"ok": False, "error": f"unknown op {op!r} (snapshot, spawn, stop, restart, task)"}
    except (msgspec.DecodeError, msgspec.ValidationError, KeyError, TypeError) as exc:
        return {"ok": False, "error": f"bad request: {exc}"}
    except CorralError as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:   # a client must never take the supervisor down
        log.exception("control_request_failed", request=line[:200].decode(errors="replace"))
        return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}


async def call(path: str, request: dict[str, Any]) -> Any:
    """Client side: one request, one answer."""
    try:
        stream = await trio.open_unix_socket(path)
    except OSError as exc:
        raise CorralError(f"cannot reach `corral run` at {path}: {exc.strerror or exc}") from None
    async with stream:
        await stream.send_all(_enc.encode(request) + b"\n")
        buf = b""
        async for chunk in stream:
            buf += chunk
            if b"\n" in buf:
                break
    answer = msgspec.json.decode(buf.split(b"\n", 1)[0])
    if not answer.get("ok"):
        raise CorralError(answer.get("error", "unknown error"))
    return answer.get("result")
