"""`corral chaos`: a pool under fire, its invariants checked - built on runtime.chaoskit.

A producer keeps tasks flowing through a pool while the kit's seeded monkey kills (`docker kill`)
or removes (`docker rm -f`) a serving worker's container about every ``kill_interval_s`` (jitter
0.5; four kills to one removal). At the end, once every task has its answer, the supervisor stops
and the kit's invariants are checked (runtime.chaoskit.invariants): every task has exactly one
result, executions counted inside the containers stay within max_attempts, no container is left,
each fault's certificate names its cause, restart delays follow the policy, no escalation.

The report (JSON, or ``text()``) lists the faults by kind, every death by cause (each worker's
``deaths_by_cause``: all of them, not the last few), restart latency percentiles (fault -> the
worker's next container READY), and each invariant with its violations.

Two more actions test corral's crash safety (``kill_supervisor_every``, ``restart_engine_every``;
the CLI's ``--kill-supervisor`` / ``--restart-engine`` with ``--every S``). With either, the pool is
in the supervisor's config, the supervisor keeps a task journal (in a temporary state directory
the run owns and removes), and the producer submits every task through the journal; results are
the journal's final results (read again from the journal file at the end).

- ``kill_supervisor``: every ``S`` seconds the supervisor is killed as a crash of corral would
  (``open_supervisor(abandon=...)``: its containers run on) and, ``supervisor_down_s`` later,
  opened again with the same name: it adopts the running containers and resumes the journal's
  unfinished tasks. Executions are counted inside the containers in one ledger across the
  instances. Invariants ``adoption`` (each worker serves on in the very container it had, none has
  two) and ``results`` / ``executions`` as always; the report gives the kills and the adoption
  times (reopening -> the configured tree serving).
- ``restart_engine``: every ``S`` seconds the engine restarts with live-restore: on a dockerd the
  run starts itself (`runtime.chaoskit.dockerd.private_dockerd`: never the machine's own
  engine), or FakeEngine. Invariant ``engine_restarts``: no worker dies of it (deaths of the
  workers the monkey hit meanwhile are counted apart).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections import Counter
from contextlib import AsyncExitStack
from typing import Any

import msgspec
import trio

from ..chaoskit import INVARIANTS, ChaosError, Harness
from ..engines import Engine
from ..engines.fake import FakeEngine
from ..specs import Backoff, PoolSpec, RestartPolicy, SupervisorConfig, Task, WorkerSpec

DEFAULT_EVERY_S = 10.0
"""how often --kill-supervisor / --restart-engine act by default"""
ANSWER_GRACE_S = 120.0
ANSWER_GRACE_FAKE_S = 600.0
"""after the run's duration, how long the producer waits for the last answers (a real engine;
FakeEngine's virtual seconds)"""


class ChaosReport(msgspec.Struct, kw_only=True):
    supervisor: str
    engine: str = ""
    seed: int = 0
    workers: int
    duration_s: float
    faults: dict[str, int] = {}
    """faults injected, by kind (kill, remove)"""
    schedule: list[str] = []
    restart_latency_s: dict[str, float]
    """fault -> the worker's next container READY: n, p50, p90, p95, p99, max, mean"""
    tasks_submitted: int
    results: dict[str, int]
    """results by status"""
    tasks_without_result: int
    tasks_with_several_results: int
    executions: int = 0
    """task executions the wrappers reported (task_started frames), redeliveries included"""
    deaths: int
    """every death of a worker container during the run (whatever killed it)"""
    deaths_by_cause: dict[str, int] = {}
    """those deaths by cause (every worker's deaths_by_cause: every death since its spawn)"""
    containers_left: int
    supervisor_kills: int = 0
    """times the supervisor was killed (a crash: containers left running) and opened again"""
    adoption_s: dict[str, float] = {}
    """reopening -> the configured tree serving again (its workers adopted): n, p50, ..., max"""
    adopted: int = 0
    """workers that served on in the very container they had, over all the reopenings"""
    replaced: int = 0
    """workers whose container had ended meanwhile, over all the reopenings (a new one)"""
    generation_resets: int = 0
    """of those, the ones made again from generation 1: the container that died while corral was
    down is removed at the reopening without a death certificate, and the worker's generation,
    restarts and last death start over"""
    engine_restarts: int = 0
    engine_down_s: dict[str, float] = {}
    """each engine restart: down -> answering again"""
    deaths_during_engine_restarts: int = 0
    """deaths recorded while the engine was restarting (down -> answering again), whatever their
    cause (a death the monkey did not cause, up to ENGINE_RESTART_MARGIN_S after a restart, is an
    ``engine_restarts`` violation)"""
    journal_results: dict[str, int] = {}
    """the final results in the task journal at the end, by status (durable runs)"""
    invariants: dict[str, list[str]] = {}
    """each invariant of runtime.chaoskit.invariants -> its violations ([]: it holds)"""
    left_behind: list[str] = []
    """what the run left behind: tasks without an answer, containers (removed since)"""
    delivery_violations: list[str] = []
    """the results and executions invariants' violations (runtime.executions.check_deliveries)"""
    actions: dict[str, int] = {}
    """= faults (the name older readers use)"""
    causes: dict[str, int] = {}
    """= deaths_by_cause (the name older readers use)"""

    @property
    def ok(self) -> bool:
        return (not any(self.invariants.values()) and not self.left_behind
                and self.tasks_without_result == 0 and self.tasks_with_several_results == 0
                and self.containers_left == 0 and self.results.get("worker_died", 0) == 0)

    def text(self) -> str:
        def counts(d: dict[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"
        lat = self.restart_latency_s
        lines = [
            f"corral chaos: supervisor {self.supervisor}, {self.workers} workers, {self.duration_s:g} s"
            + (f" on {self.engine}" if self.engine else "") + f" (seed {self.seed})",
            f"faults:    {sum(self.faults.values())} ({counts(self.faults)})",
            f"deaths:    {self.deaths} ({counts(self.deaths_by_cause)})",
            ("restarts:  " + (f"{int(lat['n'])} measured: p50 {lat['p50']:.3f} s, p90 {lat['p90']:.3f} s, "
                              f"p95 {lat['p95']:.3f} s, p99 {lat['p99']:.3f} s, max {lat['max']:.3f} s"
                              if lat.get("n") else "none measured")),
            f"tasks:     {self.tasks_submitted} submitted, {self.executions} executions; results "
            f"{counts(self.results)}" + (f"; in the journal: {counts(self.journal_results)}"
                                         if self.journal_results else ""),
        ]
        if self.supervisor_kills:
            ad = self.adoption_s
            lines.append(f"supervisor: killed {self.supervisor_kills} times; adopted {self.adopted} "
                         f"containers, {self.replaced} replaced"
                         + (f" ({self.generation_resets} from generation 1)" if self.generation_resets else "")
                         + "; serving again after p50 "
                         f"{ad.get('p50', float('nan')):.3f} s, max {ad.get('max', float('nan')):.3f} s")
        if self.engine_restarts:
            dn = self.engine_down_s
            lines.append(f"engine:    restarted {self.engine_restarts} times (down p50 "
                         f"{dn.get('p50', float('nan')):.3f} s, max {dn.get('max', float('nan')):.3f} s); "
                         f"{self.deaths_during_engine_restarts} deaths while it was down")
        lines.append("invariants:")
        for name in INVARIANTS:
            bad = self.invariants.get(name, [])
            lines.append(f"  {name:<15} {'holds' if not bad else f'VIOLATED ({len(bad)})'}")
            lines += [f"    - {v}" for v in bad[:20]]
        lines += [f"  left behind: {p}" for p in self.left_behind]
        lines.append("chaos: invariants hold" if self.ok else "chaos: INVARIANT VIOLATED")
        return "\n".join(lines)


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def latency_summary(values: list[float]) -> dict[str, float]:
    out = {"n": float(len(values))}
    for p in (50, 90, 95, 99):
        out[f"p{p}"] = round(_pct(values, p), 3)
    out["max"] = round(max(values), 3) if values else float("nan")
    out["mean"] = round(statistics.fmean(values), 3) if values else float("nan")
    return out


async def run_chaos(*, engine_url: str | None = None, name: str = "chaos", workers: int = 4,
                    duration_s: float = 20.0, kill_interval_s: float = 1.0, seed: int = 0,
                    agent: str = "claude", engine: Engine | None = None,
                    kill_supervisor_every: float | None = None,
                    restart_engine_every: float | None = None,
                    supervisor_down_s: float = 1.0,
                    engine_down_s: float | None = None, engine_control: Any = None) -> ChaosReport:
    """Run the chaos scenario on ``engine`` (None: the Docker engine at ``engine_url``); the
    supervisor is named ``name`` exactly (one instance per name per engine).

    ``kill_interval_s``: how often a worker is killed or removed (0: never).
    ``kill_supervisor_every``: kill the supervisor that often (reopened ``supervisor_down_s``
    later). ``restart_engine_every``: restart the engine that often (``engine_down_s``: how long it
    stays down; see `runtime.chaoskit.schedule`): on FakeEngine, on ``engine_control`` (a
    `runtime.chaoskit.dockerd.PrivateDockerd` with live-restore the caller started: its engine is
    the run's), or else on a private dockerd this run starts and removes; ChaosError for any
    other engine."""
    policy = RestartPolicy(max_restarts=10_000, within_s=60,
                           backoff=Backoff(initial_s=0.05, max_s=1.0, stable_s=2.0))
    for what, every in (("kill_supervisor_every", kill_supervisor_every),
                        ("restart_engine_every", restart_engine_every)):
        if every is not None and every <= 0:
            raise ChaosError(f"{what} must be positive")
    durable = bool(kill_supervisor_every or restart_engine_every)
    config = SupervisorConfig(name=name, engine_url=engine_url, max_restarts=10_000, within_s=60)
    t_start = time.monotonic()
    cleanup_problems: list[str] = []
    async with AsyncExitStack() as stack:
        control = engine_control
        if control is not None:
            if engine is not None or engine_url not in (None, control.url):
                raise ChaosError("engine_control: the run's engine is that of engine_control, not another")
            if restart_engine_every and not control.live_restore:
                raise ChaosError("restart_engine: engine_control runs without live-restore (its containers "
                                 "would die with it)")
            config = msgspec.structs.replace(config, engine_url=control.url)
        elif restart_engine_every:
            if engine is not None and not isinstance(engine, FakeEngine):
                raise ChaosError(f"restart_engine: the engine {engine.url} was not started by this chaos "
                                 f"run; restarts are only made on an engine the run starts itself (a "
                                 f"private dockerd) or on FakeEngine")
            if engine is None and engine_url is not None:
                raise ChaosError(f"--restart-engine restarts an engine this chaos run starts itself (a "
                                 f"private dockerd with live-restore), never one it was given: leave out "
                                 f"--engine ({engine_url})")
            if engine is None:
                from ..chaoskit.dockerd import DockerdError, PrivateDockerd
                control = PrivateDockerd(live_restore=True)
                stack.push_async_callback(_close_dockerd, control, cleanup_problems)
                try:
                    await control.open()
                except DockerdError as exc:
                    raise ChaosError(f"--restart-engine needs a private dockerd of the run's own: {exc}") from None
                config = msgspec.structs.replace(config, engine_url=control.url)
        if engine is None:
            from ..engines import open_engine
            engine = await stack.enter_async_context(open_engine(config.engine_url))
        pool = PoolSpec(name="chaos", replicas=workers, queue_size=4 * workers,
                        worker=WorkerSpec(agent=agent, stub_agent=True, restart=policy))
        state_dir = None
        if durable:
            state_dir = tempfile.mkdtemp(prefix="corral-chaos-")
            stack.callback(shutil.rmtree, state_dir, ignore_errors=True)
            config = msgspec.structs.replace(config, state_dir=state_dir, pools=[pool])
        async with trio.open_nursery() as nursery:
            h = Harness(engine, nursery, seed=seed, unique_names=False, engine_control=control)
            try:
                report = await _scenario(h, config, pool, workers=workers, duration_s=duration_s,
                                         kill_interval_s=kill_interval_s,
                                         kill_supervisor_every=kill_supervisor_every,
                                         restart_engine_every=restart_engine_every,
                                         supervisor_down_s=supervisor_down_s,
                                         engine_down_s=engine_down_s)
            finally:
                await h.close()
                nursery.cancel_scope.cancel()
        if state_dir is not None:
            await _check_journal(report, h, state_dir)
    report.left_behind += cleanup_problems
    report.duration_s = round(time.monotonic() - t_start, 2)
    return report


async def _close_dockerd(d, problems: list[str]) -> None:
    """Remove the run's private dockerd; what it could not remove is left behind (reported)."""
    from ..chaoskit.dockerd import DockerdError
    try:
        await d.aclose()
    except DockerdError as exc:
        problems.append(f"the private dockerd: {exc}")


async def _check_journal(report: "ChaosReport", h: Harness, state_dir: str) -> None:
    """Read every task's final result from the journal file, after the last supervisor stopped:
    each must have one, the one the kit saw written."""
    from ..journal import open_journal
    bad: list[str] = []
    statuses: Counter[str] = Counter()
    async with open_journal(state_dir) as journal:
        for tid, rec in h.history.tasks.items():
            jrec = await journal.get(tid)
            if jrec is None:
                bad.append(f"task {tid} is not in the journal")
            elif jrec.result is None:
                bad.append(f"task {tid} has no final result in the journal ({jrec.state}, "
                           f"{len(jrec.dispatches)} dispatch(es))")
            else:
                statuses[jrec.result.status] += 1
                if rec.results and rec.results[0][1].status != jrec.result.status:
                    bad.append(f"task {tid}: the journal says {jrec.result.status}, the kit saw "
                               f"{rec.results[0][1].status} written")
            if jrec is not None:
                seen = Counter((a.worker_id, a.generation) for a in jrec.attempts)
                bad += [f"task {tid}: the journal records {n} answers of {w} gen {g} (one container "
                        f"answers a task once)" for (w, g), n in sorted(seen.items()) if n > 1]
    report.journal_results = dict(sorted(statuses.items()))
    if bad:
        report.invariants.setdefault("results", []).extend(bad)
        report.delivery_violations.extend(bad)


async def _scenario(h: Harness, config: SupervisorConfig, pool_spec: PoolSpec, *, workers: int,
                    duration_s: float, kill_interval_s: float, kill_supervisor_every: float | None,
                    restart_engine_every: float | None, supervisor_down_s: float,
                    engine_down_s: float | None) -> ChaosReport:
    durable = config.state_dir is not None
    sup = await h.supervisor(config)
    if not durable:
        pool = await sup.start_pool(pool_spec)
    await sup.wait_configured()               # (durable: the pool is the config's)
    run = h.run_of(sup)
    until = max(0.0, duration_s - 1)
    if kill_interval_s > 0:
        h.chaos.every(kill_interval_s, jitter=0.5, until=until).any({"kill": 4.0, "remove": 1.0}, pool="chaos")
    if kill_supervisor_every:
        h.chaos.every(kill_supervisor_every, jitter=0.2, until=until).kill_supervisor(for_s=supervisor_down_s)
    if restart_engine_every:
        h.chaos.every(restart_engine_every, jitter=0.2, until=until).restart_engine(for_s=engine_down_s)
    deadline = trio.current_time() + duration_s

    async def producer() -> None:
        limiter = trio.Semaphore(2 * workers)
        n = 0
        async with trio.open_nursery() as tasks:
            while trio.current_time() < deadline and not run.done.is_set():
                await limiter.acquire()
                n += 1
                task = Task(prompt=f"!sleep 0.1 task {n}", max_attempts=10)

                async def one(task=task) -> None:
                    try:
                        if durable:
                            await h.submit(config.name, "pool:chaos", task)
                            rec = h.history.tasks[task.task_id]
                            await h.history.wait_until(lambda: rec.answers > 0 or run.done.is_set())
                        else:
                            await h.history.run_task(pool, task)
                    except Exception:
                        pass              # recorded as its answer
                    finally:
                        limiter.release()
                tasks.start_soon(one)
            # the last answers: a task that never gets one is the results invariant's to report
            tasks.cancel_scope.deadline = deadline + (ANSWER_GRACE_FAKE_S if h.fake else ANSWER_GRACE_S)

    async with h.chaos.running():
        await producer()
    await h.settle()
    left_behind = await h.close()
    violations = await h.invariants.violations(final=True)
    history = h.history
    by_invariant: dict[str, list[str]] = {name: [] for name in INVARIANTS}
    for v in violations:
        by_invariant.setdefault(v.invariant, []).append(v.text)
    tasks = history.tasks.values()
    statuses = Counter(res.status for r in tasks for _, res in r.results)
    restarts = history.engine_restarts()
    causes = history.deaths_by_cause()
    faults = history.faults_by_kind()
    return ChaosReport(
        supervisor=config.name, engine=h.engine.url, seed=h.seed, workers=workers,
        duration_s=0.0, faults=faults, actions=dict(faults),
        schedule=[r.describe() for r in h.chaos.rules],
        restart_latency_s=latency_summary(history.restart_latencies()),
        tasks_submitted=len(history.tasks), results=dict(sorted(statuses.items())),
        tasks_without_result=sum(1 for r in tasks if not r.results),
        tasks_with_several_results=sum(1 for r in tasks if len(r.results) > 1),
        executions=sum(history.ledger.counts.values()),
        deaths=sum(causes.values()), deaths_by_cause=causes, causes=dict(causes),
        containers_left=sum(len(v) for v in h.containers_left.values()),
        supervisor_kills=len(history.kills),
        adoption_s=latency_summary([k.adoption_s for k in history.kills if k.adoption_s is not None])
        if history.kills else {},
        adopted=sum(k.adopted for k in history.kills), replaced=sum(k.replaced for k in history.kills),
        generation_resets=sum(len(k.generation_resets) for k in history.kills),
        engine_restarts=len(restarts),
        engine_down_s=latency_summary([f.back_at - f.t for f in restarts if f.back_at is not None])
        if restarts else {},
        deaths_during_engine_restarts=_deaths_during(history, restarts),
        invariants=by_invariant, left_behind=[p for p in left_behind if "container" not in p],
        delivery_violations=by_invariant.get("results", []) + by_invariant.get("executions", []))


def _deaths_during(history, restarts) -> int:
    """Deaths recorded while the engine was restarting (down -> answering again)."""
    seen: set[int] = set()
    for f in restarts:
        end = f.back_at if f.back_at is not None else history.now()
        seen.update(id(d) for d in history.deaths if f.t <= d.t <= end)
    return len(seen)
