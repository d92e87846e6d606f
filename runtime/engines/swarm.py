"""The Swarm adapter of the engine port: workers placed by Docker Swarm, their stdio carried by
each node's own engine.

    async with open_engine("swarm+unix:///var/run/docker.sock") as engine:   # a manager's engine
        ...

Swarm places containers but cannot carry their stdio (attaching through the manager to another
node's container answers 404). So:

- the **manager API** places one service per worker container, with one task that is never
  restarted (restart-condition none): `container_create` makes the service with 0 replicas (the
  container is "created"), `container_start` scales it to 1 and waits until its task runs;
  `container_remove` removes the service. The port's container id is the service's id: a
  service has one container for its whole life, and so the id never changes.
- each **node's own engine** (a `DockerEngine` on the URL of the node's ``corral.engine`` label,
  or of ``nodes=`` given to `open_swarm_engine`) does attach, events, inspect, wait, kill, logs
  and exec of the container that the task runs there. Their events are merged into one stream,
  with the service id as the container id.
- a task's container starts before anyone can attach to it: its wrapper is gated
  (CORRAL_STDIN_GATE=1, see runtime/wrapper/wrapper.py) and speaks only after `container_start`
  has attached every attachment taken before it and sent the gate's line.
- **images**: the service names its image by id (``sha256:...``; a tag makes each node try a
  registry first). Images are built and listed on the manager's engine and copied into each
  node that lacks them before a container is created (``docker save | docker load``: same id).
- **a lost node**: the manager's ``/nodes`` is polled (every ``poll_s``); once it marks a node
  down, every container placed there is dead: a ``died`` event (no exit code) goes out, and
  `container_inspect` says ``status="dead"`` with ``lost`` saying why (a certificate's cause is
  ``node_lost``). A call to a node's engine that does not answer waits for the manager's verdict
  (the node answers again, or it is down). How soon a node is marked down is the swarm's
  dispatcher heartbeat period (``docker swarm update --dispatcher-heartbeat``), times about 3.

What cannot hold on Swarm (`LIMITATIONS`; the contract suite names each exception):
no-new-privileges per container (Swarm drops it: start each node's dockerd with
``--no-new-privileges``); stdin EOF (stdin-once is dropped: stdin stays open, the wrapper's lease
ends an orphan); memory without swap (Swarm sets no swap limit: run nodes without swap); tmpfs
mode and owner (a tmpfs is root's, 755); restart of a container (a task runs once); no network
of its own (network "none" is refused: the node's default network, loopback only where its
dockerd runs ``--bridge=none``, or an egress policy).
"""

from __future__ import annotations

import math
import os
import time
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Collection, Mapping, Sequence

import msgspec
import trio

from ..errors import (
    ContainerNotFound,
    ContainerNotRunning,
    EngineError,
    EngineUnavailable,
    ImageNotFound,
)
from ..logging import get_logger
from .base import (
    ContainerEvent,
    ContainerSpec,
    ContainerState,
    ContainerSummary,
    EngineVersion,
    EventKind,
    ImageSummary,
    LabelFilter,
    label_filters,
    labels_match,
)
from .cluster import TASK_ENDED, NodeInfo, ServiceInfo, ServiceSpec, TaskInfo

if TYPE_CHECKING:
    from .docker import DockerEngine

log = get_logger("corral.engine")

SCHEME = "swarm+"
GATE_ENV = "CORRAL_STDIN_GATE"
ENGINE_LABEL = "corral.engine"
"""a node label: the URL of that node's own engine"""
SWARM_LABELS = "com.docker.swarm."
"""the labels Swarm adds to a task's container (not the spec's)"""
LIMITATIONS = {
    "no_new_privileges": "Swarm drops no-new-privileges from a service: start each node's dockerd "
                         "with --no-new-privileges",
    "stdin_eof": "Swarm drops stdin-once: a container's stdin never ends; the wrapper's lease "
                 "(orphan_timeout_s) ends an orphan",
    "swap": "Swarm sets a memory limit but no swap limit: run the nodes without swap",
    "tmpfs_owner": "Swarm applies neither the mode nor the owner of a tmpfs (root's, 755)",
    "restart": "a service's task runs once: its container cannot be started again",
    "network": "a service cannot have network 'none': it gets the node's default network "
               "(loopback only where its dockerd runs --bridge=none)",
}
POLL_S = 0.5


class _Loc(msgspec.Struct, kw_only=True):
    """Where a service's one container runs (once its task has one)."""
    service: ServiceInfo
    node_id: str = ""
    cid: str = ""
    task: TaskInfo | None = None


class _PendingAttachment:
    """An attachment taken before its container exists; `SwarmEngine.container_start` connects
    it to the node's engine once the task's container runs."""

    def __init__(self) -> None:
        self._out, self.output = trio.open_memory_channel[tuple[int, bytes]](256)
        self.go = trio.Event()
        self.connected = trio.Event()
        self.target: tuple[Any, str] | None = None
        self.att: Any = None
        self.scope = trio.CancelScope()

    async def send(self, data: bytes) -> None:
        await self.connected.wait()
        if self.att is None:
            raise EngineError("the container ended before it could be attached")
        await self.att.send(data)

    async def close_stdin(self) -> None:
        if self.att is not None:
            await self.att.close_stdin()      # stdin stays open on Swarm (LIMITATIONS)

    async def pump(self) -> None:
        with self.scope:
            await self._pump()

    async def _pump(self) -> None:
        async with self._out:
            await self.go.wait()
            if self.target is None:
                self.connected.set()
                return
            engine, cid = self.target
            try:
                async with engine.attach(cid) as att:
                    self.att = att
                    self.connected.set()
                    async for item in att.output:
                        await self._out.send(item)
            except EngineError as exc:
                log.warning("swarm_attach_failed", container_id=cid[:12], error=str(exc))
            finally:
                self.connected.set()


class _Ended:
    def __init__(self) -> None:
        send, self.output = trio.open_memory_channel[tuple[int, bytes]](0)
        send.close()

    async def send(self, data: bytes) -> None:
        raise ContainerNotRunning("the container does not run")

    async def close_stdin(self) -> None:
        pass


class _MergedEvents:
    def __init__(self, labels: list[str], kinds: Collection[EventKind] | None) -> None:
        self.send, self.receive = trio.open_memory_channel[ContainerEvent](1024)
        self.labels = labels
        self.kinds = kinds
        self.ended: str | None = None


class SwarmEngine:
    """Make one with `open_swarm_engine()` (or `runtime.engines.open_engine("swarm+...")`)."""

    flavour = "swarm"
    name = "Swarm engine"
    limitations = LIMITATIONS
    reports_oom = True
    places = True
    """it honours ContainerSpec.placement"""

    def __init__(self, manager: DockerEngine, nursery: trio.Nursery, url: str, *,
                 nodes: Mapping[str, str] | None = None, constraints: Sequence[str] = (),
                 poll_s: float = POLL_S) -> None:
        self.manager = manager
        self.url = url
        self.node_urls = dict(nodes or {})
        """node hostname (or id) -> its engine's URL, where its ``corral.engine`` label is not set"""
        self.constraints = tuple(constraints)
        self.poll_s = poll_s
        self._nursery = nursery
        self._closing = trio.Event()
        self.manager_node = ""
        self.nodes: dict[str, NodeInfo] = {}
        self.lost: dict[str, str] = {}
        """node id -> why it counts as lost"""
        self.lost_at: dict[str, float] = {}
        """node id -> when this engine saw it lost (trio clock)"""
        self._changed = trio.Event()
        self._engines: dict[str, DockerEngine] = {}
        self._engine_lock = trio.Lock()
        self._loc: dict[str, _Loc] = {}
        self._by_cid: dict[str, str] = {}
        self._waiting: dict[str, list[_PendingAttachment]] = {}
        self._images: dict[tuple[str, str], trio.Event] = {}
        self._image_labels: dict[str, dict[str, str]] = {}
        self._subscribers: set[_MergedEvents] = set()
        self._seen_down: set[str] = set()

    # -- nodes ----------------------------------------------------------------------------------
    async def _poll_nodes(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            try:
                nodes = await self.manager.node_list()
            except EngineError as exc:
                if not started:
                    raise
                log.warning("swarm_nodes_unavailable", error=str(exc))
            else:
                self._update_nodes(nodes)
                if not started:
                    started = True
                    task_status.started()
            await trio.sleep(self.poll_s)

    def _update_nodes(self, nodes: list[NodeInfo]) -> None:
        for n in nodes:
            if n.status != "ready":
                self._seen_down.add(n.id)
            if n.status == "down" and n.id not in self.lost:
                self._lose(n.id, f"node {n.hostname} ({n.id[:12]}) is {n.status} in the swarm")
            elif n.status == "ready" and n.id in self.lost and n.id in self._seen_down:
                # back, after the manager saw it gone (a node that left, seen by its own engine
                # first, stays lost until then)
                log.info("swarm_node_back", node=n.hostname, node_id=n.id[:12])
                del self.lost[n.id]
                self._seen_down.discard(n.id)
        self.nodes = {n.id: n for n in nodes}
        self._changed.set()
        self._changed = trio.Event()

    def _lose(self, node_id: str, why: str) -> None:
        self.lost[node_id] = why
        self.lost_at[node_id] = trio.current_time()
        node = self.nodes.get(node_id)
        log.warning("swarm_node_lost", node=node.hostname if node else "", node_id=node_id[:12], why=why)
        self._announce_lost(node_id)
        self._changed.set()
        self._changed = trio.Event()

    async def _check_node(self, node_id: str, engine: DockerEngine) -> None:
        """A container there ended: did its node leave the swarm (its engine shutting down
        stops every container, like a `docker stop` from outside)? Then it is lost."""
        if node_id in self.lost:
            return
        try:
            state = await engine.swarm_local_state()
        except EngineUnavailable:
            await self._node_verdict(node_id, engine)
            return
        if state != "active" and node_id not in self.lost:
            node = self.nodes.get(node_id)
            self._lose(node_id, f"node {node.hostname if node else ''} ({node_id[:12]}) left the swarm "
                                f"(its engine's swarm state is {state or 'unknown'})")

    def _announce_lost(self, node_id: str) -> None:
        """Every container placed on a lost node is dead: say so on the events streams."""
        now = time.time_ns()
        for sid, loc in list(self._loc.items()):
            if loc.node_id != node_id or not loc.cid:
                continue
            labels = loc.service.labels
            ev = ContainerEvent(kind="died", container_id=sid, time_ns=now, exit_code=None,
                                supervisor=labels.get("corral.supervisor"),
                                worker_id=labels.get("corral.worker"),
                                generation=_int(labels.get("corral.generation")))
            for sub in list(self._subscribers):
                if (sub.kinds is None or "died" in sub.kinds) and labels_match(labels, sub.labels):
                    try:
                        sub.send.send_nowait(ev)
                    except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                        pass

    def node_url(self, node: NodeInfo) -> str | None:
        url = node.labels.get(ENGINE_LABEL) or self.node_urls.get(node.hostname) \
            or self.node_urls.get(node.id)
        if url is None and node.id == self.manager_node:
            url = self.manager.url
        return url

    async def node_engine(self, node_id: str) -> DockerEngine:
        """The node's own engine (opened once, held until this engine closes)."""
        engine = self._engines.get(node_id)
        if engine is not None:
            return engine
        async with self._engine_lock:
            if node_id in self._engines:
                return self._engines[node_id]
            node = self.nodes.get(node_id)
            if node is None:
                self._update_nodes(await self.manager.node_list())
                node = self.nodes.get(node_id)
            if node is None:
                raise EngineError(f"node {node_id[:12]} is not in the swarm")
            url = self.node_url(node)
            if url is None:
                raise EngineError(f"node {node.hostname} ({node_id[:12]}) has no engine URL: label it "
                                  f"{ENGINE_LABEL}=<url> (docker node update --label-add) or name it "
                                  f"in the swarm engine's nodes")
            if url == self.manager.url:
                engine = self.manager
            else:
                engine = await self._nursery.start(self._hold_engine, url)
            self._engines[node_id] = engine
            return engine

    async def _hold_engine(self, url: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from .docker import open_engine as open_docker
        async with open_docker(url) as engine:
            task_status.started(engine)
            await self._closing.wait()

    async def _node_verdict(self, node_id: str, engine: DockerEngine | None) -> None:
        """A node's engine did not answer: until it answers again or the manager marks the
        node down (then it is in ``lost``)."""
        while node_id not in self.lost:
            if engine is not None:
                with trio.move_on_after(1.0):
                    try:
                        await engine.ping()
                        return
                    except EngineUnavailable:
                        pass
            with trio.move_on_after(self.poll_s * 2):
                await self._changed.wait()

    async def _on_node(self, loc: _Loc, call: Callable[[DockerEngine], Any]) -> Any:
        """``call(node's engine)``; an engine that does not answer: wait for the verdict, and
        raise _Lost if the node is lost."""
        while True:
            if loc.node_id in self.lost:
                raise _Lost(self.lost[loc.node_id])
            engine = None
            try:
                engine = await self.node_engine(loc.node_id)
                return await call(engine)
            except EngineUnavailable:
                await self._node_verdict(loc.node_id, engine)

    async def placement(self, cid: str) -> tuple[NodeInfo, str]:
        """Where a worker container runs: its node, and its id in that node's engine (for
        `docker -H <node's engine> ...`). EngineError while it has no container yet."""
        loc = await self._locate(cid)
        if not loc.cid:
            raise EngineError(f"{loc.service.name} has no container yet")
        node = self.nodes.get(loc.node_id)
        if node is None:
            self._update_nodes(await self.manager.node_list())
            node = self.nodes[loc.node_id]
        return node, loc.cid

    # -- system ---------------------------------------------------------------------------------
    async def ping(self) -> None:
        await self.manager.ping()

    async def version(self) -> EngineVersion:
        return await self.manager.version()

    # -- images (the manager's engine; copied into the nodes on demand) --------------------------
    async def image_inspect(self, ref: str) -> ImageSummary:
        return await self.manager.image_inspect(ref)

    async def image_build(self, context_tar: bytes, *, tag: str, labels: dict[str, str],
                          network: bool = False, on_progress: Callable[[str], None] | None = None) -> str:
        return await self.manager.image_build(context_tar, tag=tag, labels=labels, network=network,
                                              on_progress=on_progress)

    async def image_import(self, tar_path: str, *, repo: str, tag: str,
                           changes: Sequence[str] = (), message: str = "") -> str:
        return await self.manager.image_import(tar_path, repo=repo, tag=tag, changes=changes,
                                               message=message)

    async def image_list(self, *, labels: LabelFilter | None = None) -> list[ImageSummary]:
        return await self.manager.image_list(labels=labels)

    async def image_remove(self, ref: str, *, force: bool = False) -> None:
        await self.manager.image_remove(ref, force=force)

    async def image_tag(self, ref: str, repo: str, tag: str) -> None:
        await self.manager.image_tag(ref, repo, tag)

    async def _spread(self, image_id: str) -> None:
        """Copy the image into every ready node that lacks it (same id)."""
        for node in list(self.nodes.values()):
            if node.status != "ready" or node.availability != "active" or node.id == self.manager_node:
                continue
            key = (node.id, image_id)
            done = self._images.get(key)
            if done is not None:
                await done.wait()
                continue
            done = self._images[key] = trio.Event()
            try:
                engine = await self.node_engine(node.id)
                try:
                    await engine.image_inspect(image_id)
                except ImageNotFound:
                    t0 = trio.current_time()
                    from .docker import admin_copy_images
                    copied = await trio.to_thread.run_sync(admin_copy_images, self.manager.url,
                                                           engine.url, [image_id])
                    log.info("swarm_image_copied", image=image_id[:19], node=node.hostname,
                             bytes=copied, copy_s=round(trio.current_time() - t0, 3))
            except BaseException:
                del self._images[key]
                raise
            finally:
                done.set()

    async def _labels_of_image(self, image: str) -> dict[str, str]:
        if image not in self._image_labels:
            self._image_labels[image] = dict((await self.manager.image_inspect(image)).labels)
        return self._image_labels[image]

    # -- containers: one service each ------------------------------------------------------------
    async def container_create(self, spec: ContainerSpec) -> str:
        image = (await self.manager.image_inspect(spec.image)).id     # ImageNotFound
        await self._spread(image)
        name = spec.name or f"corral-{os.urandom(6).hex()}"
        placement = tuple(self.constraints) + spec.placement \
            + tuple(f"node.id!={node_id}" for node_id in sorted(self.lost))
        sspec = ServiceSpec(
            name=name, image=image, env={**spec.env, GATE_ENV: "1"}, labels=dict(spec.labels),
            command=spec.command, entrypoint=spec.entrypoint, user=spec.user,
            working_dir=spec.working_dir, memory=spec.memory, cpus=spec.cpus,
            pids_limit=spec.pids_limit, read_only_rootfs=spec.read_only_rootfs, tmpfs=spec.tmpfs,
            constraints=placement, reserve_memory=spec.memory, reserve_cpus=spec.cpus, replicas=0)
        sid = await self.manager.service_create(sspec)
        self._loc[sid] = _Loc(service=ServiceInfo(id=sid, name=name, labels=dict(spec.labels), replicas=0,
                                                  version=0, image=image, created_at=time.time()))
        return sid

    async def _locate(self, sid: str, *, fresh: bool = False) -> _Loc:
        """The service and where its container is (ContainerNotFound: no such service)."""
        loc = self._loc.get(sid)
        if loc is not None and loc.cid and not fresh:
            return loc
        if loc is None:
            service = await self.manager.service_inspect(sid)
            loc = _Loc(service=service)
            sid = service.id
        tasks = await self.manager.task_list(services=[loc.service.id])
        if tasks:
            task = max(tasks, key=lambda t: t.at or 0.0)
            loc.task = task
            if task.container_id and not loc.cid:
                loc.node_id, loc.cid = task.node_id, task.container_id
                self._by_cid[task.container_id] = sid
        self._loc[sid] = loc
        return loc

    async def container_start(self, cid: str) -> None:
        loc = await self._locate(cid)
        sid = loc.service.id
        if loc.task is not None:
            if loc.task.status in TASK_ENDED:
                raise EngineError(f"start {loc.service.name}: {LIMITATIONS['restart']}")
            return                                          # started already
        await self.manager.service_scale(sid, 1)
        delay = 0.02
        while True:
            loc = await self._locate(sid, fresh=True)
            task = loc.task
            if task is not None and task.status in TASK_ENDED:
                raise EngineError(f"start {loc.service.name}: its task {task.status}: "
                                  f"{task.error or task.message}")
            if task is not None and task.node_id in self.lost:
                raise EngineError(f"start {loc.service.name}: placed on a lost node: "
                                  f"{self.lost[task.node_id]}")
            if task is not None and task.status == "running" and loc.cid:
                break
            await trio.sleep(delay)
            delay = min(delay * 1.5, 0.2)
        engine = await self.node_engine(loc.node_id)
        pending = self._waiting.pop(sid, [])
        for p in pending:
            p.target = (engine, loc.cid)
            p.go.set()
        with trio.move_on_after(10):
            for p in pending:
                await p.connected.wait()
        # open the wrapper's gate: everyone attached so far sees everything it writes
        live = [p for p in pending if p.att is not None]
        if live:
            await live[0].att.send(b"\n")
        else:
            async with engine.attach(loc.cid) as att:
                await att.send(b"\n")

    def _port_state(self, loc: _Loc, st: ContainerState) -> ContainerState:
        return msgspec.structs.replace(
            st, id=loc.service.id, name=loc.service.name,
            labels={k: v for k, v in st.labels.items() if not k.startswith(SWARM_LABELS)})

    async def container_inspect(self, cid: str) -> ContainerState:
        loc = await self._locate(cid)
        if not loc.cid:
            labels = {**await self._labels_of_image(loc.service.image), **loc.service.labels}
            task = loc.task
            if task is not None and task.status in TASK_ENDED:     # it never got a container
                return ContainerState(id=loc.service.id, name=loc.service.name, image=loc.service.image,
                                      labels=labels, status="dead", running=False, exit_code=None)
            return ContainerState(id=loc.service.id, name=loc.service.name, image=loc.service.image,
                                  labels=labels, status="created", running=False)
        async def inspect(engine: DockerEngine) -> ContainerState:
            st = await engine.container_inspect(loc.cid)
            if not st.running:
                await self._check_node(loc.node_id, engine)
                if loc.node_id in self.lost:
                    raise _Lost(self.lost[loc.node_id])
            return st
        try:
            st = await self._on_node(loc, inspect)
        except _Lost as lost:
            labels = {**await self._labels_of_image(loc.service.image), **loc.service.labels}
            return ContainerState(id=loc.service.id, name=loc.service.name, image=loc.service.image,
                                  labels=labels, status="dead", running=False, exit_code=None,
                                  lost=str(lost))
        except ContainerNotFound:
            self._forget(loc.service.id)
            raise
        return self._port_state(loc, st)

    async def container_wait(self, cid: str) -> int:
        loc = await self._locate(cid)
        if not loc.cid:
            if loc.task is None:
                return 0
            loc = await self._locate(cid, fresh=True)
            if not loc.cid:
                return 0
        async def wait(engine: DockerEngine) -> int:
            code = await engine.container_wait(loc.cid)
            await self._check_node(loc.node_id, engine)
            if loc.node_id in self.lost:
                raise _Lost(self.lost[loc.node_id])
            return code
        try:
            return await self._on_node(loc, wait)
        except _Lost:
            return -1

    async def container_kill(self, cid: str, signal: str | int = "SIGKILL") -> None:
        loc = await self._locate(cid)
        if not loc.cid:
            raise ContainerNotRunning(f"kill {loc.service.name}: it does not run")
        try:
            await self._on_node(loc, lambda e: e.container_kill(loc.cid, signal))
        except _Lost as lost:
            raise ContainerNotRunning(f"kill {loc.service.name}: {lost}") from None

    async def container_stop(self, cid: str, *, grace_s: float = 10.0) -> None:
        loc = await self._locate(cid)
        if not loc.cid:
            return
        try:
            await self._on_node(loc, lambda e: e.container_stop(loc.cid, grace_s=grace_s))
        except _Lost:
            pass

    async def container_restart(self, cid: str, *, grace_s: float = 10.0) -> None:
        """By the node's engine (`docker restart` on the node: Swarm's task does not change)."""
        loc = await self._locate(cid)
        if not loc.cid:
            raise EngineError(f"restart {loc.service.name}: it was never started")
        try:
            await self._on_node(loc, lambda e: e.container_restart(loc.cid, grace_s=grace_s))
        except _Lost as lost:
            raise EngineError(f"restart {loc.service.name}: {lost}") from None

    async def container_remove(self, cid: str, *, force: bool = True) -> None:
        loc = await self._locate(cid)
        sid = loc.service.id
        if loc.cid and loc.node_id not in self.lost:
            # the node's engine removes the container (as `docker rm` would: its events, at
            # once), then the manager the service (its agent would take its time)
            with trio.move_on_after(15):
                try:
                    await self._on_node(loc, lambda e: e.container_remove(loc.cid, force=force))
                except (ContainerNotFound, _Lost):
                    pass
        await self.manager.service_remove(sid)
        self._forget(sid)

    def _forget(self, sid: str) -> None:
        loc = self._loc.pop(sid, None)
        if loc is not None and loc.cid:
            self._by_cid.pop(loc.cid, None)

    async def container_list(self, *, labels: LabelFilter | None = None,
                             all: bool = True) -> list[ContainerSummary]:
        services = await self.manager.service_list(labels=labels)
        if not services:
            return []
        tasks = await self.manager.task_list(services=[s.id for s in services])
        latest: dict[str, TaskInfo] = {}
        for t in tasks:
            if t.service_id not in latest or (t.at or 0) > (latest[t.service_id].at or 0):
                latest[t.service_id] = t
        # each node's own word on the containers it runs (the manager's lags behind)
        on_node: dict[str, dict[str, ContainerSummary]] = {}
        for node_id in {t.node_id for t in latest.values() if t.container_id and t.node_id}:
            if node_id in self.lost:
                continue
            try:
                with trio.move_on_after(2):
                    engine = await self.node_engine(node_id)
                    on_node[node_id] = {c.id: c for c in await engine.container_list(labels=labels)}
            except EngineError:
                pass
        out = []
        for s in services:
            loc = self._loc.setdefault(s.id, _Loc(service=s))
            task = latest.get(s.id)
            status = "created"
            if task is not None and task.container_id:
                if not loc.cid:
                    loc.node_id, loc.cid = task.node_id, task.container_id
                    self._by_cid[task.container_id] = s.id
                seen = on_node.get(task.node_id, {}).get(task.container_id)
                if task.node_id in self.lost:
                    status = "dead"
                elif seen is not None:
                    status = seen.status
                else:
                    status = "running" if task.status == "running" else \
                        "exited" if task.status in TASK_ENDED else "created"
            elif task is not None and task.status in TASK_ENDED:
                status = "dead"
            if not all and status not in ("running", "paused", "restarting"):
                continue
            out.append(ContainerSummary(
                id=s.id, name=s.name, status=status, image_id=s.image,  # type: ignore[arg-type]
                labels={**await self._labels_of_image(s.image), **s.labels}))
        return out

    async def container_logs(self, cid: str, *, tail_bytes: int = 4096, stdout_only: bool = False) -> str:
        loc = await self._locate(cid)
        if not loc.cid:
            return ""
        try:
            return await self._on_node(loc, lambda e: e.container_logs(loc.cid, tail_bytes=tail_bytes,
                                                                     stdout_only=stdout_only))
        except _Lost:
            return ""

    async def container_exec(self, cid: str, cmd: list[str], *, user: str = "") -> tuple[int, str]:
        loc = await self._locate(cid)
        if not loc.cid:
            raise ContainerNotRunning(f"exec in {loc.service.name}: it does not run")
        try:
            return await self._on_node(loc, lambda e: e.container_exec(loc.cid, cmd, user=user))
        except _Lost as lost:
            raise ContainerNotRunning(f"exec in {loc.service.name}: {lost}") from None

    @asynccontextmanager
    async def attach(self, cid: str) -> AsyncIterator[Any]:
        loc = await self._locate(cid)
        if loc.cid:
            if loc.node_id in self.lost:
                yield _Ended()
                return
            engine = await self.node_engine(loc.node_id)
            async with engine.attach(loc.cid) as att:
                yield att
            return
        if loc.task is not None and loc.task.status in TASK_ENDED:
            yield _Ended()
            return
        pending = _PendingAttachment()
        sid = loc.service.id
        self._waiting.setdefault(sid, []).append(pending)
        # its pump runs in the engine's nursery: the block's own exceptions pass as they are
        self._nursery.start_soon(pending.pump)
        try:
            yield pending
        finally:
            pending.scope.cancel()
            waiting = self._waiting.get(sid)
            if waiting and pending in waiting:
                waiting.remove(pending)

    # -- events: every node's, merged ------------------------------------------------------------
    @asynccontextmanager
    async def events(self, *, labels: LabelFilter | None = None,
                     kinds: Collection[EventKind] | None = None,
                     since: float | None = None) -> AsyncIterator[_MergedEvents]:
        sub = _MergedEvents(label_filters(labels), kinds)
        self._subscribers.add(sub)
        try:
            async with trio.open_nursery() as nursery:
                for node in list(self.nodes.values()):
                    if self.node_url(node) is None or node.id in self.lost:
                        continue
                    first = node.id == self.manager_node
                    if first or node.status == "ready":
                        try:
                            await nursery.start(self._node_events, node.id, sub, labels, kinds, since)
                        except EngineUnavailable:
                            if first:
                                raise
                            nursery.start_soon(self._node_events, node.id, sub, labels, kinds, since)
                try:
                    yield sub
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._subscribers.discard(sub)

    async def _node_events(self, node_id: str, sub: _MergedEvents, labels: LabelFilter | None,
                           kinds: Collection[EventKind] | None, since: float | None, *,
                           task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """One node's events into ``sub`` (its container ids made service ids). When the
        node's stream ends, it is taken again from where it ended once the node answers; the
        manager's ending ends ``sub``."""
        started = False
        last = since
        while True:
            try:
                engine = await self.node_engine(node_id)
                async with engine.events(labels=labels, kinds=kinds, since=last) as stream:
                    if not started:
                        started = True
                        task_status.started()
                    async for ev in stream.receive:
                        last = ev.time
                        sid = await self._service_of(engine, ev.container_id)
                        if sid is None:
                            continue
                        await sub.send.send(msgspec.structs.replace(ev, container_id=sid))
                    why = stream.ended
            except EngineUnavailable as exc:
                if not started:
                    raise
                why = str(exc)
            if node_id == self.manager_node:
                sub.ended = f"the manager's events stream ended: {why}"
                await sub.send.aclose()
                return
            await self._node_verdict(node_id, self._engines.get(node_id))
            if node_id in self.lost:
                with trio.move_on_after(math.inf):
                    while node_id in self.lost:
                        await self._changed.wait()

    async def _service_of(self, engine: DockerEngine, cid: str) -> str | None:
        sid = self._by_cid.get(cid)
        if sid is not None:
            return sid
        try:
            st = await engine.container_inspect(cid)
        except EngineError:
            return None
        sid = st.labels.get(SWARM_LABELS + "service.id")
        if sid:
            self._by_cid[cid] = sid
        return sid


class _Lost(Exception):
    """The node of the container was lost."""


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


@asynccontextmanager
async def open_swarm_engine(url: str, *, nodes: Mapping[str, str] | None = None,
                            constraints: Sequence[str] = (),
                            poll_s: float = POLL_S) -> AsyncIterator[SwarmEngine]:
    """The Swarm engine whose manager's engine is at ``url`` (``swarm+unix:///...``, or
    ``swarm+tcp://...`` with DOCKER_TLS_VERIFY / DOCKER_CERT_PATH for TLS; the node engines'
    URLs with TLS take the same settings). ``nodes``: hostname (or node id) -> engine URL, for
    nodes without a ``corral.engine`` label. ``constraints``: placement constraints for every
    container (e.g. ``node.labels.corral.pool==agents``). EngineUnavailable if the manager does
    not answer; EngineError if it is not a swarm manager."""
    from .docker import open_engine as open_docker
    manager_url = url[len(SCHEME):] if url.startswith(SCHEME) else url
    async with AsyncExitStack() as stack:
        manager = await stack.enter_async_context(open_docker(manager_url))
        async with trio.open_nursery() as nursery:
            engine = SwarmEngine(manager, nursery, url if url.startswith(SCHEME) else SCHEME + url,
                                 nodes=nodes, constraints=constraints, poll_s=poll_s)
            engine.manager_node = await manager.swarm_node_id()
            if not engine.manager_node:
                raise EngineError(f"the engine at {manager_url} is not in a swarm")
            try:
                await nursery.start(engine._poll_nodes)
            except EngineError as exc:
                raise EngineError(f"the engine at {manager_url} is not a swarm manager: {exc}") from None
            try:
                yield engine
            finally:
                engine._closing.set()
                nursery.cancel_scope.cancel()
