"""The Docker adapter of the engine port: Docker through aiodocker, bridged into trio with
trio-asyncio.

This is the ONLY module that imports asyncio, aiodocker, aiohttp or trio_asyncio, and the only one
that speaks Docker's JSON: ContainerSpec -> a create body with HostConfig (and corral's fixed
hardening), inspect/list/event JSON -> ContainerState / ContainerSummary / ContainerEvent, image
JSON -> ImageSummary, Docker's error statuses and texts -> runtime.errors. Everything here is
trio-flavoured to its callers; every aiodocker/aiohttp error becomes a corral exception that keeps
the engine's own message.

Podman's Docker-compatible API is served here too: `open_engine` pings and, when the answer
comes from Podman (a ``Libpod-Api-Version`` header), opens a `PodmanEngine`, which handles what
Podman does differently (see its doc). Nothing Podman-specific reaches the port's callers.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import os
import re
import signal as _signal
import socket
import time
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, AsyncIterator, Callable, Collection, Sequence
from urllib.parse import quote, urlencode

import aiodocker
import aiohttp
import msgspec
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
from ..logging import get_logger
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
    labels_match,
)
from .cluster import TASK_ENDED, NodeInfo, ServiceInfo, ServiceSpec, TaskInfo
from .podman import (
    INIT_HINT,
    LIMITS_ENV,
    OUTSIDE_REMOVAL_S,
    RLIMIT_HINT,
    SETTLE_S,
    KillSignals,
    limits_reason,
    unenforced_limits_allowed,
)

DEFAULT_URL = "unix:///var/run/docker.sock"
IDENTIFY_S = 30
"""how long an engine that answered its ping may take to say how it runs (Podman's libpod/info)"""
_STEP_RE = re.compile(r"^(?:Step|STEP) (\d+)/\d+ ?: (.*)$")
"""a build step: Docker's ``Step 1/16 : FROM x``, Podman's ``STEP 1/16: FROM x``"""
_LAYER_RE = re.compile(r"^\s*-{2,3}> ([0-9a-f]{6,64})\s*$")
"""the image a build step made: Docker's `` ---> id``, Podman's ``--> id``"""
log = get_logger("corral.engine")


def resolve_url(url: str | None = None) -> str:
    return url or os.environ.get("DOCKER_HOST") or DEFAULT_URL


# -- Docker's JSON, both ways ---------------------------------------------------------------------

_ACTION_KIND: dict[str, EventKind] = {"start": "started", "die": "died", "died": "died",
                                      "kill": "killed", "oom": "oom", "stop": "stopped",
                                      "restart": "restarted", "destroy": "removed",
                                      "remove": "removed"}
"""Docker's actions and Podman's (Podman tells ``remove`` for ``destroy``, and filters a death by
its own name ``died`` though its events say ``die``)"""
_KIND_ACTIONS: dict[EventKind, tuple[str, ...]] = {
    kind: tuple(a for a, k in _ACTION_KIND.items() if k == kind) for kind in EVENT_KINDS}
_STATUSES = frozenset({"created", "running", "paused", "restarting", "removing", "exited", "dead"})
_PODMAN_STATUS = {"configured": "created", "initialized": "created", "stopped": "exited",
                  "stopping": "running"}
"""Podman's own container states, where its compatible API lets them through"""


def _tmpfs_options(m: TmpfsMount, *, podman: bool = False) -> str:
    opts = []
    if podman and (m.uid is not None or m.gid is not None):
        opts.append("U")         # Podman 4.3 rejects uid=/gid=: U gives it to the container's user
    if not podman and m.uid is not None:
        opts.append(f"uid={m.uid}")
    if not podman and m.gid is not None:
        opts.append(f"gid={m.gid}")
    opts.append(f"mode={m.mode:04o}")
    if m.size is not None:
        opts.append(f"size={m.size}")
    return ",".join(opts)


def create_body(spec: ContainerSpec, *, podman: bool = False) -> dict[str, Any]:
    """A ContainerSpec as the body of ``POST /containers/create``, with corral's fixed
    hardening: no network, no capabilities, no-new-privileges, an init, no restart policy.
    ``podman``: a tmpfs owned by the container's user is asked for with Podman's ``U`` option."""
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
        host["Tmpfs"] = {m.path: _tmpfs_options(m, podman=podman) for m in spec.tmpfs}
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
    value = _PODMAN_STATUS.get(value, value)
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


def _short_ref(tag: str) -> str:
    """Podman names local images ``localhost/x`` and the ones it builds ``docker.io/x``: the
    name they were given is ``x``."""
    for prefix in ("localhost/", "docker.io/library/", "docker.io/"):
        if tag.startswith(prefix):
            return tag[len(prefix):]
    return tag


def image_summary(raw: dict[str, Any], *, podman: bool = False) -> ImageSummary:
    """An image from ``GET /images/json`` or ``GET /images/{ref}/json``. ``podman``: tags as
    they were given (without Podman's ``localhost/`` and ``docker.io/``)."""
    tags = [t for t in raw.get("RepoTags") or [] if t != "<none>:<none>"]
    if podman:
        tags = list(dict.fromkeys(_short_ref(t) for t in tags))
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


# -- Swarm's manager API (runtime.engines.swarm places workers through it) -------------------
_NODE_STATES = frozenset({"ready", "down", "unknown", "disconnected"})


def service_body(spec: ServiceSpec) -> dict[str, Any]:
    """A ServiceSpec as the body of ``POST /services/create``: one task, never restarted, with
    the hardening Swarm lets a service ask for (capabilities dropped, an init, stdin open; no
    network of its own: the node's default one)."""
    cs: dict[str, Any] = {
        "Image": spec.image, "Labels": dict(spec.labels),
        "Env": [f"{k}={v}" for k, v in spec.env.items()],
        "OpenStdin": True, "TTY": False, "Init": True, "CapabilityDrop": ["ALL"],
        "ReadOnly": spec.read_only_rootfs,
        "StopGracePeriod": int(spec.stop_grace_s * 1e9),
    }
    if spec.entrypoint is not None:
        cs["Command"] = list(spec.entrypoint)
    if spec.command is not None:
        cs["Args"] = list(spec.command)
    if spec.user:
        cs["User"] = spec.user
    if spec.working_dir:
        cs["Dir"] = spec.working_dir
    if spec.tmpfs:
        cs["Mounts"] = [{"Type": "tmpfs", "Target": m.path,
                         "TmpfsOptions": {k: v for k, v in (("SizeBytes", m.size), ("Mode", m.mode))
                                          if v is not None}} for m in spec.tmpfs]
    limits: dict[str, Any] = {}
    if spec.memory:
        limits["MemoryBytes"] = spec.memory
    if spec.cpus:
        limits["NanoCPUs"] = int(spec.cpus * 1e9)
    if spec.pids_limit:
        limits["Pids"] = spec.pids_limit
    reserve: dict[str, Any] = {}
    if spec.reserve_memory:
        reserve["MemoryBytes"] = spec.reserve_memory
    if spec.reserve_cpus:
        reserve["NanoCPUs"] = int(spec.reserve_cpus * 1e9)
    template: dict[str, Any] = {"ContainerSpec": cs, "Resources": {"Limits": limits, "Reservations": reserve},
                                "RestartPolicy": {"Condition": "none", "MaxAttempts": 0}}
    if spec.constraints:
        template["Placement"] = {"Constraints": list(spec.constraints)}
    return {"Name": spec.name, "Labels": dict(spec.labels), "TaskTemplate": template,
            "Mode": {"Replicated": {"Replicas": spec.replicas}}}


def node_info(raw: dict[str, Any]) -> NodeInfo:
    spec = raw.get("Spec") or {}
    status = raw.get("Status") or {}
    state = str(status.get("State") or "unknown")
    return NodeInfo(id=raw["ID"], hostname=str((raw.get("Description") or {}).get("Hostname") or ""),
                    status=state if state in _NODE_STATES else "unknown",  # type: ignore[arg-type]
                    availability=str(spec.get("Availability") or ""), role=str(spec.get("Role") or ""),
                    addr=str(status.get("Addr") or ""), labels=dict(spec.get("Labels") or {}),
                    engine_version=str(((raw.get("Description") or {}).get("Engine") or {})
                                       .get("EngineVersion") or ""))


def service_info(raw: dict[str, Any]) -> ServiceInfo:
    spec = raw.get("Spec") or {}
    replicas = ((spec.get("Mode") or {}).get("Replicated") or {}).get("Replicas") or 0
    image = ((spec.get("TaskTemplate") or {}).get("ContainerSpec") or {}).get("Image") or ""
    return ServiceInfo(id=raw["ID"], name=str(spec.get("Name") or ""), labels=dict(spec.get("Labels") or {}),
                       replicas=int(replicas), version=int((raw.get("Version") or {}).get("Index") or 0),
                       image=str(image), created_at=_time(raw.get("CreatedAt")))


def task_info(raw: dict[str, Any]) -> TaskInfo:
    status = raw.get("Status") or {}
    cstatus = status.get("ContainerStatus") or {}
    state = str(status.get("State") or "new")
    code = cstatus.get("ExitCode")
    return TaskInfo(id=raw["ID"], service_id=str(raw.get("ServiceID") or ""),
                    node_id=str(raw.get("NodeID") or ""), status=state,  # type: ignore[arg-type]
                    desired=str(raw.get("DesiredState") or ""),
                    container_id=str(cstatus.get("ContainerID") or ""),
                    exit_code=_int(code) if state in TASK_ENDED and code is not None else None,
                    message=str(status.get("Message") or ""), error=str(status.get("Err") or ""),
                    at=_time(status.get("Timestamp")))


class BuildOutput:
    """The JSON lines of ``POST /build``, Docker's and Podman's: the step that runs (Docker
    ``Step 2/16 : RUN x``, Podman ``STEP 2/16: RUN x``), that step's output so far, the images
    the steps after FROM made (Docker `` ---> id``, Podman ``--> id``) and the error, if any."""

    def __init__(self, on_progress: Callable[[str], None] | None = None) -> None:
        self.on_progress = on_progress
        self.step: str | None = None
        self.step_no = 0
        self.output: list[str] = []
        self.layers: list[str] = []
        self.error: str | None = None

    def feed(self, obj: dict[str, Any]) -> None:
        if "stream" in obj:
            for line in str(obj["stream"]).splitlines():
                m = _LAYER_RE.match(line)
                if m and self.step_no > 1:      # step 1's is the FROM image itself
                    self.layers.append(m.group(1))
                m = _STEP_RE.match(line)
                if m:
                    self.step_no, self.step = int(m.group(1)), m.group(2)
                    self.output.clear()
                self.output.append(line)
                if self.on_progress and line.strip():
                    self.on_progress(line)
        if "error" in obj:
            self.error = str(obj.get("error") or obj.get("errorDetail")).strip()


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

    flavour = "docker"
    """which engine answers: "docker", or "podman" (a `PodmanEngine`)"""
    name = "Docker engine"

    def __init__(self, docker: aiodocker.Docker, loop: Any, url: str, *, rootless: bool = False,
                 cgroup_version: str = "") -> None:
        self._docker = docker
        self._loop = loop
        self.url = url
        self.rootless = rootless
        """the engine runs as an unprivileged user"""
        self.cgroup_version = cgroup_version
        """"1" or "2" (the engine's host), "" when it does not say"""
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
            return EngineUnavailable(f"cannot reach the {self.name} at {self.url}: {msg}", status=None)
        return self._map_status(status, msg, what=what, kind=kind)

    def _map_status(self, status: int, msg: str, *, what: str = "", kind: str = "") -> EngineError:
        """An engine's error answer (status, message) as corral's typed error."""
        text = f"{what}: {msg}" if what else msg
        if status == 404:
            if kind == "image" or "No such image" in msg:
                return ImageNotFound(text, status=404)
            if kind == "container" or "No such container" in msg:
                return ContainerNotFound(text, status=404)
        if status == 409 and "already in use" in msg:
            return NameConflict(msg, status=409)
        if status == 409 and "is not running" in msg:
            return ContainerNotRunning(text, status=409)
        if status == 409 and "already in progress" in msg:
            return RemovalInProgress(text, status=409)
        return EngineError(text, status=status)

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

    async def _ping_headers(self) -> dict[str, str]:
        """``GET /_ping`` (unversioned: it may come before the API version is known): the
        answer's headers, names in lower case."""
        async def run() -> dict[str, str]:
            async with self._docker._query("_ping", "GET", versioned_api=False) as resp:
                await resp.read()
                return {k.lower(): v for k, v in resp.headers.items()}
        return await self._call(run)

    async def version(self) -> EngineVersion:
        v = await self._call(self._docker.version)
        return EngineVersion(version=str(v.get("Version", "")), api_version=str(v.get("ApiVersion", "")),
                             kernel_version=str(v.get("KernelVersion", "")))

    # -- images ----------------------------------------------------------------------------
    async def image_inspect(self, ref: str) -> ImageSummary:
        return image_summary(await self._image_inspect_raw(ref), podman=self.flavour == "podman")

    async def _image_inspect_raw(self, ref: str) -> dict[str, Any]:
        return await self._json(f"images/{ref}/json", what=f"image {ref}", kind="image")

    async def image_list(self, *, labels: LabelFilter | None = None) -> list[ImageSummary]:
        params = {}
        wanted = label_filters(labels)
        asked = wanted[:1] if self.flavour == "podman" else wanted   # see PodmanEngine
        if asked:
            params["filters"] = json.dumps({"label": asked})
        podman = self.flavour == "podman"
        images = [image_summary(raw, podman=podman) for raw in await self._json("images/json", params=params)]
        return [i for i in images if labels_match(i.labels, wanted)]

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
        out = BuildOutput(on_progress)
        params = {"t": tag, "labels": json.dumps(labels), "networkmode": "host" if network else "none",
                  "rm": "1", "forcerm": "1"}
        try:
            await self._stream_json("build", params=params, data=context_tar,
                                    headers={"Content-Type": "application/x-tar"}, on_line=out.feed)
        except EngineError as exc:
            if isinstance(exc, EngineUnavailable):
                raise
            raise ImageBuildError(f"building {tag} failed: {exc}", step=out.step,
                                  output_tail="\n".join(out.output)) from None
        if out.error:
            await self._remove_dangling(out.layers)
            raise ImageBuildError(f"building {tag} failed: {out.error}", step=out.step,
                                  output_tail="\n".join(out.output))
        return (await self._image_inspect_raw(tag))["Id"]

    async def _remove_dangling(self, layers: list[str]) -> None:
        """A failed build leaves its intermediate images untagged: remove those it made."""
        for layer in reversed(layers):
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
        """Also checks that the engine applied the limits the spec asks for: a container it
        would run without them is removed again (EngineError), unless CORRAL_ALLOW_UNENFORCED_LIMITS
        is set (then a warning is logged)."""
        name = spec.name
        params = {"name": name} if name else None
        data = await self._json("containers/create", "POST", data=self._create_body(spec),
                                params=params, what=f"create {name or ''}".strip(), kind="image")
        cid = data["Id"]
        if (spec.memory or spec.cpus or spec.pids_limit) and self._limits_may_drop(data):
            await self._check_limits(cid, spec)
        return cid

    def _create_body(self, spec: ContainerSpec) -> dict[str, Any]:
        return create_body(spec)

    def _kill_signals(self) -> KillSignals | None:
        """What fills in the signals of kill events, for an engine whose events lack them."""
        return None

    @property
    def reports_oom(self) -> bool:
        """The engine tells OOM kills (an ``oom`` event, ContainerState.oom_killed). Where it
        does not, the wrapper's own report (its cgroup's OOM kill counter) is all there is."""
        return True

    def _limits_may_drop(self, created: dict[str, Any]) -> bool:
        """Docker drops a limit the host cannot enforce with a warning in its answer."""
        return bool(created.get("Warnings"))

    async def _check_limits(self, cid: str, spec: ContainerSpec) -> None:
        host = (await self.container_inspect_raw(cid)).get("HostConfig") or {}
        dropped = []
        if spec.memory and host.get("Memory") != spec.memory:
            dropped.append(f"memory={spec.memory}")
        if spec.cpus and not host.get("NanoCpus") and not host.get("CpuQuota"):
            dropped.append(f"cpus={spec.cpus}")
        if spec.pids_limit and host.get("PidsLimit") != spec.pids_limit:
            dropped.append(f"pids_limit={spec.pids_limit}")
        if not dropped:
            return
        why = limits_reason(rootless=self.rootless, cgroup_version=self.cgroup_version)
        if unenforced_limits_allowed():
            log.warning("limits_not_enforced", container=spec.name or cid[:12], dropped=dropped,
                        engine=self.url, why=why)
            return
        with trio.CancelScope(shield=True), trio.move_on_after(15):
            try:
                await self.container_remove(cid, force=True)
            except EngineError:
                pass
        raise EngineError(
            f"the {self.name} at {self.url} did not apply {', '.join(dropped)} to "
            f"{spec.name or cid[:12]} ({why}): corral does not run a container without the limits "
            f"its spec asks for. Set {LIMITS_ENV}=1 to run it without them (a warning is logged), "
            "or use an engine that enforces them (rootful, or cgroup v2)")

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
        code = int(data.get("StatusCode", -1))
        if code == -1:      # Podman, for a container that never ran
            state = await self.container_inspect(cid)
            if not state.running:
                return state.exit_code or 0
        return code

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
        try:
            await self._json(f"containers/{cid}", "DELETE", params={"force": force, "v": True},
                             what=f"remove {cid[:12]}", kind="container")
        except EngineError as exc:
            if not (force and self._stopping_race(exc)):
                raise
            # it was on its way out when the kill came: once it is out, remove it
            await self.container_wait(cid)
            await self._json(f"containers/{cid}", "DELETE", params={"force": force, "v": True},
                             what=f"remove {cid[:12]}", kind="container")

    def _stopping_race(self, exc: EngineError) -> bool:
        return False

    async def container_list(self, *, labels: LabelFilter | None = None,
                             all: bool = True) -> list[ContainerSummary]:
        params: dict[str, Any] = {"all": all}
        if labels:
            params["filters"] = json.dumps({"label": label_filters(labels)})
        return [container_summary(raw) for raw in await self._json("containers/json", params=params)]

    async def container_logs(self, cid: str, *, tail_bytes: int = 4096, stdout_only: bool = False) -> str:
        # the engine counts its tail in lines: enough of them for tail_bytes of short lines
        lines = max(200, tail_bytes // 256)

        async def run() -> list[str]:
            c = self._docker.containers.container(cid)
            return await c.log(stdout=True, stderr=not stdout_only, tail=lines)
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

    # -- Swarm's manager API (not part of the engine port: runtime.engines.swarm uses it) ----
    async def swarm_node_id(self) -> str:
        """This engine's own node id in its swarm ("" outside a swarm)."""
        info = await self._json("info")
        return str((info.get("Swarm") or {}).get("NodeID") or "")

    async def swarm_local_state(self) -> str:
        """This engine's own swarm state: "active" while it takes part in its swarm ("inactive"
        as soon as it begins to shut down, before it stops its containers)."""
        info = await self._json("info")
        return str((info.get("Swarm") or {}).get("LocalNodeState") or "")

    async def node_list(self) -> list[NodeInfo]:
        return [node_info(raw) for raw in await self._json("nodes")]

    async def service_create(self, spec: ServiceSpec) -> str:
        """NameConflict if a service of that name exists."""
        try:
            data = await self._json("services/create", "POST", data=service_body(spec),
                                    what=f"create service {spec.name}")
        except EngineError as exc:
            if exc.status == 409:
                raise NameConflict(str(exc), status=409) from None
            raise
        return str(data["ID"])

    async def service_inspect(self, ref: str) -> ServiceInfo:
        """ContainerNotFound if there is no such service (a worker's container is one)."""
        return service_info(await self._service_raw(ref))

    async def _service_raw(self, ref: str) -> dict[str, Any]:
        try:
            return await self._json(f"services/{quote(ref, safe='')}", what=f"service {ref[:12]}")
        except EngineError as exc:
            if exc.status == 404:
                raise ContainerNotFound(str(exc), status=404) from None
            raise

    async def service_scale(self, ref: str, replicas: int) -> None:
        raw = await self._service_raw(ref)
        spec = raw["Spec"]
        spec["Mode"] = {"Replicated": {"Replicas": replicas}}
        version = (raw.get("Version") or {}).get("Index")
        await self._json(f"services/{raw['ID']}/update", "POST", data=spec,
                         params={"version": version}, what=f"scale service {ref[:12]}")

    async def service_remove(self, ref: str) -> None:
        try:
            await self._json(f"services/{quote(ref, safe='')}", "DELETE", what=f"remove service {ref[:12]}")
        except EngineError as exc:
            if exc.status == 404:
                raise ContainerNotFound(str(exc), status=404) from None
            raise

    async def service_list(self, *, labels: LabelFilter | None = None) -> list[ServiceInfo]:
        params: dict[str, Any] = {}
        if labels:
            params["filters"] = json.dumps({"label": label_filters(labels)})
        return [service_info(raw) for raw in await self._json("services", params=params)]

    async def task_list(self, *, services: Sequence[str] = (),
                        labels: LabelFilter | None = None) -> list[TaskInfo]:
        filters: dict[str, list[str]] = {}
        if services:
            filters["service"] = list(services)
        if labels:
            filters["label"] = label_filters(labels)
        params = {"filters": json.dumps(filters)} if filters else None
        return [task_info(raw) for raw in await self._json("tasks", params=params)]

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
                raise self._map_status(status, body if status == 404 else f"{status_line}: {body}",
                                       what=f"attach {cid[:12]}", kind="container")
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
            "event": sorted(a for k in (EVENT_KINDS if kinds is None else kinds)
                            for a in _KIND_ACTIONS[k])}
        if labels:
            filters["label"] = label_filters(labels)
        params: dict[str, Any] = {"filters": json.dumps(filters)}
        if since is not None:
            params["since"] = f"{since:.9f}"
        es = _EventStream()
        opened = trio.Event()
        state: dict[str, Any] = {}
        fill = self._kill_signals()
        if fill is None:
            sink = es._send
        else:    # the reader's events pass through `fill` on their way to the subscriber
            sink, raw_events = trio.open_memory_channel[ContainerEvent](1024)

        async def refill() -> None:
            assert fill is not None
            async with es._send, raw_events:
                while True:
                    deadline = fill.deadline
                    out = None
                    with trio.move_on_at(math.inf if deadline is None else deadline):
                        try:
                            ev = await raw_events.receive()
                        except trio.EndOfChannel:
                            break
                        out = fill.feed(ev, trio.current_time())
                    for ev in fill.expire(trio.current_time()) if out is None else out:
                        await es._send.send(ev)
                for ev in fill.flush():
                    await es._send.send(ev)

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
                                sink.send_nowait(ev)
            async with sink:
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

        failed: EngineUnavailable | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            if fill is not None:
                nursery.start_soon(refill)
            await opened.wait()
            if es.ended and "resp" not in state:
                # raised once the nursery is closed: from inside, it would reach the caller
                # wrapped in an ExceptionGroup, which no `except EngineError` catches
                failed = EngineUnavailable(f"cannot subscribe to events at {self.url}: {es.ended}")
                nursery.cancel_scope.cancel()
            else:
                try:
                    yield es
                finally:
                    nursery.cancel_scope.cancel()
        if failed is not None:
            raise failed


class PodmanEngine(DockerEngine):
    """Podman's Docker-compatible API (`podman system service`), rootful or rootless, as the
    engine port. What Podman (4.3) does differently, and what this class makes of it:

    - Name conflicts are HTTP 500 "already in use" (Docker: 409): NameConflict all the same.
      Other states are 500 "container state improper": kill or exec of a container that does not
      run is ContainerNotRunning, removing a running one without force an EngineError 409.
    - Podman prepares a container when it is attached, so the runtime's failures (runc) come back
      as 409 on attach, before start: they are reported as the start's failure, with a hint for
      the two a host causes (rlimits raised where root lacks CAP_SYS_RESOURCE; no catatonit).
    - A tmpfs for the container's user: Podman rejects ``uid=``/``gid=``; its ``U`` option.
    - Events: it filters a death by its own name ``died`` and tells a removal as ``remove``: the
      adapter asks for both names (on Docker too). Its kill events carry no signal: the death
      that follows names it (`KillSignals`). A stop or restart tells no kill at all, and a stop
      tells ``stop`` before the death.
    - ``wait`` on a container that never ran answers -1, and on one that runs it answers
      0.2-1.2 s after the exit: Podman's own wait (``libpod/.../wait``, 10 ms interval) instead.
    - Image tags come back as ``localhost/x`` and ``docker.io/x``: ``x``. Build output is
      ``STEP 1/16: FROM`` and ``--> id`` (`BuildOutput` reads both).
    - Rootless on cgroup v1 drops memory, cpu and pids limits without a word: every create is
      checked (see `DockerEngine.container_create`).
    - An image listing filtered by several labels lists nothing: it asks for the first and
      filters the rest itself.
    - Removing a container (forced) that is exiting just then fails ("could not be stopped ...
      container state improper"): it waits for the exit and removes it then.
    - Two forced removals of one container that overlap both answer 204 (the later one waits for
      the container's lock, finds it gone and calls that a success), where Docker answers the
      later one 409: a forced removal looks first (see `container_remove`), so that a removal
      out of band (`podman rm -f`) is told as one. A container being removed answers inspect
      with 500 "... does not exist in database: no such container": ContainerNotFound.
    - A stop or restart shows ``stopping`` (not running, no exit code yet) until the container
      has exited: ``wait`` waits for that exit rather than answering 0 at once (and takes the
      exit code from the ``died`` event when a restart got the container running again first).
    - Inspect lists CapDrop expanded (the capabilities Podman would have granted) rather than
      ``ALL``; the container has none either way.
    - On cgroup v1 there are no ``oom`` events and ``OOMKilled`` stays false (`reports_oom`).
    - ``/version`` takes ~0.4 s (it runs conmon and runc for their versions): pings use ``/_ping``.
    - Each exec keeps two conmon processes for containers.conf's ``exit_command_delay`` (300 s
      by default), past the container's removal; scripts/setup sets it to 5 s for its services.
    """

    flavour = "podman"
    name = "Podman engine"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._removing: set[str] = set()
        """the containers (full ids) this engine is removing"""
        self._ended_here: set[str] = set()
        """the containers this engine killed, stopped or restarted (as it was asked): their
        deaths need no outside removal to explain them (see `container_remove`)"""

    async def container_wait(self, cid: str) -> int:
        """Podman's own wait (its compatible one answers 0.2-1.2 s after the exit, polling
        slowly): until the container is stopped or exited, looking every 10 ms.

        A stop or restart shows ``stopping`` (not running, no exit code yet) until the container
        has exited: that is waited for too. A restart can take it from there to running again
        without a look seeing it stopped (it holds the container's lock meanwhile): the exit
        code is then the one its ``died`` event tells."""
        state = await self.container_inspect(cid)
        if not state.running and state.status != "running":   # "stopping" reads as running
            return state.exit_code or 0
        if state.running:
            code = await self._libpod_wait(cid, "stopped", "exited")
            return int(code) if isinstance(code, int) else await super().container_wait(cid)
        code = await self._libpod_wait(cid, "stopped", "exited", "running")
        if isinstance(code, int) and code >= 0:
            return code
        return await self._last_exit_code(cid, since=state.started_at or 0.0)

    async def _last_exit_code(self, cid: str, *, since: float) -> int:
        """The exit code of the container's last ``died`` event since ``since``."""
        params = {"stream": "false", "since": f"{since:.9f}",
                  "filters": json.dumps({"container": [cid], "event": ["died"]})}

        async def run() -> bytes:
            async with self._docker._query("libpod/events", "GET", params=params) as resp:
                return await resp.read()
        body = await self._call(run, what=f"events of {cid[:12]}", kind="container")
        codes = []
        for line in body.splitlines():
            try:
                attrs = json.loads(line)["Actor"]["Attributes"]
            except (ValueError, KeyError, TypeError):
                continue
            code = _int(attrs.get("containerExitCode", attrs.get("exitCode")))
            if code is not None:
                codes.append(code)
        if not codes:
            raise EngineError(f"wait {cid[:12]}: it was started again before its exit was seen, "
                              f"and no died event tells its exit code")
        return codes[-1]

    async def container_kill(self, cid: str, signal: str | int = "SIGKILL") -> None:
        self._ended_here.add(cid)
        await super().container_kill(cid, signal)

    async def container_stop(self, cid: str, *, grace_s: float = 10.0) -> None:
        self._ended_here.add(cid)
        await super().container_stop(cid, grace_s=grace_s)

    async def container_restart(self, cid: str, *, grace_s: float = 10.0) -> None:
        self._ended_here.add(cid)
        await super().container_restart(cid, grace_s=grace_s)

    async def container_remove(self, cid: str, *, force: bool = True) -> None:
        """Podman answers 204 to both of two forced removals that overlap (the later one waits
        for the container's lock, then finds it gone), where Docker answers the later one 409. A
        removal out of band (``podman rm -f``) would pass for this call's own, and the worker
        whose container it was would be certified as crashed. So a forced removal looks first:

        - a container that is gone, or being removed (inspect answers "no such container"), is
          ContainerNotFound; a removal of it by this engine under way already, RemovalInProgress;
        - one on its way out (``stopping``, or ``stopped``: exited, not yet cleaned up) is waited
          for, up to `SETTLE_S`, until it has exited, runs again, or is gone;
        - one that died of a signal that did not come through this engine, less than
          `OUTSIDE_REMOVAL_S` ago, is given until then to be taken by a removal out of band
          (which kills first, and holds the container only once it has seen the death): gone by
          then, ContainerNotFound.

        An outside removal slower than that still passes for this one's: Podman 4.3 tells no
        more. This one's own removal is not slowed by any of it when the container runs, or this
        engine ended it."""
        if not force:
            await super().container_remove(cid, force=False)
            return
        full = cid
        try:
            raw = await self.container_inspect_raw(cid)
            full = str(raw["Id"])
            if full in self._removing:
                raise RemovalInProgress(f"remove {cid[:12]}: removal of container {full} is already "
                                        f"in progress (by this engine)", status=409)
            self._removing.add(full)
            try:
                await self._wait_for_outside_removal(cid, full, raw)
                await super().container_remove(full, force=True)
            finally:
                self._removing.discard(full)
        finally:
            self._ended_here.difference_update((cid, full))

    async def _libpod_wait(self, cid: str, *conditions: str) -> Any:
        """Podman's own wait: until the container is in one of those states (looking every
        10 ms); its exit code. ContainerNotFound once it is gone."""
        url = URL(f"libpod/containers/{cid}/wait").with_query(
            [("condition", c) for c in conditions] + [("interval", "10ms")])
        return await self._json(url, "POST", timeout=None, what=f"wait {cid[:12]}",
                                kind="container")

    async def _wait_for_outside_removal(self, cid: str, full: str, raw: dict[str, Any]) -> None:
        """See `container_remove`. ContainerNotFound if another removal took the container."""
        if (raw.get("State") or {}).get("Status") in ("stopping", "stopped"):
            with trio.move_on_after(SETTLE_S):
                await self._libpod_wait(full, "exited", "running")
            raw = await self.container_inspect_raw(full)
        state = container_state(raw)
        if state.running or state.finished_at is None or (state.exit_code or 0) <= 128 \
                or cid in self._ended_here or full in self._ended_here:
            return
        left = min(state.finished_at + OUTSIDE_REMOVAL_S - time.time(), OUTSIDE_REMOVAL_S)
        if left > 0:
            with trio.move_on_after(left):
                await self._libpod_wait(full, "removing")    # it never shows: gone, or the timeout
                raise RemovalInProgress(f"remove {cid[:12]}: container {full} is being removed",
                                        status=409)

    async def ping(self) -> None:
        """``GET /_ping``: Podman's ``/version`` runs conmon and the OCI runtime to ask theirs
        (~0.4 s), and corral pings after every death."""
        async def run() -> None:
            async with self._docker._query("_ping", "GET") as resp:
                await resp.read()
        await self._call(run)

    def _create_body(self, spec: ContainerSpec) -> dict[str, Any]:
        return create_body(spec, podman=True)

    def _limits_may_drop(self, created: dict[str, Any]) -> bool:
        return True

    def _kill_signals(self) -> KillSignals | None:
        return KillSignals()

    def _stopping_race(self, exc: EngineError) -> bool:
        return "could not be stopped" in str(exc) and "container state improper" in str(exc)

    @property
    def reports_oom(self) -> bool:
        return self.cgroup_version != "1"

    def _map_status(self, status: int, msg: str, *, what: str = "", kind: str = "") -> EngineError:
        text = f"{what}: {msg}" if what else msg
        if "already in use" in msg and status in (409, 500):
            return NameConflict(msg, status=409)
        if "can only kill running containers" in msg or \
                "can only create exec sessions on running containers" in msg:
            return ContainerNotRunning(text, status=409)
        if "cannot remove container" in msg and "as it is running" in msg:
            return EngineError(text, status=409)
        if "is being removed" in msg or "removal is already in progress" in msg:
            return RemovalInProgress(text, status=409)
        if "no such container" in msg.lower() or "has already been removed" in msg:
            return ContainerNotFound(text, status=404)    # 500s while it is being removed
        if status == 404 and ("image not known" in msg or "No such image" in msg):
            return ImageNotFound(text, status=404)
        hint = ""
        if "error setting rlimit" in msg:
            hint = f" ({RLIMIT_HINT})"
        elif "container-init binary not found" in msg or "catatonit" in msg:
            hint = f" ({INIT_HINT})"
        if status == 409 and "for attach" in msg and what.startswith("attach "):
            cid = what[len("attach "):]
            return EngineError(f"start {cid} (Podman starts the runtime on attach): {msg}{hint}",
                               status=409)
        if hint:
            return EngineError(f"{text}{hint}", status=status)
        return super()._map_status(status, msg, what=what, kind=kind)


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
        try:
            probe = DockerEngine(docker, loop, url)
            try:
                with trio.fail_after(5):
                    headers = await probe._ping_headers()
            except trio.TooSlowError:
                raise EngineUnavailable(f"the Docker engine at {url} did not answer within 5 s") from None
            if docker.api_version == "auto" and headers.get("api-version"):
                # what aiodocker would ask /version for (~0.4 s on Podman, seconds under load)
                docker.api_version = "v" + headers["api-version"]
            try:
                with trio.fail_after(IDENTIFY_S):
                    engine = await _identify(probe, headers)
            except trio.TooSlowError:
                raise EngineUnavailable(f"the engine at {url} answered its ping but did not say how "
                                        f"it runs within {IDENTIFY_S:g} s") from None
            yield engine
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5):
                    await aio_as_trio(docker.close, loop=loop)()
                    for connector in own:
                        await aio_as_trio(connector.close, loop=loop)()


async def _identify(probe: DockerEngine, ping_headers: dict[str, str]) -> DockerEngine:
    """Which engine answers at the URL, as the adapter for it: Podman answers its ping with a
    ``Libpod-Api-Version`` header (the ``/version`` that also says so takes Podman ~0.4 s, as it
    runs conmon and runc for theirs). Podman tells whether it runs rootless, and on which cgroup
    version."""
    if "libpod-api-version" not in ping_headers:
        return probe
    info = await probe._json("libpod/info")
    host = info.get("host") or {}
    return PodmanEngine(probe._docker, probe._loop, probe.url,
                        rootless=bool((host.get("security") or {}).get("rootless")),
                        cgroup_version=str(host.get("cgroupVersion") or "").lstrip("v"))


# -- a local engine's administration, synchronously ----------------------------------------------
# For runtime.chaoskit.dockerd, which runs engines of its own for tests and chaos runs and holds
# one across a pytest session, outside any trio run: plain http.client on the unix socket, no
# asyncio. Docker's JSON stays here all the same.

class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client on a unix socket (``unix://`` URLs only)."""

    def __init__(self, url: str, timeout: float) -> None:
        if not url.startswith("unix://"):
            raise EngineError(f"{url}: only a local engine's unix socket (unix://...) is administered here")
        super().__init__("localhost", timeout=timeout)
        self._path = url[len("unix://"):]

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _admin(url: str, method: str, path: str, *, timeout: float = 30.0,
           body: Any = None) -> tuple[int, bytes]:
    conn = UnixHTTPConnection(url, timeout)
    try:
        if body is None:
            conn.request(method, path, headers={"Host": "docker"})
        else:
            conn.request(method, path, body=json.dumps(body).encode(),
                         headers={"Host": "docker", "Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise EngineUnavailable(f"{method} {path} at {url}: {exc}") from None
    finally:
        conn.close()


def _admin_json(url: str, path: str, *, timeout: float = 30.0) -> Any:
    status, body = _admin(url, "GET", path, timeout=timeout)
    if status != 200:
        raise EngineError(f"GET {path} at {url}: {status} {body[:300].decode(errors='replace')}",
                          status=status)
    return json.loads(body)


def admin_ping(url: str, *, timeout: float = 2.0) -> bool:
    """Does the engine at ``url`` answer ``/_ping``?"""
    try:
        status, _ = _admin(url, "GET", "/_ping", timeout=timeout)
    except EngineUnavailable:
        return False
    return status == 200


class AdminInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What `admin_info` tells of an engine (``GET /info``)."""
    storage_driver: str
    cgroup_driver: str
    live_restore: bool
    containers: int
    images: int


def admin_info(url: str) -> AdminInfo:
    raw = _admin_json(url, "/info", timeout=10)
    return AdminInfo(storage_driver=str(raw.get("Driver") or ""),
                     cgroup_driver=str(raw.get("CgroupDriver") or ""),
                     live_restore=bool(raw.get("LiveRestoreEnabled")),
                     containers=int(raw.get("Containers") or 0), images=int(raw.get("Images") or 0))


def admin_image_id(url: str, ref: str) -> str | None:
    """The id of image ``ref`` at ``url``; None if it has none of that name."""
    status, body = _admin(url, "GET", f"/images/{quote(ref, safe='')}/json")
    if status == 404:
        return None
    if status != 200:
        raise EngineError(f"image {ref} at {url}: {status} {body[:300].decode(errors='replace')}",
                          status=status)
    return str(json.loads(body)["Id"])


def admin_container_ids(url: str) -> list[str]:
    """Every container at ``url`` (running or not), whoever made it."""
    return [str(c["Id"]) for c in _admin_json(url, "/containers/json?all=1")]


def admin_remove_container(url: str, cid: str) -> bool:
    """Remove (forced, with its anonymous volumes). True once it is gone; False while someone
    else's removal of it is in progress."""
    status, body = _admin(url, "DELETE", f"/containers/{cid}?force=1&v=1", timeout=60)
    if status in (204, 404):
        return True
    if status == 409 and b"already in progress" in body:
        return False
    raise EngineError(f"removing container {cid[:12]} at {url}: {status} "
                      f"{body[:300].decode(errors='replace')}", status=status)


def admin_copy_images(source_url: str, target_url: str, refs: Sequence[str]) -> int:
    """Copy images from one local engine to another, as `docker save | docker load` would (the
    ids stay the same): ``GET /images/get`` streamed into ``POST /images/load``. Returns the
    bytes copied. ImageNotFound if the source lacks one; EngineError if the load fails."""
    for ref in refs:
        if admin_image_id(source_url, ref) is None:
            raise ImageNotFound(f"{ref} is not in the engine at {source_url}", status=404)
    src = UnixHTTPConnection(source_url, 600)
    dst = UnixHTTPConnection(target_url, 600)
    copied = 0
    try:
        src.request("GET", "/images/get?" + urlencode([("names", ref) for ref in refs]),
                    headers={"Host": "docker"})
        resp = src.getresponse()
        if resp.status != 200:
            raise EngineError(f"GET /images/get at {source_url}: {resp.status} "
                              f"{resp.read()[:300].decode(errors='replace')}", status=resp.status)

        def body() -> Any:
            nonlocal copied
            while chunk := resp.read(1 << 20):
                copied += len(chunk)
                yield chunk
        dst.request("POST", "/images/load?quiet=1", body=body(), encode_chunked=True,
                    headers={"Host": "docker", "Content-Type": "application/x-tar"})
        answer = dst.getresponse()
        text = answer.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as exc:
        raise EngineUnavailable(f"copying {', '.join(refs)} from {source_url} to {target_url}: {exc}") from None
    finally:
        src.close()
        dst.close()
    errors = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("error"):
            errors.append(str(obj["error"]))
    if answer.status != 200 or errors:
        raise EngineError(f"POST /images/load at {target_url}: {answer.status} "
                          f"{'; '.join(errors) or text[:300]}", status=answer.status)
    return copied


# -- a test swarm's administration (runtime.chaoskit.swarm) -------------------------------------
def _admin_call(url: str, method: str, path: str, body: Any = None, *, timeout: float = 30.0) -> Any:
    status, raw = _admin(url, method, path, timeout=timeout, body=body)
    if status >= 300:
        raise EngineError(f"{method} {path} at {url}: {status} {raw[:300].decode(errors='replace')}",
                          status=status)
    return json.loads(raw) if raw.strip() else None


def admin_swarm_init(url: str, *, addr: str, addr_pools: Sequence[str], pool_mask: int = 24,
                     heartbeat_s: float = 5.0) -> str:
    """``docker swarm init`` with its API listening and advertised on ``addr`` (no port: 2377),
    overlay and ingress subnets from ``addr_pools``, and node heartbeats every ``heartbeat_s``
    (a node is marked down after a few missed ones). Returns the manager's node id."""
    return str(_admin_call(url, "POST", "/swarm/init", {
        "ListenAddr": f"{addr}:2377", "AdvertiseAddr": addr, "DataPathAddr": addr,
        "DefaultAddrPool": list(addr_pools), "SubnetSize": pool_mask,
        "Spec": {"Dispatcher": {"HeartbeatPeriod": int(heartbeat_s * 1e9)}},
    }, timeout=60))


def admin_swarm_join(url: str, *, addr: str, manager_addr: str, token: str) -> None:
    _admin_call(url, "POST", "/swarm/join", {
        "ListenAddr": f"{addr}:2377", "AdvertiseAddr": addr, "DataPathAddr": addr,
        "RemoteAddrs": [f"{manager_addr}:2377"], "JoinToken": token}, timeout=60)


def admin_swarm_worker_token(url: str) -> str:
    return str(_admin_json(url, "/swarm")["JoinTokens"]["Worker"])


def admin_swarm_node_id(url: str) -> str:
    """The engine's node id in its swarm ("" outside one)."""
    return str((_admin_json(url, "/info").get("Swarm") or {}).get("NodeID") or "")


def admin_swarm_leave(url: str) -> None:
    status, raw = _admin(url, "POST", "/swarm/leave?force=1", timeout=30)
    if status not in (200, 503):          # 503: not in a swarm
        raise EngineError(f"POST /swarm/leave at {url}: {status} {raw[:300].decode(errors='replace')}",
                          status=status)


def admin_nodes(url: str) -> list[NodeInfo]:
    return [node_info(raw) for raw in _admin_json(url, "/nodes")]


def admin_node_labels(url: str, node_id: str, labels: dict[str, str]) -> None:
    """Add ``labels`` to a node's (through a manager at ``url``)."""
    raw = _admin_json(url, f"/nodes/{node_id}")
    spec = raw.get("Spec") or {}
    spec["Labels"] = {**(spec.get("Labels") or {}), **labels}
    _admin_call(url, "POST", f"/nodes/{node_id}/update?version={raw['Version']['Index']}", spec)


def admin_service_ids(url: str) -> list[str]:
    """Every service of the swarm (through a manager at ``url``), whoever made it."""
    return [str(s["ID"]) for s in _admin_json(url, "/services")]


def admin_remove_service(url: str, sid: str) -> None:
    status, raw = _admin(url, "DELETE", f"/services/{sid}")
    if status not in (200, 404):
        raise EngineError(f"removing service {sid} at {url}: {status} {raw[:300].decode(errors='replace')}",
                          status=status)


def admin_networks(url: str) -> list[tuple[str, str, list[str]]]:
    """The engine's networks: (name, driver, subnets)."""
    return [(str(n.get("Name")), str(n.get("Driver")),
             [str(c.get("Subnet")) for c in ((n.get("IPAM") or {}).get("Config") or []) if c.get("Subnet")])
            for n in _admin_json(url, "/networks")]
