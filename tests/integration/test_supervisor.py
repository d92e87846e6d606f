"""Supervision against the real engine: strategies, escalation, pools under chaos. The restart
tests run on the chaos kit's fixtures with the docker engine (runtime.chaoskit: unique names,
cleanup by label, faults through its monkey, invariants checked)."""

import pytest
import trio

from runtime import (Backoff, PoolSpec, RestartPolicy, SupervisorConfig, Task, WorkerSpec,
                     WorkerStartupError, open_supervisor)
from runtime.errors import WorkerGone
from runtime.testing import wait_for_generation

pytestmark = pytest.mark.chaos


@pytest.mark.corral_engine("docker", deadline=180)
async def test_one_for_all_group_of_three(corral_engine, corral_supervisor, chaos, invariants):
    with trio.fail_after(120):
        sup = await corral_supervisor(strategy="one_for_all")
        ws = [await sup.spawn(WorkerSpec(id=f"g{i}", agent="shell")) for i in range(3)]
        before = {w.id: (await w.info()).container_id for w in ws}
        await chaos.inject("kill", worker="g1")
        for w in ws:
            await wait_for_generation(w, 2)
        for w in ws:
            info = await w.info()
            assert info.generation == 2 and info.container_id != before[w.id]
            assert (await w.run(Task(prompt="echo ok"))).output == "ok\n"
        running = await corral_engine.container_list(labels={"corral.supervisor": sup.name}, all=False)
        assert len(running) == 3
        await invariants.check()


@pytest.mark.corral_engine("docker", deadline=180)
async def test_wrapper_killed_after_every_ready_escalates_with_certificates(corral_supervisor, chaos, invariants):
    policy = RestartPolicy(max_restarts=3, within_s=60, backoff=Backoff(initial_s=0.05, max_s=0.2))
    faults = []

    async def crash_every_ready(w):
        gen = 1
        while True:
            try:
                info = await w.wait_until(lambda i, g=gen: i.generation >= g and i.state == "ready")
            except WorkerGone:
                return                   # it gave up: its supervisor escalates
            # kill the wrapper from inside while it is idle (a death charged to no task:
            # a task that kills its wrapper is a poison task and never escalates)
            faults.append(await chaos.inject("crash_wrapper", worker=w))
            gen = info.generation + 1

    with trio.fail_after(120):
        sup = await corral_supervisor()
        w = await sup.spawn(WorkerSpec(id="doomed", agent="claude", stub_agent=True, restart=policy))
        async with trio.open_nursery() as n:
            n.start_soon(crash_every_ready, w)
            esc = await corral_supervisor.wait_escalation(sup)
            n.cancel_scope.cancel()
        await invariants.check()         # it gave up, and its supervisor escalated, exactly then
    assert esc.reason == "child_failed" and len(faults) == 4 and None not in faults
    assert [c.cause for c in esc.certificates] == ["crashed"] * 4
    assert [c.generation for c in esc.certificates] == [1, 2, 3, 4]
    assert esc.certificates[-1].restart_in_s is None and all(c.ready for c in esc.certificates)
    assert [f.cert for f in faults] == esc.certificates


async def test_startup_config_error_is_reported_at_once_not_a_crash_loop(engine, corral_name):
    with trio.fail_after(60):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            with pytest.raises(WorkerStartupError) as ei:
                await sup.spawn(WorkerSpec(agent="shell", required_env=["OPENAI_API_KEY"]))
            assert ei.value.certificate.cause == "config_error"
            assert "OPENAI_API_KEY" in ei.value.certificate.reason
            # the supervisor is unharmed and still serves
            w = await sup.spawn(WorkerSpec(agent="shell"))
            assert (await w.run(Task(prompt="echo fine"))).output == "fine\n"


@pytest.mark.corral_engine("docker", deadline=240)
async def test_pool_of_three_completes_30_tasks_while_one_worker_is_killed(corral_supervisor, chaos, invariants):
    with trio.fail_after(180):
        sup = await corral_supervisor()
        pool = await sup.start_pool(PoolSpec(name="p", replicas=3,
                                             worker=WorkerSpec(agent="claude", stub_agent=True)))
        results: dict[int, list] = {i: [] for i in range(30)}

        async def one(i):
            r = await pool.run(Task(prompt=f"!sleep 0.3 task {i}", max_attempts=3))
            results[i].append(r)

        async with trio.open_nursery() as n:
            for i in range(30):
                n.start_soon(one, i)
            victim = pool.workers[1]
            # kill it while it runs a task (0.3 s each): exactly one task is redelivered
            await victim.wait_until(lambda i: i.state == "busy")
            assert await chaos.inject("kill", worker=victim) is not None
        assert all(len(rs) == 1 for rs in results.values())
        assert all(rs[0].status == "ok" for rs in results.values())
        assert sorted(rs[0].output for rs in results.values()) == sorted(
            f"stub-claude: task {i}" for i in range(30))
        assert (await victim.info()).generation == 2
        assert sum(rs[0].attempts for rs in results.values()) == 31
        await invariants.check()         # executions counted inside the containers: 31, each <= 3


@pytest.mark.corral_engine("docker", deadline=180)
async def test_nested_supervisor_and_snapshot(corral_supervisor, chaos, invariants):
    with trio.fail_after(120):
        sup = await corral_supervisor()
        inner = await sup.start_supervisor(SupervisorConfig(name="inner", strategy="one_for_all"))
        a = await inner.spawn(WorkerSpec(id="a"))
        await inner.spawn(WorkerSpec(id="b"))
        await chaos.inject("kill", worker=a)
        await wait_for_generation(a, 2)
        snap = await sup.snapshot()
        inner_snap = snap.children[0]
        assert inner_snap.name == "inner" and [c.info.id for c in inner_snap.children] == ["a", "b"]
        assert inner_snap.children[0].deaths[0].cause == "killed"
        await invariants.check()


async def test_more_than_100_attached_workers(engine, corral_name):
    """Each READY worker holds one engine connection; the 101st must not wait for a free one."""
    with trio.fail_after(240):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            pool = await sup.start_pool(PoolSpec(name="big", replicas=105, worker=WorkerSpec(agent="shell")))
            assert len(pool.workers) == 105
            assert all(w.state == "ready" for w in pool.workers)
            r = await pool.run(Task(prompt="echo 105"))
            assert r.output == "105\n"
