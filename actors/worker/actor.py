"""Worker actor: owns ONE container at a time, knows when its wrapper dies, says why, and
restarts it (with backoff) or escalates to its supervisor with a DeathCertificate.

States: pending -> building -> creating -> starting -> ready <-> busy -> backoff | held -> ...
-> stopping -> stopped | failed.

One concern per module: this one is the actor (mailbox, lifecycle loop, views); `life` is one
container from create to removal, `session` the wrapper protocol, `tasks` the task book,
`classify` why it died (pure), `restart` when it comes back (pure)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
import trio

from runtime import events
from runtime.engines import ContainerSummary, Engine
from runtime.errors import CorralError, WorkerGone, WorkerStartupError
from runtime.instance import LIVE_STATES
from runtime.messages import (
    CancelTaskRequest,
    ChildDied,
    ChildExited,
    ChildFailed,
    InfoRequest,
    RestartRequest,
    RunTaskRequest,
    SnapshotRequest,
    StopRequest,
    ask,
    drain_mailbox,
    reply_error,
    reply_to,
    reply_value,
)
from runtime.records import DeathCertificate, TokenUsage, WorkerInfo, WorkerSnapshot
from runtime.specs import WorkerSpec, new_worker_id

from .handle import WorkerHandle
from .life import MAX_DEATHS, ContainerLife, GatewaySetup
from .restart import BackoffState, RestartWindow, decide
from .session import WrapperSession
from .tasks import TaskBook, _Pending

if TYPE_CHECKING:
    from .life import _Life

log = structlog.get_logger("corral.worker")


class Worker(ContainerLife, WrapperSession, TaskBook):
    def __init__(self, spec: WorkerSpec, *, engine: Engine, builder, supervisor: str = "corral",
                 watcher=None, start_limiter: trio.CapacityLimiter | None = None,
                 parent: trio.MemorySendChannel | None = None, pool: str | None = None,
                 rng: random.Random | None = None, mailbox_size: int = 1024, ledger=None,
                 journal=None, adopt: ContainerSummary | None = None,
                 abandon: trio.Event | None = None, engine_outage_s: float = 60.0,
                 leftovers: set[str] | None = None) -> None:
        self.spec = spec
        self.ledger = ledger
        """an ExecutionLedger (runtime.executions), or None: executions are not counted"""
        self.journal = journal
        """a TaskJournal (runtime.journal), or None: dispatches and results are not recorded"""
        self._adopt = adopt
        """a running container of this worker that an earlier corral process left: the first
        life attaches to it instead of creating one"""
        self.abandon = abandon
        """set: the supervisor was abandoned (a simulated crash): containers are left running"""
        self.engine_outage_s = engine_outage_s
        self._carried: set[str] = set()
        """ids of the tasks adopted containers were running or replayed results of"""
        self._unremoved: set[str] = leftovers if leftovers is not None else set()
        """containers that could not be removed (the engine was away): tried again before the
        next container, and by the supervisor's final sweep (one set for the whole tree)"""
        self._nursery: trio.Nursery | None = None
        self.id = spec.id or new_worker_id()
        self.engine: Engine = engine
        self.builder = builder
        self.supervisor = supervisor
        self.watcher = watcher
        self.start_limiter = start_limiter or trio.CapacityLimiter(16)
        self.parent = parent
        self.pool = pool
        self.rng = rng or random.Random()
        self.state = "pending"
        self.generation = 0
        self.restarts = 0
        self.image_id: str | None = None
        self.image_tag: str | None = None
        self.deaths: list[DeathCertificate] = []
        """the most recent deaths, oldest first (at most MAX_DEATHS)"""
        self.deaths_by_cause: dict[str, int] = {}
        """every death since the worker was spawned, by cause"""
        self.current_backoff_s = 0.0
        self.next_backoff_s = 0.0
        self.mailbox, self._recv = trio.open_memory_channel[Any](mailbox_size)
        self.finished = trio.Event()
        self._life: _Life | None = None
        self._before_outage = "ready"
        """the state before the engine went away (``engine_down``): what it goes back to"""
        self._pending: list[_Pending] = []
        self._current: _Pending | None = None
        self._draining: _Pending | None = None
        """a task corral ended at its deadline, whose task_done the wrapper still owes"""
        self._changed = trio.Event()
        self.listeners: list[Any] = []
        """called with this worker at every state change (pools use it; must not block)"""
        self._window = RestartWindow(spec.restart.max_restarts, spec.restart.within_s)
        self._backoff = BackoffState(spec.restart.backoff)
        self._stop: StopRequest | None = None
        self._stop_event = trio.Event()
        self._removed: dict[str, str] = {}
        self._restart_waiters: list[Any] = []
        self._hold: trio.Event | None = None
        """while set and not yet released: wait before the next container (group restarts)"""
        self.holds = 0
        """how many holds this worker was given (a group restart that released it knows by this
        that a later death took it again: it must not wait for it to come back)"""
        self._spec_hash = spec.fingerprint()
        """the ``corral.spec`` label: changes with the spec, reveals no secret"""
        self.usage_totals = TokenUsage()
        """model tokens and cost since the worker was spawned (every container)"""
        self._gateway_setup: GatewaySetup | None = None
        """a real agent's upstream and credential, resolved before each container"""
        self._http = None
        """the httpx client of this worker's model gateways (made on first use)"""

    def info(self) -> WorkerInfo:
        life = self._life
        return WorkerInfo(id=self.id, state=self.state, agent=self.spec.agent,
                          container_id=life.container_id if life else None,
                          container_name=life.name if life else None, image_id=self.image_id,
                          image_tag=self.image_tag, generation=self.generation, restarts=self.restarts,
                          pool=self.pool, last_death=self.deaths[-1] if self.deaths else None,
                          usage=self.usage_totals)

    def snapshot(self) -> WorkerSnapshot:
        return WorkerSnapshot(info=self.info(), current_backoff_s=self.current_backoff_s,
                              next_backoff_s=self.next_backoff_s, deaths=list(self.deaths),
                              deaths_by_cause=dict(self.deaths_by_cause))

    async def wait_ready(self) -> None:
        await self.wait_until(lambda i: i.state in ("ready", "busy"))

    async def wait_until(self, predicate) -> WorkerInfo:
        """Wait until ``predicate(self.info())`` holds (checked at every state change)."""
        while True:
            info = self.info()
            if predicate(info):
                return info
            if self.finished.is_set():
                raise WorkerGone(f"worker {self.id} ended ({self.state}) before the condition held")
            await self._changed.wait()

    def hold(self) -> None:
        """Wait before the next container until ``release()`` (its supervisor restarts a group
        of children in order). Several holds before one release are one hold."""
        if self._hold is None or self._hold.is_set():
            self._hold = trio.Event()
            self.holds += 1
            self._changed.set()
            self._changed = trio.Event()

    def release(self) -> None:
        if self._hold is not None:
            self._hold.set()

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        old, self.state = self.state, state
        log.info("worker_state", state=state, previous=old)
        events.worker_state(self, old)
        self._changed.set()
        self._changed = trio.Event()
        for listener in self.listeners:
            listener(self)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Runs the worker; ``task_status.started(handle)`` once its first container is READY.
        Raises WorkerStartupError (with the certificate) if that first container never is."""
        structlog.contextvars.bind_contextvars(actor="worker", worker_id=self.id)
        handle = WorkerHandle(self)
        outcome_kind = "stopped"     # also when cancelled or when the first start fails
        certs: list[DeathCertificate] = []
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._mailbox_loop)
                try:
                    outcome_kind, certs = await self._lifecycle(task_status, handle)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._finish(outcome_kind, certs)
            with trio.CancelScope(shield=True):
                if self._http is not None:
                    with trio.move_on_after(5):
                        await self._http.aclose()
                await self._notify_parent(outcome_kind, certs)

    def _finish(self, kind: str, certs: list[DeathCertificate]) -> None:
        self._set_state("failed" if kind == "failed" else "stopped")
        why = f"worker {self.id} has {'failed' if kind == 'failed' else 'stopped'}"
        self._end_all_tasks(why, certs[-1] if kind == "failed" and certs else None)
        for r in self._restart_waiters:
            reply_error(r, WorkerGone(why))
        if self._stop is not None:
            reply_value(self._stop.reply, None)
        drain_mailbox(self._recv, WorkerGone(why), worker_id=self.id)
        self.finished.set()
        self._changed.set()

    async def _notify_parent(self, kind: str, certs: list[DeathCertificate]) -> None:
        if self.parent is None:
            return
        with trio.move_on_after(5):
            try:
                if kind == "failed":
                    why = ("config_error: not retried" if certs and certs[-1].cause == "config_error"
                           else f"restart budget spent: more than {self.spec.restart.max_restarts} "
                                f"restarts within {self.spec.restart.within_s} s")
                    await self.parent.send(ChildFailed(child_id=self.id, certificates=certs, reason=why))
                else:
                    await self.parent.send(ChildExited(child_id=self.id))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _mailbox_loop(self) -> None:
        async for msg in self._recv:
            match msg:
                case RunTaskRequest(task=task, reply=reply):
                    self._pending.append(_Pending(task, reply))
                    await self._dispatch()
                case CancelTaskRequest(task_id=tid):
                    await self._cancel(tid)
                case InfoRequest(reply=reply):
                    reply_value(reply, self.info())
                case SnapshotRequest(reply=reply):
                    reply_value(reply, self.snapshot())
                case RestartRequest(reply=reply, reason=reason, hold=hold):
                    if hold and not self._stop_event.is_set():
                        self.hold()
                    if self._life is not None and not self._life.ended.is_set():
                        self._life.end("restart", reason)
                        if reply is not None:
                            self._restart_waiters.append(reply)   # answered once it is replaced
                    else:   # between containers already: the next one is the restart
                        reply_value(reply, None)
                case StopRequest():
                    if self._stop is None:
                        self._stop = msg
                    else:
                        reply_value(reply_to(msg), None)
                    self._stop_event.set()
                    self.release()
                    if self._life is not None:
                        self._life.end("stop", "stop requested")
                case _:
                    reply_error(reply_to(msg), CorralError(f"worker cannot handle {type(msg).__name__}"))

    async def _lifecycle(self, task_status, handle) -> tuple[str, list[DeathCertificate]]:
        first = True
        while True:
            if self._hold is not None and not self._stop_event.is_set():
                self._set_state("held")
                log.info("restart_held")
                await self._hold.wait()        # release() (a stop request releases too)
            self._hold = None
            if self._stop_event.is_set():
                return "stopped", []
            adopt, self._adopt = self._adopt, None
            if adopt is not None:
                self._take_over(adopt)
                if adopt.status not in LIVE_STATES:
                    await self._found_dead(adopt)
                    continue
            else:
                self.generation += 1
            structlog.contextvars.bind_contextvars(generation=self.generation)
            end_kind, cert = await self._one_life(task_status if first else None, handle, first,
                                                  adopt)
            if adopt is not None and end_kind == "died" and cert is not None and not cert.ready:
                # the container it found did not answer hello (its wrapper was already going,
                # e.g. orphaned, or on an engine that closed its stdin): no death of this worker,
                # a new container instead
                log.warning("adoption_failed", container_id=adopt.id[:12], cause=cert.cause,
                            reason=cert.reason)
                continue
            if end_kind == "replace":
                continue           # it never ran: a new container, no death, no restart
            was_first, first = first, False
            if end_kind == "stop":
                return "stopped", []
            if end_kind == "restart":
                waiters, self._restart_waiters = self._restart_waiters, []
                events.worker_restart_requested(self)
                self.restarts += 1
                for r in waiters:
                    reply_value(r, None)
                continue
            assert cert is not None
            if was_first and not cert.ready:
                raise WorkerStartupError(
                    f"worker {self.id} did not become ready: {cert.cause}"
                    + (f": {cert.reason}" if cert.reason else ""), cert)
            charged = self._charged_task(cert)
            outage = self._life is not None and self._life.outage
            decision, delay = self._decide(cert, charged=charged is not None or outage)
            cert = self._record_death(cert, decision, delay if decision == "restart" else None)
            self._on_death(cert, charged)
            if self.parent is not None:
                # the supervisor answers at once: restart when ready, or wait for its gate
                with trio.move_on_after(5):
                    try:
                        gate = await ask(self.parent, lambda r: ChildDied(
                            child_id=self.id, certificate=cert, restarting=decision == "restart",
                            charged_to_task=charged.task.task_id if charged is not None else None,
                            in_outage=outage, reply=r))
                    except CorralError:     # the supervisor is stopping or escalating
                        gate = False
                    if gate and decision == "restart":
                        self.hold()
            if decision == "give_up":
                return "failed", list(self.deaths)
            if decision == "done":
                return "stopped", []
            self.restarts += 1
            if delay > 0:
                self._set_state("backoff")
                self.current_backoff_s = delay
                log.info("restart_scheduled", delay_s=round(delay, 3), consecutive=self._backoff.consecutive)
                with trio.move_on_after(delay):
                    await self._stop_event.wait()
                self.current_backoff_s = 0.0
            else:
                log.info("restart_scheduled", delay_s=0.0, consecutive=self._backoff.consecutive)

    def _take_over(self, c: ContainerSummary) -> None:
        """Adopting ``c``: the worker goes on where the earlier process left it (generation,
        restarts, last death: the container's labels)."""
        try:
            self.generation = int(c.labels.get("corral.generation", "1"))
            self.restarts = int(c.labels.get("corral.restarts", "0"))
        except ValueError:
            self.generation = max(self.generation + 1, 1)
        last = c.labels.get("corral.last_death")
        if last:
            try:
                self.deaths = [msgspec.json.decode(last, type=DeathCertificate)]
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.warning("adopted_last_death_unreadable")

    async def _found_dead(self, c: ContainerSummary) -> None:
        """Its container ended while no corral process was attached: the death is certified
        and recorded (last death, restarts: as after any death, but in the past: no backoff,
        and nothing for the supervisor to count), the results the container wrote meanwhile are
        recorded in the journal, and a new container follows at once."""
        structlog.contextvars.bind_contextvars(generation=self.generation)
        cert, results = await self._certify_found(c)
        for frame in results:
            self._carried.add(frame.task_id)
            await self._task_done(frame)
        self._record_death(cert, "restart", 0.0, found_dead=True)
        self.restarts += 1

    def _record_death(self, cert: DeathCertificate, decision: str, restart_in_s: float | None,
                      **log_extra) -> DeathCertificate:
        """Keep the death (last deaths, counts by cause), log it and publish it; the certificate
        with its restart delay."""
        cert = msgspec.structs.replace(cert, restart_in_s=restart_in_s)
        self.deaths.append(cert)
        del self.deaths[:-MAX_DEATHS]
        self.deaths_by_cause[cert.cause] = self.deaths_by_cause.get(cert.cause, 0) + 1
        log.warning("worker_died", cause=cert.cause, exit_code=cert.exit_code, reason=cert.reason,
                    ready=cert.ready, uptime_s=round(cert.uptime_s, 3), decision=decision,
                    restart_in_s=restart_in_s, **log_extra)
        events.worker_died(self, cert, decision)
        return cert

    def carries(self, task_id: str) -> bool:
        """An adopted container was running ``task_id``, or replays its result: it is not lost."""
        return task_id in self._carried

    def _decide(self, cert: DeathCertificate, *, charged: bool = False) -> tuple[str, float]:
        decision, delay = decide(self.spec.restart, cert, charged=charged,
                                 stopping=self._stop_event.is_set(), window=self._window,
                                 backoff=self._backoff, now=trio.current_time(), rng=self.rng)
        if decision == "restart":
            self.next_backoff_s = self._backoff.next_cap
        return decision, delay
