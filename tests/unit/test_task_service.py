"""Durable tasks (runtime.journal.TaskService) on FakeEngine: submit and result, and what a
restart makes of each unfinished task in the journal (`open_supervisor` with the same
``state_dir``)."""

import random
from contextlib import asynccontextmanager, suppress

import pytest
import trio

from runtime import (CorralError, NoSuchChild, PoolSpec, SupervisorConfig, Task, TaskResult, WorkerSpec,
                     open_supervisor)
from runtime.executions import ExecutionLedger
from runtime.journal import ResumeSummary, UnknownTask, open_journal, open_task_service
from runtime.testing import FakeEngine

from .helpers import fake_supervisor


@pytest.fixture(autouse=True)
def _journal_on_trios_thread():
    """The journal's calls on trio's own thread (runtime.journal.INLINE): under the autojump
    clock, a task waiting for a worker thread lets virtual time run through every timer (a
    loaded machine made a worker look hung while the journal wrote)."""
    from runtime.journal import INLINE
    token = INLINE.set(True)
    yield
    INLINE.reset(token)



def config(state_dir, **kw) -> SupervisorConfig:
    return SupervisorConfig(name="t", state_dir=str(state_dir), workers=[WorkerSpec(id="solo")],
                            pools=[PoolSpec(name="p", replicas=2)], **kw)


@asynccontextmanager
async def service(state_dir, ledger=None, **kw):
    """A supervisor with a journal on a fresh FakeEngine (as after a restart: no container of
    the previous run is left)."""
    async with FakeEngine() as engine:
        async with open_supervisor(config(state_dir, **kw), engine=engine, rng=random.Random(1),
                                   ledger=ledger) as sup:
            yield sup


async def occupy(nursery: trio.Nursery, sup, worker_id: str) -> None:
    """Make the worker busy with a task that is not journaled, run in ``nursery`` (it runs
    until that is cancelled or corral stops): tasks sent to the worker meanwhile wait in its
    queue, whatever the clock does."""
    async def hold() -> None:
        with suppress(CorralError):
            await sup.worker(worker_id).run(Task(prompt="!sleep 86400"))
    nursery.start_soon(hold)
    await sup.worker(worker_id).wait_until(lambda i: i.state == "busy")


@asynccontextmanager
async def occupied(sup, worker_id: str):
    """`occupy` for the block."""
    async with trio.open_nursery() as n:
        await occupy(n, sup, worker_id)
        yield
        n.cancel_scope.cancel()


async def test_without_a_state_dir_there_is_no_journal(autojump_clock):
    async with fake_supervisor(SupervisorConfig(name="t")) as (sup, engine):
        assert sup.tasks is None


async def test_submit_records_the_task_and_its_result(autojump_clock, tmp_path):
    async with service(tmp_path) as sup:
        assert await sup.tasks.wait_resumed() == ResumeSummary()
        async with occupied(sup, "solo"):
            tid = await sup.tasks.submit("worker:solo", Task(prompt="hello", task_id="t-1"))
            assert tid == "t-1"
            rec = await sup.tasks.result(tid)
            assert rec.state == "queued" and rec.result is None and rec.target == "worker:solo"
        rec = await sup.tasks.result(tid, wait=True)
        assert rec.state == "done"
        assert (rec.result.status, rec.result.output) == ("ok", "stub-shell: hello")
        pid = await sup.tasks.submit("pool:p", Task(prompt="!sleep 5"))
        assert (await sup.tasks.result(pid, wait=True)).result.output == "stub-shell: slept"
    async with open_journal(str(tmp_path)) as j:          # it outlives the supervisor
        assert (await j.get("t-1")).result.output == "stub-shell: hello"
        assert (await j.get(pid)).result.worker_id in ("p-1", "p-2")


async def test_an_unknown_target_is_an_error_and_nothing_is_recorded(autojump_clock, tmp_path):
    async with service(tmp_path) as sup:
        with pytest.raises(NoSuchChild, match="no pool 'nope'"):
            await sup.tasks.submit("pool:nope", Task(prompt="x", task_id="t-1"))
        with pytest.raises(NoSuchChild, match="no worker 'ghost'"):
            await sup.tasks.submit("worker:ghost", Task(prompt="x", task_id="t-2"))
        assert await sup.tasks.journal.counts() == {"queued": 0, "dispatched": 0, "done": 0}
        with pytest.raises(UnknownTask, match="no task 't-1'"):
            await sup.tasks.result("t-1")


async def test_resume_sends_each_unfinished_task_its_way(autojump_clock, tmp_path):
    """What the journal held when corral died, and what the next start makes of it."""
    queued = Task(prompt="never sent", task_id="t-queued")
    retry = Task(prompt="lost, one attempt left", max_attempts=2, task_id="t-retry")
    lost = Task(prompt="lost, at most once", task_id="t-lost")
    answered = Task(prompt="answered while corral died", task_id="t-answered")
    died = Task(prompt="its container died, attempts left", max_attempts=3, task_id="t-died")
    async with open_journal(str(tmp_path)) as j:
        for t in (queued, retry, lost, answered, died):
            await j.accepted(t, "pool:p")
        await j.dispatched("t-retry", "p-1", 1)
        await j.dispatched("t-lost", "p-2", 1)
        await j.dispatched("t-answered", "p-1", 1)
        await j.attempt_done("t-answered", "p-1", 1, TaskResult(
            task_id="t-answered", status="ok", output="the answer from before", worker_id="p-1"))
        await j.dispatched("t-died", "p-2", 1)
        await j.attempt_done("t-died", "p-2", 1, TaskResult(
            task_id="t-died", status="worker_died", worker_id="p-2", error="oom"))

    ledger = ExecutionLedger()
    async with service(tmp_path, ledger=ledger) as sup:
        summary = await sup.tasks.wait_resumed()
        assert summary == ResumeSummary(requeued=1, retried=2, lost=1, finalized=1)
        res = {t.task_id: (await sup.tasks.result(t.task_id, wait=True)).result
               for t in (queued, retry, lost, answered, died)}

    assert (res["t-queued"].status, res["t-queued"].attempts) == ("ok", 1)
    assert res["t-queued"].output == "stub-shell: never sent"
    assert (res["t-retry"].status, res["t-retry"].attempts) == ("ok", 2)     # 1 before + 1 now
    assert (res["t-died"].status, res["t-died"].attempts) == ("ok", 2)
    assert (res["t-lost"].status, res["t-lost"].attempts) == ("worker_died", 1)
    assert "corral restarted" in res["t-lost"].error and "p-2" in res["t-lost"].error
    assert res["t-answered"] == TaskResult(task_id="t-answered", status="ok", worker_id="p-1",
                                           output="the answer from before", attempts=1)
    assert dict(ledger.counts) == {"t-queued": 1, "t-retry": 1, "t-died": 1}   # nothing else ran

    ledger = ExecutionLedger()
    async with service(tmp_path, ledger=ledger) as sup:        # and a third start: all done
        assert await sup.tasks.wait_resumed() == ResumeSummary()
    assert not ledger.counts


async def test_a_task_carried_by_an_adopted_container_is_awaited_not_run_again(
        autojump_clock, tmp_path, monkeypatch):
    from actors.worker.handle import WorkerHandle
    carried = {"t-1", "t-2"}
    monkeypatch.setattr(WorkerHandle, "carries", lambda self, tid: tid in carried, raising=False)
    async with open_journal(str(tmp_path)) as j:
        for tid in ("t-1", "t-2"):
            await j.accepted(Task(prompt="long", task_id=tid), "worker:solo")
            await j.dispatched(tid, "solo", 1)
    ledger = ExecutionLedger()
    async with service(tmp_path, ledger=ledger) as sup:
        assert await sup.tasks.wait_resumed() == ResumeSummary(continued=2)
        await trio.sleep(60)
        assert (await sup.tasks.result("t-1")).state == "dispatched"     # still awaited
        # its container answers (the worker records it before acknowledging it)
        await sup.tasks.journal.attempt_done("t-1", "solo", 1, TaskResult(
            task_id="t-1", status="ok", output="finished while corral was away", worker_id="solo"))
        rec = await sup.tasks.result("t-1", wait=True)
        assert (rec.result.output, rec.result.attempts) == ("finished while corral was away", 1)
        # the other one's container goes without answering: lost (at most once)
        carried.discard("t-2")
        await sup.worker("solo").restart()
        rec = await sup.tasks.result("t-2", wait=True)
        assert rec.result.status == "worker_died" and "corral restarted" in rec.result.error
    assert not ledger.counts


async def test_a_graceful_stop_leaves_queued_tasks_to_the_next_start(autojump_clock, tmp_path):
    async with trio.open_nursery() as n, service(tmp_path) as sup:
        await occupy(n, sup, "solo")          # (still busy when corral stops)
        await sup.tasks.submit("worker:solo", Task(prompt="waits its turn", task_id="t-next"))
    async with open_journal(str(tmp_path)) as j:
        rec = await j.get("t-next")
        assert rec.state == "queued" and rec.result is None      # not "cancelled": kept
    ledger = ExecutionLedger()
    async with service(tmp_path, ledger=ledger) as sup:
        rec = await sup.tasks.result("t-next", wait=True)
        assert rec.result.output == "stub-shell: waits its turn"
    assert ledger["t-next"] == 1


async def test_a_client_that_gives_up_cancels_its_task(autojump_clock, tmp_path):
    async with service(tmp_path) as sup:
        tid = await sup.tasks.submit("worker:solo", Task(prompt="!sleep 86400"))
        await sup.worker("solo").wait_until(lambda i: i.state == "busy")
        assert sup.tasks.cancel(tid)
        rec = await sup.tasks.result(tid, wait=True)
        assert rec.result.status == "cancelled" and "client" in rec.result.error
        info = await sup.worker("solo").wait_until(lambda i: i.state == "ready")
        assert info.generation == 1                             # cancelled in its container
        assert not sup.tasks.cancel("t-unknown")


async def test_finished_tasks_expire_while_the_service_runs(autojump_clock, tmp_path):
    wall = [1_000_000.0]
    async with fake_supervisor(SupervisorConfig(name="t", workers=[WorkerSpec(id="solo")])) as (sup, _):
        async with open_journal(str(tmp_path), retention_s=3600, clock=lambda: wall[0]) as j, \
                open_task_service(sup, j, expire_every_s=60) as tasks:
            tid = await tasks.submit("worker:solo", Task(prompt="x"))
            await tasks.result(tid, wait=True)
            wall[0] += 3601
            await trio.sleep(61)
            with pytest.raises(UnknownTask):
                await tasks.result(tid)


async def test_a_duplicate_task_id_is_refused(autojump_clock, tmp_path):
    from runtime.journal import DuplicateTask
    async with service(tmp_path) as sup:
        await sup.tasks.submit("worker:solo", Task(prompt="a", task_id="t-1"))
        with pytest.raises(DuplicateTask):
            await sup.tasks.submit("worker:solo", Task(prompt="b", task_id="t-1"))
        assert (await sup.tasks.result("t-1", wait=True)).result.output == "stub-shell: a"
        with pytest.raises(DuplicateTask):
            await sup.tasks.submit("pool:p", Task(prompt="c", task_id="t-1"))


async def test_a_corrupt_journal_stops_the_start_with_an_error_naming_it(autojump_clock, tmp_path):
    from runtime.journal import JournalError
    (tmp_path / "journal.sqlite3").write_bytes(b"\x00garbage" * 1000)
    async with FakeEngine() as engine:
        with pytest.raises(JournalError, match=f"{tmp_path}/journal.sqlite3 is corrupt"):
            async with open_supervisor(config(tmp_path), engine=engine):
                pytest.fail("started on a corrupt journal")
        assert engine.stats["creates"] == 0
