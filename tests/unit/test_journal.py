"""The task journal (runtime.journal.TaskJournal): SQLite through a thread, exactly one final
result, waits that wake, retention, and errors that name the file."""

import os
import sqlite3
import stat

import pytest
import trio

from runtime import CorralError, Task, TaskResult
from runtime.journal import (Attempt, Dispatch, DuplicateTask, JournalError, TaskRecord,
                             UnknownTask, open_journal)


def ok(task_id: str, output: str = "done", **kw) -> TaskResult:
    return TaskResult(task_id=task_id, status="ok", output=output, exit_code=0, **kw)


class Clock:
    """A wall clock the test moves."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_the_first_final_result_wins_exactly_once(tmp_path):
    async with open_journal(str(tmp_path)) as j:
        t = Task(prompt="hi", task_id="t-1")
        await j.accepted(t, "pool:p")
        assert (await j.get("t-1")).state == "queued"
        assert await j.finished(ok("t-1", "first")) is True
        assert await j.finished(TaskResult(task_id="t-1", status="error", error="second")) is False
        rec = await j.get("t-1")
        assert rec.state == "done" and rec.result.output == "first" and rec.finished_at is not None
        # a task that has its result takes no more dispatches
        assert await j.dispatched("t-1", "p-1", 1) is False
        assert (await j.get("t-1")).dispatches == []


async def test_concurrent_final_results_record_one(tmp_path):
    async with open_journal(str(tmp_path)) as j:
        await j.accepted(Task(prompt="hi", task_id="t-1"), "pool:p")
        wins = []

        async def finish(i: int) -> None:
            if await j.finished(ok("t-1", f"from {i}")):
                wins.append(i)
        async with trio.open_nursery() as n:
            for i in range(20):
                n.start_soon(finish, i)
        assert len(wins) == 1
        assert (await j.get("t-1")).result.output == f"from {wins[0]}"


async def test_wait_wakes_when_the_result_is_recorded_without_polling(tmp_path):
    async with open_journal(str(tmp_path)) as j:
        await j.accepted(Task(prompt="hi", task_id="t-1"), "worker:solo")
        reads = 0
        get = j.get

        async def counting_get(task_id):
            nonlocal reads
            reads += 1
            return await get(task_id)
        j.get = counting_get
        got = []

        async def waiter() -> None:
            got.append(await j.wait("t-1"))
        async with trio.open_nursery() as n:
            n.start_soon(waiter)
            await trio.sleep(0.5)
            assert got == [] and reads == 1        # read once, then asleep: no polling
            await j.dispatched("t-1", "solo", 3)    # a change that is not the result: reads again
            await trio.sleep(0.2)
            assert got == [] and reads == 2
            with trio.fail_after(5):
                await j.finished(ok("t-1"))
        assert got[0].result == ok("t-1") and got[0].dispatches[0].generation == 3


async def test_records_survive_closing_and_reopening(tmp_path):
    clock = Clock()
    task = Task(prompt="long one", args=["-v"], timeout_s=30, max_attempts=3, task_id="t-1")
    async with open_journal(str(tmp_path), clock=clock) as j:
        await j.accepted(task, "pool:p")
        clock.now += 1
        await j.dispatched("t-1", "p-1", 1)
        clock.now += 1
        died = TaskResult(task_id="t-1", status="worker_died", worker_id="p-1", error="oom")
        await j.attempt_done("t-1", "p-1", 1, died)
        clock.now += 1
        await j.dispatched("t-1", "p-2", 4)
        await j.accepted(Task(prompt="other", task_id="t-2"), "worker:solo")
        await j.finished(ok("t-2"))
        before = [await j.get("t-1"), await j.get("t-2")]
    async with open_journal(str(tmp_path), clock=clock) as j:
        after = [await j.get("t-1"), await j.get("t-2")]
        assert after == before
        assert after[0] == TaskRecord(
            task=task, target="pool:p", state="dispatched",
            dispatches=[Dispatch(worker_id="p-1", generation=1, at=1_000_001.0),
                        Dispatch(worker_id="p-2", generation=4, at=1_000_003.0)],
            attempts=[Attempt(worker_id="p-1", generation=1, result=died, at=1_000_002.0)],
            result=None, accepted_at=1_000_000.0, finished_at=None)
        assert [r.task_id for r in await j.unfinished()] == ["t-1"]


async def test_unfinished_lists_queued_and_dispatched_tasks_oldest_first(tmp_path):
    clock = Clock()
    async with open_journal(str(tmp_path), clock=clock) as j:
        for i in (3, 1, 2, 4):
            clock.now += 1
            await j.accepted(Task(prompt="x", task_id=f"t-{i}"), "pool:p")
        await j.dispatched("t-1", "p-1", 1)
        await j.finished(ok("t-2"))
        assert [(r.task_id, r.state) for r in await j.unfinished()] == [
            ("t-3", "queued"), ("t-1", "dispatched"), ("t-4", "queued")]
        assert await j.counts() == {"queued": 2, "dispatched": 1, "done": 1}


async def test_expire_drops_finished_tasks_older_than_the_retention(tmp_path):
    clock = Clock()
    async with open_journal(str(tmp_path), retention_s=3600, clock=clock) as j:
        for tid in ("old", "recent", "running"):
            await j.accepted(Task(prompt="x", task_id=tid), "pool:p")
        await j.dispatched("old", "p-1", 1)
        await j.attempt_done("old", "p-1", 1, ok("old"))
        await j.finished(ok("old"))
        clock.now += 1800
        await j.finished(ok("recent"))
        clock.now += 1801                   # "old" finished 3601 s ago, "recent" 1801 s ago
        assert await j.expire() == 1
        assert await j.get("old") is None
        assert (await j.get("recent")).result == ok("recent")
        assert (await j.get("running")).state == "queued"    # unfinished tasks never expire
        with pytest.raises(UnknownTask, match=r"no task 'old' in the journal .*expired: finished "
                                              r"tasks are kept 1 hours"):
            await j.wait("old")
        assert await j.expire(now=clock.now + 10 ** 9) == 1      # "recent"; "running" stays
        assert [r.task_id for r in await j.unfinished()] == ["running"]


async def test_a_replayed_answer_of_the_same_container_is_recorded_once(tmp_path):
    """An adopted wrapper replays the answers it has not had acknowledged, also those the killed
    corral process had recorded: one answer per container (worker and generation)."""
    async with open_journal(str(tmp_path)) as j:
        await j.accepted(Task(prompt="x", task_id="t-1"), "pool:p")
        await j.dispatched("t-1", "p-1", 1)
        assert await j.attempt_done("t-1", "p-1", 1, ok("t-1", "first")) is True
        assert await j.attempt_done("t-1", "p-1", 1, ok("t-1", "replayed")) is False
        assert await j.attempt_done("t-1", "p-1", 2, ok("t-1", "next container")) is True
        assert [(a.generation, a.result.output) for a in (await j.get("t-1")).attempts] == \
            [(1, "first"), (2, "next container")]


async def test_unknown_ids_and_duplicates_are_clear_errors(tmp_path):
    async with open_journal(str(tmp_path)) as j:
        path = str(tmp_path / "journal.sqlite3")
        assert await j.get("t-nope") is None
        with pytest.raises(UnknownTask, match=f"no task 't-nope' in the journal {path}"):
            await j.wait("t-nope")
        with pytest.raises(UnknownTask, match="t-nope"):
            await j.finished(ok("t-nope"))
        assert await j.dispatched("t-nope", "w", 1) is False       # tasks not journaled: ignored
        assert await j.attempt_done("t-nope", "w", 1, ok("t-nope")) is False
        await j.accepted(Task(prompt="x", task_id="t-1"), "pool:p")
        with pytest.raises(DuplicateTask, match="task 't-1' is in the journal"):
            await j.accepted(Task(prompt="y", task_id="t-1"), "pool:p")
        with pytest.raises(CorralError, match="`pool:NAME` or `worker:ID`"):
            await j.accepted(Task(prompt="y"), "p")
        assert (await j.get("t-1")).task.prompt == "x"


async def test_a_corrupt_journal_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "journal.sqlite3"
    path.write_bytes(b"this is not a database, it is a grocery list\n" * 200)
    with pytest.raises(JournalError, match=f"the task journal {path} is corrupt .*move it aside"):
        async with open_journal(str(tmp_path)):
            pytest.fail("opened a corrupt journal")


async def test_a_journal_from_a_newer_corral_is_refused(tmp_path):
    async with open_journal(str(tmp_path)):
        pass
    conn = sqlite3.connect(tmp_path / "journal.sqlite3")
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(JournalError, match="written by a newer corral"):
        async with open_journal(str(tmp_path)):
            pytest.fail("opened a newer journal")


async def test_a_state_dir_that_cannot_be_created_is_an_error_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(JournalError, match=f"cannot create the state directory {blocker}/sub"):
        async with open_journal(str(blocker / "sub")):
            pytest.fail("opened")


async def test_an_unwritable_journal_is_an_error_naming_it(tmp_path):
    """(A directory where SQLite's write-ahead log must go: unwritable even for root.)"""
    (tmp_path / "journal.sqlite3-wal").mkdir()
    with pytest.raises(JournalError, match=f"the task journal {tmp_path}/journal.sqlite3 cannot "
                                           f"be written .*permissions"):
        async with open_journal(str(tmp_path)):
            pytest.fail("opened")


async def test_the_journal_is_private_to_its_owner(tmp_path):
    d = tmp_path / "state" / "svc"
    async with open_journal(str(d)) as j:
        await j.accepted(Task(prompt="a secret prompt"), "pool:p")
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        for name in ("journal.sqlite3", "journal.sqlite3-wal"):
            assert stat.S_IMODE(os.stat(d / name).st_mode) == 0o600, name


async def test_the_loop_keeps_running_while_a_database_call_waits(tmp_path):
    """A write that waits on the disk (here: on another connection's lock) waits in its thread:
    trio's loop, heartbeats and every other task keep running meanwhile."""
    async with open_journal(str(tmp_path)) as j:
        other = sqlite3.connect(tmp_path / "journal.sqlite3", isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        ticks = 0
        written = trio.Event()

        async def write() -> None:
            await j.accepted(Task(prompt="x", task_id="t-1"), "pool:p")
            written.set()
        async with trio.open_nursery() as n:
            n.start_soon(write)
            while ticks < 20:                    # the loop ticks while the write is stuck
                await trio.sleep(0.01)
                ticks += 1
            assert not written.is_set()
            other.execute("COMMIT")              # the lock goes: the write completes
            with trio.fail_after(5):
                await written.wait()
        other.close()
        assert (await j.get("t-1")).state == "queued"


async def test_a_closed_journal_says_so(tmp_path):
    async with open_journal(str(tmp_path)) as j:
        pass
    with pytest.raises(JournalError, match="is closed"):
        await j.get("t-1")


async def test_calls_made_together_commit_together_and_fail_alone(tmp_path):
    """Group commit: calls made while a flush runs are done in one transaction; one that fails
    (a duplicate id, or a call that fails half way) changes nothing and takes no other down."""
    async with open_journal(str(tmp_path)) as j:
        await j.accepted(Task(prompt="x", task_id="t-dup"), "pool:p")
        outcomes: dict[str, str] = {}

        def half_way(conn):
            conn.execute("INSERT INTO tasks (task_id, target, task, accepted_at) "
                         "VALUES ('t-half', 'pool:p', '{}', 0)")
            raise RuntimeError("failed half way")

        async def accept(tid: str) -> None:
            try:
                await j.accepted(Task(prompt="x", task_id=tid), "pool:p")
                outcomes[tid] = "ok"
            except DuplicateTask:
                outcomes[tid] = "duplicate"

        async def broken() -> None:
            with pytest.raises(RuntimeError, match="half way"):
                await j._run(half_way)
            outcomes["half"] = "failed"
        async with trio.open_nursery() as n:
            n.start_soon(accept, "t-0")
            n.start_soon(broken)
            for i in range(1, 10):
                n.start_soon(accept, f"t-{i}")
            n.start_soon(accept, "t-dup")
        assert outcomes == {**{f"t-{i}": "ok" for i in range(10)}, "t-dup": "duplicate",
                            "half": "failed"}
        assert await j.get("t-half") is None
        assert len(await j.unfinished()) == 11


async def test_a_replayed_answer_of_the_same_container_is_recorded_once(tmp_path):
    """A wrapper replays what its supervisor had recorded but not yet acknowledged when that
    supervisor died: the next one records it again, and the journal keeps one answer."""
    async with open_journal(str(tmp_path)) as j:
        await j.accepted(Task(prompt="x", task_id="t-1", max_attempts=2), "pool:p")
        assert await j.attempt_done("t-1", "p-1", 1, TaskResult(task_id="t-1", status="worker_died")) is True
        assert await j.attempt_done("t-1", "p-1", 1, TaskResult(task_id="t-1", status="worker_died")) is False
        assert await j.attempt_done("t-1", "p-2", 4, ok("t-1")) is True
        rec = await j.get("t-1")
    assert [(a.worker_id, a.generation, a.result.status) for a in rec.attempts] == [
        ("p-1", 1, "worker_died"), ("p-2", 4, "ok")]
