"""What happened during a chaos run, recorded where it happens: the timeline the invariants are
checked against and that a failure prints.

- tasks: every task submitted and every answer its caller got (a TaskResult, an exception, or
  nothing because the caller gave up);
- executions: the wrappers' ``task_started`` frames, in an `ExecutionLedger`;
- workers: every state change of every worker (a listener on the Worker actor) and every death
  certificate, with the worker's state when it died (``busy``: a task ran) and the time it was
  seen;
- faults: what the monkey injected, where, what cause it should give, and the certificate it gave;
- supervisors: their configs, parents and escalations; each kill of a supervisor (a simulated
  crash: ``abandon``) and the adoption by the one reopened after it;
- the engine's restarts (``restart_engine``), each from going down to answering again.

A worker or a supervisor killed and reopened has several incarnations (one actor each) under
one record: a Worker actor made again for the same worker id, or the Supervisor actor of the
reopened supervisor. Deaths and states carry the incarnation they happened in: an adopted
worker's restart budget and backoff, like a reopened supervisor's intensity, start afresh.

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
    refused: list[tuple[float, TaskResult]] = field(default_factory=list)
    """final results offered to a task journal after it had one (refused: a second result)"""

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
    incarnation: int = 0
    """which of the worker's actors recorded it (a new one after its supervisor was reopened)"""
    epoch: int = 0
    """which instance of its (top-level) supervisor ran then (0: the first; +1 per reopening)"""

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
    actors: list[Any] = field(default_factory=list)
    """every actor of this worker id, oldest first (``actor`` is the last)"""
    incarnations: list[float] = field(default_factory=list)
    """when the kit first saw each of them"""
    first_serving: dict[int, tuple[str | None, int]] = field(default_factory=dict)
    """id(actor) -> (container id, generation) when that actor first served (READY or busy)"""

    @property
    def incarnation(self) -> int:
        return len(self.actors) - 1

    def incarnation_end(self, i: int) -> float:
        """When incarnation ``i`` was followed by the next one (inf: it is the last)."""
        return self.incarnations[i + 1] if i + 1 < len(self.incarnations) else float("inf")


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
    """when the worker had a newer generation READY again (kill_supervisor: when the supervisor
    was serving again; restart_engine: when the engine answered again)"""
    actor: Any = None
    """the Worker actor hit (its incarnation: one that ended before it certified owes nothing)"""
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
    epochs: list[float] = field(default_factory=list)
    """when each instance started (one more per kill and reopening)"""

    @property
    def epoch(self) -> int:
        return max(0, len(self.epochs) - 1)


@dataclass
class SupervisorKill:
    """A supervisor killed (``abandon``: its containers left running) and reopened."""
    name: str
    t: float
    """when it was killed"""
    running: dict[str, tuple[str, int]] = field(default_factory=dict)
    """worker id -> (container id, generation) of the containers that ran when it was reopened"""
    reopened_at: float | None = None
    """when the next instance was asked to open"""
    serving_at: float | None = None
    """when its configured tree was up again (every worker of its pools READY: adopted or new)"""
    adopted: int = 0
    """workers serving on in the very container they had (same id, same generation)"""
    replaced: int = 0
    """workers whose container had ended meanwhile: a new one"""
    problems: list[str] = field(default_factory=list)
    """adoption invariant violations found at this reopening"""
    generation_resets: list[str] = field(default_factory=list)
    """workers whose container died while the supervisor was down, made again from generation 1
    (the dead container was removed at the reopening; its death was never certified)"""

    @property
    def adoption_s(self) -> float | None:
        if self.serving_at is None or self.reopened_at is None:
            return None
        return self.serving_at - self.reopened_at


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
        self.kills: list[SupervisorKill] = []
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

    def journal_result(self, result: TaskResult, first: bool) -> None:
        """A final result written to a task journal (``first``: the journal took it; False: the
        task had one already, and this second one was refused). Tasks the kit did not submit
        are left alone."""
        rec = self.tasks.get(result.task_id)
        if rec is None:
            return
        if first:
            if not any(r is result for _, r in rec.results):
                rec.results.append((self.now(), result))
        else:
            rec.refused.append((self.now(), result))
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
        rec = self.supervisors.get(name)
        if rec is None:
            rec = self.supervisors[name] = SupervisorRecord(name, config, parent, actor, self.now(),
                                                            epochs=[self.now()])
            self.note("supervisor", f"supervisor {name} started ({config.strategy}, max_restarts="
                                    f"{config.max_restarts} within {config.within_s:g} s)"
                      + (f" under {parent}" if parent else ""))
        elif rec.actor is not actor:                 # reopened after a kill
            rec.actor = actor
            rec.epochs.append(self.now())
            rec.closed_at = None
            self.note("supervisor", f"supervisor {name} reopened (instance {rec.epoch + 1})")

    def _epoch(self, supervisor: str) -> int:
        """The instance of ``supervisor``'s top-level supervisor now."""
        rec = self.supervisors.get(supervisor)
        seen = set()
        while rec is not None and rec.parent is not None and rec.name not in seen:
            seen.add(rec.name)
            rec = self.supervisors.get(rec.parent)
        return rec.epoch if rec is not None else 0

    def supervisor_escalated(self, name: str, exc: BaseException) -> None:
        rec = self.supervisors[name]
        rec.escalation, rec.escalated_at = exc, self.now()
        self.note("escalation", f"supervisor {name} escalated ({getattr(exc, 'reason', '?')}): {exc}")

    def watch_worker(self, actor, supervisor: str) -> WorkerRecord:
        """Follow a Worker actor: every state change, every death certificate as it is made."""
        rec = self.workers.get(actor.id)
        if rec is not None and any(a is actor for a in rec.actors):
            return rec
        if rec is None:
            rec = self.workers[actor.id] = WorkerRecord(
                actor.id, actor, supervisor, actor.pool, actor.spec.restart, last_state=actor.state)
        else:                                 # made again: its supervisor was reopened
            rec.actor, rec.supervisor, rec.policy = actor, supervisor, actor.spec.restart
            rec.last_state = actor.state
        rec.actors.append(actor)
        rec.incarnations.append(self.now())
        rec.states.append((self.now(), actor.state, actor.generation))
        self._first_serving(rec, actor)
        # deaths before we saw it: what its last-deaths list still holds (state unknown)
        total = sum(actor.deaths_by_cause.values())
        kept = list(actor.deaths)
        rec.lost = max(0, total - len(kept))
        for cert in kept[-total:] if total else []:
            self._add_death(rec, cert, state_before=None, group_pending=None, stopping=None)
        self._hook_deaths(rec, actor)
        actor.listeners.append(lambda w, rec=rec: self._on_state(rec, w))
        return rec

    def _hook_deaths(self, rec: WorkerRecord, actor) -> None:
        n = rec.incarnation
        actor.deaths = _DeathList(actor.deaths, lambda cert, rec=rec, n=n, a=actor: self._on_death(rec, cert, n, a))

    def _on_death(self, rec: WorkerRecord, cert: DeathCertificate, incarnation: int | None = None,
                  actor: Any = None) -> None:
        try:
            actor = actor if actor is not None else rec.actor
            sup = self.supervisors.get(rec.supervisor)
            pending = getattr(sup.actor, "_group_pending", None) if sup is not None else None
            stop = getattr(actor, "_stop_event", None)
            self._add_death(rec, cert, state_before=actor.state,
                            group_pending=None if pending is None else rec.id in pending,
                            stopping=None if stop is None else stop.is_set(),
                            incarnation=incarnation)
            self._poke()
        except Exception as exc:      # a hook must never break the actor it watches
            self.internal_errors.append(f"watching {rec.id}: {exc!r}")

    def _add_death(self, rec: WorkerRecord, cert: DeathCertificate, *, state_before: str | None,
                   group_pending: bool | None, stopping: bool | None,
                   incarnation: int | None = None) -> None:
        d = DeathRecord(self.now(), cert, state_before, rec.supervisor, group_pending,
                        trio.current_time(), stopping,
                        rec.incarnation if incarnation is None else incarnation,
                        self._epoch(rec.supervisor))
        self.deaths.append(d)
        for f in self.faults:
            if f.container_id is not None and f.container_id == cert.container_id and f.cert is None:
                f.cert, f.cert_at, f.outcome = cert, d.t, "certified"

    def _on_state(self, rec: WorkerRecord, actor) -> None:
        try:
            if actor is not rec.actor:
                return                # an earlier incarnation (abandoned) changing on its way out
            if not isinstance(actor.deaths, _DeathList):
                # adopting a container, the worker took its past from the container's labels
                # (a new list): follow that one
                self._hook_deaths(rec, actor)
            rec.states.append((self.now(), actor.state, actor.generation))
            rec.last_state = actor.state
            self._first_serving(rec, actor)
            if actor.state in ("ready", "busy"):
                for f in self.faults:
                    if f.worker_id == rec.id and f.back_at is None and f.generation is not None \
                            and f.outcome != "missed" and (
                                actor.generation > f.generation
                                or f.actor is not None and f.actor is not actor):
                        # (a newer generation, or the worker made again after its supervisor's
                        # kill: its generation may start over)
                        f.back_at = self.now()
            self._poke()
        except Exception as exc:      # a listener must never break the actor it watches
            self.internal_errors.append(f"watching {rec.id}: {exc!r}")

    @staticmethod
    def _first_serving(rec: WorkerRecord, actor) -> None:
        if id(actor) not in rec.first_serving and actor.state in ("ready", "busy"):
            life = getattr(actor, "_life", None)
            rec.first_serving[id(actor)] = (getattr(life, "container_id", None), actor.generation)

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
            for actor in rec.actors or [rec.actor]:
                for cause, n in actor.deaths_by_cause.items():
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
        return [f.back_at - f.t for f in self.faults
                if f.back_at is not None and f.worker_id is not None and f.counted]

    def engine_restarts(self) -> list[Fault]:
        return [f for f in self.live_faults() if f.kind == "restart_engine"]

    def unexplained_deaths(self, start: float, end: float) -> list[DeathRecord]:
        """Deaths recorded between ``start`` and ``end`` that no injected fault of a worker
        explains (the certificate of no fault's container)."""
        explained = {f.container_id for f in self.live_faults()
                     if f.worker_id is not None and f.kind != "restart_engine"}
        return [d for d in self.deaths if start <= d.t <= end and d.cert.container_id not in explained]

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
