"""`corral chaos`: a pool under fire on the real engine, with its invariants checked.

A producer keeps tasks flowing through a pool while a seeded monkey kills (`docker kill`) or
removes (`docker rm -f`) random worker containers. At the end it checks what a user relies on:
every task has exactly one result, the workers came back, and no container is left behind.
"""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter
from typing import Any

import msgspec
import trio

from ..api import open_supervisor
from ..executions import ExecutionLedger, check_deliveries
from ..errors import EngineError
from ..specs import Backoff, PoolSpec, RestartPolicy, SupervisorConfig, Task, WorkerSpec


class ChaosReport(msgspec.Struct, kw_only=True):
    supervisor: str
    workers: int
    duration_s: float
    actions: dict[str, int]
    restart_latency_s: dict[str, float]
    tasks_submitted: int
    results: dict[str, int]
    tasks_without_result: int
    tasks_with_several_results: int
    deaths: int
    """every death of a worker container during the run (whatever killed it)"""
    causes: dict[str, int]
    """those deaths by cause (from each worker's deaths_by_cause: every death since its spawn)"""
    containers_left: int
    executions: int = 0
    """task executions the wrappers reported (task_started frames), redeliveries included"""
    delivery_violations: list[str] = []
    """runtime.executions.check_deliveries: exactly one result each, never more executions than
    max_attempts, exactly one with max_attempts=1 when it succeeded"""

    @property
    def ok(self) -> bool:
        return (self.tasks_without_result == 0 and self.tasks_with_several_results == 0
                and self.containers_left == 0 and self.results.get("worker_died", 0) == 0
                and not self.delivery_violations)


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def run_chaos(*, engine_url: str | None = None, name: str = "chaos", workers: int = 4,
                    duration_s: float = 20.0, kill_interval_s: float = 1.0, seed: int = 0,
                    agent: str = "claude") -> ChaosReport:
    rng = random.Random(seed)
    policy = RestartPolicy(max_restarts=10_000, within_s=60,
                           backoff=Backoff(initial_s=0.05, max_s=1.0, stable_s=2.0))
    config = SupervisorConfig(name=name, engine_url=engine_url, max_restarts=10_000, within_s=60)
    submitted: dict[str, int] = {}
    results: dict[str, list] = {}
    latencies: list[float] = []
    actions: Counter[str] = Counter()
    hit: dict[str, Any] = {}
    """every worker the monkey acted on, by id (a worker the pool no longer has still counts)"""
    t_start = time.monotonic()
    ledger = ExecutionLedger()
    by_id: dict[str, Task] = {}
    async with open_supervisor(config, ledger=ledger) as sup:
        engine = sup.engine
        pool = await sup.start_pool(PoolSpec(name="chaos", replicas=workers, queue_size=4 * workers,
                                             worker=WorkerSpec(agent=agent, stub_agent=True, restart=policy)))
        deadline = trio.current_time() + duration_s

        async def producer() -> None:
            limiter = trio.Semaphore(2 * workers)
            n = 0
            async with trio.open_nursery() as tasks:
                while trio.current_time() < deadline:
                    await limiter.acquire()
                    n += 1
                    task = Task(prompt=f"!sleep 0.1 task {n}", max_attempts=10)
                    submitted[task.task_id] = n
                    by_id[task.task_id] = task

                    async def one(task=task) -> None:
                        try:
                            results.setdefault(task.task_id, []).append(await pool.run(task))
                        finally:
                            limiter.release()
                    tasks.start_soon(one)

        async def watch_back(w, gen: int, t0: float) -> None:
            with trio.move_on_after(30):
                await w.wait_until(lambda i: i.generation > gen and i.state in ("ready", "busy"))
                latencies.append(time.monotonic() - t0)

        async def monkey() -> None:
            async with trio.open_nursery() as watchers:
                while trio.current_time() < deadline - 1:
                    await trio.sleep(rng.uniform(0.5, 1.5) * kill_interval_s)
                    ready = [w for w in pool.workers if w.state in ("ready", "busy")]
                    if not ready:
                        continue
                    w = rng.choice(ready)
                    info = await w.info()
                    action = "docker_kill" if rng.random() < 0.8 else "docker_rm"
                    t0 = time.monotonic()
                    try:
                        if action == "docker_kill":
                            await engine.container_kill(info.container_id)
                        else:
                            await engine.container_remove(info.container_id, force=True)
                    except EngineError:
                        continue
                    actions[action] += 1
                    hit[w.id] = w
                    watchers.start_soon(watch_back, w, info.generation, t0)

        async with trio.open_nursery() as n:
            n.start_soon(producer)
            n.start_soon(monkey)
        causes: Counter[str] = Counter()
        for w in {**hit, **{w.id: w for w in pool.workers}}.values():
            causes.update(w.snapshot_nowait().deaths_by_cause)
    from ..engines import open_engine
    async with open_engine(engine_url) as engine:
        left = len(await engine.container_list(labels={"corral.supervisor": name}))
    statuses = Counter(r.status for rs in results.values() for r in rs)
    return ChaosReport(
        supervisor=name, workers=workers, duration_s=round(time.monotonic() - t_start, 2),
        actions=dict(actions),
        restart_latency_s={"p50": round(_pct(latencies, 50), 3), "p95": round(_pct(latencies, 95), 3),
                           "max": round(max(latencies), 3) if latencies else float("nan"),
                           "mean": round(statistics.fmean(latencies), 3) if latencies else float("nan")},
        tasks_submitted=len(submitted), results=dict(statuses),
        tasks_without_result=sum(1 for t in submitted if not results.get(t)),
        tasks_with_several_results=sum(1 for rs in results.values() if len(rs) > 1),
        deaths=sum(causes.values()), causes=dict(causes), containers_left=left,
        executions=sum(ledger.counts.values()),
        delivery_violations=check_deliveries(by_id, results, ledger))
