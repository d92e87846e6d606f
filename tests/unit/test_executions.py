"""Executions are counted where they happen (the wrapper's task_started), and the delivery
checks that corral chaos uses can fail: a deliberately broken redelivery is caught. Run through
the chaos kit's fixtures (runtime.chaoskit): FakeEngine under the autojump clock, every task run
through the pool recorded, the invariants checked."""

import pytest
import trio

from actors.pool import Pool
from runtime import PoolSpec, RestartPolicy, Task, WorkerSpec
from runtime.chaoskit import InvariantViolation
from runtime.executions import ExecutionLedger, check_deliveries


async def run_pool(corral_supervisor, tasks, chaos=None):
    sup = await corral_supervisor(max_restarts=1000)
    pool = await sup.start_pool(PoolSpec(name="p", replicas=2, worker=WorkerSpec(
        restart=RestartPolicy(max_restarts=1000))))
    async with trio.open_nursery() as n:
        for t in tasks.values():
            n.start_soon(pool.run, t)
        if chaos is not None:
            await chaos.run_for(3.5)


def results_of(history):
    return {tid: [res for _, res in rec.results] for tid, rec in history.tasks.items()}


async def test_each_task_runs_once_and_is_counted_in_the_container(corral_supervisor, invariants):
    tasks = {t.task_id: t for t in (Task(prompt=f"!sleep 1 task {i}") for i in range(6))}
    await run_pool(corral_supervisor, tasks)
    ledger = invariants.history.ledger
    assert dict(ledger.counts) == {tid: 1 for tid in tasks}
    assert check_deliveries(tasks, results_of(invariants.history), ledger) == []
    await invariants.check()


async def test_redelivery_stays_within_max_attempts_under_kills(corral_supervisor, chaos, invariants):
    tasks = {t.task_id: t for t in (Task(prompt=f"!sleep 1 task {i}", max_attempts=3) for i in range(12))}
    chaos.every(0.5, times=6).kill(pool="p")
    await run_pool(corral_supervisor, tasks, chaos)
    ledger = invariants.history.ledger
    assert len(chaos.harness.history.live_faults()) == 6
    assert sum(ledger.counts.values()) > len(tasks)          # the kills did cause redeliveries
    assert check_deliveries(tasks, results_of(invariants.history), ledger) == []
    await invariants.check()


async def test_a_broken_redelivery_is_caught(corral_supervisor, invariants, monkeypatch):
    """Redelivery that ignores max_attempts (two extra tries): the checks name each task."""
    monkeypatch.setattr(Pool, "_should_redeliver",
                        lambda self, job, res: res.status == "worker_died"
                        and job.attempts < job.task.max_attempts + 2)
    tasks = {t.task_id: t for t in (Task(prompt="!crash-wrapper", task_id=f"bad-{i}") for i in range(2))}
    await run_pool(corral_supervisor, tasks)
    ledger = invariants.history.ledger
    assert dict(ledger.counts) == {"bad-0": 3, "bad-1": 3}
    expected = sorted([f"bad-{i}: ran 3 times, max_attempts=1" for i in range(2)]
                      + [f"bad-{i}: 3 attempts reported, max_attempts=1" for i in range(2)])
    assert sorted(check_deliveries(tasks, results_of(invariants.history), ledger)) == expected
    with pytest.raises(InvariantViolation) as ei:
        await invariants.check()
    assert sorted(v.text for v in ei.value.violations) == expected
    assert all(v.invariant == "executions" for v in ei.value.violations)


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
