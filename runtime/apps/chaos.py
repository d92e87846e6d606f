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
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from contextlib import AsyncExitStack

import msgspec
import trio

from ..chaoskit import INVARIANTS, Harness
from ..engines import Engine
from ..specs import Backoff, PoolSpec, RestartPolicy, SupervisorConfig, Task, WorkerSpec


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
            f"{counts(self.results)}",
            "invariants:",
        ]
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
                    agent: str = "claude", engine: Engine | None = None) -> ChaosReport:
    """Run the chaos scenario on ``engine`` (None: the Docker engine at ``engine_url``); the
    supervisor is named ``name`` exactly (one instance per name per engine)."""
    policy = RestartPolicy(max_restarts=10_000, within_s=60,
                           backoff=Backoff(initial_s=0.05, max_s=1.0, stable_s=2.0))
    config = SupervisorConfig(name=name, engine_url=engine_url, max_restarts=10_000, within_s=60)
    t_start = time.monotonic()
    async with AsyncExitStack() as stack:
        if engine is None:
            from ..engines import open_engine
            engine = await stack.enter_async_context(open_engine(engine_url))
        async with trio.open_nursery() as nursery:
            h = Harness(engine, nursery, seed=seed, unique_names=False)
            try:
                report = await _scenario(h, config, policy, workers=workers, duration_s=duration_s,
                                         kill_interval_s=kill_interval_s, agent=agent)
            finally:
                await h.close()
                nursery.cancel_scope.cancel()
    report.duration_s = round(time.monotonic() - t_start, 2)
    return report


async def _scenario(h: Harness, config: SupervisorConfig, policy: RestartPolicy, *, workers: int,
                    duration_s: float, kill_interval_s: float, agent: str) -> ChaosReport:
    sup = await h.supervisor(config)
    pool = await sup.start_pool(PoolSpec(name="chaos", replicas=workers, queue_size=4 * workers,
                                         worker=WorkerSpec(agent=agent, stub_agent=True, restart=policy)))
    h.chaos.every(kill_interval_s, jitter=0.5, until=max(0.0, duration_s - 1)).any(
        {"kill": 4.0, "remove": 1.0}, pool="chaos")
    deadline = trio.current_time() + duration_s

    async def producer() -> None:
        limiter = trio.Semaphore(2 * workers)
        n = 0
        async with trio.open_nursery() as tasks:
            while trio.current_time() < deadline:
                await limiter.acquire()
                n += 1
                task = Task(prompt=f"!sleep 0.1 task {n}", max_attempts=10)

                async def one(task=task) -> None:
                    try:
                        await h.history.run_task(pool, task)
                    except Exception:
                        pass              # recorded as its answer
                    finally:
                        limiter.release()
                tasks.start_soon(one)

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
        invariants=by_invariant, left_behind=[p for p in left_behind if "container" not in p],
        delivery_violations=by_invariant.get("results", []) + by_invariant.get("executions", []))
