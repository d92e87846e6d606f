"""The public handles' operations that had no test: w.restart(), sup.stop_child()."""

import pytest
import trio

from runtime import NoSuchChild, PoolSpec, SupervisorConfig, Task, WorkerGone, WorkerSpec

from .helpers import fake_supervisor


async def test_restart_replaces_the_container_gracefully_and_is_no_death(autojump_clock):
    async with fake_supervisor() as (sup, engine):
        w = await sup.spawn(WorkerSpec(id="w"))
        old = (await w.info()).container_id
        await w.restart()
        info = await w.wait_until(lambda i: i.state == "ready")
        assert (info.generation, info.restarts, info.last_death) == (2, 1, None)
        assert info.container_id != old and old not in engine.containers
        assert (await sup.snapshot()).restarts_in_window == 0     # asked for, not a failure
        assert (await w.run("after")).output == "stub-shell: after"


async def test_restart_during_a_task_redelivers_it_when_it_has_attempts(autojump_clock):
    async with fake_supervisor() as (sup, engine):
        w = await sup.spawn(WorkerSpec(id="w", stop_grace_s=1))
        async with trio.open_nursery() as n:
            results = []

            async def go(task):
                results.append(await w.run(task))
            n.start_soon(go, Task(prompt="!sleep 5 done", max_attempts=2))
            await w.wait_until(lambda i: i.state == "busy")
            await w.restart()
        # the wrapper was asked to shut down: it waited its grace, then the task was cut off
        # and ran again on the new container
        assert (results[0].status, results[0].attempts, results[0].output) == ("ok", 2, "stub-shell: done")
        assert (await w.info()).generation == 2


async def test_stop_child_stops_a_worker_a_pool_or_a_nested_supervisor(autojump_clock):
    async with fake_supervisor() as (sup, engine):
        w = await sup.spawn(WorkerSpec(id="solo"))
        await sup.start_pool(PoolSpec(name="p", replicas=2))
        nested = await sup.start_supervisor(SupervisorConfig(name="inner"))
        await nested.spawn(WorkerSpec(id="deep"))
        assert len(engine.running()) == 4
        await sup.stop_child("solo")
        assert (await w.info()).state == "stopped" and len(engine.running()) == 3
        with pytest.raises(WorkerGone):
            await w.run("too late")
        await sup.stop_child("pool:p")
        await sup.stop_child("sup:inner")
        assert engine.running() == [] and (await sup.snapshot()).children == []
        with pytest.raises(NoSuchChild) as ei:
            await sup.stop_child("nobody")
        assert "no child 'nobody'" in str(ei.value)
