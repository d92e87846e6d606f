"""What happened during a chaos run, recorded where it happens: the timeline the invariants are
checked against and that a failure prints.

- tasks: every task submitted and every answer its caller got (a TaskResult, an exception, or
  nothing because the caller gave up);
- executions: the wrappers' ``task_started`` frames, in an `ExecutionLedger`;
- workers: every state change of every worker (a listener on the Worker actor) and every death
  certificate, with the worker's state when it died (``busy``: a task ran) and the time it was
  seen;
- faults: what the monkey injected, where, what cause it should give, and the certificate it gave;
- supervisors: their configs, parents and escalations.

Times are ``trio.current_time()`` relative to the history's start: virtual and exact under the
autojump clock, real on Docker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from ..executions import ExecutionLedger
from ..records import DeathCertificate, TaskResult
from ..specs import SupervisorConfig, Task

ANSWER_RESULT = "result"
ANSWER_ERROR = "error"
ANSWER_ABANDONED = "abandoned"


@dataclass
class TaskRecord:
    task: Task
    target: str
    """where it was sent: ``pool:<name>`` or ``worker:<id>``"""
    submitted_at: float
    results: list[tuple[float, TaskResult]] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)
    """exceptions the caller got instead of a result (PoolStopped, WorkerGone...)"""
    abandoned_at: float | None = None
    """the caller gave up (cancelled) before an answer came"""

    @property
    def answers(self) -> int:
        return len(self.results) + len(self.errors)


@dataclass
class DeathRecord:
    t: float
    """when the worker recorded the certificate: the moment it concluded its container died
    (its supervisor counts the death then); when the kit first saw it for a death it could not
    follow"""
    cert: DeathCertificate
    state_before: str | None
    """the worker's state when it died (``busy``: a task was running); None: unknown"""
    supervisor: str
    group_pending: bool | None = False
    """its supervisor was about to restart it as part of a group at that moment (such a death is
    absorbed: not counted against the intensity); None: unknown"""
    clock: float = 0.0
    """``trio.current_time()`` then: the value the worker's and its supervisor's windows
    compare (the same float, so the model decides exactly as they do)"""
    stopping: bool | None = False
    """the worker had been told to stop when it died (it is done, not restarted); None: unknown"""

    @property
    def at(self) -> float:
        return self.t


class _DeathList(list):
    """A Worker's ``deaths`` list that tells the history of each death as it is recorded."""

    def __init__(self, items, on_append) -> None:
        super().__init__(items)
        self._on_append = on_append

    def append(self, cert) -> None:
        super().append(cert)
        self._on_append(cert)


@dataclass
class WorkerRecord:
    id: str
    actor: Any
    supervisor: str
    """the name of the supervisor it reports to"""
    pool: str | None
    policy: Any
    """its RestartPolicy"""
    states: list[tuple[float, str, int]] = field(default_factory=list)
    """(time, state, generation)"""
    lost: int = 0
    """deaths that happened before the kit saw the worker and no longer in its last-deaths list"""
    last_state: str = "pending"


@dataclass
class Fault:
    n: int
    kind: str
    t: float
    worker_id: str | None = None
    container_id: str | None = None
    generation: int | None = None
    expected: tuple[str, ...] = ()
    """the causes its certificate may give"""
    detail: str = ""
    rule: str = ""
    """the schedule rule that fired it ("" when injected directly)"""
    counted: bool = True
    """False for the per-container records of an engine-wide fault (stop_engine)"""
    cert: DeathCertificate | None = None
    cert_at: float | None = None
    back_at: float | None = None
    """when the worker had a newer generation READY again"""
    outcome: str = "pending"
    """pending | certified | missed (the engine refused it: the container was not running)"""

    def describe(self) -> str:
        where = (f"{self.worker_id} gen {self.generation} ({(self.container_id or '')[:12]})"
                 if self.worker_id else self.detail)
        return f"{self.kind} {where}"


@dataclass
class SupervisorRecord:
    name: str
    config: SupervisorConfig
    parent: str | None
    actor: Any = None
    started_at: float = 0.0
    escalation: BaseException | None = None
    escalated_at: float | None = None
    closed_at: float | None = None


@dataclass
class Note:
    t: float
    kind: str
    text: str


class History:
    def __init__(self) -> None:
        self.t0 = trio.current_time()
        self.ledger = ExecutionLedger()
        self.tasks: dict[str, TaskRecord] = {}
        self.workers: dict[str, WorkerRecord] = {}
        self.deaths: list[DeathRecord] = []
        self.faults: list[Fault] = []
        self.supervisors: dict[str, SupervisorRecord] = {}
        self.notes: list[Note] = []
        self.internal_errors: list[str] = []
        self._changed = trio.Event()

    # -- time and waiting ---------------------------------------------------------------------
    def now(self) -> float:
        return trio.current_time() - self.t0

    def note(self, kind: str, text: str) -> None:
        self.notes.append(Note(self.now(), kind, text))
        self._poke()

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate) -> None:
        """Until ``predicate()`` holds (checked whenever the history changes)."""
        while not predicate():
            await self._changed.wait()

    # -- tasks --------------------------------------------------------------------------------
    def submitted(self, task: Task, target: str) -> TaskRecord:
        rec = self.tasks.get(task.task_id)
        if rec is None:
            rec = self.tasks[task.task_id] = TaskRecord(task, target, self.now())
        self._poke()
        return rec

    def answered(self, task: Task, result: TaskResult) -> None:
        self.tasks[task.task_id].results.append((self.now(), result))
        self._poke()

    def failed(self, task: Task, exc: BaseException) -> None:
        self.tasks[task.task_id].errors.append((self.now(), f"{type(exc).__name__}: {exc}"))
        self._poke()

    def abandoned(self, task: Task) -> None:
        rec = self.tasks[task.task_id]
        if rec.abandoned_at is None:
            rec.abandoned_at = self.now()
        self._poke()

    def unanswered(self) -> list[TaskRecord]:
        return [r for r in self.tasks.values() if r.answers == 0 and r.abandoned_at is None]

    async def run_task(self, handle, task: Task | str, *, run=None) -> TaskResult:
        """``handle.run(task)`` (a pool's or a worker's handle), recorded. ``run``: the unbound
        run method to call instead of ``handle.run`` (when ``run`` itself is instrumented)."""
        if isinstance(task, str):
            task = Task(prompt=task)
        target = f"pool:{handle.name}" if hasattr(handle, "scale") else f"worker:{handle.id}"
        self.submitted(task, target)
        try:
            result = await (run(handle, task) if run is not None else handle.run(task))
        except trio.Cancelled:
            self.abandoned(task)
            raise
        except Exception as exc:
            self.failed(task, exc)
            raise
        self.answered(task, result)
        return result

    # -- supervisors and workers ----------------------------------------------------------------
    def supervisor_started(self, name: str, config: SupervisorConfig, parent: str | None, actor) -> None:
        if name not in self.supervisors:
            self.supervisors[name] = SupervisorRecord(name, config, parent, actor, self.now())
            self.note("supervisor", f"supervisor {name} started ({config.strategy}, max_restarts="
                                    f"{config.max_restarts} within {config.within_s:g} s)"
                      + (f" under {parent}" if parent else ""))

    def supervisor_escalated(self, name: str, exc: BaseException) -> None:
        rec = self.supervisors[name]
        rec.escalation, rec.escalated_at = exc, self.now()
        self.note("escalation", f"supervisor {name} escalated ({getattr(exc, 'reason', '?')}): {exc}")

    def watch_worker(self, actor, supervisor: str) -> WorkerRecord:
        """Follow a Worker actor: every state change, every death certificate as it is made."""
        rec = self.workers.get(actor.id)
        if rec is not None:
            return rec
        rec = self.workers[actor.id] = WorkerRecord(
            actor.id, actor, supervisor, actor.pool, actor.spec.restart, last_state=actor.state)
        rec.states.append((self.now(), actor.state, actor.generation))
        # deaths before we saw it: what its last-deaths list still holds (state unknown)
        total = sum(actor.deaths_by_cause.values())
        kept = list(actor.deaths)
        rec.lost = max(0, total - len(kept))
        for cert in kept[-total:] if total else []:
            self._add_death(rec, cert, state_before=None, group_pending=None, stopping=None)
        actor.deaths = _DeathList(actor.deaths, lambda cert, rec=rec: self._on_death(rec, cert))
        actor.listeners.append(lambda w, rec=rec: self._on_state(rec, w))
        return rec

    def _on_death(self, rec: WorkerRecord, cert: DeathCertificate) -> None:
        try:
            sup = self.supervisors.get(rec.supervisor)
            pending = getattr(sup.actor, "_group_pending", None) if sup is not None else None
            stop = getattr(rec.actor, "_stop_event", None)
            self._add_death(rec, cert, state_before=rec.actor.state,
                            group_pending=None if pending is None else rec.id in pending,
                            stopping=None if stop is None else stop.is_set())
            self._poke()
        except Exception as exc:      # a hook must never break the actor it watches
            self.internal_errors.append(f"watching {rec.id}: {exc!r}")

    def _add_death(self, rec: WorkerRecord, cert: DeathCertificate, *, state_before: str | None,
                   group_pending: bool | None, stopping: bool | None) -> None:
        d = DeathRecord(self.now(), cert, state_before, rec.supervisor, group_pending,
                        trio.current_time(), stopping)
        self.deaths.append(d)
        for f in self.faults:
            if f.container_id is not None and f.container_id == cert.container_id and f.cert is None:
                f.cert, f.cert_at, f.outcome = cert, d.t, "certified"

    def _on_state(self, rec: WorkerRecord, actor) -> None:
        try:
            rec.states.append((self.now(), actor.state, actor.generation))
            rec.last_state = actor.state
            if actor.state in ("ready", "busy"):
                for f in self.faults:
                    if f.worker_id == rec.id and f.back_at is None and f.generation is not None \
                            and actor.generation > f.generation and f.outcome != "missed":
                        f.back_at = self.now()
            self._poke()
        except Exception as exc:      # a listener must never break the actor it watches
            self.internal_errors.append(f"watching {rec.id}: {exc!r}")

    def certificates(self, worker_id: str | None = None) -> list[DeathRecord]:
        return [d for d in self.deaths if worker_id is None or d.cert.worker_id == worker_id]

    # -- faults -------------------------------------------------------------------------------
    def fault(self, fault: Fault) -> Fault:
        """Record a fault before injecting it (its certificate may come before the injecting
        call returns); mark it ``missed`` if the engine refused it."""
        self.faults.append(fault)
        self._poke()
        return fault

    def live_faults(self) -> list[Fault]:
        return [f for f in self.faults if f.outcome != "missed"]

    def deaths_by_cause(self) -> dict[str, int]:
        """Every death of every worker seen, by cause (the workers' own counts: complete even
        where the kit saw a worker late)."""
        out: dict[str, int] = {}
        for rec in self.workers.values():
            for cause, n in rec.actor.deaths_by_cause.items():
                out[cause] = out.get(cause, 0) + n
        return dict(sorted(out.items()))

    def faults_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.faults:
            if f.outcome == "missed" or not f.counted:
                continue
            out[f.kind] = out.get(f.kind, 0) + 1
        return dict(sorted(out.items()))

    def restart_latencies(self) -> list[float]:
        """Fault -> the worker's next generation READY, for each fault whose worker came back."""
        return [f.back_at - f.t for f in self.faults if f.back_at is not None]

    # -- the timeline ---------------------------------------------------------------------------
    def timeline(self, *, limit: int = 400) -> str:
        rows: list[tuple[float, int, str]] = []
        for n in self.notes:
            rows.append((n.t, 0, n.text))
        for f in self.faults:
            if f.outcome == "missed":
                continue
            exp = "/".join(f.expected) or "-"
            rows.append((f.t, 1, f"FAULT #{f.n} {f.describe()}"
                                 + (f" [{f.rule}]" if f.rule else "") + f" (expect {exp})"))
        for d in self.deaths:
            c = d.cert
            when = ("gives up" if c.restart_in_s is None else f"restart in {c.restart_in_s:.3f} s")
            rows.append((d.at, 2, f"DEATH {c.worker_id} gen {c.generation}: {c.cause}"
                                 + (f" ({c.reason})" if c.reason else "")
                                 + f"; {when}" + (f"; died {d.state_before}" if d.state_before else "")))
        for rec in self.workers.values():
            prev_gen = None
            for t, state, gen in rec.states:
                if state == "ready" and gen != prev_gen:
                    rows.append((t, 3, f"{rec.id} gen {gen} ready"))
                    prev_gen = gen
                elif state in ("failed", "stopped", "held"):
                    rows.append((t, 3, f"{rec.id} {state}"))
        for tid, r in self.tasks.items():
            rows.append((r.submitted_at, 4, f"task {tid} -> {r.target}: {r.task.prompt[:40]!r} "
                                            f"(max_attempts={r.task.max_attempts})"))
            for t, res in r.results:
                rows.append((t, 5, f"task {tid} answered {res.status} after {res.attempts} attempt(s)"
                                   + (f" on {res.worker_id}" if res.worker_id else "")
                                   + f"; ran {self.ledger[tid]} time(s)"))
            for t, err in r.errors:
                rows.append((t, 5, f"task {tid} raised {err}"))
            if r.abandoned_at is not None:
                rows.append((r.abandoned_at, 5, f"task {tid} abandoned by its caller"))
        rows.sort(key=lambda x: (x[0], x[1]))
        lines = [f"  t={t:9.3f}  {text}" for t, _, text in rows]
        if len(lines) > limit:
            lines = lines[:limit // 4] + [f"  ... {len(lines) - limit} lines left out ..."] \
                + lines[-(limit - limit // 4):]
        lost = [f"{r.id}: {r.lost}" for r in self.workers.values() if r.lost]
        if lost:
            lines.append(f"  (deaths before the kit saw the worker, not in its history: {', '.join(lost)})")
        return "\n".join(lines)
