"""Worker actor: owns ONE container at a time, knows when its wrapper dies, says why, and
restarts it (with backoff) or escalates to its supervisor with a DeathCertificate.

States: pending -> building -> creating -> starting -> ready <-> busy -> backoff -> ...
-> stopping -> stopped | failed.
"""

from __future__ import annotations

import math
import hashlib
import random
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import outcome
import structlog
import trio

from runtime.engine_api import STDOUT

from .restart import BackoffState, RestartWindow
from runtime.errors import (
    ContainerNotFound,
    CorralError,
    EngineError,
    EngineUnavailable,
    ImageNotFound,
    NameConflict,
    ProtocolError,
    WorkerGone,
    WorkerStartupError,
)
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
from runtime.protocol import (
    CancelTask,
    Fatal,
    Heartbeat,
    LineSplitter,
    Ready,
    RunTask,
    Shutdown,
    TaskDone,
    TaskOutput,
    TaskStarted,
    decode_wrapper_frame,
    encode_frame,
)
from runtime.records import TASK_CAUSES, DeathCertificate, TaskResult, WorkerInfo, WorkerSnapshot
from runtime.specs import Task, WorkerSpec, new_worker_id

from .classify import ExitFacts, classify, signal_name
from .watcher import ENGINE_CHECK_S, SETTLE_S

log = structlog.get_logger("corral.worker")

LOG_TAIL = 4096
MAX_DEATHS = 10
EX_CONFIG = 78
_spec_json = msgspec.json.Encoder(order="sorted").encode


def container_name(supervisor: str, worker_id: str, generation: int) -> str:
    return f"corral-{supervisor}-{worker_id}-{generation}"


@dataclass(slots=True)
class _Pending:
    task: Task
    reply: Any
    attempts: int = 0
    started_at: float = 0.0
    charged_deaths: int = 0
    """deaths of a container while it ran this task, of a cause the task may have brought about"""
    released: trio.Event | None = None
    """past corral's own deadline: set once the wrapper reports the task done after all"""


@dataclass(slots=True)
class _Life:
    """One container of this worker, from create to removal."""
    container_id: str
    name: str
    generation: int
    created_at: float
    ready_at: float | None = None
    ready: bool = False
    settled: trio.Event = field(default_factory=trio.Event)   # ready, or ended before it
    ended: trio.Event = field(default_factory=trio.Event)
    end_kind: str | None = None        # died | hung | protocol | restart | stop | startup_timeout
    end_reason: str = ""
    fatal_reason: str | None = None
    tail: bytearray = field(default_factory=bytearray)
    last_frame: float = 0.0
    att: Any = None
    started: bool = False
    kill_sent: bool = False
    nursery: trio.Nursery | None = None
    """runs the tasks that live as long as this container (the reader, task deadlines)"""

    def end(self, kind: str, reason: str = "") -> None:
        if self.end_kind is None:
            self.end_kind, self.end_reason = kind, reason
        self.settled.set()
        self.ended.set()

    def add_tail(self, data: bytes) -> None:
        self.tail += data
        if len(self.tail) > LOG_TAIL:
            del self.tail[:-LOG_TAIL]


class WorkerHandle:
    """What `sup.spawn()` returns. ``id`` is the worker id, never a container id."""

    def __init__(self, actor: "Worker") -> None:
        self._actor = actor
        self.id = actor.id

    def __repr__(self) -> str:
        return f"<WorkerHandle {self.id} {self._actor.state}>"

    @property
    def state(self) -> str:
        return self._actor.state

    async def info(self) -> WorkerInfo:
        return self._actor.info()

    def info_nowait(self) -> WorkerInfo:
        return self._actor.info()

    def snapshot_nowait(self) -> WorkerSnapshot:
        return self._actor.snapshot()

    async def run(self, task: Task | str) -> TaskResult:
        """Run a task on this worker and wait for its result. Tasks queue while the worker is
        busy or restarting. Cancelling the caller cancels the task in the container."""
        if isinstance(task, str):
            task = Task(prompt=task)
        send, recv = trio.open_memory_channel[outcome.Outcome](1)
        try:
            await self._actor.mailbox.send(RunTaskRequest(task=task, reply=send))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise WorkerGone(f"worker {self.id} has stopped ({self._actor.state})") from None
        try:
            with recv:
                res = await recv.receive()
        except trio.EndOfChannel:
            raise WorkerGone(f"worker {self.id} has stopped") from None
        except trio.Cancelled:
            try:
                self._actor.mailbox.send_nowait(CancelTaskRequest(task_id=task.task_id))
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            raise
        return res.unwrap()

    async def restart(self) -> None:
        """Replace the container (graceful: shutdown within stop_grace_s, then kill)."""
        await self._ask(lambda r: RestartRequest(reply=r))

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop the worker and remove its container. Returns when it is gone."""
        if self._actor.finished.is_set():
            return
        try:
            await self._ask(lambda r: StopRequest(reply=r, grace_s=grace_s))
        except WorkerGone:
            pass
        await self._actor.finished.wait()

    async def wait_ready(self) -> None:
        await self._actor.wait_ready()

    async def wait_until(self, predicate) -> WorkerInfo:
        return await self._actor.wait_until(predicate)

    async def wait_finished(self) -> None:
        await self._actor.finished.wait()

    async def _ask(self, make) -> Any:
        return await ask(self._actor.mailbox, make, gone=f"worker {self.id} has stopped")


class Worker:
    def __init__(self, spec: WorkerSpec, *, engine, builder, supervisor: str = "corral",
                 watcher=None, start_limiter: trio.CapacityLimiter | None = None,
                 parent: trio.MemorySendChannel | None = None, pool: str | None = None,
                 rng: random.Random | None = None, mailbox_size: int = 1024) -> None:
        self.spec = spec
        self.id = spec.id or new_worker_id()
        self.engine = engine
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
        self._spec_hash = hashlib.sha256(_spec_json(spec)).hexdigest()[:16]

    # -- views -------------------------------------------------------------------------------
    def info(self) -> WorkerInfo:
        life = self._life
        return WorkerInfo(id=self.id, state=self.state, agent=self.spec.agent,
                          container_id=life.container_id if life else None,
                          container_name=life.name if life else None, image_id=self.image_id,
                          image_tag=self.image_tag, generation=self.generation, restarts=self.restarts,
                          pool=self.pool, last_death=self.deaths[-1] if self.deaths else None)

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

    def release(self) -> None:
        if self._hold is not None:
            self._hold.set()

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        old, self.state = self.state, state
        log.info("worker_state", state=state, previous=old)
        self._changed.set()
        self._changed = trio.Event()
        for listener in self.listeners:
            listener(self)

    # -- the actor -----------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Runs the worker; ``task_status.started(handle)`` once its first container is READY.
        Raises WorkerStartupError (with the certificate) if that first container never is."""
        structlog.contextvars.bind_contextvars(actor="worker", worker_id=self.id)
        handle = WorkerHandle(self)
        outcome_kind = "stopped"     # also when cancelled or when the first start fails
        certs: list[DeathCertificate] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._mailbox_loop)
                try:
                    outcome_kind, certs = await self._lifecycle(task_status, handle)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._finish(outcome_kind, certs)
            with trio.CancelScope(shield=True):
                await self._notify_parent(outcome_kind, certs)

    def _finish(self, kind: str, certs: list[DeathCertificate]) -> None:
        self._set_state("failed" if kind == "failed" else "stopped")
        why = f"worker {self.id} has {'failed' if kind == 'failed' else 'stopped'}"
        cert = certs[-1] if certs else None
        for p in [q for q in (self._current, self._draining) if q is not None] + list(self._pending):
            if kind == "failed" and cert is not None:
                reply_value(p.reply, TaskResult(task_id=p.task.task_id, status="worker_died",
                                                error=why, attempts=p.attempts, worker_id=self.id,
                                                death=cert))
            else:
                reply_value(p.reply, TaskResult(task_id=p.task.task_id, status="cancelled",
                                                error=why, attempts=p.attempts, worker_id=self.id))
        self._current = self._draining = None
        self._pending.clear()
        for r in self._restart_waiters:
            reply_error(r, WorkerGone(why))
        if self._stop is not None:
            reply_value(self._stop.reply, None)
        drain_mailbox(self._recv, why, worker_id=self.id)
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

    # -- tasks ---------------------------------------------------------------------------------
    async def _send(self, life: _Life, frame) -> None:
        """Write one frame to the wrapper's stdin. A failed write means the container is going
        away: its death is noticed (and classified) by the reader at EOF."""
        await self._send_bytes(life, encode_frame(frame))

    async def _send_bytes(self, life: _Life, data: bytes) -> None:
        try:
            await life.att.send(data)
        except EngineError as exc:
            log.debug("stdin_write_failed", error=str(exc))

    async def _dispatch(self) -> None:
        life = self._life
        while True:
            if self._current is not None or self._draining is not None or not self._pending \
                    or life is None or not life.ready or life.ended.is_set() or self.state != "ready":
                return
            p = self._pending.pop(0)
            p.attempts += 1
            p.started_at = trio.current_time()
            t = p.task
            try:
                data = encode_frame(RunTask(task_id=t.task_id, prompt=t.prompt, args=t.args,
                                            timeout_s=t.timeout_s, max_output_bytes=t.max_output_bytes))
            except (UnicodeError, ValueError, TypeError) as exc:
                # Task validates itself when built; whatever slips past fails alone, here
                reply_value(p.reply, TaskResult(task_id=t.task_id, status="error", attempts=p.attempts,
                                                error=f"the task cannot be sent to the worker: {exc}",
                                                worker_id=self.id))
                continue
            self._current = p
            self._set_state("busy")
            if t.timeout_s is not None and life.nursery is not None:
                life.nursery.start_soon(self._enforce_deadline, life, p)
            await self._send_bytes(life, data)
            return

    async def _enforce_deadline(self, life: _Life, p: _Pending) -> None:
        """corral's own deadline for a task, whatever the wrapper does: at timeout_s +
        task_grace_s the task ends "timeout" and the wrapper is told to cancel it. If the wrapper
        has still not reported it done after another task_grace_s (its agent cannot be stopped,
        or the wrapper is wedged while its heartbeats go on), the container is replaced."""
        grace = self.spec.task_grace_s
        assert p.task.timeout_s is not None
        await trio.sleep_until(p.started_at + p.task.timeout_s + grace)
        if self._current is not p or life.ended.is_set():
            return
        tid = p.task.task_id
        log.warning("task_deadline_passed", task_id=tid, timeout_s=p.task.timeout_s, grace_s=grace)
        self._current, self._draining = None, p
        p.released = trio.Event()
        reply_value(p.reply, TaskResult(
            task_id=tid, status="timeout", attempts=p.attempts, worker_id=self.id,
            duration_s=trio.current_time() - p.started_at,
            error=f"no result {p.task.timeout_s} s (timeout_s) + {grace} s (task_grace_s) after it "
                  f"started: corral ended the task"))
        await self._send(life, CancelTask(task_id=tid))
        with trio.move_on_after(grace):
            await p.released.wait()
        if self._draining is p and not life.ended.is_set():
            life.end("hung", f"task {tid} did not end within timeout_s + 2 x task_grace_s "
                             f"({p.task.timeout_s + 2 * grace:g} s): the wrapper could not stop it")

    async def _cancel(self, task_id: str) -> None:
        for p in list(self._pending):
            if p.task.task_id == task_id:
                self._pending.remove(p)
                reply_value(p.reply, TaskResult(task_id=task_id, status="cancelled", error="cancelled",
                                                attempts=p.attempts, worker_id=self.id))
                return
        if self._current and self._current.task.task_id == task_id and self._life:
            await self._send(self._life, CancelTask(task_id=task_id))

    async def _task_done(self, frame: TaskDone) -> None:
        d = self._draining
        if d is not None and d.task.task_id == frame.task_id:
            # the wrapper did end the task after corral's deadline: the worker is free again
            self._draining = None
            assert d.released is not None
            d.released.set()
            if self.state == "busy":
                self._set_state("ready")
            await self._dispatch()
            return
        p = self._current
        if p is None or p.task.task_id != frame.task_id:
            log.warning("task_done_unknown", task_id=frame.task_id)
            return
        self._current = None
        status = frame.status if frame.status in ("ok", "error", "timeout", "cancelled") else "error"
        reply_value(p.reply, TaskResult(task_id=frame.task_id, status=status, output=frame.output,
                                        exit_code=frame.exit_code, error=frame.error,
                                        duration_s=frame.duration_s, attempts=p.attempts,
                                        worker_id=self.id, truncated=frame.truncated))
        log.debug("task_done", task_id=frame.task_id, status=status)
        if self.state == "busy":
            self._set_state("ready")
        await self._dispatch()

    def _charged_task(self, cert: DeathCertificate) -> _Pending | None:
        """The task this death is charged to: the one running (or being ended) when the container
        died of a cause that a task may bring about (records.TASK_CAUSES)."""
        p = self._current or self._draining
        return p if p is not None and cert.cause in TASK_CAUSES else None

    def _on_death(self, cert: DeathCertificate, charged: _Pending | None = None) -> None:
        """The in-flight task: redelivered after the restart if it has attempts left, else it
        ends 'worker_died' with the certificate (at-most-once by default). A task whose every
        attempt killed its container is a poison task: it fails alone, marked ``poison``."""
        p, self._current = self._current, None
        self._draining = None
        if p is None:
            return
        if charged is p:
            p.charged_deaths += 1
        if p.attempts < p.task.max_attempts and cert.restart_in_s is not None:
            self._pending.insert(0, p)
        else:
            poison = p.charged_deaths == p.attempts
            if poison:
                log.warning("poison_task", task_id=p.task.task_id, attempts=p.attempts, cause=cert.cause)
            reply_value(p.reply, TaskResult(task_id=p.task.task_id, status="worker_died",
                                            error=f"worker died: {cert.cause}"
                                                  + (f" (poison task: each of its {p.attempts} "
                                                     f"attempt(s) killed the container running it)"
                                                     if poison else ""),
                                            attempts=p.attempts, worker_id=self.id, death=cert,
                                            duration_s=trio.current_time() - p.started_at,
                                            poison=poison))

    # -- lifecycle -----------------------------------------------------------------------------
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
            self.generation += 1
            structlog.contextvars.bind_contextvars(generation=self.generation)
            end_kind, cert = await self._one_life(task_status if first else None, handle, first)
            was_first, first = first, False
            if end_kind == "stop":
                return "stopped", []
            if end_kind == "restart":
                waiters, self._restart_waiters = self._restart_waiters, []
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
            decision, delay = self._decide(cert, charged=charged is not None)
            cert = msgspec.structs.replace(cert, restart_in_s=delay if decision == "restart" else None)
            self.deaths.append(cert)
            del self.deaths[:-MAX_DEATHS]
            self.deaths_by_cause[cert.cause] = self.deaths_by_cause.get(cert.cause, 0) + 1
            self._on_death(cert, charged)
            log.warning("worker_died", cause=cert.cause, exit_code=cert.exit_code, reason=cert.reason,
                        ready=cert.ready, uptime_s=round(cert.uptime_s, 3), decision=decision,
                        restart_in_s=cert.restart_in_s)
            if self.parent is not None:
                # the supervisor answers at once: restart when ready, or wait for its gate
                with trio.move_on_after(5):
                    try:
                        gate = await ask(self.parent, lambda r: ChildDied(
                            child_id=self.id, certificate=cert, restarting=decision == "restart",
                            charged_to_task=charged.task.task_id if charged is not None else None,
                            reply=r))
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

    def _decide(self, cert: DeathCertificate, *, charged: bool = False) -> tuple[str, float]:
        """Restart or not, and when. A death charged to a task backs off like any other but
        does not count against the restart budget: bad data never makes a worker give up."""
        policy = self.spec.restart
        if self._stop_event.is_set():
            return "done", 0.0
        if policy.restart == "temporary":
            return "done", 0.0
        if policy.restart == "transient" and cert.cause == "exited":
            return "done", 0.0
        if cert.cause == "config_error":
            return "give_up", 0.0       # not retried in a loop: the same config fails the same way
        if not charged and not self._window.admit(trio.current_time()):
            return "give_up", 0.0
        stable = cert.ready and cert.uptime_s >= policy.backoff.stable_s
        delay = self._backoff.next_delay(stable=stable, rng=self.rng)
        self.next_backoff_s = self._backoff.next_cap
        return "restart", delay

    def container_config(self, image_id: str, generation: int) -> dict[str, Any]:
        spec = self.spec
        env = {**spec.env, "CORRAL_WORKER_ID": self.id, "CORRAL_AGENT": spec.agent,
               "CORRAL_HEARTBEAT_S": str(spec.heartbeat_s), "CORRAL_WORKSPACE": "/workspace"}
        if spec.required_env:
            env["CORRAL_REQUIRED_ENV"] = ",".join(spec.required_env)
        labels = {"corral.supervisor": self.supervisor, "corral.worker": self.id,
                  "corral.generation": str(generation), "corral.spec": self._spec_hash,
                  "corral.agent": spec.agent}
        if self.pool:
            labels["corral.pool"] = self.pool
        host: dict[str, Any] = {
            "NetworkMode": "none", "CapDrop": ["ALL"], "SecurityOpt": ["no-new-privileges"],
            "Init": True, "PidsLimit": spec.pids_limit, "AutoRemove": False,
            "RestartPolicy": {"Name": "no"},
        }
        if spec.memory:
            host["Memory"] = spec.memory
            host["MemorySwap"] = spec.memory
        if spec.cpus:
            host["NanoCpus"] = int(spec.cpus * 1e9)
        size = f",size={spec.disk}" if spec.disk else ""
        if spec.read_only_rootfs or spec.disk:
            host["Tmpfs"] = {"/workspace": f"uid=1000,gid=1000,mode=0755{size}", "/tmp": f"mode=1777{size}"}
        if spec.read_only_rootfs:
            host["ReadonlyRootfs"] = True
            host["Tmpfs"]["/home/worker"] = f"uid=1000,gid=1000,mode=0700{size}"
        return {
            "Image": image_id, "User": "worker", "WorkingDir": "/workspace",
            "Env": [f"{k}={v}" for k, v in env.items()], "Labels": labels,
            "AttachStdin": True, "AttachStdout": True, "AttachStderr": True,
            "OpenStdin": True, "StdinOnce": True, "Tty": False, "HostConfig": host,
        }

    async def _create(self, config: dict[str, Any], name: str) -> str:
        try:
            return await self.engine.container_create(config, name=name)
        except NameConflict:
            # A leftover of ours (same supervisor, worker and generation: a crashed earlier run).
            # Remove it only if it carries our labels; never touch anyone else's container.
            existing = await self.engine.container_list(labels={"corral.supervisor": self.supervisor,
                                                                "corral.worker": self.id})
            for c in existing:
                if f"/{name}" in (c.get("Names") or []):
                    log.warning("stale_container_removed", name=name, container_id=c["Id"][:12])
                    await self.engine.container_remove(c["Id"], force=True)
                    return await self.engine.container_create(config, name=name)
            raise

    async def _one_life(self, task_status, handle, first: bool) -> tuple[str, DeathCertificate | None]:
        """One container, from create to removal. Returns ("died", certificate), or ("restart" |
        "stop", None) when it ended on request."""
        gen = self.generation
        name = container_name(self.supervisor, self.id, gen)
        t_create = trio.current_time()
        if self.image_id is None:
            try:
                await self._build_image()
            except CorralError as exc:
                if first:
                    raise          # spawn() reports ConfigError / ImageBuildError as they are
                return "died", self._engine_cert(None, gen, exc, t_create)
        self._set_state("creating")
        await self.start_limiter.acquire()
        holding_slot = True
        try:
            # the startup deadline counts from here (waiting for a start slot is corral's own
            # throttle) and covers create, attach, start and the wait for READY
            deadline = trio.current_time() + self.spec.startup_timeout_s
            try:
                with trio.fail_after(self.spec.startup_timeout_s):
                    try:
                        cid = await self._create(self.container_config(self.image_id, gen), name)
                    except ImageNotFound:
                        # the image went away (pruned, engine reset): rebuild it once, no death
                        log.warning("image_missing_rebuilding", image=self.image_tag)
                        self.builder.invalidate(self.image_tag)
                        await self._build_image()
                        self._set_state("creating")
                        cid = await self._create(self.container_config(self.image_id, gen), name)
            except (CorralError, trio.TooSlowError) as exc:
                if isinstance(exc, ImageNotFound):
                    self.image_id = None
                if isinstance(exc, trio.TooSlowError):
                    exc = EngineError(f"creating {name} took over {self.spec.startup_timeout_s} s")
                    await self._remove_container(name)   # in case the engine made it after all
                return "died", self._engine_cert(None, gen, exc, t_create)
            life = self._life = _Life(container_id=cid, name=name, generation=gen, created_at=t_create,
                                      last_frame=t_create)
            structlog.contextvars.bind_contextvars(container_id=cid[:12])
            watch = self.watcher.watch(cid) if self.watcher is not None else None
            try:
                async with trio.open_nursery() as nursery:
                    life.nursery = nursery
                    try:
                        with trio.move_on_at(deadline):
                            try:
                                await nursery.start(self._attached, life)
                                self._set_state("starting")
                                await self.engine.container_start(cid)
                            except EngineError as exc:
                                life.end("died", str(exc))
                                return "died", await self._certify(life, watch, exc)
                            life.started = True
                            log.debug("container_started", name=name)
                            await life.settled.wait()
                        if not life.settled.is_set():
                            life.end("startup_timeout", f"not READY within {self.spec.startup_timeout_s} s")
                            await self._kill(cid)
                        self.start_limiter.release()
                        holding_slot = False
                        if life.ready and not life.ended.is_set():
                            self._set_state("ready")
                            log.info("worker_ready", name=name,
                                     startup_s=round(trio.current_time() - t_create, 3))
                            if task_status is not None:
                                task_status.started(handle)
                            await self._dispatch()
                            await life.ended.wait()
                        return await self._end_of_life(life, watch)
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                if self.watcher is not None:
                    self.watcher.forget(cid)
                await self._remove_container(cid)
        finally:
            if holding_slot:
                self.start_limiter.release()

    async def _build_image(self) -> None:
        self._set_state("building")
        img = await self.builder.image_for(self.spec.agent, self.spec.capabilities, self.spec.stub_agent)
        self.image_id, self.image_tag = img.image_id, img.tag

    async def _end_of_life(self, life: _Life, watch) -> tuple[str, DeathCertificate | None]:
        kind = life.end_kind
        if kind in ("restart", "stop"):
            self._set_state("stopping")
            await self._graceful_end(life)
            if self._current is not None and kind == "restart":
                cert = await self._certify(life, watch, None)
                self._on_death(msgspec.structs.replace(cert, restart_in_s=0.0))
            return kind, None
        if kind == "hung":
            await self._kill(life.container_id)
        cert = await self._certify(life, watch, None)
        if await self._remove_container(life.container_id) == "gone" \
                and cert.cause in ("killed", "crashed", "exited"):
            # `docker rm -f` kills, then removes: the kill is what we saw first
            cert = msgspec.structs.replace(cert, cause="removed",
                                           reason="the container was removed out of band")
        return "died", cert

    async def _graceful_end(self, life: _Life) -> None:
        grace = self._stop.grace_s if (self._stop and self._stop.grace_s is not None) else self.spec.stop_grace_s
        if life.att is not None and life.end_kind != "died":
            with trio.move_on_after(1.0):
                await self._send(life, Shutdown(grace_s=grace))
        with trio.move_on_after(grace + 1.0) as cs:
            try:
                await self.engine.container_wait(life.container_id)
            except EngineError:
                pass
        if cs.cancelled_caught:
            await self._kill(life.container_id)

    async def _kill(self, cid: str) -> None:
        if self._life is not None:
            self._life.kill_sent = True
        with trio.move_on_after(10):
            try:
                await self.engine.container_kill(cid, "SIGKILL")
            except EngineError:
                pass

    async def _remove_container(self, cid: str) -> str:
        """Remove our container (once). Returns "removed", "gone" (someone else removed it
        first) or "failed"."""
        if cid in self._removed:
            return self._removed[cid]
        result = "failed"
        with trio.CancelScope(shield=True):
            with trio.move_on_after(15):
                try:
                    await self.engine.container_remove(cid, force=True)
                    log.debug("container_removed", container_id=cid[:12])
                    result = "removed"
                except ContainerNotFound:
                    result = "gone"
                except EngineError as exc:
                    if exc.status == 409 and "already in progress" in str(exc):
                        result = "gone"
                    else:
                        log.warning("container_remove_failed", container_id=cid[:12], error=str(exc))
        self._removed = {cid: result}
        return result

    async def _attached(self, life: _Life, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Holds the container's attach stream for the life of the container, reading it."""
        async with self.engine.attach(life.container_id) as att:
            life.att = att
            task_status.started()
            await self._reader(life, att)

    async def _reader(self, life: _Life, att) -> None:
        splitter = LineSplitter()
        timeout = self.spec.heartbeat_timeout_s
        try:
            while True:
                # once READY, any frame (heartbeats included) must come within heartbeat_timeout_s
                with trio.move_on_at(life.last_frame + timeout if life.ready else math.inf) as cs:
                    try:
                        stream, data = await att.output.receive()
                    except (trio.EndOfChannel, trio.ClosedResourceError):
                        break
                if cs.cancelled_caught:
                    # A frozen engine holds every container's output back: before blaming the
                    # worker, the engine must answer, at once. If it does not, wait on (don't
                    # kill): an engine that was slow to answer may have held frames back too.
                    answered = False
                    t_ping = trio.current_time()
                    with trio.move_on_after(min(5.0, timeout)):
                        try:
                            await self.engine.ping()
                            answered = trio.current_time() - t_ping < 1.0
                        except EngineUnavailable:
                            pass
                        except EngineError:
                            answered = True        # it answered, with an error
                    if not answered:
                        log.warning("engine_unresponsive", timeout_s=timeout,
                                    silent_s=round(trio.current_time() - life.last_frame, 3))
                        life.last_frame = trio.current_time()   # a new heartbeat period from now
                        continue
                    log.error("heartbeat_missed", timeout_s=timeout)
                    life.end("hung", f"no heartbeat for {timeout} s")
                    return
                if stream != STDOUT:
                    life.add_tail(data)
                    continue
                for line in splitter.feed(data):
                    frame = decode_wrapper_frame(line)
                    life.last_frame = trio.current_time()
                    if not isinstance(frame, (Heartbeat, TaskOutput)):
                        life.add_tail(line + b"\n")
                    await self._on_frame(life, frame)
        except ProtocolError as exc:
            log.error("protocol_error", error=str(exc))
            life.end("protocol", str(exc))
            await self._kill(life.container_id)
            return
        life.end("died", "output closed")

    async def _on_frame(self, life: _Life, frame) -> None:
        match frame:
            case Heartbeat():
                pass
            case Ready(worker_id=wid):
                if wid != self.id:
                    raise ProtocolError(f"ready from worker {wid!r}, expected {self.id!r}")
                life.ready = True
                life.ready_at = trio.current_time()
                life.settled.set()
            case TaskDone():
                await self._task_done(frame)
            case TaskStarted() | TaskOutput():
                pass
            case Fatal(reason=reason):
                life.fatal_reason = reason
            case _:
                raise ProtocolError(f"unexpected frame {type(frame).__name__}")

    def _engine_cert(self, cid: str | None, gen: int, exc: BaseException, t0: float) -> DeathCertificate:
        return DeathCertificate(worker_id=self.id, container_id=cid, generation=gen,
                                cause="engine_error", reason=str(exc), at=time.time(),
                                uptime_s=trio.current_time() - t0)

    async def _certify(self, life: _Life, watch, exc: BaseException | None) -> DeathCertificate:
        """Gather the facts of how this container ended (the I/O), then classify them
        (actors.classify: pure)."""
        cid = life.container_id
        kind = life.end_kind or "died"
        exit_code: int | None = None
        oom = removed = restarted = False
        problem = str(exc) if exc is not None else None
        unreachable = isinstance(exc, EngineUnavailable)
        answered = True
        if exc is None and kind != "protocol" and life.started:
            try:
                with trio.fail_after(10):
                    exit_code = await self.engine.container_wait(cid)
                if watch is not None and self.watcher.alive:
                    with trio.move_on_after(0.5):     # the die event comes after any kill event
                        await watch.died.wait()
                state = (await self.engine.container_inspect(cid)).get("State", {})
                if state.get("Running"):
                    restarted = True                  # up again since it died: a docker restart
                else:
                    oom = bool(state.get("OOMKilled"))
                    exit_code = state.get("ExitCode", exit_code)
            except ContainerNotFound:
                removed = True
            except EngineUnavailable as e:
                problem, unreachable = str(e), True
            except EngineError as e:
                problem = str(e)
            except trio.TooSlowError:
                problem = "the container's exit was not reported within 10 s"
        if watch is not None:
            oom = oom or watch.oom
            removed = removed or watch.destroyed.is_set()
            if exit_code is None:
                exit_code = watch.exit_code
        if kind == "died" and not removed and not unreachable:
            if watch is not None and not life.kill_sent \
                    and any(signal_name(s) != "SIGKILL" for s in watch.kills):
                # a stop signal from outside: `docker stop`, `docker restart` (the engine starts
                # the container again) or the engine shutting down (its events stream ends)
                with trio.move_on_after(SETTLE_S):
                    await self.watcher.wait_settled(watch)
            # does the engine still answer? If not, it is what went away, not the worker
            answered, why = False, f"no answer to a ping within {ENGINE_CHECK_S} s"
            with trio.move_on_after(ENGINE_CHECK_S):
                try:
                    await self.engine.ping()
                    why = f"its events stream ended and no new one was taken within {ENGINE_CHECK_S} s"
                    if self.watcher is not None:
                        await self.watcher.wait_alive()
                    answered = True
                except EngineUnavailable as e:
                    why = str(e)
                except EngineError:
                    answered = True                   # it answered, with an error
            if not answered:
                problem = why
        facts = ExitFacts(
            end=kind, detail=life.end_reason, ready=life.ready, exit_code=exit_code, oom=oom,
            oom_event=bool(watch and watch.oom), removed=removed, engine_problem=problem,
            engine_unreachable=unreachable, fatal=life.fatal_reason, watched=watch is not None,
            kill_signals=tuple(watch.kills) if watch is not None else (),
            corral_killed=life.kill_sent, stopped=bool(watch and watch.stopped),
            restarted=restarted or bool(watch and watch.restarted), engine_answered=answered)
        cause, reason = classify(facts)
        uptime = trio.current_time() - (life.ready_at or life.created_at)
        return DeathCertificate(worker_id=self.id, container_id=cid, generation=life.generation,
                                cause=cause, reason=reason, exit_code=exit_code,
                                oom_killed=oom or cause == "oom_killed", ready=life.ready,
                                uptime_s=round(uptime, 6),
                                logs_tail=life.tail.decode(errors="replace"), at=time.time())
