"""Supervisor actor: OTP-style strategies and intensity over Worker actors, pools and nested
supervisors, with Kubernetes-style backoff (in the workers) and one clear escalation upward.

- A worker restarts its own container (backoff, budget) and reports every death here.
- Here: strategy (one_for_one / one_for_all / rest_for_one), the intensity window
  (max_restarts within_s, on trio's clock), shared-cause detection, and escalation.
- Past the intensity, or when a child gives up for good, the supervisor stops its children in
  reverse start order (each with its grace period) and raises SupervisorEscalation carrying the
  DeathCertificates that caused it.
Nothing slow runs in the receive loop: spawns, builds and container starts happen in children.
"""

from __future__ import annotations

import collections
import itertools
import random
from dataclasses import dataclass, field
from typing import Any, Deque

import msgspec
import outcome
import structlog
import trio

from runtime import events
from runtime.engines import Engine
from runtime.errors import (
    ActorStopped,
    CorralError,
    NoSuchChild,
    SupervisorEscalation,
    SupervisorStopped,
    WorkerGone,
)
from runtime.messages import (
    ChildDied,
    ChildExited,
    ChildFailed,
    RestartRequest,
    SnapshotRequest,
    SpawnRequest,
    StartPoolRequest,
    StartSupervisorRequest,
    StopChildRequest,
    StopRequest,
    ask,
    drain_mailbox,
    reply_error,
    reply_to,
    reply_value,
)
from runtime.records import DeathCertificate, SupervisorSnapshot
from runtime.specs import PoolSpec, SupervisorConfig, WorkerSpec
from runtime.util import unwrap_single

from .pool import Pool, PoolHandle
from .worker.restart import RestartWindow
from .worker import Worker, WorkerHandle

log = structlog.get_logger("corral.supervisor")

SHARED_CAUSES = frozenset({"engine_error"})


@dataclass
class _Child:
    id: str
    kind: str                     # worker | pool | supervisor
    actor: Any
    order: int
    handle: Any = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)


class SupervisorHandle:
    """What `open_supervisor()` yields; also the handle of a nested supervisor."""

    def __init__(self, sup: "Supervisor") -> None:
        self._sup = sup
        self.name = sup.config.name

    @property
    def builder(self):
        return self._sup.builder

    @property
    def engine(self) -> Engine:
        return self._sup.engine

    async def spawn(self, spec: WorkerSpec | None = None, **kwargs) -> WorkerHandle:
        """Start a worker; returns once it is READY. Raises WorkerStartupError (with the
        DeathCertificate), ConfigError or ImageBuildError; never hangs past the startup deadline."""
        spec = spec or WorkerSpec(**kwargs)
        return await ask(self._sup.mailbox, lambda r: SpawnRequest(spec=spec, reply=r),
                         gone=SupervisorStopped(f"supervisor {self.name} has stopped"))

    async def start_pool(self, spec: PoolSpec) -> PoolHandle:
        return await ask(self._sup.mailbox, lambda r: StartPoolRequest(spec=spec, reply=r),
                         gone=SupervisorStopped(f"supervisor {self.name} has stopped"))

    async def start_supervisor(self, config: SupervisorConfig) -> "SupervisorHandle":
        return await ask(self._sup.mailbox, lambda r: StartSupervisorRequest(config=config, reply=r),
                         gone=SupervisorStopped(f"supervisor {self.name} has stopped"))

    async def stop_child(self, child_id: str) -> None:
        await ask(self._sup.mailbox, lambda r: StopChildRequest(child_id=child_id, reply=r),
                  gone=SupervisorStopped(f"supervisor {self.name} has stopped"))

    async def snapshot(self) -> SupervisorSnapshot:
        return self._sup.snapshot()

    async def wait_configured(self) -> None:
        """Wait until the workers and pools named in the config are READY. One that cannot start
        is a supervision failure: the supervisor escalates (reason "start_failed")."""
        await self._sup.configured.wait()

    def worker(self, worker_id: str) -> WorkerHandle:
        w = self._sup.find_worker(worker_id)
        if w is None:
            raise NoSuchChild(f"no worker {worker_id!r} under supervisor {self.name}")
        return WorkerHandle(w)

    def pool(self, name: str) -> PoolHandle:
        child = self._sup.children.get(f"pool:{name}")
        if child is None or child.handle is None:
            raise NoSuchChild(f"no pool {name!r} under supervisor {self.name}")
        return child.handle

    def workers(self) -> list[WorkerHandle]:
        return [WorkerHandle(w) for w in self._sup.all_workers()]

    async def shutdown(self) -> None:
        """Stop every child (reverse start order) and the supervisor itself."""
        if self._sup.finished.is_set():
            return
        try:
            await ask(self._sup.mailbox, lambda r: StopRequest(reply=r),
                      gone=SupervisorStopped(f"supervisor {self.name} has stopped"))
        except (ActorStopped, SupervisorEscalation):
            pass
        await self._sup.finished.wait()


class Supervisor:
    def __init__(self, config: SupervisorConfig, *, engine: Engine, builder, watcher=None,
                 start_limiter: trio.CapacityLimiter | None = None,
                 parent: trio.MemorySendChannel | None = None, rng: random.Random | None = None,
                 root: str | None = None, mailbox_size: int = 4096, ledger=None, journal=None,
                 adoptable: dict | None = None, abandon: trio.Event | None = None,
                 engine_outage_s: float | None = None, leftovers: set[str] | None = None) -> None:
        self.config = config
        self.ledger = ledger
        self.journal = journal
        """a TaskJournal (runtime.journal) its workers record dispatches and results in"""
        self.adoptable: dict = adoptable if adoptable is not None else {}
        """worker id -> a running container an earlier corral process left (one dict for the
        whole tree): the worker of that id, when it is made, adopts it"""
        self.abandon = abandon
        self.leftovers: set[str] = leftovers if leftovers is not None else set()
        """ids of containers of the tree that could not be removed (the engine was away)"""
        self.engine_outage_s = engine_outage_s if engine_outage_s is not None else config.engine_outage_s
        self.root = root or config.name
        """the top-level supervisor's name: the corral.supervisor label of every container"""
        self.engine: Engine = engine
        self.builder = builder
        self.watcher = watcher
        self.start_limiter = start_limiter or trio.CapacityLimiter(config.max_concurrent_starts)
        self.parent = parent
        self.rng = rng or random.Random()
        self.mailbox, self._recv = trio.open_memory_channel[Any](mailbox_size)
        self.children: dict[str, _Child] = {}
        self._order = itertools.count()
        self._intensity = RestartWindow(config.max_restarts, config.within_s)
        self._group_pending: set[str] = set()
        """children that a running or queued group restart has yet to start again"""
        self._group_lock = trio.Semaphore(1)
        """one group restart at a time (a Semaphore: a parent's hold and release may come from
        different tasks)"""
        self._recent: Deque[tuple[float, DeathCertificate]] = collections.deque(maxlen=1000)
        self._certs: Deque[DeathCertificate] = collections.deque(maxlen=50)
        self._nursery: trio.Nursery | None = None
        self.state = "starting"
        self.finished = trio.Event()
        self.configured = trio.Event()
        """set once the children named in the config have started (or failed to)"""
        self._stop_reply: Any = None

    # -- views -------------------------------------------------------------------------------
    def snapshot(self) -> SupervisorSnapshot:
        kids = [c.actor.snapshot() for c in sorted(self.children.values(), key=lambda c: c.order)]
        now = trio.current_time()
        return SupervisorSnapshot(name=self.config.name, strategy=self.config.strategy, state=self.state,
                                  restarts_in_window=self._intensity.count(now),
                                  children=kids)

    def all_workers(self) -> list[Worker]:
        out: list[Worker] = []
        for c in sorted(self.children.values(), key=lambda c: c.order):
            if c.kind == "worker":
                out.append(c.actor)
            elif c.kind == "pool":
                out.extend(c.actor.members)
            else:
                out.extend(c.actor.all_workers())
        return out

    def find_worker(self, worker_id: str) -> Worker | None:
        return next((w for w in self.all_workers() if w.id == worker_id), None)

    # -- the actor -----------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        structlog.contextvars.bind_contextvars(actor="supervisor", supervisor=self.config.name)
        escalation: SupervisorEscalation | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.state = "running"
                task_status.started(SupervisorHandle(self))
                nursery.start_soon(self._start_configured)
                escalation = await self._loop()
                self.state = "stopping"
                await self._stop_children()
                nursery.cancel_scope.cancel()
        finally:
            self.state = "escalated" if escalation else "stopped"
            drain_mailbox(self._recv, SupervisorStopped(f"supervisor {self.config.name} has stopped"))
            self.finished.set()
            if self._stop_reply is not None:
                reply_value(self._stop_reply, None)
        if escalation is not None:
            log.error("supervisor_escalated", reason=escalation.reason, error=str(escalation),
                      certificates=len(escalation.certificates))
            events.escalated(self.config.name, escalation)
            raise escalation

    async def _loop(self) -> SupervisorEscalation | None:
        assert self._nursery is not None
        async for msg in self._recv:
            match msg:
                case SpawnRequest(spec=spec, reply=reply):
                    self._nursery.start_soon(self._start_worker, spec, reply)
                case StartPoolRequest(spec=spec, reply=reply):
                    self._nursery.start_soon(self._start_pool, spec, reply)
                case StartSupervisorRequest(config=config, reply=reply):
                    self._nursery.start_soon(self._start_supervisor, config, reply)
                case StopChildRequest(child_id=cid, reply=reply):
                    self._nursery.start_soon(self._stop_child, cid, reply)
                case SnapshotRequest(reply=reply):
                    reply_value(reply, self.snapshot())
                case ChildDied(reply=reply):
                    # a child that a group restart is about to restart anyway: as in OTP, its
                    # death is absorbed (not counted again); that group restart releases it
                    absorbed = msg.restarting and msg.child_id in self._group_pending
                    esc = self._on_death(msg, absorbed=absorbed)
                    if esc is not None:
                        return esc      # (the worker's question is answered by the drain)
                    reply_value(reply, absorbed or self._group_restart(msg))
                case ChildFailed(child_id=cid, certificates=certs, reason=reason, kind=kind):
                    self._certs.extend(c for c in certs if c not in self._certs)
                    what = "could not start" if kind == "start_failed" else "gave up"
                    return SupervisorEscalation(
                        f"supervisor {self.config.name}: child {cid} {what} ({reason})"
                        + (f"; last death: {certs[-1].cause}: {certs[-1].reason}" if certs else ""),
                        list(certs) or list(self._certs), supervisor=self.config.name,
                        reason=kind)
                case ChildExited():
                    pass
                case StopRequest(reply=reply):
                    self._stop_reply = reply
                    return None
                case _:
                    reply_error(reply_to(msg), CorralError(f"supervisor cannot handle {type(msg).__name__}"))
        return None

    def _on_death(self, msg: ChildDied, *, absorbed: bool = False) -> SupervisorEscalation | None:
        cert = msg.certificate
        now = trio.current_time()
        self._certs.append(cert)
        self._recent.append((now, cert))
        cfg = self.config
        if cert.cause == "engine_unavailable":
            # the engine stayed away longer than engine_outage_s: nothing here can fix that
            return SupervisorEscalation(
                f"supervisor {cfg.name}: the engine was unreachable for over "
                f"{self.engine_outage_s:g} s (engine_outage_s): {cert.reason}",
                [cert], supervisor=cfg.name, reason="engine_unavailable")
        if msg.in_outage:
            # died while the engine was away, and the engine is back: not the worker's doing,
            # and not a cause that persists: restarted without counting
            log.info("child_restarting", child=msg.child_id, cause=cert.cause, in_outage=True)
            return None
        # shared cause: many workers dying of the same environmental cause at once
        if cert.cause in SHARED_CAUSES:
            same = {c.worker_id for t, c in self._recent
                    if c.cause == cert.cause and now - t <= cfg.shared_cause_window_s}
            if len(same) >= cfg.shared_cause_threshold:
                certs = [c for t, c in self._recent if c.cause == cert.cause and now - t <= cfg.shared_cause_window_s]
                return SupervisorEscalation(
                    f"supervisor {cfg.name}: {len(same)} workers died of {cert.cause} within "
                    f"{cfg.shared_cause_window_s} s (shared cause): {cert.reason}",
                    certs, supervisor=cfg.name, reason="shared_cause")
        if not msg.restarting:
            return None
        if absorbed:
            log.info("death_absorbed_by_group_restart", child=msg.child_id, cause=cert.cause)
        elif msg.charged_to_task is not None:
            # the task running at the time brought the container down: the worker restarts it
            # (with backoff) and the task fails alone once its attempts are spent; bad data never
            # counts toward this supervisor's intensity
            log.info("child_restarting", child=msg.child_id, cause=cert.cause,
                     charged_to_task=msg.charged_to_task)
        else:
            esc = self._count_restart(msg, now)
            if esc is not None:
                return esc
        return None

    # -- group restarts (one_for_all, rest_for_one), as OTP's supervisor.erl does them ---------
    def _group_restart(self, msg: ChildDied) -> bool:
        """The answer to a dying child: False (one_for_one: restart yourself), or True: wait to
        be released while the group is stopped in reverse start order and started again in
        start order. A pool's member is not a child of its own: its pool restarts it."""
        child = self.children.get(msg.child_id)
        if child is None or not msg.restarting or self.config.strategy == "one_for_one":
            return False
        cfg = self.config
        group = sorted((c for c in self.children.values()
                        if c is child or cfg.strategy == "one_for_all" or c.order > child.order),
                       key=lambda c: c.order)
        self._group_pending.update(c.id for c in group)
        assert self._nursery is not None
        self._nursery.start_soon(self._run_group_restart, child, group, msg.certificate.generation)
        return True

    async def _run_group_restart(self, dead: _Child, group: list[_Child], dead_gen: int) -> None:
        cfg = self.config
        async with self._group_lock:
            log.info("group_restart", strategy=cfg.strategy, because=dead.id,
                     children=[c.id for c in group])
            why = f"{cfg.strategy}: {dead.id} died"
            releases: dict[str, Any] = {}
            for c in reversed(group):              # stop: reverse start order
                if c is not dead:
                    releases[c.id] = await _hold(c, why)
            for c in group:                        # start: start order, each READY before the next
                self._group_pending.discard(c.id)  # a death from here on is a new group restart
                if c is dead:
                    holds = c.actor.holds
                    c.actor.release()
                    await _wait_back(c.actor, dead_gen, holds)
                else:
                    await releases[c.id]()

    async def hold_all(self, why: str):
        """Stop every child's containers (reverse start order) and hold them; returns the
        coroutine function that starts them again in start order, each READY before the next
        (a nested supervisor restarted by its parent's group restart)."""
        await self._group_lock.acquire()
        releases = []
        try:
            for c in sorted(self.children.values(), key=lambda c: c.order, reverse=True):
                releases.append(await _hold(c, why))
        except BaseException:
            self._group_lock.release()
            raise

        async def release() -> None:
            try:
                for r in reversed(releases):
                    await r()
            finally:
                self._group_lock.release()
        return release

    def _count_restart(self, msg: ChildDied, now: float) -> SupervisorEscalation | None:
        """The intensity window: more than max_restarts within within_s escalates."""
        cfg, cert = self.config, msg.certificate
        if not self._intensity.admit(now):
            window = [c for t, c in self._recent if now - t <= cfg.within_s]
            return SupervisorEscalation(
                f"supervisor {cfg.name}: {self._intensity.count(now) + 1} restarts within {cfg.within_s} s "
                f"exceed max_restarts={cfg.max_restarts}; last death: {cert.worker_id} {cert.cause}"
                + (f": {cert.reason}" if cert.reason else ""),
                window, supervisor=cfg.name, reason="intensity")
        log.info("child_restarting", child=msg.child_id, cause=cert.cause,
                 restarts_in_window=self._intensity.count(now))
        return None

    async def _stop_children(self) -> None:
        for child in sorted(self.children.values(), key=lambda c: c.order, reverse=True):
            await self._stop_one(child)

    async def _stop_one(self, child: _Child) -> None:
        grace = self._grace(child)
        with trio.move_on_after(grace + 10):
            try:
                if child.kind == "worker" and child.handle is not None:
                    await child.handle.stop()
                elif child.kind == "pool" and child.handle is not None:
                    await child.handle.stop()
                    await child.done.wait()
                elif child.kind == "supervisor" and child.handle is not None:
                    await child.handle.shutdown()
            except (ActorStopped, SupervisorEscalation):
                pass
        child.scope.cancel()
        with trio.move_on_after(15):
            await child.done.wait()

    def _grace(self, child: _Child) -> float:
        if child.kind == "worker":
            return child.actor.spec.stop_grace_s
        if child.kind == "pool":
            return child.actor.spec.worker.stop_grace_s
        return 30.0

    async def _stop_child(self, cid: str, reply: Any) -> None:
        child = self.children.get(cid)
        if child is None:
            reply_error(reply, NoSuchChild(f"no child {cid!r} under supervisor {self.config.name}"))
            return
        await self._stop_one(child)
        reply_value(reply, None)

    async def _start_configured(self) -> None:
        """The children named in the config start in the background (the loop serves meanwhile);
        ``configured`` is set once each is READY or has failed to start (logged with its reason)."""
        assert self._nursery is not None
        nursery = self._nursery

        async def one(start, spec) -> None:
            send, recv = trio.open_memory_channel[outcome.Outcome](1)
            nursery.start_soon(start, spec, send)
            with recv:
                try:
                    (await recv.receive()).unwrap()
                except Exception as exc:
                    child = getattr(spec, "id", None) or getattr(spec, "name", None) or "?"
                    cert = getattr(exc, "certificate", None)
                    log.error("configured_child_failed", child=child, error=str(exc),
                              certificate=msgspec.to_builtins(cert))
                    # a child named in the config that cannot start is a supervision failure
                    await self.mailbox.send(ChildFailed(
                        child_id=child, certificates=[cert] if cert is not None else [],
                        reason=f"{type(exc).__name__}: {exc}", kind="start_failed"))

        async with trio.open_nursery() as n:
            for spec in self.config.workers:
                n.start_soon(one, self._start_worker, spec)
            for pspec in self.config.pools:
                n.start_soon(one, self._start_pool, pspec)
        self.configured.set()

    # -- children ------------------------------------------------------------------------------
    def _make_worker(self, spec: WorkerSpec, pool: str | None = None) -> Worker:
        adopt = self.adoptable.pop(spec.id, None) if spec.id else None
        return Worker(spec, engine=self.engine, builder=self.builder, supervisor=self.root,
                      watcher=self.watcher, start_limiter=self.start_limiter, parent=self.mailbox,
                      pool=pool, rng=self.rng, ledger=self.ledger, journal=self.journal,
                      adopt=adopt, abandon=self.abandon, engine_outage_s=self.engine_outage_s,
                      leftovers=self.leftovers)

    async def _run_child(self, child: _Child, reply: Any, fn) -> None:
        """Start ``fn`` as a child; reply with its handle once started, or with its start error.
        After that, nothing it raises escapes: it becomes a ChildFailed message here."""
        if child.id in self.children:
            reply_error(reply, CorralError(f"a child named {child.id!r} exists already under "
                                           f"supervisor {self.config.name}"))
            return
        self.children[child.id] = child
        started = False
        try:
            with child.scope:
                async with trio.open_nursery() as n:
                    child.handle = await n.start(fn)
                    started = True
                    reply_value(reply, child.handle)
        except Exception as exc:
            exc = unwrap_single(exc)
            if not started:
                log.warning("child_start_failed", child=child.id, error=str(exc).splitlines()[0])
                reply_error(reply, exc)
            else:
                certs = list(getattr(exc, "certificates", []))
                log.error("child_crashed", child=child.id, error=repr(exc))
                try:
                    self.mailbox.send_nowait(ChildFailed(child_id=child.id, certificates=certs,
                                                         reason=f"{type(exc).__name__}: {exc}"))
                except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        finally:
            self.children.pop(child.id, None)
            child.done.set()

    async def _start_worker(self, spec: WorkerSpec, reply: Any) -> None:
        worker = self._make_worker(spec)
        await self._run_child(_Child(worker.id, "worker", worker, next(self._order)), reply, worker.run)

    async def _start_pool(self, spec: PoolSpec, reply: Any) -> None:
        pool = Pool(spec, make_worker=self._make_worker)
        await self._run_child(_Child(f"pool:{spec.name}", "pool", pool, next(self._order)), reply, pool.run)

    async def _start_supervisor(self, config: SupervisorConfig, reply: Any) -> None:
        sup = Supervisor(config, engine=self.engine, builder=self.builder, watcher=self.watcher,
                         start_limiter=self.start_limiter, parent=self.mailbox, rng=self.rng,
                         root=self.root, ledger=self.ledger, journal=self.journal,
                         adoptable=self.adoptable, abandon=self.abandon,
                         engine_outage_s=self.engine_outage_s, leftovers=self.leftovers)
        await self._run_child(_Child(f"sup:{config.name}", "supervisor", sup, next(self._order)),
                              reply, sup.run)


async def _noop() -> None:
    pass


async def _wait_back(worker: Worker, generation: int, holds: int) -> None:
    """Until ``worker`` has a container newer than ``generation`` READY, or is held again (a new
    death: a later group restart takes it, and waits for this one's lock), or has ended."""
    try:
        await worker.wait_until(lambda i: worker.holds > holds or (
            i.generation > generation and i.state in ("ready", "busy", "held")))
    except WorkerGone:
        pass


async def _hold_worker(worker: Worker, why: str):
    gen = worker.generation
    try:
        await ask(worker.mailbox, lambda r: RestartRequest(reply=r, hold=True, reason=why))
    except CorralError:
        return _noop

    async def release() -> None:
        holds = worker.holds
        worker.release()
        await _wait_back(worker, gen, holds)
    return release


async def _hold(child: _Child, why: str):
    """Stop a child's containers and hold it; returns how to start it again."""
    if child.kind == "worker":
        return await _hold_worker(child.actor, why)
    if child.kind == "supervisor":
        return await child.actor.hold_all(why)
    releases = []                      # a pool: its members at once, in parallel

    async def hold_one(w: Worker) -> None:
        releases.append(await _hold_worker(w, why))
    async with trio.open_nursery() as n:
        for w in list(child.actor.members):
            n.start_soon(hold_one, w)

    async def release_pool() -> None:
        async with trio.open_nursery() as n:
            for r in releases:
                n.start_soon(r)
    return release_pool
