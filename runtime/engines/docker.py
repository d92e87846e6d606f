"""The Docker adapter of the engine port: Docker through aiodocker, bridged into trio with
trio-asyncio.

This is the ONLY module that imports asyncio, aiodocker, aiohttp or trio_asyncio, and the only one
that speaks Docker's JSON: ContainerSpec -> a create body with HostConfig (and corral's fixed
hardening), inspect/list/event JSON -> ContainerState / ContainerSummary / ContainerEvent, image
JSON -> ImageSummary, Docker's error statuses and texts -> runtime.errors. Everything here is
trio-flavoured to its callers; every aiodocker/aiohttp error becomes a corral exception that keeps
the engine's own message.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal as _signal
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, AsyncIterator, Callable, Collection, Sequence

import aiodocker
import aiohttp
import trio
import trio_asyncio
from aiodocker.stream import Stream
from trio_asyncio import aio_as_trio
from yarl import URL

from ..errors import (
    ContainerNotFound,
    ContainerNotRunning,
    EngineError,
    EngineUnavailable,
    ImageBuildError,
    ImageNotFound,
    NameConflict,
    RemovalInProgress,
)
from ..util import unwrap_single
from .base import (
    EVENT_KINDS,
    STDERR,
    STDOUT,
    ContainerEvent,
    ContainerSpec,
    ContainerState,
    ContainerSummary,
    EngineVersion,
    EventKind,
    ImageSummary,
    LabelFilter,
    TmpfsMount,
    event_labels,
    label_filters,
)

DEFAULT_URL = "unix:///var/run/docker.sock"
_STEP_RE = re.compile(r"^Step \d+/\d+ : (.*)$")


def resolve_url(url: str | None = None) -> str:
    return url or os.environ.get("DOCKER_HOST") or DEFAULT_URL


# -- Docker's JSON, both ways ---------------------------------------------------------------------

_ACTION_KIND: dict[str, EventKind] = {"start": "started", "die": "died", "kill": "killed",
                                      "oom": "oom", "stop": "stopped", "restart": "restarted",
                                      "destroy": "removed"}
_KIND_ACTION = {kind: action for action, kind in _ACTION_KIND.items()}
_STATUSES = frozenset({"created", "running", "paused", "restarting", "removing", "exited", "dead"})


def _tmpfs_options(m: TmpfsMount) -> str:
    opts = []
    if m.uid is not None:
        opts.append(f"uid={m.uid}")
    if m.gid is not None:
        opts.append(f"gid={m.gid}")
    opts.append(f"mode={m.mode:04o}")
    if m.size is not None:
        opts.append(f"size={m.size}")
    return ",".join(opts)


def create_body(spec: ContainerSpec) -> dict[str, Any]:
    """A ContainerSpec as the body of ``POST /containers/create``, with corral's fixed
    hardening: no network, no capabilities, no-new-privileges, an init, no restart policy."""
    host: dict[str, Any] = {
        "NetworkMode": "none", "CapDrop": ["ALL"], "SecurityOpt": ["no-new-privileges"],
        "Init": True, "AutoRemove": False, "RestartPolicy": {"Name": "no"},
    }
    if spec.pids_limit is not None:
        host["PidsLimit"] = spec.pids_limit
    if spec.memory:
        host["Memory"] = spec.memory
        host["MemorySwap"] = spec.memory
    if spec.cpus:
        host["NanoCpus"] = int(spec.cpus * 1e9)
    if spec.read_only_rootfs:
        host["ReadonlyRootfs"] = True
    if spec.tmpfs:
        host["Tmpfs"] = {m.path: _tmpfs_options(m) for m in spec.tmpfs}
    body: dict[str, Any] = {
        "Image": spec.image, "Env": [f"{k}={v}" for k, v in spec.env.items()],
        "Labels": dict(spec.labels),
        "AttachStdin": True, "AttachStdout": True, "AttachStderr": True,
        "OpenStdin": True, "StdinOnce": spec.stdin_once, "Tty": False, "HostConfig": host,
    }
    if spec.command is not None:
        body["Cmd"] = list(spec.command)
    if spec.entrypoint is not None:
        body["Entrypoint"] = list(spec.entrypoint)
    if spec.user:
        body["User"] = spec.user
    if spec.working_dir:
        body["WorkingDir"] = spec.working_dir
    return body


def _time(text: str | None) -> float | None:
    """Docker's RFC 3339 times; its zero time (never) is None."""
    if not text or text.startswith("0001-01-01"):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _signum(value: Any) -> int | None:
    """dockerd reports a kill's signal as its number; a name is taken too."""
    num = _int(value)
    if num is not None or not value:
        return num
    name = str(value).upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    return int(_signal.Signals[name]) if name in _signal.Signals.__members__ else None


def _status(value: Any) -> Any:
    return value if value in _STATUSES else "dead"


def container_state(raw: dict[str, Any]) -> ContainerState:
    """``GET /containers/{id}/json`` as a ContainerState."""
    state = raw.get("State") or {}
    running = bool(state.get("Running"))
    finished = _time(state.get("FinishedAt"))
    return ContainerState(
        id=raw["Id"], name=str(raw.get("Name") or "").lstrip("/"), image=raw.get("Image") or "",
        labels=(raw.get("Config") or {}).get("Labels") or {}, status=_status(state.get("Status")),
        running=running, pid=state.get("Pid") or None,
        exit_code=None if running or finished is None else int(state.get("ExitCode") or 0),
        oom_killed=bool(state.get("OOMKilled")), started_at=_time(state.get("StartedAt")),
        finished_at=finished)


def container_summary(raw: dict[str, Any]) -> ContainerSummary:
    names = raw.get("Names") or []
    return ContainerSummary(id=raw["Id"], name=names[0].lstrip("/") if names else "",
                            labels=raw.get("Labels") or {}, status=_status(raw.get("State")),
                            image_id=raw.get("ImageID") or "")


def image_summary(raw: dict[str, Any]) -> ImageSummary:
    """An image from ``GET /images/json`` or ``GET /images/{ref}/json``."""
    tags = [t for t in raw.get("RepoTags") or [] if t != "<none>:<none>"]
    labels = raw.get("Labels") if "Labels" in raw else (raw.get("Config") or {}).get("Labels")
    created = raw.get("Created")
    created = float(created) if isinstance(created, (int, float)) else (_time(created) or 0.0)
    created = float(int(created))      # whole seconds, as the listing has them
    return ImageSummary(id=raw["Id"], tags=tags, labels=labels or {}, created=created,
                        size=int(raw.get("Size") or 0))


def container_event(raw: dict[str, Any]) -> ContainerEvent | None:
    """A line of ``GET /events`` as a ContainerEvent; None for what corral does not follow."""
    if raw.get("Type", "container") != "container":
        return None
    kind = _ACTION_KIND.get(raw.get("Action") or raw.get("status") or "")
    if kind is None:
        return None
    actor = raw.get("Actor") or {}
    attrs = actor.get("Attributes") or {}
    t = raw.get("timeNano")
    if t is None:
        t = int(float(raw.get("time") or 0) * 1e9)
    return ContainerEvent(kind=kind, container_id=actor.get("ID") or raw.get("id") or "",
                          time_ns=int(t),
                          exit_code=_int(attrs.get("exitCode")) if kind == "died" else None,
                          signal=_signum(attrs.get("signal")) if kind == "killed" else None,
                          **event_labels(attrs))  # type: ignore[arg-type]


class _Attachment:
    def __init__(self, engine: "DockerEngine", stream: Stream) -> None:
        self._engine = engine
        self._stream = stream
        send, self.output = trio.open_memory_channel[tuple[int, bytes]](256)
        self._send_out = send

    async def _pump(self) -> None:
        async with self._send_out:
            while True:
                try:
                    msg = await self._engine._aio(self._stream.read_out)()
                except (aiohttp.ClientError, OSError, asyncio.CancelledError):
                    return
                if msg is None:
                    return
                stream = STDERR if msg.stream == 2 else STDOUT
                await self._send_out.send((stream, bytes(msg.data)))

    async def send(self, data: bytes) -> None:
        try:
            await self._engine._aio(self._stream.write_in)(data)
        except (RuntimeError, aiohttp.ClientError, OSError, ConnectionError) as exc:
            raise EngineError(f"attach stdin closed: {exc}") from None

    async def close_stdin(self) -> None:
        """Half-close: the container sees EOF on stdin while its output keeps flowing to us.
        (aiodocker's Stream.close() would also close the connection and lose output in flight.)"""
        async def half_close() -> None:
            resp = self._stream._resp
            transport = resp.connection.transport if resp is not None and resp.connection else None
            if transport is not None and transport.can_write_eof():
                transport.write_eof()
        try:
            await self._engine._aio(half_close)()
        except (RuntimeError, OSError, ConnectionError):
            pass


class _NativeAttachment:
    """Attach over the engine's unix socket in trio itself: the hijacked HTTP connection carries
    Docker's multiplexed stream (8-byte frame headers). No asyncio hop per frame: this is the hot
    path of every worker (heartbeats, task frames), so it is the one place that skips aiodocker."""

    def __init__(self, stream: trio.SocketStream, initial: bytes) -> None:
        self._s = stream
        self._initial = initial       # stream bytes that came with the HTTP response head
        self._lock = trio.Lock()      # several tasks may write frames; one send_all at a time
        send, self.output = trio.open_memory_channel[tuple[int, bytes]](256)
        self._send_out = send

    async def _pump(self) -> None:
        buf = bytearray(self._initial)
        async with self._send_out:
            while True:
                while len(buf) >= 8:
                    size = int.from_bytes(buf[4:8], "big")
                    if len(buf) < 8 + size:
                        break
                    kind, data = buf[0], bytes(buf[8:8 + size])
                    del buf[:8 + size]
                    await self._send_out.send((STDERR if kind == 2 else STDOUT, data))
                try:
                    chunk = await self._s.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return
                if not chunk:
                    return
                buf += chunk

    async def send(self, data: bytes) -> None:
        try:
            async with self._lock:
                await self._s.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise EngineError(f"attach stdin closed: {exc}") from None

    async def close_stdin(self) -> None:
        try:
            async with self._lock:
                await self._s.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


@asynccontextmanager
async def _pumping(att: Any, close: Callable[[], Any]) -> AsyncIterator[Any]:
    """Run an attachment's output pump for the duration of the block, then close its connection
    (shielded, bounded) however the block ends."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(att._pump)
            try:
                yield att
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await close()


class _ExitedAttachment:
    """An attachment to a container that has exited: no output, no stdin."""

    def __init__(self) -> None:
        send, self.output = trio.open_memory_channel[tuple[int, bytes]](0)
        send.close()

    async def send(self, data: bytes) -> None:
        raise EngineError("attach stdin closed: the container has exited")

    async def close_stdin(self) -> None:
        pass


class _EventStream:
    def __init__(self) -> None:
        send, self.receive = trio.open_memory_channel[ContainerEvent](1024)
        self._send = send
        self.ended: str | None = None


class DockerEngine:
    """Trio-native client of a Docker engine. Make one with `open_engine()`."""

    def __init__(self, docker: aiodocker.Docker, loop: Any, url: str) -> None:
        self._docker = docker
        self._loop = loop
        self.url = url
        # attach natively over a local socket (set CORRAL_ATTACH=aiodocker to use aiodocker's)
        self.native_attach = url.startswith("unix://") and os.environ.get("CORRAL_ATTACH") != "aiodocker"

    # -- plumbing --------------------------------------------------------------------------
    def _aio(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return aio_as_trio(fn, loop=self._loop)

    def _map(self, exc: BaseException, *, what: str = "", kind: str = "") -> EngineError:
        if isinstance(exc, aiodocker.DockerError):
            status, msg = exc.status, exc.message
        else:
            status, msg = 900, f"{type(exc).__name__}: {exc}"
        if status == 900 or isinstance(exc, (aiohttp.ClientConnectionError, OSError)):
            return EngineUnavailable(f"cannot reach the Docker engine at {self.url}: {msg}", status=None)
        if status == 404:
            if kind == "image" or "No such image" in msg:
                return ImageNotFound(f"{what}: {msg}" if what else msg, status=404)
            if kind == "container" or "No such container" in msg:
                return ContainerNotFound(f"{what}: {msg}" if what else msg, status=404)
        if status == 409 and "already in use" in msg:
            return NameConflict(msg, status=409)
        if status == 409 and "is not running" in msg:
            return ContainerNotRunning(f"{what}: {msg}" if what else msg, status=409)
        if status == 409 and "already in progress" in msg:
            return RemovalInProgress(f"{what}: {msg}" if what else msg, status=409)
        return EngineError(f"{what}: {msg}" if what else msg, status=status)

    async def _call(self, fn: Callable[..., Any], *args: Any, what: str = "", kind: str = "",
                    **kwargs: Any) -> Any:
        try:
            return await self._aio(fn)(*args, **kwargs)
        except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
            raise self._map(exc, what=what, kind=kind) from None

    async def _json(self, path: str | URL, method: str = "GET", *, what: str = "", kind: str = "",
                    **kwargs: Any) -> Any:
        return await self._call(self._docker._query_json, path, method, what=what, kind=kind, **kwargs)

    # -- system ----------------------------------------------------------------------------
    async def ping(self) -> None:
        await self.version()

    async def version(self) -> EngineVersion:
        v = await self._call(self._docker.version)
        return EngineVersion(version=str(v.get("Version", "")), api_version=str(v.get("ApiVersion", "")),
                             kernel_version=str(v.get("KernelVersion", "")))

    # -- images ----------------------------------------------------------------------------
    async def image_inspect(self, ref: str) -> ImageSummary:
        return image_summary(await self._image_inspect_raw(ref))

    async def _image_inspect_raw(self, ref: str) -> dict[str, Any]:
        return await self._json(f"images/{ref}/json", what=f"image {ref}", kind="image")

    async def image_list(self, *, labels: LabelFilter | None = None) -> list[ImageSummary]:
        params = {}
        if labels:
            params["filters"] = json.dumps({"label": label_filters(labels)})
        return [image_summary(raw) for raw in await self._json("images/json", params=params)]

    async def image_remove(self, ref: str, *, force: bool = False) -> None:
        await self._json(f"images/{ref}", "DELETE", params={"force": force}, what=f"image {ref}",
                         kind="image")

    async def image_tag(self, ref: str, repo: str, tag: str) -> None:
        await self._json(f"images/{ref}/tag", "POST", params={"repo": repo, "tag": tag},
                         what=f"image {ref}", kind="image")

    async def _stream_json(self, path: str | URL, *, params: Any = None, data: Any = None,
                           headers: Any = None, on_line: Callable[[dict[str, Any]], None]) -> None:
        async def run() -> None:
            async with self._docker._query(path, "POST", params=params, data=data, headers=headers,
                                           timeout=None, chunked=None) as resp:
                async for raw in resp.content:
                    raw = raw.strip()
                    if raw:
                        try:
                            on_line(json.loads(raw))
                        except json.JSONDecodeError:
                            on_line({"stream": raw.decode(errors="replace")})
        try:
            await self._aio(run)()
        except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
            raise self._map(exc) from None

    async def image_build(self, context_tar: bytes, *, tag: str, labels: dict[str, str],
                          network: bool = False,
                          on_progress: Callable[[str], None] | None = None) -> str:
        """Build from a tar context holding a Dockerfile. Returns the image id.
        A failing step raises ImageBuildError with that step and the tail of its output."""
        output: list[str] = []
        layers: list[str] = []
        state: dict[str, Any] = {"step": None, "error": None}

        def on_line(obj: dict[str, Any]) -> None:
            if "stream" in obj:
                for line in str(obj["stream"]).splitlines():
                    if line.startswith(" ---> ") and not line.startswith(" ---> Running in") \
                            and not line.startswith(" ---> Using cache"):
                        layers.append(line[6:].strip())
                    m = _STEP_RE.match(line)
                    if m:
                        state["step"] = m.group(1)
                        output.clear()
                    output.append(line)
                    if on_progress and line.strip():
                        on_progress(line)
            if "error" in obj:
                state["error"] = obj.get("error") or str(obj.get("errorDetail"))
        params = {"t": tag, "labels": json.dumps(labels), "networkmode": "host" if network else "none",
                  "rm": "1", "forcerm": "1"}
        try:
            await self._stream_json("build", params=params, data=context_tar,
                                    headers={"Content-Type": "application/x-tar"}, on_line=on_line)
        except EngineError as exc:
            if isinstance(exc, EngineUnavailable):
                raise
            raise ImageBuildError(f"building {tag} failed: {exc}", step=state["step"],
                                  output_tail="\n".join(output)) from None
        if state["error"]:
            await self._remove_dangling(layers)
            raise ImageBuildError(f"building {tag} failed: {state['error']}", step=state["step"],
                                  output_tail="\n".join(output))
        return (await self._image_inspect_raw(tag))["Id"]

    async def _remove_dangling(self, layers: list[str]) -> None:
        """A failed build leaves its intermediate images untagged: remove those it made."""
        for layer in reversed(layers[1:]):   # layers[0] is the FROM image itself
            try:
                info = await self._image_inspect_raw(layer)
                if not info.get("RepoTags"):
                    await self.image_remove(layer)
            except EngineError:
                pass

    async def image_import(self, tar_path: str, *, repo: str, tag: str,
                           changes: Sequence[str] = (), message: str = "") -> str:
        """`docker import`: make an image from a root filesystem tarball. Returns the image id."""
        query = [("fromSrc", "-"), ("repo", repo), ("tag", tag)]
        query += [("changes", c) for c in changes]
        if message:
            query.append(("message", message))
        url = URL("images/create").with_query(query)
        errors: list[str] = []

        def on_line(obj: dict[str, Any]) -> None:
            if "error" in obj:
                errors.append(str(obj["error"]))

        with open(tar_path, "rb") as f:
            await self._stream_json(url, data=f, headers={"Content-Type": "application/x-tar"},
                                    on_line=on_line)
        if errors:
            raise EngineError(f"docker import failed: {errors[-1]}")
        return (await self._image_inspect_raw(f"{repo}:{tag}"))["Id"]

    # -- containers ------------------------------------------------------------------------
    async def container_create(self, spec: ContainerSpec) -> str:
        name = spec.name
        params = {"name": name} if name else None
        data = await self._json("containers/create", "POST", data=create_body(spec), params=params,
                                what=f"create {name or ''}".strip(), kind="image")
        return data["Id"]

    async def container_start(self, cid: str) -> None:
        await self._json(f"containers/{cid}/start", "POST", what=f"start {cid[:12]}",
                         kind="container")

    async def container_inspect(self, cid: str) -> ContainerState:
        return container_state(await self.container_inspect_raw(cid))

    async def container_inspect_raw(self, cid: str) -> dict[str, Any]:
        """Docker's own inspect JSON: for tests of this adapter only (not part of the port)."""
        return await self._json(f"containers/{cid}/json", what=f"container {cid[:12]}",
                                kind="container")

    async def container_wait(self, cid: str) -> int:
        data = await self._json(f"containers/{cid}/wait", "POST", timeout=None,
                                what=f"wait {cid[:12]}", kind="container")
        return int(data.get("StatusCode", -1))

    async def container_kill(self, cid: str, signal: str | int = "SIGKILL") -> None:
        await self._json(f"containers/{cid}/kill", "POST", params={"signal": str(signal)},
                         what=f"kill {cid[:12]}", kind="container")

    async def container_stop(self, cid: str, *, grace_s: float = 10.0) -> None:
        await self._json(f"containers/{cid}/stop", "POST", params={"t": max(0, round(grace_s))},
                         timeout=None, what=f"stop {cid[:12]}", kind="container")

    async def container_restart(self, cid: str, *, grace_s: float = 10.0) -> None:
        await self._json(f"containers/{cid}/restart", "POST", params={"t": max(0, round(grace_s))},
                         timeout=None, what=f"restart {cid[:12]}", kind="container")

    async def container_remove(self, cid: str, *, force: bool = True) -> None:
        await self._json(f"containers/{cid}", "DELETE", params={"force": force, "v": True},
                         what=f"remove {cid[:12]}", kind="container")

    async def container_list(self, *, labels: LabelFilter | None = None,
                             all: bool = True) -> list[ContainerSummary]:
        params: dict[str, Any] = {"all": all}
        if labels:
            params["filters"] = json.dumps({"label": label_filters(labels)})
        return [container_summary(raw) for raw in await self._json("containers/json", params=params)]

    async def container_logs(self, cid: str, *, tail_bytes: int = 4096) -> str:
        async def run() -> list[str]:
            c = self._docker.containers.container(cid)
            return await c.log(stdout=True, stderr=True, tail=200)
        lines = await self._call(run, what=f"logs {cid[:12]}", kind="container")
        return "".join(lines)[-tail_bytes:]

    async def container_exec(self, cid: str, cmd: list[str], *, user: str = "") -> tuple[int, str]:
        """Run ``cmd`` in the container; returns (exit code, stdout+stderr)."""
        async def run() -> tuple[int, str]:
            c = self._docker.containers.container(cid)
            ex = await c.exec(cmd, user=user, stdout=True, stderr=True)
            chunks: list[bytes] = []
            async with ex.start(detach=False) as stream:
                while (msg := await stream.read_out()) is not None:
                    chunks.append(msg.data)
            info = await ex.inspect()
            return int(info.get("ExitCode") or 0), b"".join(chunks).decode(errors="replace")
        return await self._call(run, what=f"exec in {cid[:12]}", kind="container")

    @asynccontextmanager
    async def attach(self, cid: str) -> AsyncIterator[_Attachment | _NativeAttachment | _ExitedAttachment]:
        """Attach stdin/stdout/stderr (non-TTY, demultiplexed). Attach before start to see
        everything the container writes; ``output`` closes when the container's output ends.

        Docker holds an attach to a container that has exited open until it runs again: the
        port says its output ends at once, so such a container gets a closed attachment. (One
        that exits between that look and the attach itself still holds it open.)"""
        if (await self.container_inspect(cid)).status in ("exited", "dead"):
            yield _ExitedAttachment()
            return
        if self.native_attach:
            async with self._native_attach(cid) as att:
                yield att
            return

        async def setup() -> tuple[URL, None, bool]:
            q = [("stdin", 1), ("stdout", 1), ("stderr", 1), ("stream", 1), ("logs", 0)]
            return URL(f"containers/{cid}/attach").with_query(q), None, False
        stream = Stream(self._docker, setup, None)
        await self._call(stream._init, what=f"attach {cid[:12]}", kind="container")

        async def close() -> None:
            try:
                await self._aio(stream.close)()
            except Exception:
                pass
        async with _pumping(_Attachment(self, stream), close) as att:
            yield att

    @asynccontextmanager
    async def _native_attach(self, cid: str) -> AsyncIterator[_NativeAttachment]:
        path = self.url[len("unix://"):]
        try:
            stream = await trio.open_unix_socket(path)
        except OSError as exc:
            raise EngineUnavailable(f"cannot reach the Docker engine at {self.url}: {exc}") from None
        try:
            api = self._docker.api_version if self._docker.api_version != "auto" else "v1.41"
            await stream.send_all(
                f"POST /{api}/containers/{cid}/attach?stream=1&stdin=1&stdout=1&stderr=1&logs=0 HTTP/1.1\r\n"
                "Host: docker\r\nUser-Agent: corral\r\nContent-Type: text/plain\r\n"
                "Connection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise EngineError(f"attach {cid[:12]}: the engine closed the connection")
                head += chunk
                if len(head) > 1 << 16:
                    raise EngineError(f"attach {cid[:12]}: oversized response from the engine")
            header, _, rest = head.partition(b"\r\n\r\n")
            status_line = header.split(b"\r\n", 1)[0].decode(errors="replace")
            parts = status_line.split(" ", 2)
            status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            if status not in (101, 200):
                body = rest.decode(errors="replace").strip()
                try:
                    body = json.loads(body).get("message", body)
                except (ValueError, AttributeError):
                    pass
                if status == 404:
                    raise ContainerNotFound(f"attach {cid[:12]}: {body}", status=404)
                raise EngineError(f"attach {cid[:12]}: {status_line}: {body}", status=status or None)
        except OSError as exc:
            await stream.aclose()
            raise EngineUnavailable(f"attach {cid[:12]} at {self.url}: {exc}") from None
        except BaseException:
            await stream.aclose()
            raise
        async with _pumping(_NativeAttachment(stream, rest), stream.aclose) as att:
            yield att

    @asynccontextmanager
    async def events(self, *, labels: LabelFilter | None = None,
                     kinds: Collection[EventKind] | None = None,
                     since: float | None = None) -> AsyncIterator[_EventStream]:
        """Subscribe to container events. ``receive`` closes when the stream ends (``ended``
        says why)."""
        filters: dict[str, list[str]] = {
            "type": ["container"],
            "event": sorted(_KIND_ACTION[k] for k in (EVENT_KINDS if kinds is None else kinds))}
        if labels:
            filters["label"] = label_filters(labels)
        params: dict[str, Any] = {"filters": json.dumps(filters)}
        if since is not None:
            params["since"] = f"{since:.9f}"
        es = _EventStream()
        opened = trio.Event()
        state: dict[str, Any] = {}

        async def reader() -> None:
            async def run() -> None:
                async with self._docker._query("events", "GET", params=params, timeout=None) as resp:
                    state["resp"] = resp
                    opened.set()
                    while True:
                        raw = await resp.content.readline()
                        if not raw:
                            return
                        if raw.strip():
                            ev = container_event(json.loads(raw))
                            if ev is not None:
                                es._send.send_nowait(ev)
            async with es._send:
                try:
                    await self._aio(run)()
                    es.ended = "the engine closed the events stream"
                except trio.Cancelled:
                    es.ended = "unsubscribed"
                    raise
                except (aiodocker.DockerError, aiohttp.ClientError, OSError, asyncio.CancelledError,
                        trio.WouldBlock) as exc:
                    es.ended = f"events stream failed: {self._map(exc) if not isinstance(exc, trio.WouldBlock) else 'subscriber fell behind (1024 events)'}"
                finally:
                    opened.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await opened.wait()
            if es.ended and "resp" not in state:
                raise EngineUnavailable(f"cannot subscribe to events at {self.url}: {es.ended}")
            try:
                yield es
            finally:
                nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_engine(url: str | None = None) -> AsyncIterator[DockerEngine]:
    """Open a trio-native Docker engine client. ``url``: None means DOCKER_HOST, else
    unix:///var/run/docker.sock. Raises EngineUnavailable (naming the URL) within 5 s if the
    engine does not answer."""
    url = resolve_url(url)
    try:
        async with _open_engine(url) as engine:
            yield engine
    except BaseExceptionGroup as group:
        leaf = unwrap_single(group)   # trio-asyncio's nurseries wrap single errors in groups
        if leaf is group:
            raise
        raise leaf from None


@asynccontextmanager
async def _open_engine(url: str) -> AsyncIterator[DockerEngine]:
    async with trio_asyncio.open_loop() as loop:
        own: list[aiohttp.BaseConnector] = []   # connectors we made: aiodocker leaves those open

        async def make() -> aiodocker.Docker:
            # Every attached worker holds one connection for its lifetime: aiohttp's default pool
            # of 100 would deadlock the 100th worker's attach. No limit for the local socket.
            if url.startswith("unix://"):
                own.append(aiohttp.UnixConnector(url[len("unix://"):], limit=0))
                docker = aiodocker.Docker(url=url, connector=own[0])
                docker.docker_host = "unix://localhost"   # what aiodocker does with its own connector
                return docker
            if url.startswith(("tcp://", "http://")) and os.environ.get("DOCKER_TLS_VERIFY", "0") != "1":
                own.append(aiohttp.TCPConnector(limit=0))
                return aiodocker.Docker(url=url, connector=own[0])
            return aiodocker.Docker(url=url)
        try:
            docker = await aio_as_trio(make, loop=loop)()
        except ValueError as exc:
            raise EngineUnavailable(f"bad engine URL {url!r}: {exc}") from None
        engine = DockerEngine(docker, loop, url)
        try:
            try:
                with trio.fail_after(5):
                    await engine.ping()
            except trio.TooSlowError:
                raise EngineUnavailable(f"the Docker engine at {url} did not answer within 5 s") from None
            yield engine
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5):
                    await aio_as_trio(docker.close, loop=loop)()
                    for connector in own:
                        await aio_as_trio(connector.close, loop=loop)()
