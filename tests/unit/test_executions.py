"""Executions are counted where they happen (the wrapper's task_started), and the delivery
checks that corral chaos uses can fail: a deliberately broken redelivery is caught."""

import trio

from actors.pool import Pool
from runtime import PoolSpec, RestartPolicy, SupervisorConfig, Task, WorkerSpec, open_supervisor
from runtime.executions import ExecutionLedger, check_deliveries
from runtime.testing import FakeEngine


async def run_pool(tasks, *, kill_every=None):
    ledger = ExecutionLedger()
    results = {}
    async with FakeEngine() as engine:
        async with open_supervisor(SupervisorConfig(name="t", max_restarts=1000), engine=engine,
                                   ledger=ledger) as sup:
            pool = await sup.start_pool(PoolSpec(name="p", replicas=2, worker=WorkerSpec(
                restart=RestartPolicy(max_restarts=1000))))

            async def one(task):
                results.setdefault(task.task_id, []).append(await pool.run(task))
            async with trio.open_nursery() as n:
                for t in tasks.values():
                    n.start_soon(one, t)
                if kill_every:
                    for _ in range(kill_every[1]):
                        await trio.sleep(kill_every[0])
                        for c in engine.running(labels={"corral.supervisor": "t"})[:1]:
                            engine.kill(c.id)
    return results, ledger


async def test_each_task_runs_once_and_is_counted_in_the_container(autojump_clock):
    tasks = {t.task_id: t for t in (Task(prompt=f"!sleep 1 task {i}") for i in range(6))}
    results, ledger = await run_pool(tasks)
    assert dict(ledger.counts) == {tid: 1 for tid in tasks}
    assert check_deliveries(tasks, results, ledger) == []


async def test_redelivery_stays_within_max_attempts_under_kills(autojump_clock):
    tasks = {t.task_id: t for t in (Task(prompt=f"!sleep 1 task {i}", max_attempts=3) for i in range(12))}
    results, ledger = await run_pool(tasks, kill_every=(0.5, 6))
    assert sum(ledger.counts.values()) > len(tasks)          # the kills did cause redeliveries
    assert check_deliveries(tasks, results, ledger) == []


async def test_a_broken_redelivery_is_caught(autojump_clock, monkeypatch):
    """Redelivery that ignores max_attempts (two extra tries): the checks name each task."""
    monkeypatch.setattr(Pool, "_should_redeliver",
                        lambda self, job, res: res.status == "worker_died"
                        and job.attempts < job.task.max_attempts + 2)
    tasks = {t.task_id: t for t in (Task(prompt="!crash-wrapper", task_id=f"bad-{i}") for i in range(2))}
    results, ledger = await run_pool(tasks)
    assert dict(ledger.counts) == {"bad-0": 3, "bad-1": 3}
    violations = check_deliveries(tasks, results, ledger)
    assert sorted(violations) == sorted(
        [f"bad-{i}: ran 3 times, max_attempts=1" for i in range(2)]
        + [f"bad-{i}: 3 attempts reported, max_attempts=1" for i in range(2)])


def test_several_results_and_unsubmitted_runs_are_violations():
    from runtime import TaskResult
    ledger = ExecutionLedger()
    ledger.record("a", "w", 1)
    ledger.record("ghost", "w", 1)
    tasks = {"a": Task(prompt="x", task_id="a"), "b": Task(prompt="y", task_id="b")}
    results = {"a": [TaskResult(task_id="a", status="ok")] * 2}
    assert check_deliveries(tasks, results, ledger) == [
        "a: 2 results (expected exactly 1)", "b: 0 results (expected exactly 1)",
        "ghost: ran but was never submitted"]
