"""A client of `corral run`'s HTTP API (runtime.apps.httpapi), on httpx: what the `corral` CLI
uses. Over the unix socket by default; ``url`` + ``token`` for 127.0.0.1. Answers are decoded
into corral's own Structs; an error answer is a CorralError carrying its ``code``."""

from __future__ import annotations

from typing import Any, Iterator

import httpx
import msgspec

from ..errors import CorralError
from ..events import AnyEvent, event_decoder
from ..journal import TaskRecord
from ..records import PoolSnapshot, SupervisorSnapshot, TaskResult, WorkerInfo, WorkerSnapshot
from .apitypes import ApiError, TaskAccepted, TaskSubmit, _PoolRef, _TaskRef, _WorkerRef, check_param

_api_error = msgspec.json.Decoder(ApiError)


class ApiCallError(CorralError):
    """An error answer of the API: ``code`` is its stable code, the message is for people."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class Client:
    def __init__(self, socket: str | None = None, *, url: str | None = None,
                 token: str | None = None) -> None:
        self.where = socket or url or "?"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        transport = httpx.HTTPTransport(uds=socket) if socket else None
        self._http = httpx.Client(base_url=url or "http://corral", transport=transport,
                                  headers=headers, timeout=httpx.Timeout(30.0, read=None))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------------
    def _call(self, method: str, path: str, kind: type | None = None, *, body: Any = None,
              params: dict | None = None) -> Any:
        content = msgspec.json.encode(body) if body is not None else None
        try:
            r = self._http.request(method, path, content=content, params=params,
                                   headers={"Content-Type": "application/json"} if content else None)
        except (httpx.ConnectError, FileNotFoundError, ConnectionRefusedError) as exc:
            raise CorralError(f"cannot reach `corral run` at {self.where}: {_why(exc)}") from None
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise CorralError(f"`corral run` at {self.where} closed the connection before "
                              f"answering (it stopped or crashed)") from None
        except httpx.TransportError as exc:
            raise CorralError(f"cannot reach `corral run` at {self.where}: {_why(exc)}") from None
        return self._decode(r, kind)

    def _decode(self, r: httpx.Response, kind: type | None) -> Any:
        if r.status_code >= 400:
            try:
                err = _api_error.decode(r.content)
            except (msgspec.DecodeError, msgspec.ValidationError):
                raise ApiCallError("http_error", f"`corral run` at {self.where} answered "
                                   f"{r.status_code}: {r.text[:200]}", r.status_code) from None
            raise ApiCallError(err.code, err.message, r.status_code)
        if kind is None:
            return r.content
        if kind is str:
            return r.text
        try:
            return msgspec.json.decode(r.content, type=kind)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise CorralError(f"`corral run` at {self.where} sent a malformed answer: {exc}") from None

    # -- the API ----------------------------------------------------------------------------------
    def tree(self) -> SupervisorSnapshot:
        return self._call("GET", "/v1/tree", SupervisorSnapshot)

    def worker(self, worker_id: str) -> WorkerSnapshot:
        _check(_WorkerRef, worker_id=worker_id)
        return self._call("GET", f"/v1/workers/{worker_id}", WorkerSnapshot)

    def spawn(self, spec: Any) -> WorkerInfo:
        return self._call("POST", "/v1/workers", WorkerInfo, body=spec)

    def restart(self, worker_id: str) -> None:
        _check(_WorkerRef, worker_id=worker_id)
        self._call("POST", f"/v1/workers/{worker_id}/restart")

    def stop(self, worker_id: str) -> None:
        _check(_WorkerRef, worker_id=worker_id)
        self._call("POST", f"/v1/workers/{worker_id}/stop")

    def scale(self, pool: str, replicas: int) -> PoolSnapshot:
        _check(_PoolRef, pool=pool)
        return self._call("POST", f"/v1/pools/{pool}/scale", PoolSnapshot,
                          body={"replicas": replicas})

    def submit(self, req: TaskSubmit) -> TaskAccepted:
        return self._call("POST", "/v1/tasks", TaskAccepted, body=req)

    def run(self, req: TaskSubmit) -> TaskResult:
        """Submit with ``wait``: the result once the task has ended. Interrupting the call
        (closing the connection) cancels the task."""
        return self._call("POST", "/v1/tasks", TaskResult,
                          body=msgspec.structs.replace(req, wait=True))

    def task(self, task_id: str, *, wait_s: float = 0.0) -> TaskRecord:
        _check(_TaskRef, task_id=task_id)
        return self._call("GET", f"/v1/tasks/{task_id}", TaskRecord,
                          params={"wait": wait_s} if wait_s else None)

    def wait_task(self, task_id: str) -> TaskRecord:
        """Long-poll until the task is done."""
        while True:
            rec = self.task(task_id, wait_s=60)
            if rec.state == "done":
                return rec

    def logs(self, worker_id: str, *, previous: bool = False) -> str:
        _check(_WorkerRef, worker_id=worker_id)
        return self._call("GET", f"/v1/workers/{worker_id}/logs", str,
                          params={"previous": "1"} if previous else None)

    def follow_logs(self, worker_id: str) -> Iterator[str]:
        _check(_WorkerRef, worker_id=worker_id)
        with self._stream("GET", f"/v1/workers/{worker_id}/logs", params={"follow": "1"}) as r:
            yield from r.iter_text()

    def events(self, *, last_event_id: int | None = None, kinds: list[str] | None = None,
               follow: bool = True) -> Iterator[AnyEvent]:
        """The lifecycle events (those kept, then, with ``follow``, as they come)."""
        params: dict[str, Any] = {"last_event_id": last_event_id if last_event_id is not None else 0}
        if kinds:
            params["kinds"] = ",".join(kinds)
        if not follow:
            params["follow"] = "0"
        with self._stream("GET", "/v1/events", params=params) as r:
            data: list[str] = []
            event = ""
            for line in r.iter_lines():
                if line == "":
                    if data and event != "gap":
                        yield event_decoder.decode("\n".join(data))
                    data, event = [], ""
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())
                elif line.startswith("event:"):
                    event = line[6:].strip()

    def metrics(self) -> str:
        return self._call("GET", "/metrics", str)

    def _stream(self, method: str, path: str, **kw):
        client = self

        class _Ctx:
            def __enter__(self):
                try:
                    self.cm = client._http.stream(method, path, **kw)
                    r = self.cm.__enter__()
                except httpx.TransportError as exc:
                    raise CorralError(f"cannot reach `corral run` at {client.where}: "
                                      f"{_why(exc)}") from None
                if r.status_code >= 400:
                    r.read()
                    self.cm.__exit__(None, None, None)
                    client._decode(r, None)
                return r

            def __exit__(self, *exc):
                return self.cm.__exit__(*exc)
        return _Ctx()


def _check(kind: type, **values: Any) -> None:
    """A path parameter is checked here as the server checks it (no request for a bad one)."""
    try:
        check_param(kind, **values)
    except msgspec.ValidationError as exc:
        raise ApiCallError("bad_request", f"bad request: {exc}", 400) from None


def _why(exc: BaseException) -> str:
    inner = exc
    while inner.__cause__ is not None or inner.__context__ is not None:
        inner = inner.__cause__ or inner.__context__   # type: ignore[assignment]
    return getattr(inner, "strerror", None) or str(exc) or type(exc).__name__
