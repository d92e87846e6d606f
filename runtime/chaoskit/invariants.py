"""The invariants of a supervision tree under faults, checked against a `History` (the checks
`corral chaos` makes, as a library).

- ``results``: every task has exactly one answer (a TaskResult; an exception such as PoolStopped
  counts as the answer of a task its pool no longer takes), unless its caller gave up.
- ``executions``: executions counted inside the containers (the wrappers' ``task_started``, in an
  ExecutionLedger) never exceed ``max_attempts`` (runtime.executions.check_deliveries), and
  nothing runs that was not submitted.
- ``orphans``: no container outlives its worker; none is left once its supervisor stopped; a
  worker never has two running containers.
- ``certificates``: every fault that hit a serving container gave exactly that container's death
  certificate, with the cause the fault makes (kill -> killed, remove -> removed, crash_wrapper
  -> crashed, oom -> oom_killed, pause -> hung, stop_engine -> engine_error).
- ``restart_delays``: each restart's delay is the policy's (``Backoff``: 0 after a stable container,
  else ``min(max_s, initial_s * factor**(n-2))`` after n failures in a row, exactly with
  ``jitter="none"``, at most that with full jitter), and the next container really waited it.
- ``escalations``: a worker gives up exactly when its budget (``max_restarts`` within
  ``within_s``, deaths charged to a task not counted) is spent; a supervisor escalates exactly when
  its intensity is exceeded, a child gives up, ``shared_cause_threshold`` workers die of an
  engine error within ``shared_cause_window_s``, or a worker finds the engine unreachable for over
  ``engine_outage_s`` (``engine_unavailable``), and for that reason, at that death.
- ``adoption`` (``kill_supervisor``): the supervisor reopened after a kill serves on with the
  containers that were running: each worker in the very container it had (same id, same
  generation), no worker with two running containers, no container of the supervisor's that no
  worker took.
- ``engine_restarts`` (``restart_engine``): a restart of a live-restore engine costs no worker
  a restart: no death from the moment the engine goes down until ``ENGINE_RESTART_MARGIN_S``
  after it answers again, other than the deaths of faults injected into workers.

A killed supervisor's workers are made again when it reopens: their restart budget and backoff,
like the supervisor's intensity, start afresh then (the models here too).

The model behind the last two is written here again, apart from the actors' own code
(actors/worker/restart.py, actors/supervisor.py), so a bug there shows up as a difference.
A failure's text has the violations, the seed and schedule, and a timeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import EngineError
from ..executions import ExecutionLedger, check_deliveries
from ..records import TASK_CAUSES

if TYPE_CHECKING:
    from .harness import Harness
    from .history import DeathRecord, History

INVARIANTS = ("results", "executions", "orphans", "certificates", "restart_delays", "escalations",
              "adoption", "engine_restarts")
ENGINE_RESTART_MARGIN_S = 30.0
"""after the engine answers again, how long a death is still the restart's (a worker finds out
its container is gone at its next heartbeat, at most a heartbeat timeout later)"""
SHARED_CAUSES = frozenset({"engine_error"})
"""causes that, striking several workers at once, are the environment's (DESIGN.md)"""


@dataclass(frozen=True)
class Violation:
    invariant: str
    text: str

    def __str__(self) -> str:
        return f"[{self.invariant}] {self.text}"


class InvariantViolation(AssertionError):
    """Raised by `Invariants.check`; ``violations`` holds each one, the message everything."""

    def __init__(self, message: str, violations: list[Violation]) -> None:
        super().__init__(message)
        self.violations = violations


def _charged(d: "DeathRecord") -> bool | None:
    """Was the death charged to the task running at the time? None: unknown."""
    if d.cert.cause not in TASK_CAUSES:
        return False
    if d.state_before is None:
        return None
    return d.state_before == "busy"


def _window(times: list[float], now: float, within_s: float, max_restarts: int,
            eps: float) -> tuple[list[float], bool | None]:
    """The restarts still in the window at ``now``, and whether one more is refused (None: it
    depends on a time within ``eps`` of the window's edge: on a real engine the kit sees a death
    a moment apart from the supervisor; on FakeEngine ``eps`` is 0 and the times are the very
    floats the actors compare)."""
    keep = [t for t in times if now - t <= within_s + eps]
    strict = [t for t in keep if now - t <= within_s - eps]
    refused, refused_strict = len(keep) >= max_restarts, len(strict) >= max_restarts
    return keep, (refused if refused == refused_strict else None)


def _cap(backoff: Any, consecutive: int) -> float:
    if consecutive <= 1:
        return 0.0
    return min(backoff.max_s, backoff.initial_s * backoff.factor ** (consecutive - 2))


# -- results and executions -------------------------------------------------------------------
def check_results(h: "History", *, complete: bool) -> list[Violation]:
    out: list[Violation] = []
    for tid, r in h.tasks.items():
        if r.refused:
            out.append(Violation("results", f"task {tid}: a second final result was offered to the journal "
                                            f"after its first ({r.results[0][1].status if r.results else '?'}): "
                                            + ", ".join(res.status for _, res in r.refused)))
        if len(r.results) > 1:
            out.append(Violation("results", f"task {tid}: {len(r.results)} results (expected exactly 1): "
                                            + ", ".join(res.status for _, res in r.results)))
        elif r.answers > 1:
            out.append(Violation("results", f"task {tid}: {r.answers} answers (a result and "
                                            f"{len(r.errors)} exception(s): {r.errors[0][1]})"))
        elif complete and r.answers == 0 and r.abandoned_at is None:
            out.append(Violation("results", f"task {tid} ({r.task.prompt[:40]!r}, sent to {r.target} "
                                            f"at t={r.submitted_at:.3f}): no result"))
    return out


def check_executions(h: "History") -> list[Violation]:
    out: list[Violation] = []
    for tid, ran in sorted(h.ledger.counts.items()):
        r = h.tasks.get(tid)
        if r is None:
            out.append(Violation("executions", f"{tid}: ran {ran} time(s) but was never submitted"))
            continue
        if len(r.results) == 1:
            one = ExecutionLedger()
            one.counts[tid] = ran
            out += [Violation("executions", text)
                    for text in check_deliveries({tid: r.task}, {tid: [r.results[0][1]]}, one)]
        elif ran > r.task.max_attempts:
            out.append(Violation("executions", f"{tid}: ran {ran} times, max_attempts={r.task.max_attempts}"))
    return out


# -- certificates ---------------------------------------------------------------------------
def check_certificates(h: "History", *, complete: bool) -> list[Violation]:
    out: list[Violation] = []
    engine_stops = [g for g in h.live_faults() if g.kind == "stop_engine" and g.worker_id is None]
    for f in h.live_faults():
        if f.worker_id is None:
            continue
        head = f"fault #{f.n} ({f.describe()} at t={f.t:.3f})"
        if f.cert is not None:
            c = f.cert
            # the engine stopped before the container's death was told: the engine's doing
            overtaken = any(f.t <= g.t <= (f.cert_at if f.cert_at is not None else g.t) and c.cause in g.expected
                            for g in engine_stops if g.n != f.n)
            if c.cause not in f.expected and not overtaken:
                out.append(Violation("certificates", f"{head}: the certificate says {c.cause}"
                                     + (f" ({c.reason})" if c.reason else "")
                                     + f", the fault makes {' or '.join(f.expected)}"))
            if c.generation != f.generation or c.worker_id != f.worker_id:
                out.append(Violation("certificates", f"{head}: certified as {c.worker_id} gen {c.generation}"))
        elif complete:
            rec = h.workers.get(f.worker_id)
            actor = f.actor if f.actor is not None else (rec.actor if rec is not None else None)
            if rec is not None and not actor.finished.is_set():
                out.append(Violation("certificates", f"{head}: no death certificate for its container"))
    return out


# -- restart delays -------------------------------------------------------------------------
def check_restart_delays(h: "History", *, tolerance: float) -> list[Violation]:
    out: list[Violation] = []
    for wid, rec in h.workers.items():
        if rec.lost:
            continue                                  # its first deaths are unknown
        backoff = rec.policy.backoff
        consecutive = 0
        incarnation = 0
        for d in h.certificates(wid):
            c = d.cert
            if d.incarnation != incarnation:           # made again: a fresh backoff
                incarnation, consecutive = d.incarnation, 0
            if c.restart_in_s is None:
                continue
            stable = c.ready and c.uptime_s >= backoff.stable_s
            consecutive = 1 if stable else consecutive + 1
            cap = _cap(backoff, consecutive)
            why = ("after a stable container (READY for "
                   f"{c.uptime_s:.3f} s >= stable_s={backoff.stable_s:g})" if stable
                   else f"after {consecutive} failures in a row")
            head = f"{wid} gen {c.generation} ({c.cause}, t={d.at:.3f})"
            if backoff.jitter == "none" and abs(c.restart_in_s - cap) > 1e-9:
                out.append(Violation("restart_delays", f"{head}: restart in {c.restart_in_s:.3f} s; "
                                                       f"the policy says {cap:.3f} s {why}"))
            elif not -1e-9 <= c.restart_in_s <= cap + 1e-9:
                out.append(Violation("restart_delays", f"{head}: restart in {c.restart_in_s:.3f} s; "
                                                       f"the policy allows 0 to {cap:.3f} s {why}"))
            end = rec.incarnation_end(d.incarnation) if rec.incarnations else float("inf")
            nxt = next((t for t, state, gen in rec.states
                        if d.at <= t < end and gen > c.generation
                        and state in ("building", "creating", "starting")), None)
            if nxt is not None and nxt - d.at < c.restart_in_s - tolerance:
                out.append(Violation("restart_delays", f"{head}: the next container came "
                                                       f"{nxt - d.at:.3f} s later, before its delay of "
                                                       f"{c.restart_in_s:.3f} s"))
    return out


# -- escalations ----------------------------------------------------------------------------
@dataclass
class Prediction:
    reason: str
    trigger: "DeathRecord"
    t: float
    why: str


def _worker_decisions(h: "History", eps: float) -> tuple[list[Violation], set[str]]:
    """Each death's decision by the worker's own budget; violations, and the workers whose
    history is not complete enough to tell."""
    out: list[Violation] = []
    unknown: set[str] = set()
    for wid, rec in h.workers.items():
        if rec.lost:
            unknown.add(wid)
            continue
        pol = rec.policy
        window: list[float] = []
        deaths = h.certificates(wid)
        incarnation = 0
        for i, d in enumerate(deaths):
            c = d.cert
            if d.incarnation != incarnation:           # made again: a fresh budget
                incarnation, window = d.incarnation, []
            charged = _charged(d)
            if charged is None:
                unknown.add(wid)
                break
            if d.stopping or pol.restart == "temporary" or (pol.restart == "transient" and c.cause == "exited"):
                expect = "done"
            elif c.cause == "config_error":
                expect = "give_up"
            elif charged:
                expect = "restart"
            else:
                window, refused = _window(window, d.clock, pol.within_s, pol.max_restarts, eps)
                if refused is None:
                    unknown.add(wid)
                    break
                if refused:
                    expect = "give_up"
                else:
                    window.append(d.clock)
                    expect = "restart"
            head = f"{wid} gen {c.generation} ({c.cause}, t={d.at:.3f})"
            last = i == len(deaths) - 1
            if expect == "restart" and c.restart_in_s is None:
                actor = rec.actors[d.incarnation] if d.incarnation < len(rec.actors) else rec.actor
                if d.stopping is None and last and actor.state == "stopped":
                    continue                          # it was being stopped: done, not given up
                out.append(Violation("escalations", f"{head}: the worker gave up, but "
                                     + ("the death was charged to its task (such deaths never count "
                                        "against a worker's budget)" if charged else
                                        f"its budget (max_restarts={pol.max_restarts} within "
                                        f"{pol.within_s:g} s) had room: {len(window) - 1} restart(s) "
                                        f"counted in the window")))
            elif expect == "done" and c.restart_in_s is not None:
                why = ("it had been told to stop" if d.stopping
                       else f"its restart type is {pol.restart}" + (" and it exited 0" if c.cause == "exited" else ""))
                out.append(Violation("escalations", f"{head}: the worker restarted, but {why}"))
            elif expect == "give_up" and c.restart_in_s is not None:
                out.append(Violation("escalations", f"{head}: the worker restarted, but "
                                     + ("a config_error is never retried" if c.cause == "config_error"
                                        else f"that was restart {len(window) + 1} within "
                                             f"{pol.within_s:g} s (max_restarts={pol.max_restarts}): "
                                             f"it should have given up")))
    return out, unknown


def predict_escalation(h: "History", name: str, unknown: set[str], eps: float = 0.0, *,
                       give_up_first: bool = False) -> Prediction | None | str:
    """When and why supervisor ``name`` should escalate by its config and what happened; None:
    never; a string: cannot tell (why).

    A worker that gives up tells its supervisor after the death itself has been counted, and a
    nested supervisor after it has stopped its children: such a ChildFailed comes after the deaths
    of the same instant (``give_up_first``: before them, the other order a race may give)."""
    rec = h.supervisors[name]
    cfg = rec.config
    late = 0 if give_up_first else len(h.deaths) + 1
    events: list[tuple[float, float, str, Any]] = []
    for i, d in enumerate(h.deaths):
        if d.supervisor != name:
            continue
        events.append((d.clock, i, "death", d))
        w = h.workers.get(d.cert.worker_id)
        if d.cert.restart_in_s is None and w is not None and w.actor.state == "failed" \
                and h.certificates(d.cert.worker_id)[-1] is d:
            events.append((d.clock, late + i + 0.5, "gave_up", d))
    for child in h.supervisors.values():
        if child.parent == name:
            p = predict_escalation(h, child.name, unknown, eps, give_up_first=give_up_first)
            if isinstance(p, str):
                return p
            if p is not None:
                events.append((p.trigger.clock, len(h.deaths) * 2 + 2, "child", p))
    events.sort(key=lambda e: (e[0], e[1]))
    counted: list[float] = []
    recent: list["DeathRecord"] = []
    epoch = 0
    for _, _, kind, x in events:
        if kind == "child":
            return Prediction("child_failed", x.trigger, x.t, f"a nested supervisor escalated ({x.why})")
        d = x
        c = d.cert
        if d.epoch != epoch:                   # reopened after a kill: a fresh intensity
            epoch, counted, recent = d.epoch, [], []
        if kind == "gave_up":
            return Prediction("child_failed", d, d.t, f"{c.worker_id} gave up ({c.cause})")
        if c.worker_id in unknown:
            return f"the history of {c.worker_id} is incomplete"
        recent.append(d)
        if c.cause == "engine_unavailable":
            return Prediction("engine_unavailable", d, d.t, f"{c.worker_id} found the engine unreachable "
                                                            f"for over engine_outage_s")
        if c.cause in SHARED_CAUSES:
            same = {r.cert.worker_id for r in recent
                    if r.cert.cause == c.cause and d.clock - r.clock <= cfg.shared_cause_window_s + eps}
            if len(same) >= cfg.shared_cause_threshold:
                return Prediction("shared_cause", d, d.t, f"{len(same)} workers died of {c.cause} within "
                                                          f"{cfg.shared_cause_window_s:g} s "
                                                          f"(shared_cause_threshold={cfg.shared_cause_threshold})")
        if c.restart_in_s is None:
            continue
        if _charged(d):
            continue
        if d.group_pending is None:
            return f"whether the death of {c.worker_id} gen {c.generation} fell in a group restart"
        if d.group_pending:
            continue                     # absorbed by the group restart that will restart it
        counted, refused = _window(counted, d.clock, cfg.within_s, cfg.max_restarts, eps)
        if refused is None:
            return f"the death of {c.worker_id} gen {c.generation} fell at the edge of the window"
        if refused:
            t0 = d.clock - d.t
            return Prediction("intensity", d, d.t, f"restart {len(counted) + 1} within {cfg.within_s:g} s "
                                                   f"(max_restarts={cfg.max_restarts}; counted at t="
                                                   + ", ".join(f"{x - t0:.3f}" for x in counted + [d.clock]) + ")")
        counted.append(d.clock)
    return None


def _matches(pred: Prediction, exc: Any, h: "History") -> bool:
    trig = exc.certificates[-1] if exc.certificates else None
    if exc.reason != pred.reason or trig is None:
        return False
    if (trig.worker_id, trig.generation) == (pred.trigger.cert.worker_id, pred.trigger.cert.generation):
        return True
    # another death of the same instant: which of them the supervisor took last is a race
    return any(d.clock == pred.trigger.clock and d.cert.worker_id == trig.worker_id
               and d.cert.generation == trig.generation for d in h.deaths)


def check_escalations(harness: "Harness", *, complete: bool) -> list[Violation]:
    h = harness.history
    eps = 0.0 if harness.fake else 0.05
    out, unknown = _worker_decisions(h, eps)
    for name, rec in h.supervisors.items():
        pred = predict_escalation(h, name, unknown, eps)
        if isinstance(pred, str):
            continue
        other = predict_escalation(h, name, unknown, eps, give_up_first=True)
        run = next((r for r in harness.runs if r.name == name), None)
        exc = run.escalation if run is not None else None
        escalated = exc is not None or getattr(rec.actor, "state", None) == "escalated"
        if pred is None and escalated:
            out.append(Violation("escalations", f"supervisor {name} escalated"
                                 + (f" ({exc.reason}: {exc})" if exc is not None else "")
                                 + f", but by its config (max_restarts={rec.config.max_restarts} within "
                                   f"{rec.config.within_s:g} s) and what happened it should not have"))
        elif pred is not None and not escalated:
            if complete and (rec.closed_at is None or pred.t < rec.closed_at):
                out.append(Violation("escalations", f"supervisor {name} should have escalated "
                                     f"({pred.reason}) at t={pred.t:.3f}: {pred.why}; it did not"))
        elif pred is not None and exc is not None:
            if _matches(pred, exc, h) or (isinstance(other, Prediction) and _matches(other, exc, h)):
                if run is not None:
                    run.observed = True           # expected: the test need not look at it
                continue
            trig = exc.certificates[-1] if exc.certificates else None
            if exc.reason != pred.reason:
                out.append(Violation("escalations", f"supervisor {name} escalated for {exc.reason}; "
                                     f"by its config it should have for {pred.reason} at t={pred.t:.3f}: "
                                     f"{pred.why}"))
            else:
                out.append(Violation("escalations", f"supervisor {name} escalated ({exc.reason}) at the "
                                     f"death of {trig.worker_id if trig else '?'} gen "
                                     f"{trig.generation if trig else '?'}; by its config at the death of "
                                     f"{pred.trigger.cert.worker_id} gen {pred.trigger.cert.generation} "
                                     f"(t={pred.t:.3f}): {pred.why}"))
    return out


# -- orphans --------------------------------------------------------------------------------
async def check_orphans(harness: "Harness") -> list[Violation]:
    out: list[Violation] = []
    h = harness.history
    for run in harness.runs:
        if run.done.is_set():
            left = harness.containers_left.get(run.name)
            if left:
                out.append(Violation("orphans", f"supervisor {run.name} stopped and left "
                                                f"{len(left)} container(s): {left}"))
            continue
        if not harness.fake or not run.up:
            continue                       # a real engine's containers come and go in between;
                                           # a killed supervisor's run on until it is reopened
        running: dict[str, list[str]] = {}
        try:
            listing = await harness.engine.container_list(labels={"corral.supervisor": run.name}, all=False)
        except EngineError:
            continue                       # the engine is down (a stop_engine fault): nothing to see
        for c in listing:
            running.setdefault(c.labels.get("corral.worker", "?"), []).append(c.name)
        for wid, names in sorted(running.items()):
            w = h.workers.get(wid)
            if w is None or w.actor.finished.is_set():
                out.append(Violation("orphans", f"container(s) {names} run for "
                                                + (f"worker {wid}, which has ended" if w else f"no known worker ({wid})")))
            elif len(names) > 1:
                out.append(Violation("orphans", f"worker {wid} has {len(names)} running containers: {names}"))
    return out


# -- adoption and engine restarts ------------------------------------------------------------
def check_adoption(h: "History") -> list[Violation]:
    return [Violation("adoption", f"supervisor {k.name} killed at t={k.t:.3f}, reopened at "
                                  f"t={k.reopened_at if k.reopened_at is not None else float('nan'):.3f}: {p}")
            for k in h.kills for p in k.problems]


def check_engine_restarts(h: "History", *, margin_s: float = ENGINE_RESTART_MARGIN_S) -> list[Violation]:
    out: list[Violation] = []
    restarts = h.engine_restarts()
    for d in h.unexplained_deaths(restarts[0].t if restarts else 0.0, h.now()) if restarts else []:
        # the latest restart that began before the death, if the death falls in its window
        f = max((g for g in restarts if g.t <= d.t), key=lambda g: g.t, default=None)
        if f is None or d.t > (f.back_at if f.back_at is not None else h.now()) + margin_s:
            continue
        c = d.cert
        out.append(Violation("engine_restarts", f"{c.worker_id} gen {c.generation} died ({c.cause}"
                             + (f": {c.reason}" if c.reason else "") + f") at t={d.t:.3f}, during "
                             f"the engine restart #{f.n} (down at t={f.t:.3f}, back at "
                             + (f"t={f.back_at:.3f}" if f.back_at is not None else "never")
                             + "), and no fault was injected into it"))
    return out


class Invariants:
    """The invariants of one harness (the ``invariants`` fixture)."""

    def __init__(self, harness: "Harness") -> None:
        self.harness = harness
        self.raised: set[Violation] = set()
        """violations check() has raised already (teardown does not report them again)"""

    @property
    def history(self) -> "History":
        return self.harness.history

    async def violations(self, *, complete: bool = True, final: bool = False) -> list[Violation]:
        """Every violation now. ``complete``: also what must have happened by now (each task
        answered, each fault certified, each predicted escalation); ``final``: the supervisors
        have stopped (the plugin's teardown)."""
        h = self.harness
        complete = complete or final
        if not final:
            h.census()                  # (workers made before the kit could follow them)
        out = check_results(h.history, complete=complete)
        out += check_executions(h.history)
        out += await check_orphans(h)
        out += check_certificates(h.history, complete=complete)
        out += check_restart_delays(h.history, tolerance=1e-6 if h.fake else 0.25)
        out += check_escalations(h, complete=complete)
        out += check_adoption(h.history)
        out += check_engine_restarts(h.history)
        out += [Violation("kit", e) for e in h.history.internal_errors]
        return out

    async def check(self, *, settle: bool = True) -> None:
        """Settle (every task answered, every fault certified: at most 600 virtual seconds on
        FakeEngine, 60 s on a real engine), then raise InvariantViolation if any invariant does
        not hold: its message lists them, then the seed, the schedule and the timeline."""
        if settle:
            await self.harness.settle()
        bad = await self.violations(complete=True)
        if bad:
            self.raised.update(bad)
            self.harness.described = True
            raise InvariantViolation(self.report(bad), bad)

    def report(self, violations: list[Violation]) -> str:
        lines = [f"corral: {len(violations)} invariant violation(s):"]
        lines += [f"  {v}" for v in violations]
        lines.append(self.harness.chaos.describe())
        lines.append("timeline:")
        lines.append(self.history.timeline())
        return "\n".join(lines)

    def timeline(self) -> str:
        return self.history.timeline()
