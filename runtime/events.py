"""Lifecycle events: what the supervision tree does, as typed values, for whoever listens.

An in-process bus (``EventBus``) that the actors publish to with one-line calls of the helpers
below (``worker_state(worker, previous)``, ``worker_died(worker, cert, decision)``, ...). It is
found through a context variable that `open_supervisor` sets, and that trio copies into every
task it starts: actors need no reference to it, and publishing where no bus is set (an actor
built by hand in a test) does nothing.

The bus keeps the last ``keep`` events, numbered from 1, so that a reader can resume where it
left off (the HTTP API's ``GET /v1/events`` with ``Last-Event-ID``). Subscribers (metrics) are
called synchronously at each publish and must not block. Publishing costs a Struct and a
deque append: nothing is published while the tree is idle.

Worker output (``WorkerOutput``, what the wrapper writes to stderr) is transient: it is handed
to subscribers (``corral logs --follow``) but not kept.
"""

from __future__ import annotations

import collections
import contextvars
import time
from typing import Any, Callable, Iterator, Literal, Union

import msgspec
import trio
from msgspec import Struct, field

from .records import DeathCertificate


class Event(Struct, frozen=True, kw_only=True, tag_field="kind"):
    id: int = 0
    """position in the bus (from 1): what an SSE client sends back as Last-Event-ID"""
    at: float = 0.0
    """wall-clock time (epoch seconds)"""


class WorkerStateChanged(Event, frozen=True, kw_only=True, tag="worker_state"):
    worker_id: str
    pool: str | None = None
    state: str
    previous: str
    generation: int
    restarts: int


class WorkerDied(Event, frozen=True, kw_only=True, tag="worker_died"):
    worker_id: str
    pool: str | None = None
    decision: str
    """restart | give_up | done"""
    certificate: DeathCertificate


class WorkerRestarting(Event, frozen=True, kw_only=True, tag="worker_restarting"):
    worker_id: str
    pool: str | None = None
    cause: str
    """the dead container's cause of death, or ``requested`` (a restart asked for)"""
    delay_s: float = 0.0
    generation: int
    """the generation that ended"""


class SupervisorEscalated(Event, frozen=True, kw_only=True, tag="supervisor_escalated"):
    supervisor: str
    reason: str
    error: str
    certificates: list[DeathCertificate] = field(default_factory=list)


class TaskQueued(Event, frozen=True, kw_only=True, tag="task_queued"):
    task_id: str
    target: str
    """pool:NAME or worker:ID"""


class TaskStarted(Event, frozen=True, kw_only=True, tag="task_started"):
    task_id: str
    worker_id: str
    pool: str | None = None
    generation: int


class TaskDone(Event, frozen=True, kw_only=True, tag="task_done"):
    task_id: str
    target: str
    status: str
    duration_s: float = 0.0
    worker_id: str | None = None
    attempts: int = 1


class GatewayExchange(Event, frozen=True, kw_only=True, tag="gateway_exchange"):
    worker_id: str | None = None
    status: int | None = None
    """the upstream's HTTP status; None: no answer (refused, unreachable, aborted)"""
    failure: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0


class ImageBuilt(Event, frozen=True, kw_only=True, tag="image_built"):
    tag: str
    agent: str = ""
    seconds: float


class WorkerOutput(Event, frozen=True, kw_only=True, tag="worker_output"):
    worker_id: str
    generation: int
    data: str


AnyEvent = Union[WorkerStateChanged, WorkerDied, WorkerRestarting, SupervisorEscalated, TaskQueued,
                 TaskStarted, TaskDone, GatewayExchange, ImageBuilt, WorkerOutput]
KINDS: tuple[str, ...] = tuple(t.__struct_config__.tag for t in AnyEvent.__args__)  # type: ignore[attr-defined]
Kind = Literal["worker_state", "worker_died", "worker_restarting", "supervisor_escalated",
               "task_queued", "task_started", "task_done", "gateway_exchange", "image_built",
               "worker_output"]

event_decoder = msgspec.json.Decoder(AnyEvent)


class EventBus:
    """Numbered lifecycle events: kept (the last ``keep``), handed to subscribers, waited for."""

    def __init__(self, *, keep: int = 10_000) -> None:
        self._events: collections.deque[Event] = collections.deque(maxlen=keep)
        self._next = 1
        self._subscribers: list[Callable[[Event], None]] = []
        self._new = trio.Event()
        self.closed = False

    @property
    def last_id(self) -> int:
        return self._next - 1

    @property
    def first_id(self) -> int:
        """the id of the oldest event still kept (last_id + 1 if none is)"""
        return self._events[0].id if self._events else self._next

    def publish(self, event: Event, *, keep: bool = True) -> Event:
        if keep:
            event = msgspec.structs.replace(event, id=self._next, at=event.at or time.time())
            self._next += 1
            self._events.append(event)
        for fn in self._subscribers:
            fn(event)
        if keep:
            self._new.set()
            self._new = trio.Event()
        return event

    def subscribe(self, fn: Callable[[Event], None], *, replay: bool = False) -> Callable[[], None]:
        """Call ``fn`` with every event from now on (and, with ``replay``, first with the ones
        kept); returns the function that unsubscribes."""
        if replay:
            for ev in list(self._events):
                fn(ev)
        self._subscribers.append(fn)

        def unsubscribe() -> None:
            try:
                self._subscribers.remove(fn)
            except ValueError:
                pass
        return unsubscribe

    def since(self, last_id: int) -> Iterator[Event]:
        """The kept events after ``last_id`` (all of them if ``last_id`` is not one of this
        bus's: a reader from before a restart of corral)."""
        if last_id > self.last_id:
            last_id = 0
        if not self._events or last_id >= self.last_id:
            return iter(())
        start = max(0, last_id + 1 - self._events[0].id)
        return iter(list(self._events)[start:])

    async def wait_after(self, last_id: int) -> None:
        """Until an event newer than ``last_id`` is kept (at once if there is one)."""
        if last_id < self.last_id or last_id > self.last_id:
            return
        await self._new.wait()

    def close(self) -> None:
        self.closed = True
        self._new.set()


_current: contextvars.ContextVar[EventBus | None] = contextvars.ContextVar("corral_events",
                                                                           default=None)


def current_bus() -> EventBus | None:
    return _current.get()


def set_bus(bus: EventBus | None) -> contextvars.Token:
    return _current.set(bus)


def reset_bus(token: contextvars.Token) -> None:
    try:
        _current.reset(token)
    except ValueError:      # left in another context than it was entered in
        _current.set(None)


def publish(event: Event, *, keep: bool = True) -> None:
    bus = _current.get()
    if bus is not None:
        bus.publish(event, keep=keep)


# -- the one-line publishers the actors call ------------------------------------------------------
def worker_state(worker: Any, previous: str) -> None:
    if _current.get() is None:
        return
    publish(WorkerStateChanged(worker_id=worker.id, pool=worker.pool, state=worker.state,
                               previous=previous, generation=worker.generation,
                               restarts=worker.restarts))


def worker_died(worker: Any, cert: DeathCertificate, decision: str) -> None:
    if _current.get() is None:
        return
    publish(WorkerDied(worker_id=worker.id, pool=worker.pool, decision=decision, certificate=cert))
    if decision == "restart":
        publish(WorkerRestarting(worker_id=worker.id, pool=worker.pool, cause=cert.cause,
                                 delay_s=cert.restart_in_s or 0.0, generation=cert.generation))


def worker_restart_requested(worker: Any) -> None:
    publish(WorkerRestarting(worker_id=worker.id, pool=worker.pool, cause="requested",
                             generation=worker.generation))


def worker_output(worker: Any, data: bytes) -> None:
    bus = _current.get()
    if bus is not None and bus._subscribers:
        bus.publish(WorkerOutput(worker_id=worker.id, generation=worker.generation,
                                 data=data.decode(errors="replace"), at=time.time()), keep=False)


def escalated(supervisor: str, exc: Any) -> None:
    publish(SupervisorEscalated(supervisor=supervisor, reason=getattr(exc, "reason", ""),
                                error=str(exc),
                                certificates=list(getattr(exc, "certificates", []))[-10:]))


def task_queued(task_id: str, target: str) -> None:
    publish(TaskQueued(task_id=task_id, target=target))


def task_started(worker: Any, task_id: str, generation: int) -> None:
    publish(TaskStarted(task_id=task_id, worker_id=worker.id, pool=worker.pool,
                        generation=generation))


def task_done(target: str, result: Any) -> Any:
    """Publishes the result of a task; returns it."""
    publish(TaskDone(task_id=result.task_id, target=target, status=result.status,
                     duration_s=result.duration_s, worker_id=result.worker_id,
                     attempts=result.attempts))
    return result


def gateway_exchange(done: Any) -> None:
    if _current.get() is None:
        return
    import structlog

    usage = getattr(done, "usage", None)
    worker_id = structlog.contextvars.get_contextvars().get("worker_id")
    publish(GatewayExchange(worker_id=worker_id, status=done.status, failure=done.failure,
                            input_tokens=getattr(usage, "input_tokens", 0) if usage else 0,
                            output_tokens=getattr(usage, "output_tokens", 0) if usage else 0))


def image_built(tag: str, agent: str, seconds: float) -> None:
    publish(ImageBuilt(tag=tag, agent=agent, seconds=seconds))
