"""The engine port: what corral needs of a container engine, as a typed Protocol and typed values.

Actors, the API and the applications speak only this. Each adapter translates its engine's own
vocabulary at its edge and nowhere else: `runtime.engines.docker` (Docker's JSON, through
aiodocker), `runtime.engines.fake` (in memory), `runtime.engines.swarm` (Swarm's manager for
placement, each node's engine for the rest; what cannot hold there is its ``LIMITATIONS``). ``tests/contract`` runs the same cases against
every adapter.

Hardening is the adapters' fixed policy, not a field: every container an engine creates has no
network (loopback only), drops every capability, cannot gain privileges (no-new-privileges), runs
an init process as pid 1, never restarts on its own and is never removed on its own. A spec cannot
ask for less. What varies per worker is in `ContainerSpec`: user, limits (memory without swap,
cpus, pids), a read-only root filesystem and sized tmpfs mounts.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Callable, Collection, Literal, Mapping, Protocol, Sequence, TypeAlias

import msgspec
import trio

STDOUT = 1
STDERR = 2

ContainerStatus: TypeAlias = Literal["created", "running", "paused", "restarting", "removing",
                                     "exited", "dead"]

EventKind: TypeAlias = Literal["started", "died", "killed", "oom", "stopped", "restarted", "removed"]
EVENT_KINDS: frozenset[EventKind] = frozenset(
    ("started", "died", "killed", "oom", "stopped", "restarted", "removed"))
"""``started``: the container (re)started. ``died``: its main process ended (``exit_code``).
``killed``: a signal was sent through the engine (``signal``; `docker kill`, `stop`, `restart`,
`rm -f` send one). ``oom``: the kernel's OOM killer struck inside it. ``stopped``: a stop ended
(`docker stop`, `restart`, the engine shutting down). ``restarted``: `docker restart` finished.
``removed``: the container is gone."""

LabelFilter: TypeAlias = Mapping[str, str | None] | Sequence[str]
"""``{"key": "value"}`` (``None``: the key with any value), or ``["key", "key=value"]``."""


class TmpfsMount(msgspec.Struct, frozen=True, kw_only=True):
    """A memory-backed filesystem at ``path``."""
    path: str
    size: int | None = None
    """bytes; None: the engine's default (half the host's memory)"""
    mode: int = 0o1777
    uid: int | None = None
    gid: int | None = None


class ContainerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What to create. Its stdio is attachable (non-TTY); see the module doc for the hardening
    every container gets."""
    image: str
    name: str | None = None
    env: dict[str, str] = {}
    labels: dict[str, str] = {}
    command: list[str] | None = None
    """None: the image's own command"""
    entrypoint: list[str] | None = None
    """None: the image's own entrypoint"""
    user: str | None = None
    working_dir: str | None = None
    memory: int | None = None
    """bytes of memory, swap included (no swap beyond it)"""
    cpus: float | None = None
    pids_limit: int | None = None
    read_only_rootfs: bool = False
    tmpfs: tuple[TmpfsMount, ...] = ()
    stdin_once: bool = True
    """stdin closes (EOF) when the first attached client detaches"""
    placement: tuple[str, ...] = ()
    """(a cluster engine: ``places`` is true) constraints on the node it runs on"""


class ContainerState(msgspec.Struct, frozen=True, kw_only=True):
    """A container as the engine knows it now (`container_inspect`)."""
    id: str
    name: str
    image: str
    """the image id"""
    labels: dict[str, str]
    status: ContainerStatus
    running: bool
    """its process runs (paused and restarting containers included)"""
    pid: int | None = None
    """its main process on the engine's host, while it runs"""
    exit_code: int | None = None
    """how its process ended last; None while it runs or before it first ended"""
    oom_killed: bool = False
    """the kernel's OOM killer struck inside it since it last started"""
    started_at: float | None = None
    """last start, seconds since the epoch"""
    finished_at: float | None = None
    """last end, seconds since the epoch"""
    lost: str | None = None
    """a cluster engine lost the node that ran it (why): it is dead, with no exit code"""


class ContainerSummary(msgspec.Struct, frozen=True, kw_only=True):
    """One container of a listing (`container_list`)."""
    id: str
    name: str
    labels: dict[str, str]
    status: ContainerStatus
    image_id: str


class ContainerEvent(msgspec.Struct, frozen=True, kw_only=True):
    """Something that happened to a container; corral's labels say whose it is."""
    kind: EventKind
    container_id: str
    time_ns: int
    """when, in nanoseconds since the epoch (``time`` in seconds)"""
    supervisor: str | None = None
    """the ``corral.supervisor`` label"""
    worker_id: str | None = None
    """the ``corral.worker`` label"""
    generation: int | None = None
    """the ``corral.generation`` label"""
    exit_code: int | None = None
    """``died``: how the process ended"""
    signal: int | None = None
    """``killed``: the signal's number"""

    @property
    def time(self) -> float:
        return self.time_ns / 1e9


class ImageSummary(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    tags: list[str]
    """``repo:tag`` references; empty for an untagged image"""
    labels: dict[str, str]
    created: float
    """seconds since the epoch (whole seconds)"""
    size: int
    """bytes"""


class EngineVersion(msgspec.Struct, frozen=True, kw_only=True):
    version: str
    api_version: str
    kernel_version: str = ""


class Attachment(Protocol):
    """A container's attached stdio. ``output`` yields ``(STDOUT | STDERR, bytes)`` and ends
    when the container's output ends."""

    output: trio.abc.ReceiveChannel[tuple[int, bytes]]

    async def send(self, data: bytes) -> None:
        """Write to the container's stdin; EngineError once it cannot take more."""

    async def close_stdin(self) -> None:
        """Half-close: the container reads EOF; its output still flows."""


class EventStream(Protocol):
    """An events subscription. ``receive`` ends when the stream ends; ``ended`` then says why
    (None while it runs)."""

    receive: trio.abc.ReceiveChannel[ContainerEvent]
    ended: str | None


class Engine(Protocol):
    """A container engine, trio-native. Errors are runtime.errors' EngineError family:
    EngineUnavailable (no answer), ContainerNotFound, ImageNotFound, NameConflict,
    ContainerNotRunning, RemovalInProgress, and EngineError with the engine's own message."""

    url: str

    async def ping(self) -> None: ...
    async def version(self) -> EngineVersion: ...

    # -- images -------------------------------------------------------------------------------
    async def image_inspect(self, ref: str) -> ImageSummary: ...
    async def image_build(self, context_tar: bytes, *, tag: str, labels: dict[str, str],
                          network: bool = False,
                          on_progress: Callable[[str], None] | None = None) -> str:
        """Build from a tar holding a Dockerfile; returns the image id. ``network``: the build
        steps may use the host's network (else none). A failing step raises ImageBuildError."""
        ...
    async def image_import(self, tar_path: str, *, repo: str, tag: str,
                           changes: Sequence[str] = (), message: str = "") -> str:
        """An image from a root filesystem tarball (`docker import`); returns its id."""
        ...
    async def image_list(self, *, labels: LabelFilter | None = None) -> list[ImageSummary]: ...
    async def image_remove(self, ref: str, *, force: bool = False) -> None: ...
    async def image_tag(self, ref: str, repo: str, tag: str) -> None: ...

    # -- containers ---------------------------------------------------------------------------
    async def container_create(self, spec: ContainerSpec) -> str:
        """Returns the container id. NameConflict if ``spec.name`` is taken, ImageNotFound."""
        ...
    async def container_start(self, cid: str) -> None: ...
    async def container_inspect(self, cid: str) -> ContainerState: ...
    async def container_wait(self, cid: str) -> int:
        """Until the container does not run; returns its exit code (at once if it does not run:
        a created container's is 0)."""
        ...
    async def container_kill(self, cid: str, signal: str | int = "SIGKILL") -> None:
        """ContainerNotRunning if it does not run."""
        ...
    async def container_stop(self, cid: str, *, grace_s: float = 10.0) -> None:
        """SIGTERM, SIGKILL after ``grace_s``; returns once it does not run."""
        ...
    async def container_restart(self, cid: str, *, grace_s: float = 10.0) -> None:
        """Stop (as `container_stop`), then start it again."""
        ...
    async def container_remove(self, cid: str, *, force: bool = True) -> None:
        """``force`` kills a running container first (else EngineError, status 409).
        RemovalInProgress when someone else removes it already."""
        ...
    async def container_list(self, *, labels: LabelFilter | None = None,
                             all: bool = True) -> list[ContainerSummary]: ...
    async def container_logs(self, cid: str, *, tail_bytes: int = 4096, stdout_only: bool = False) -> str:
        """The end of what the container wrote to stdout and stderr (``stdout_only``: stdout's,
        where the wrapper's frames are)."""
        ...
    async def container_exec(self, cid: str, cmd: list[str], *, user: str = "") -> tuple[int, str]:
        """Run ``cmd`` in the running container: (exit code, stdout + stderr)."""
        ...

    def attach(self, cid: str) -> AbstractAsyncContextManager[Attachment]:
        """Attach to the container's stdio for the block. Attach before start to see everything
        it writes; attached to a container that does not run, ``output`` ends at once."""
        ...

    def events(self, *, labels: LabelFilter | None = None,
               kinds: Collection[EventKind] | None = None,
               since: float | None = None) -> AbstractAsyncContextManager[EventStream]:
        """Subscribe to container events for the block. ``since`` (seconds since the epoch)
        replays the events from then on (inclusive) that the engine still holds, then goes live.
        EngineUnavailable if the subscription cannot be taken."""
        ...


def label_filters(labels: LabelFilter | None) -> list[str]:
    """Label filters as ``key`` or ``key=value`` strings."""
    if labels is None:
        return []
    if isinstance(labels, Mapping):
        return [f"{k}={v}" if v is not None else k for k, v in labels.items()]
    return list(labels)


def labels_match(have: Mapping[str, str] | None, want: Sequence[str]) -> bool:
    have = have or {}
    for f in want:
        key, eq, value = f.partition("=")
        if key not in have or (eq and have[key] != value):
            return False
    return True


def event_labels(labels: Mapping[str, str]) -> dict[str, object]:
    """The corral fields of an event, from its container's labels."""
    gen = labels.get("corral.generation")
    try:
        generation = int(gen) if gen is not None else None
    except ValueError:
        generation = None
    return {"supervisor": labels.get("corral.supervisor"), "worker_id": labels.get("corral.worker"),
            "generation": generation}
