"""Watcher actor: ONE engine events subscription per supervisor tree, routed by container id.

Workers register the containers they create; the watcher records what the engine says happened to
each (kill signals, oom, die with exit code, stop, a start after the die, restart, destroy). The
worker's classification uses it to tell a `docker kill`, `docker stop` or `docker restart` from a
crash and to catch OOM kills. If the stream ends, the watcher resubscribes from the last event it
saw, so nothing in between is lost (what is replayed twice counts once); while it cannot, the
engine is taken to be gone (`alive`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import structlog
import trio

from runtime.engines import ContainerEvent, Engine, EventKind
from runtime.errors import EngineError

log = structlog.get_logger("corral.watcher")

SETTLE_S = 2.0
"""after a stop signal from outside killed a container: how long the engine has to show that it
restarts it (`docker restart`) or is going away itself (its events stream ends)"""
WATCHED: frozenset[EventKind] = frozenset(
    ("killed", "oom", "died", "stopped", "started", "restarted", "removed"))
REPLAY_MARGIN_NS = 1_000_000
"""a resubscription asks for the events from this much before the last one seen: ``since`` is a
float of seconds, too coarse to name one nanosecond; what comes twice is recognised and dropped"""
ENGINE_CHECK_S = 2.0
"""after a container's death: how quickly the engine must answer a ping (and take an events
subscription) for corral to call it present"""


@dataclass(slots=True)
class ContainerWatch:
    container_id: str
    kills: list[str] = field(default_factory=list)
    """numbers of the signals sent through the engine API (docker kill / stop), in order"""
    oom: bool = False
    exit_code: int | None = None
    stopped: bool = False
    """a stop event: `docker stop` (or the engine stopping its containers as it shuts down)"""
    restarted: bool = False
    """started again after it died, or a restart event: `docker restart`"""
    died: trio.Event = field(default_factory=trio.Event)
    destroyed: trio.Event = field(default_factory=trio.Event)
    changed: trio.Event = field(default_factory=trio.Event)
    """set (and replaced) at every event for this container, and when the events stream ends"""

    def _poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class Watcher:
    def __init__(self, engine: Engine, *, supervisor: str) -> None:
        self.engine = engine
        self.supervisor = supervisor
        self._watches: dict[str, ContainerWatch] = {}
        self.alive = False
        """subscribed to the engine's events right now"""
        self.events_seen = 0
        self._last_ns: int | None = None
        self._recent: set[ContainerEvent] = set()
        """the events seen within REPLAY_MARGIN_NS of the last one: a replay repeats them"""
        self.subscriptions = 0
        """how many times the events stream was taken (1 + resubscriptions)"""
        self._first_ns: int | None = None
        """wall-clock time just before the first subscription was taken: a resubscription
        before any event was seen replays from then (a local engine stamps its events with the
        same clock)"""
        self._up = trio.Event()
        """set while ``alive``"""

    def watch(self, container_id: str) -> ContainerWatch:
        w = self._watches.get(container_id)
        if w is None:
            w = self._watches[container_id] = ContainerWatch(container_id)
        return w

    def forget(self, container_id: str) -> None:
        self._watches.pop(container_id, None)

    async def wait_alive(self) -> None:
        """Wait until the watcher is subscribed to the engine's events (at once if it is)."""
        await self._up.wait()

    async def wait_settled(self, w: ContainerWatch) -> None:
        """After ``w``'s container died: wait until the engine has restarted it, or its events
        stream has ended (the engine went away). Neither may come: callers set a deadline."""
        while not w.restarted and self.alive:
            await w.changed.wait()

    def _set_alive(self, alive: bool) -> None:
        self.alive = alive
        if alive:
            self._up.set()
        else:
            if self._up.is_set():
                self._up = trio.Event()
            for w in self._watches.values():
                w._poke()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        structlog.contextvars.bind_contextvars(actor="watcher")
        labels = {"corral.supervisor": self.supervisor}
        started = False
        delay = 0.1
        while True:
            last = self._last_ns if self._last_ns is not None else self._first_ns
            since = None if last is None else (last - REPLAY_MARGIN_NS) / 1e9
            try:
                t_subscribe = time.time_ns()
                async with self.engine.events(labels=labels, kinds=WATCHED, since=since) as stream:
                    if self._first_ns is None:
                        self._first_ns = t_subscribe
                    self.subscriptions += 1
                    self._set_alive(True)
                    delay = 0.1
                    if not started:
                        task_status.started(self)
                        started = True
                    async for ev in stream.receive:
                        self._route(ev)
                    log.warning("events_stream_ended", why=stream.ended)
            except EngineError as exc:
                log.warning("events_subscribe_failed", error=str(exc))
                if not started:
                    task_status.started(self)
                    started = True
            finally:
                self._set_alive(False)
            await trio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _route(self, ev: ContainerEvent) -> None:
        if not self._fresh(ev):
            return
        self.events_seen += 1
        w = self._watches.get(ev.container_id)
        if w is None:
            return
        match ev.kind:
            case "killed":
                w.kills.append(str(ev.signal) if ev.signal is not None else "")
            case "oom":
                w.oom = True
            case "died":
                if ev.exit_code is not None:
                    w.exit_code = ev.exit_code
                w.died.set()
            case "stopped":
                w.stopped = True
            case "restarted":
                w.restarted = True
            case "started" if w.died.is_set():
                w.restarted = True
            case "removed":
                w.destroyed.set()
                w.died.set()
        w._poke()

    def _fresh(self, ev: ContainerEvent) -> bool:
        """False for an event seen already (a resubscription replays from a little before the
        last event seen)."""
        if ev in self._recent:
            return False
        if self._last_ns is not None and ev.time_ns < self._last_ns - REPLAY_MARGIN_NS:
            return False
        if self._last_ns is None or ev.time_ns > self._last_ns:
            self._last_ns = ev.time_ns
            floor = ev.time_ns - REPLAY_MARGIN_NS
            self._recent = {e for e in self._recent if e.time_ns >= floor}
        self._recent.add(ev)
        return True
