"""The in-memory adapter of the engine port: `FakeEngine`, trio-native.

Each "container" runs a fake worker-wrapper that speaks the real wire protocol, so the real
Worker/Supervisor code runs unchanged - with trio's autojump clock, thousands of restarts take
milliseconds and every time is exact. It passes the same contract suite as the Docker adapter
(tests/contract): errors, waits, logs, events and their replay (``since``) behave alike.

Controls: kill(), stop(), restart(), crash(), hang(), wedge(), remove(), fail_next_starts(),
fail_next_creates(), set_start_delay(), add_image(), remove_image(), go_down()/come_up()
(``go_down(live_restore=True)``: the containers outlive the outage), shut_down(),
freeze()/thaw(), oom(). Each container runs the wrapper's REAL sans-IO core
(runtime/wrapper/core.py) through a trio driver (fake_wrapper.py), with the one stub agent
(runtime/wrapper/agents.py) standing in for every agent CLI: the same directives (!exit N,
!sleep S, !crash-wrapper, !oom) and CORRAL_STUB_FAIL_PROBE=1 as in real containers. hang() and
wedge() are engine-level faults (a wrapper that stops answering, or whose task never ends).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import signal as _signal
import tarfile
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Collection, Sequence

import trio

from ..errors import (
    ContainerNotFound,
    ContainerNotRunning,
    EngineError,
    EngineUnavailable,
    ImageBuildError,
    ImageNotFound,
    NameConflict,
)
from ..util import unwrap_single
from .base import (
    EVENT_KINDS,
    ContainerEvent,
    ContainerSpec,
    ContainerState,
    ContainerSummary,
    EngineVersion,
    EventKind,
    ImageSummary,
    LabelFilter,
    event_labels,
    label_filters,
    labels_match,
)
from .fake_wrapper import FakeControls, run_fake_wrapper

BASE = "corral/worker-base:latest"
EVENTS_KEPT = 256
"""how many past events an engine keeps for ``since`` (dockerd keeps 256)"""
LOG_KEPT = 64 * 1024
"""bytes of each container's output kept for container_logs"""


def _signum(sig: str | int) -> int:
    """ "9", 9, "KILL", "SIGKILL" -> 9 (an engine reports a kill's signal as its number)."""
    text = str(sig).upper()
    return int(text) if text.isdigit() else int(_signal.Signals[text if text.startswith("SIG") else f"SIG{text}"])


@dataclass
class FakeImage:
    id: str
    tags: list[str]
    labels: dict[str, str]
    created: float
    size: int = 1
    worker_user: bool = True
    """the image has the user ``worker`` (else building on it fails, as on Docker)"""

    def summary(self) -> ImageSummary:
        return ImageSummary(id=self.id, tags=list(self.tags), labels=dict(self.labels),
                            created=self.created, size=self.size)


class _Output:
    """A container's stdout and stderr: kept as its log, and passed on to whoever is attached
    (nobody attached: the log only)."""

    def __init__(self, c: "FakeContainer") -> None:
        self._c = c
        self.attached: trio.MemorySendChannel[tuple[int, bytes]] | None = None
        self.attachment: "_FakeAttachment | None" = None
        self.lose: list[bytes] = []
        """(lose_output) the next stdout writes that contain these go to the log only"""

    def send_nowait(self, item: tuple[int, bytes]) -> None:
        for log in (self._c.log, self._c.stdout_log) if item[0] == 1 else (self._c.log,):
            log += item[1]
            if len(log) > LOG_KEPT:
                del log[:-LOG_KEPT]
        if self.lose and item[0] == 1:
            for mark in self.lose:
                if mark in item[1]:
                    self.lose.remove(mark)
                    return             # lost on the way (in the log, never seen attached)
        if self.attached is not None:
            self.attached.send_nowait(item)

    def close(self) -> None:
        if self.attached is not None:
            self.attached.close()

    def break_off(self) -> None:
        """The engine went away under the attachment: its output ends, its stdin is gone."""
        if self.attachment is not None:
            self.attachment.broken = True
        self.close()
        self.attached = self.attachment = None


@dataclass
class FakeContainer:
    id: str
    name: str
    spec: ContainerSpec
    image_id: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    """the image's labels, then the spec's (as Docker merges them)"""
    status: str = "created"           # created | running | exited
    exit_code: int | None = None
    oom: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    pid: int | None = None
    exited: trio.Event = field(default_factory=trio.Event)
    out_send: _Output | None = None
    stdin: trio.MemorySendChannel | None = None
    _stdin_recv: trio.MemoryReceiveChannel | None = None
    log: bytearray = field(default_factory=bytearray)
    stdout_log: bytearray = field(default_factory=bytearray)
    lose_input: list[bytes] = field(default_factory=list)
    """(lose_input) the next stdin writes that contain these are lost on the way"""
    controls: FakeControls = field(default_factory=FakeControls)
    scope: trio.CancelScope | None = None

    def __post_init__(self) -> None:
        self.out_send = _Output(self)
        self.stdin, self._stdin_recv = trio.open_memory_channel[bytes](1024)

    @property
    def env(self) -> dict[str, str]:
        return self.spec.env

    def state(self) -> ContainerState:
        running = self.status == "running"
        return ContainerState(id=self.id, name=self.name, image=self.image_id, labels=dict(self.labels),
                              status=self.status, running=running,  # type: ignore[arg-type]
                              pid=self.pid if running else None,
                              exit_code=None if running else self.exit_code, oom_killed=self.oom,
                              started_at=self.started_at, finished_at=self.finished_at)


class _FakeAttachment:
    def __init__(self, c: FakeContainer, output: "_HeldOutput") -> None:
        self._c = c
        self.output = output
        self.broken = False
        """the engine went away under it (a live-restore outage): nothing goes through it again"""

    async def send(self, data: bytes) -> None:
        if self.broken:
            raise EngineError("attach stdin closed: the engine closed the connection")
        if self._c.stdin is None or self._c.status == "exited":
            raise EngineError("attach stdin closed: container exited")
        for mark in self._c.lose_input:
            if mark in data:
                self._c.lose_input.remove(mark)
                return                 # written, and lost on the way
        try:
            self._c.stdin.send_nowait(data)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            raise EngineError("attach stdin closed") from None

    async def close_stdin(self) -> None:
        if self._c.stdin is not None and not self.broken:
            self._c.stdin.close()


class _HeldOutput(trio.abc.ReceiveChannel[tuple[int, bytes]]):
    """An attach stream's output as the attached side sees it: nothing comes through while the
    engine is frozen (it is held, not lost)."""

    def __init__(self, engine: "FakeEngine", recv: trio.MemoryReceiveChannel[tuple[int, bytes]]) -> None:
        self._engine = engine
        self._recv = recv

    async def receive(self) -> tuple[int, bytes]:
        await self._engine._wait_thawed()
        item = await self._recv.receive()
        await self._engine._wait_thawed()
        return item

    def close(self) -> None:
        self._recv.close()

    async def aclose(self) -> None:
        self._recv.close()
        await trio.lowlevel.checkpoint()


class _FakeEvents:
    def __init__(self, recv: trio.MemoryReceiveChannel[ContainerEvent]) -> None:
        self.receive = recv
        self.ended: str | None = None


class FakeEngine:
    """In-memory engine. ``nursery``-free: containers run in the engine's own nursery, which
    `open_fake_engine()` (or ``async with FakeEngine() as e``) provides."""

    url = "fake://"

    def __init__(self, *, start_delay: float = 0.0, ready_delay: float = 0.0, build_delay: float = 0.0,
                 op_delay: float = 0.0) -> None:
        self.start_delay = start_delay
        self.ready_delay = ready_delay
        self.build_delay = build_delay
        self.op_delay = op_delay
        self.images: dict[str, FakeImage] = {}
        """by every tag and by id"""
        self.containers: dict[str, FakeContainer] = {}
        self.names: dict[str, str] = {}
        self.down = False
        self._outage = trio.Event()
        """set when a live-restore outage begins (calls in flight fail)"""
        self._frozen: trio.Event | None = None
        self._ids = itertools.count(1)
        self._fail_starts: list[BaseException] = []
        self._fail_creates: list[BaseException] = []
        self._subscribers: list[tuple[trio.MemorySendChannel, list[str], frozenset[str], _FakeEvents]] = []
        self._events: deque[tuple[ContainerEvent, dict[str, str]]] = deque(maxlen=EVENTS_KEPT)
        self._last_ns = 0
        self._nursery: trio.Nursery | None = None
        self.stats = {"creates": 0, "starts": 0, "builds": 0, "starting_now": 0, "max_starting": 0,
                      "kills": 0, "removes": 0}
        self.add_image(BASE, labels={"corral.base": "1"})

    async def __aenter__(self) -> "FakeEngine":
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        try:
            return await self._nursery_cm.__aexit__(*exc)
        except BaseExceptionGroup as group:
            leaf = unwrap_single(group)
            if leaf is group:
                raise
            raise leaf from None

    # -- controls ----------------------------------------------------------------------------
    def add_image(self, ref: str, *, labels: dict[str, str] | None = None, has_worker_user: bool = True) -> str:
        iid = "sha256:" + hashlib.sha256(f"{ref}{next(self._ids)}".encode()).hexdigest()
        old = self.images.get(ref)
        if old is not None:                 # the tag moves to the new image
            self._untag(old, ref)
        img = FakeImage(id=iid, tags=[ref], labels=dict(labels or {}), created=float(int(time.time())),
                        worker_user=has_worker_user)
        self.images[ref] = img
        self.images[iid] = img
        return iid

    def remove_image(self, ref: str) -> None:
        img = self.images.get(ref)
        if img:
            for k in [k for k, v in self.images.items() if v is img]:
                del self.images[k]

    def _untag(self, img: FakeImage, ref: str) -> None:
        img.tags.remove(ref)
        del self.images[ref]
        if not img.tags and not any(c.image_id == img.id for c in self.containers.values()):
            self.remove_image(img.id)   # dangling: gone, as docker build's replaced tags are

    def fail_next_starts(self, n: int = 1, exc: BaseException | None = None) -> None:
        self._fail_starts += [exc or EngineError("fake: start failed", status=500)] * n

    def fail_next_creates(self, n: int = 1, exc: BaseException | None = None) -> None:
        self._fail_creates += [exc or EngineError("fake: create failed", status=500)] * n

    def set_start_delay(self, seconds: float) -> None:
        self.start_delay = seconds

    def go_down(self, *, live_restore: bool = False) -> None:
        """The engine disappears: every call fails (EngineUnavailable), running containers die
        with it (137, no event) and their streams end.

        ``live_restore``: like dockerd with ``--live-restore`` stopping or crashing: every call
        fails, calls in flight (a ``container_wait``) fail, attachments' output streams end (and
        writing to them fails), events streams end; but the containers KEEP RUNNING: their
        wrappers go on, and what they write goes to their logs only. Their stdin is not closed,
        even for ``stdin_once`` (nobody is left to close it). After come_up() the same
        containers can be attached again."""
        self.down = True
        if not live_restore:
            for c in self.containers.values():
                if c.status == "running":
                    self._exit(c, 137, emit=False)
            return
        outage, self._outage = self._outage, trio.Event()
        outage.set()
        for c in self.containers.values():
            if c.out_send is not None:
                c.out_send.break_off()
        for send, _, _, es in list(self._subscribers):
            es.ended = "the engine closed the events stream"
            send.close()

    def come_up(self) -> None:
        """The engine answers again (after go_down()): the containers that survived are there,
        attachable, with what they wrote meanwhile in their logs."""
        self.down = False

    def shut_down(self, *, linger_s: float = 0.5) -> None:
        """Like stopping dockerd: every running container is stopped (kill 15, die 143 and stop
        events, as stop() does); ``linger_s`` later (the daemon finishing its own shutdown, calls
        still answered meanwhile) the events streams end and every call fails, as after go_down()."""
        for c in list(self.containers.values()):
            if c.status == "running":
                self.stop(c.id)

        async def gone() -> None:
            await trio.sleep(linger_s)
            self.down = True
            for send, _, _, es in list(self._subscribers):
                es.ended = "the engine closed the events stream"
                send.close()
        assert self._nursery is not None, "use `async with FakeEngine() as engine`"
        self._nursery.start_soon(gone)

    def freeze(self) -> None:
        """Like SIGSTOP on dockerd: every call blocks and the containers' output stops reaching
        whoever is attached (it is held, not lost) until thaw(). The containers run on."""
        if self._frozen is None:
            self._frozen = trio.Event()

    def thaw(self) -> None:
        frozen, self._frozen = self._frozen, None
        if frozen is not None:
            frozen.set()

    async def _wait_thawed(self) -> None:
        while self._frozen is not None:
            await self._frozen.wait()

    def running(self, *, labels: dict[str, str] | None = None) -> list[FakeContainer]:
        want = label_filters(labels)
        return [c for c in self.containers.values() if c.status == "running" and labels_match(c.labels, want)]

    def container_of(self, worker_id: str) -> FakeContainer | None:
        for c in self.containers.values():
            if c.labels.get("corral.worker") == worker_id and c.status == "running":
                return c
        return None

    def lose_output(self, cid: str, *marks: bytes) -> None:
        """The next stdout write of the container that contains each of ``marks`` (a frame's
        ``b'"kind":"task_done"'``) reaches its log but not the attached side, as frames written
        while a live-restore dockerd restarts can be lost."""
        out = self._get(cid).out_send
        assert out is not None
        out.lose += marks

    def lose_input(self, cid: str, *marks: bytes) -> None:
        """The next stdin write to the container that contains each of ``marks`` seems to go
        through but never reaches it, as a write on a connection that a restarting dockerd
        drops."""
        self._get(cid).lose_input.extend(marks)

    def kill(self, cid: str, signal: str | int = "9") -> None:
        """Like `docker kill`: a kill event (with the signal's number, as dockerd reports it),
        then the container dies of it: 128 + the number (137 for SIGKILL)."""
        c = self._get(cid)
        if c.status != "running":
            return
        num = _signum(signal)
        self.stats["kills"] += 1
        self._emit(c, "killed", signal=num)
        self._exit(c, 128 + num)

    def stop(self, cid: str) -> None:
        """Like `docker stop`: SIGTERM (a kill event), the wrapper dies of it (143), then a
        stop event."""
        c = self._get(cid)
        if c.status == "running":
            self.kill(cid, "15")
            self._emit(c, "stopped")

    def restart(self, cid: str, *, after_s: float = 0.3) -> None:
        """Like `docker restart`: stop() it, and ``after_s`` later start it again (start and
        restart events). No wrapper runs in it then, nobody being attached: it stays up, silent,
        until it is removed."""
        c = self._get(cid)
        if c.status != "running":
            return
        self.stop(cid)

        async def start_again() -> None:
            await trio.sleep(after_s)
            self._start_again(c)
        assert self._nursery is not None, "use `async with FakeEngine() as engine`"
        self._nursery.start_soon(start_again)

    def _start_again(self, c: FakeContainer) -> None:
        if self.containers.get(c.id) is c and c.status in ("created", "exited"):
            c.status, c.exit_code, c.exited, c.oom = "running", None, trio.Event(), False
            c.started_at, c.pid = time.time(), 1000 + next(self._ids)
            self._emit(c, "started")
            self._emit(c, "restarted")

    def crash(self, cid: str, exit_code: int = 1) -> None:
        """The wrapper exits on its own with ``exit_code``."""
        c = self._get(cid)
        if c.status == "running":
            self._exit(c, exit_code)

    def oom(self, cid: str) -> None:
        c = self._get(cid)
        if c.status == "running":
            c.oom = True
            self._emit(c, "oom")
            self._exit(c, 137)

    def hang(self, cid: str) -> None:
        self._get(cid).controls.hang()

    def wedge(self, cid: str) -> None:
        """The wrapper goes on heartbeating but its tasks never end, timeout or cancel
        notwithstanding (an agent it cannot kill, a fork bomb holding every pid)."""
        self._get(cid).controls.wedge()

    def remove(self, cid: str) -> None:
        """Removed out of band (`docker rm -f`)."""
        c = self._get(cid)
        if c.status == "running":
            self._emit(c, "killed", signal=9)
            self._exit(c, 137)
        self._destroy(c)

    # -- internals -----------------------------------------------------------------------------
    async def _op(self) -> None:
        await self._wait_thawed()
        if self.down:
            raise EngineUnavailable(f"cannot reach the Docker engine at {self.url}: fake engine is down")
        if self.op_delay:
            await trio.sleep(self.op_delay)
        else:
            await trio.lowlevel.checkpoint()

    def _get(self, cid: str) -> FakeContainer:
        c = self.containers.get(cid) or self.containers.get(self.names.get(cid.lstrip("/"), ""))
        if c is None:
            for k, v in self.containers.items():
                if cid and k.startswith(cid):
                    return v
            raise ContainerNotFound(f"fake: no container {cid}", status=404)
        return c

    def _image(self, ref: str, what: str = "") -> FakeImage:
        img = self.images.get(ref)
        if img is None:
            raise ImageNotFound(f"{what}{': ' if what else ''}No such image: {ref}", status=404)
        return img

    def _emit(self, c: FakeContainer, kind: EventKind, *, exit_code: int | None = None,
              signal: int | None = None) -> None:
        self._last_ns = max(time.time_ns(), self._last_ns + 1)   # strictly ordered
        ev = ContainerEvent(kind=kind, container_id=c.id, time_ns=self._last_ns, exit_code=exit_code,
                            signal=signal, **event_labels(c.labels))  # type: ignore[arg-type]
        self._events.append((ev, c.labels))
        for send, labels, kinds, _ in list(self._subscribers):
            if kind in kinds and labels_match(c.labels, labels):
                try:
                    send.send_nowait(ev)
                except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    def _exit(self, c: FakeContainer, code: int, *, emit: bool = True) -> None:
        if c.status == "exited":
            return
        c.status, c.exit_code, c.finished_at = "exited", code, time.time()
        if c.scope is not None:
            c.scope.cancel()
        if c.out_send is not None:
            c.out_send.close()
        if emit:
            self._emit(c, "died", exit_code=code)
        c.exited.set()

    def _destroy(self, c: FakeContainer) -> None:
        if self.containers.pop(c.id, None) is not None:
            self.names.pop(c.name, None)
            self.stats["removes"] += 1
            self._emit(c, "removed")

    # -- engine interface: system / images -------------------------------------------------------
    async def ping(self) -> None:
        await self._op()

    async def version(self) -> EngineVersion:
        await self._op()
        return EngineVersion(version="fake", api_version="1.41")

    async def image_inspect(self, ref: str) -> ImageSummary:
        await self._op()
        return self._image(ref, f"image {ref}").summary()

    async def image_build(self, context_tar: bytes, *, tag: str, labels: dict[str, str],
                          network: bool = False,
                          on_progress: Callable[[str], None] | None = None) -> str:
        await self._op()
        self.stats["builds"] += 1
        with tarfile.open(fileobj=io.BytesIO(context_tar)) as tar:
            dockerfile = tar.extractfile("Dockerfile").read().decode()
        base = dockerfile.splitlines()[0].split()[1]
        if base not in self.images:
            raise ImageBuildError(f"building {tag} failed: No such image: {base}", step=f"FROM {base}")
        if not self.images[base].worker_user:
            raise ImageBuildError(f"building {tag} failed: The command returned a non-zero code: 1",
                                  step="RUN id -u worker ...",
                                  output_tail="corral: the base image has no user 'worker'")
        if self.build_delay:
            await trio.sleep(self.build_delay)
        return self.add_image(tag, labels=labels)

    async def image_import(self, tar_path: str, *, repo: str, tag: str,
                           changes: Sequence[str] = (), message: str = "") -> str:
        await self._op()
        if not os.path.isfile(tar_path):
            raise EngineError(f"docker import failed: no such file {tar_path}")
        labels = {}
        for change in changes:
            word, _, rest = change.partition(" ")
            if word.upper() == "LABEL":
                k, _, v = rest.partition("=")
                labels[k.strip()] = v.strip()
        return self.add_image(f"{repo}:{tag}", labels=labels)

    async def image_list(self, *, labels: LabelFilter | None = None) -> list[ImageSummary]:
        await self._op()
        want = label_filters(labels)
        seen: dict[str, ImageSummary] = {}
        for img in self.images.values():
            if labels_match(img.labels, want):
                seen[img.id] = img.summary()
        return list(seen.values())

    async def image_remove(self, ref: str, *, force: bool = False) -> None:
        await self._op()
        img = self._image(ref)
        if ref in img.tags and len(img.tags) > 1:
            self._untag(img, ref)          # one of several tags: only the tag goes
        else:
            self.remove_image(ref)

    async def image_tag(self, ref: str, repo: str, tag: str) -> None:
        await self._op()
        img = self._image(ref, f"image {ref}")
        new = f"{repo}:{tag}"
        old = self.images.get(new)
        if old is img:
            return
        if old is not None:
            self._untag(old, new)
        img.tags.append(new)
        self.images[new] = img

    # -- engine interface: containers ------------------------------------------------------------
    async def container_create(self, spec: ContainerSpec) -> str:
        await self._op()
        if self._fail_creates:
            raise self._fail_creates.pop(0)
        name = spec.name
        img = self._image(spec.image, f"create {name}")
        name = name or f"fake_{next(self._ids)}"
        if name in self.names:
            raise NameConflict(f"fake: the container name {name!r} is taken by container "
                               f"{self.names[name]}", status=409)
        cid = hashlib.sha256(f"{name}{next(self._ids)}".encode()).hexdigest()
        self.containers[cid] = FakeContainer(cid, name, spec, image_id=img.id,
                                             labels={**img.labels, **spec.labels})
        self.names[name] = cid
        self.stats["creates"] += 1
        return cid

    async def container_start(self, cid: str) -> None:
        await self._op()
        c = self._get(cid)
        if self._fail_starts:
            raise self._fail_starts.pop(0)
        if c.status == "running":
            return                              # as Docker: nothing to do (304)
        self.stats["starting_now"] += 1
        self.stats["max_starting"] = max(self.stats["max_starting"], self.stats["starting_now"])
        outage = self._outage
        try:
            if self.start_delay:
                await trio.sleep(self.start_delay)
        finally:
            self.stats["starting_now"] -= 1
        self.stats["starts"] += 1
        c.status, c.exit_code, c.exited, c.oom = "running", None, trio.Event(), False
        c.started_at, c.pid = time.time(), 1000 + next(self._ids)
        self._emit(c, "started")
        assert self._nursery is not None, "use `async with FakeEngine() as engine`"
        self._nursery.start_soon(self._wrapper, c)
        if outage.is_set():
            # a live-restore engine went away during the start: the container runs (what it
            # writes goes to its log), but the call that started it was cut off
            c.out_send.break_off()
            raise EngineUnavailable("fake: the engine went away during the start")

    async def container_inspect(self, cid: str) -> ContainerState:
        await self._op()
        return self._get(cid).state()

    async def container_wait(self, cid: str) -> int:
        await self._op()
        c = self._get(cid)
        if c.status == "running":
            outage = self._outage
            async with trio.open_nursery() as nursery:
                async def until(event: trio.Event) -> None:
                    await event.wait()
                    nursery.cancel_scope.cancel()
                nursery.start_soon(until, c.exited)
                nursery.start_soon(until, outage)
            if outage.is_set() and c.status == "running":
                raise EngineUnavailable(f"cannot reach the Docker engine at {self.url}: the fake "
                                        f"engine went away while waiting for {cid[:12]}")
        return c.exit_code if c.exit_code is not None else 0

    async def container_kill(self, cid: str, signal: str | int = "SIGKILL") -> None:
        await self._op()
        c = self._get(cid)
        if c.status != "running":
            raise ContainerNotRunning(f"Cannot kill container: {cid}: Container {cid} is not running",
                                      status=409)
        self.kill(cid, signal)

    async def container_stop(self, cid: str, *, grace_s: float = 10.0) -> None:
        await self._op()
        self.stop(self._get(cid).id)    # the fake wrapper dies of SIGTERM at once

    async def container_restart(self, cid: str, *, grace_s: float = 10.0) -> None:
        await self._op()
        c = self._get(cid)
        self.stop(c.id)
        self._start_again(c)

    async def container_remove(self, cid: str, *, force: bool = True) -> None:
        await self._op()
        c = self._get(cid)
        if c.status == "running":
            if not force:
                raise EngineError("You cannot remove a running container: stop it first or force "
                                  "the removal", status=409)
            self._emit(c, "killed", signal=9)
            self._exit(c, 137)
        self._destroy(c)

    async def container_list(self, *, labels: LabelFilter | None = None,
                             all: bool = True) -> list[ContainerSummary]:
        await self._op()
        want = label_filters(labels)
        return [ContainerSummary(id=c.id, name=c.name, labels=dict(c.labels), status=c.status,  # type: ignore[arg-type]
                                 image_id=c.image_id)
                for c in self.containers.values()
                if labels_match(c.labels, want) and (all or c.status == "running")]

    async def container_logs(self, cid: str, *, tail_bytes: int = 4096, stdout_only: bool = False) -> str:
        await self._op()
        c = self._get(cid)
        log = c.stdout_log if stdout_only else c.log
        return bytes(log[-tail_bytes:]).decode(errors="replace") if tail_bytes else ""

    async def container_exec(self, cid: str, cmd: list[str], *, user: str = "") -> tuple[int, str]:
        await self._op()
        c = self._get(cid)
        if c.status != "running":
            raise ContainerNotRunning(f"Container {cid} is not running", status=409)
        return 0, f"fake exec: {' '.join(cmd)}\n"

    @asynccontextmanager
    async def attach(self, cid: str) -> AsyncIterator[_FakeAttachment]:
        await self._op()
        c = self._get(cid)
        send, recv = trio.open_memory_channel[tuple[int, bytes]](1024)
        assert c.out_send is not None
        att = _FakeAttachment(c, _HeldOutput(self, recv))
        c.out_send.attached, c.out_send.attachment = send, att
        if c.status == "exited":
            send.close()
        try:
            yield att
        finally:
            if c.out_send.attached is send:
                c.out_send.attached = c.out_send.attachment = None
            if c.spec.stdin_once and c.stdin is not None and not att.broken:
                c.stdin.close()   # the wrapper sees EOF when we detach (not with stdin_once off:
                #                   it runs on, its output goes to the log, until attached again)
            recv.close()

    @asynccontextmanager
    async def events(self, *, labels: LabelFilter | None = None,
                     kinds: Collection[EventKind] | None = None,
                     since: float | None = None) -> AsyncIterator[_FakeEvents]:
        await self._op()
        send, recv = trio.open_memory_channel[ContainerEvent](10_000)
        es = _FakeEvents(recv)
        entry = (send, label_filters(labels), frozenset(EVENT_KINDS if kinds is None else kinds), es)
        if since is not None:                  # what it still holds from then on, then live
            since_ns = round(since * 1e9)
            for ev, ev_labels in self._events:
                if ev.time_ns >= since_ns and ev.kind in entry[2] and labels_match(ev_labels, entry[1]):
                    send.send_nowait(ev)
        self._subscribers.append(entry)
        try:
            yield es
        finally:
            self._subscribers.remove(entry)
            send.close()

    # -- the fake worker-wrapper --------------------------------------------------------------------
    async def _wrapper(self, c: FakeContainer) -> None:
        def write(stream: int, data: bytes) -> None:
            out = c.out_send
            if out is not None and c.status == "running":
                try:
                    out.send_nowait((stream, data))
                except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                    pass

        def on_oom() -> None:                 # the kernel OOM-killed the agent: Docker says so
            c.oom = True
            self._emit(c, "oom")

        c.controls.ready_delay, c.controls.on_oom = self.ready_delay, on_oom   # (keeps an early hang())
        with trio.CancelScope() as scope:
            c.scope = scope
            code = await run_fake_wrapper(env=c.env, stdin=c._stdin_recv, write=write, controls=c.controls)
            self._exit(c, code)


@asynccontextmanager
async def open_fake_engine(**kwargs: Any) -> AsyncIterator[FakeEngine]:
    async with FakeEngine(**kwargs) as engine:
        yield engine
