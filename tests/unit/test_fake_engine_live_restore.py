"""Containers that outlive their supervisor's attachment, on FakeEngine with the autojump clock:
attached with stdin_once off, a detach is no end of stdin; a supervisor that attaches again says
``hello`` and gets what it missed (wrapper version 5: seq, lease, hello); a live-restore engine
outage ends every stream but not the containers; an orphaned wrapper exits after its lease."""

from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from runtime.engines import STDOUT
from runtime.errors import EngineError, EngineUnavailable
from runtime.protocol import (Heartbeat, Hello, Lease, Ready, RunTask, TaskDone, TaskOutput,
                              TaskStarted, decode_wrapper_frame)
from runtime.testing import FakeEngine
from runtime.engines.fake import BASE
from tests.contract.helpers import Session, worker_spec


@asynccontextmanager
async def fake_engine():
    with trio.fail_after(600):      # virtual seconds: a hang fails instead of running for ever
        async with FakeEngine() as engine:
            yield engine


def spec(wid="w1", *, stdin_once=False, **env):
    return worker_spec(BASE, "lr", wid, env=env, stdin_once=stdin_once)


async def attached(stack: AsyncExitStack, engine: FakeEngine, cid: str) -> Session:
    return Session(await stack.enter_async_context(engine.attach(cid)))


async def started(engine: FakeEngine, cspec) -> tuple[str, AsyncExitStack, Session]:
    """Created, attached, started and READY; the caller closes the stack to detach."""
    cid = await engine.container_create(cspec)
    stack = AsyncExitStack()
    session = await attached(stack, engine, cid)
    await engine.container_start(cid)
    assert isinstance(await session.next(), Ready)
    return cid, stack, session


async def hello(session: Session, wid="w1") -> tuple[Ready, list]:
    """hello: the resumed ready, and every frame replayed after it (up to its last task_done)."""
    await session.send(Hello(worker_id=wid))
    ready = await session.next()
    assert isinstance(ready, Ready) and ready.resumed, ready
    frames = []
    for _ in ready.replay:
        while not isinstance(frame := await session.next(), TaskDone):
            frames.append(frame)
        frames.append(frame)
    return ready, frames


async def test_a_detach_with_stdin_once_off_leaves_the_wrapper_and_its_task_running(autojump_clock):
    async with fake_engine() as engine:
        cid, stack, session = await started(engine, spec())
        await session.send(RunTask(task_id="t1", prompt="!sleep 5 done"))
        assert isinstance(await session.next(), TaskStarted)
        await stack.aclose()                          # the supervisor goes away
        t0 = trio.current_time()
        async with AsyncExitStack() as stack:
            session = await attached(stack, engine, cid)
            ready, replayed = await hello(session)
            assert (ready.running, ready.replay) == ("t1", [])
            done = await session.expect(TaskDone)     # the task ran on, and answers the new one
            assert (done.task_id, done.status, done.output) == ("t1", "ok", "stub-claude: done")
            assert trio.current_time() - t0 == 5
        assert (await engine.container_inspect(cid)).running


async def test_with_stdin_once_a_detach_still_ends_the_wrapper(autojump_clock):
    async with fake_engine() as engine:
        cid, stack, _ = await started(engine, spec(stdin_once=True))
        await stack.aclose()
        assert await engine.container_wait(cid) == 0
        assert "stdin closed: shutting down" in await engine.container_logs(cid)


async def test_a_result_made_while_detached_is_replayed_once_to_the_next_supervisor(autojump_clock):
    async with fake_engine() as engine:
        cid, stack, session = await started(engine, spec())
        await session.send(RunTask(task_id="t1", prompt="!sleep 1 done"))
        assert isinstance(await session.next(), TaskStarted)
        await stack.aclose()
        await trio.sleep(2)                           # the task ends while nobody is attached
        assert '"task_done"' in await engine.container_logs(cid)     # (its output: the log only)
        async with AsyncExitStack() as stack:
            session = await attached(stack, engine, cid)
            ready, replayed = await hello(session)
            assert (ready.running, ready.replay) == (None, ["t1"])
            assert [type(f) for f in replayed] == [TaskStarted, TaskOutput, TaskDone]
            assert [f.seq for f in replayed] == [1, 2, 3]
            assert (replayed[-1].status, replayed[-1].output) == ("ok", "stub-claude: done")
            await session.send(Lease(ack=3))          # received: acknowledged
            ready, replayed = await hello(session)
            assert (ready.replay, replayed) == ([], [])
            await session.send(RunTask(task_id="t2", prompt="again"))
            started_ = await session.next()
            assert (type(started_), started_.seq) == (TaskStarted, 4)
            assert (await session.expect(TaskDone)).output == "stub-claude: again"


async def test_output_written_while_detached_reaches_only_the_log_and_new_output_the_new_attachment(
        autojump_clock):
    async with fake_engine() as engine:
        cid, stack, session = await started(engine, spec())     # heartbeats every second
        await stack.aclose()
        assert '"heartbeat"' not in await engine.container_logs(cid)
        await trio.sleep(3.5)                         # heartbeats nobody hears
        assert (await engine.container_logs(cid)).count('"heartbeat"') == 3
        async with engine.attach(cid) as att:
            stream, data = await att.output.receive()     # nothing old: the next heartbeat
            assert (stream, decode_wrapper_frame(data.rstrip(b"\n"))) == (STDOUT, Heartbeat(seq=4))


async def test_a_live_restore_outage_ends_the_streams_but_not_the_containers(autojump_clock):
    async with fake_engine() as engine:
        async with engine.events(labels={"corral.supervisor": "lr"}) as events:
            cid, stack, session = await started(engine, spec())
            await session.send(RunTask(task_id="t1", prompt="!sleep 3 done"))
            assert isinstance(await session.next(), TaskStarted)
            async with trio.open_nursery() as nursery:
                waited = []

                async def wait() -> None:
                    with pytest.raises(EngineUnavailable):
                        await engine.container_wait(cid)
                    waited.append(trio.current_time())
                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                t0 = trio.current_time()
                engine.go_down(live_restore=True)
                assert await session.next() is None          # the attachment's output ended
                with pytest.raises(EngineError):
                    await session.send(Lease(ack=0))
                assert [ev.kind async for ev in events.receive] == ["started"]   # and the events'
                assert events.ended
            assert waited == [t0]                             # a wait in flight fails
            with pytest.raises(EngineUnavailable):
                await engine.container_inspect(cid)
            with pytest.raises(EngineUnavailable):
                async with engine.attach(cid):
                    pass
            await trio.sleep(5)                               # the task ends during the outage
            assert engine.containers[cid].status == "running"
            engine.come_up()
            await stack.aclose()
            assert (await engine.container_inspect(cid)).running
            async with AsyncExitStack() as stack:            # the same container, again
                session = await attached(stack, engine, cid)
                ready, replayed = await hello(session)
                assert (ready.running, ready.replay) == (None, ["t1"])
                assert replayed[-1].output == "stub-claude: done"


async def test_a_plain_outage_still_takes_the_containers_with_it(autojump_clock):
    async with fake_engine() as engine:
        cid, stack, session = await started(engine, spec())
        engine.go_down()
        assert await session.next() is None
        assert engine.containers[cid].status == "exited"
        await stack.aclose()


@pytest.mark.parametrize("policy,prompt,lives_s,status", [
    ("cancel", "!sleep 60 long", 10, "cancelled"),
    ("finish", "!sleep 60 long", 60, "ok"),
    ("cancel", None, 10, None),
])
async def test_an_orphaned_container_exits_after_its_lease(autojump_clock, policy, prompt, lives_s, status):
    async with fake_engine() as engine:
        cid, stack, session = await started(
            engine, spec(CORRAL_ORPHAN_TIMEOUT_S="10", CORRAL_ORPHAN_POLICY=policy))
        if prompt:
            await session.send(RunTask(task_id="t1", prompt=prompt))
            assert isinstance(await session.next(), TaskStarted)
        else:
            await session.send(Lease(ack=0))
        t0 = trio.current_time()                      # the last frame from a supervisor
        await stack.aclose()
        assert await engine.container_wait(cid) == 0
        assert trio.current_time() - t0 == lives_s
        logs = await engine.container_logs(cid)
        assert "orphaned: no supervisor for 10 s" in logs
        if status:
            assert f'"status":"{status}"' in logs


async def test_a_supervisor_that_comes_back_in_time_keeps_the_orphan(autojump_clock):
    async with fake_engine() as engine:
        cid, stack, session = await started(
            engine, spec(CORRAL_ORPHAN_TIMEOUT_S="10", CORRAL_ORPHAN_POLICY="finish"))
        await session.send(RunTask(task_id="t1", prompt="!sleep 30 long"))
        assert isinstance(await session.next(), TaskStarted)
        await stack.aclose()
        await trio.sleep(20)                          # orphaned at 10 s; its task runs on
        assert "orphaned" in await engine.container_logs(cid)
        async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
            session = await attached(stack, engine, cid)
            ready, _ = await hello(session)
            assert ready.running == "t1"

            async def renew() -> None:                # as a supervisor does, every heartbeat_s
                while True:
                    await trio.sleep(1)
                    await session.send(Lease(ack=0))
            nursery.start_soon(renew)
            assert (await session.expect(TaskDone)).status == "ok"
            await trio.sleep(30)
            await session.send(RunTask(task_id="t2", prompt="still here"))
            assert (await session.expect(TaskDone)).output == "stub-claude: still here"
            nursery.cancel_scope.cancel()
        assert (await engine.container_inspect(cid)).running
