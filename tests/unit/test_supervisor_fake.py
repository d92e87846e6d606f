"""Supervisor semantics on FakeEngine with the autojump clock. Restarts, escalations and chaos
run on the chaos kit's fixtures (runtime.chaoskit): unique names, faults through its monkey,
invariants checked, and teardown failing a test that leaves anything behind."""

import time

import pytest
import trio
import trio.testing

from runtime import Backoff, PoolSpec, RestartPolicy, SupervisorConfig, Task, WorkerSpec
from runtime.engines import ContainerSpec
from runtime.testing import FakeEngine, capture_logs, remove_containers, wait_for_generation

from .helpers import fake_supervisor

FAST = RestartPolicy(max_restarts=1000, within_s=60,
                     backoff=Backoff(initial_s=0.5, jitter="none", stable_s=10))


def gens(workers):
    return [w.info_nowait().generation for w in workers]


async def spawn_three(sup):
    return [await sup.spawn(WorkerSpec(id=f"w{i}", restart=FAST)) for i in range(3)]


async def test_one_for_one_restarts_only_the_dead(corral_supervisor, chaos, invariants):
    sup = await corral_supervisor(strategy="one_for_one")
    ws = await spawn_three(sup)
    await chaos.inject("kill", worker="w1")
    await wait_for_generation(ws[1], 2)
    await trio.testing.wait_all_tasks_blocked()   # settled: nothing more happens
    assert gens(ws) == [1, 2, 1]
    await invariants.check()


async def test_one_for_all_restarts_everyone(corral_supervisor, chaos, invariants):
    sup = await corral_supervisor(strategy="one_for_all")
    ws = await spawn_three(sup)
    old = {w.id: w.info_nowait().container_id for w in ws}
    await chaos.inject("kill", worker="w1")
    for w in ws:
        await wait_for_generation(w, 2)
    await trio.testing.wait_all_tasks_blocked()   # settled: nothing more happens
    assert gens(ws) == [2, 2, 2]
    assert all(w.info_nowait().container_id != old[w.id] for w in ws)
    # siblings restarted on purpose are not deaths, and count once in the intensity window
    assert (await sup.snapshot()).restarts_in_window == 1
    assert [w.info_nowait().last_death is None for w in ws] == [True, False, True]
    await invariants.check()


async def test_rest_for_one_restarts_the_dead_and_those_started_after_it(corral_supervisor, chaos, invariants):
    sup = await corral_supervisor(strategy="rest_for_one")
    ws = await spawn_three(sup)
    await chaos.inject("kill", worker="w1")
    await wait_for_generation(ws[1], 2)
    await wait_for_generation(ws[2], 2)
    await trio.testing.wait_all_tasks_blocked()   # settled: nothing more happens
    assert gens(ws) == [1, 2, 2]
    await invariants.check()


@pytest.mark.parametrize("n", [1, 3])
async def test_intensity_window_boundary(corral_supervisor, chaos, invariants, n):
    """max_restarts=N: N restarts within the window are allowed, the N+1st escalates."""
    sup = await corral_supervisor(max_restarts=n, within_s=30)
    ws = [await sup.spawn(WorkerSpec(id=f"w{i}", restart=FAST)) for i in range(n + 1)]
    for w in ws[:n]:
        await chaos.inject("kill", worker=w)
        await wait_for_generation(w, 2)
    # N restarts: still running
    assert (await sup.snapshot()).state == "running"
    await chaos.inject("kill", worker=ws[n])
    esc = await corral_supervisor.wait_escalation(sup)
    assert esc.reason == "intensity"
    assert len(esc.certificates) == n + 1
    assert all(c.cause == "killed" for c in esc.certificates)
    await invariants.check()                      # at that death, and not before


async def test_intensity_window_slides(corral_supervisor, chaos, invariants):
    sup = await corral_supervisor(max_restarts=2, within_s=10)
    w = await sup.spawn(WorkerSpec(restart=FAST))
    for gen in range(1, 6):   # one death every 11 s never fills a 10 s window
        await trio.sleep(11)
        await chaos.inject("kill", worker=w)
        await wait_for_generation(w, gen + 1)
    assert (await w.info()).restarts == 5
    await invariants.check()


async def test_transient_and_temporary_restart_types(corral_engine, corral_supervisor, invariants):
    engine = corral_engine
    sup = await corral_supervisor()
    tr = await sup.spawn(WorkerSpec(id="tr", restart=RestartPolicy(restart="transient")))
    tm = await sup.spawn(WorkerSpec(id="tm", restart=RestartPolicy(restart="temporary")))
    engine.crash(engine.container_of("tr").id, 3)       # abnormal: transient restarts
    await wait_for_generation(tr, 2)
    engine.crash(engine.container_of("tr").id, 0)       # normal exit: transient stays down
    await tr.wait_finished()
    assert tr.state == "stopped"
    engine.crash(engine.container_of("tm").id, 3)       # temporary: never restarted
    await tm.wait_finished()
    assert tm.state == "stopped" and engine.stats["creates"] == 3
    await trio.testing.wait_all_tasks_blocked()
    assert (await sup.snapshot()).children == []
    await invariants.check()                      # restarted, done and done as the types say


async def test_nested_escalation_reaches_the_top(corral_engine, corral_supervisor, chaos, invariants):
    sup = await corral_supervisor()
    inner = await sup.start_supervisor(SupervisorConfig(name="inner", max_restarts=0))
    await inner.spawn(WorkerSpec(id="deep", restart=FAST))
    assert corral_engine.container_of("deep").labels["corral.supervisor"] == sup.name
    await chaos.inject("kill", worker="deep")
    esc = await corral_supervisor.wait_escalation(sup)
    assert "inner" in str(esc) and esc.certificates[0].worker_id == "deep"
    # nothing is left behind
    assert not corral_engine.containers
    await invariants.check()


async def test_shutdown_stops_children_in_reverse_start_order(autojump_clock):
    with capture_logs() as logs:
        async with fake_supervisor() as (sup, engine):
            for i in range(4):
                await sup.spawn(WorkerSpec(id=f"w{i}"))
    stopped = [e["worker_id"] for e in logs if e["event"] == "worker_state" and e["state"] == "stopped"]
    assert stopped == ["w3", "w2", "w1", "w0"]
    assert not engine.containers


async def test_leaving_by_exception_or_cancellation_removes_every_container(autojump_clock):
    async with FakeEngine() as engine:
        from runtime import open_supervisor
        with pytest.raises(KeyError):
            async with open_supervisor(SupervisorConfig(name="t"), engine=engine) as sup:
                await sup.spawn(WorkerSpec())
                raise KeyError("boom")
        assert not engine.containers
        with trio.move_on_after(5):
            async with open_supervisor(SupervisorConfig(name="t"), engine=engine) as sup:
                await sup.spawn(WorkerSpec())
                await trio.sleep_forever()
        assert not engine.containers


async def test_global_cap_on_concurrent_starts(autojump_clock):
    cfg = SupervisorConfig(name="t", max_concurrent_starts=2)
    async with fake_supervisor(cfg, start_delay=1.0) as (sup, engine):
        t0 = trio.current_time()
        async with trio.open_nursery() as n:
            for i in range(6):
                n.start_soon(sup.spawn, WorkerSpec(id=f"w{i}"))
        assert trio.current_time() - t0 == 3.0
        assert engine.stats["max_starting"] == 2


async def test_an_engine_that_stays_away_escalates_once_after_engine_outage_s(corral_engine, corral_supervisor,
                                                                              invariants):
    """The engine goes away for good: the workers wait in engine_down (no restart counted, no
    shared cause), and only after engine_outage_s does the supervisor escalate, once. Its
    containers are left: nothing could remove them while the engine was away."""
    with capture_logs() as logs:
        sup = await corral_supervisor(shared_cause_threshold=3, shared_cause_window_s=5, engine_outage_s=42)
        for i in range(5):
            await sup.spawn(WorkerSpec(id=f"w{i}", restart=FAST))
        corral_engine.go_down()
        await trio.sleep(41.9)
        assert {w.info_nowait().state for w in sup.workers()} == {"engine_down"}
        esc = await corral_supervisor.wait_escalation(sup)
    assert esc.reason == "engine_unavailable"
    assert {c.cause for c in esc.certificates} == {"engine_unavailable"}
    assert len([e for e in logs if e["event"] == "supervisor_escalated"]) == 1
    assert not [e for e in logs if e["event"] == "worker_died" and e["cause"] == "engine_error"]
    await invariants.check()                      # engine_unavailable, at the first such death
    corral_engine.come_up()
    left = await corral_engine.container_list(labels={"corral.supervisor": sup.name})
    assert sorted(c.name for c in left) == [f"corral-{sup.name}-w{i}-1" for i in range(5)]
    await remove_containers(corral_engine, sup.name)


async def test_shared_cause_gives_one_escalation(corral_engine, corral_supervisor, invariants):
    """Engine errors that are not an outage (the engine answers, with errors) on several
    workers at once: one escalation, shared_cause."""
    with capture_logs() as logs:
        sup = await corral_supervisor(shared_cause_threshold=3, shared_cause_window_s=5)
        for i in range(5):
            await sup.spawn(WorkerSpec(id=f"w{i}", restart=FAST))
        corral_engine.fail_next_creates(100)
        for c in list(corral_engine.running()):
            corral_engine.crash(c.id)
        esc = await corral_supervisor.wait_escalation(sup)
    assert esc.reason == "shared_cause"
    assert {c.cause for c in esc.certificates} == {"engine_error"}
    assert len([e for e in logs if e["event"] == "supervisor_escalated"]) == 1
    await invariants.check()                      # at the third engine_error, as the config says


async def test_restart_storm_of_10000(corral_engine, corral_supervisor):
    policy = RestartPolicy(max_restarts=100_000, within_s=1,
                           backoff=Backoff(initial_s=0.001, max_s=0.01, jitter="full", stable_s=0.5))
    t_real = time.perf_counter()
    sup = await corral_supervisor(max_restarts=100_000, within_s=1)
    ws = [await sup.spawn(WorkerSpec(id=f"w{i}", restart=policy)) for i in range(10)]
    for round_ in range(1000):
        for w in ws:          # (by hand: the monkey records each fault, for the invariants)
            corral_engine.kill(corral_engine.container_of(w.id).id)
        for w in ws:
            await wait_for_generation(w, round_ + 2)
    assert sum(w.info_nowait().restarts for w in ws) == 10_000
    print(f"10,000 restarts in {time.perf_counter() - t_real:.1f} s real time")


async def test_pool_dispatches_to_idle_workers_and_redelivers(corral_supervisor, chaos, invariants):
    sup = await corral_supervisor()
    pool = await sup.start_pool(PoolSpec(name="p", worker=WorkerSpec(restart=FAST), replicas=3))
    results = {}

    async def one(i):
        results[i] = await pool.run(Task(prompt=f"!sleep 1 task-{i}", max_attempts=2))

    chaos.at(2.5).kill(worker="p-2")               # busy then: its task is redelivered
    t0 = trio.current_time()
    async with chaos.running(), trio.open_nursery() as n:
        for i in range(30):
            n.start_soon(one, i)
    assert sorted(results) == list(range(30))
    assert all(r.status == "ok" for r in results.values())
    assert sorted(r.output for r in results.values()) == sorted(f"stub-shell: task-{i}" for i in range(30))
    assert sum(r.attempts for r in results.values()) == 31
    assert trio.current_time() - t0 <= 11
    assert [(f.t - (t0 - chaos.harness.history.t0), f.worker_id) for f in chaos.harness.history.live_faults()] \
        == [(2.5, "p-2")]
    await invariants.check()                      # one result each, executions <= max_attempts


async def test_pool_backpressure_and_scale(autojump_clock):
    async with fake_supervisor() as (sup, engine):
        pool = await sup.start_pool(PoolSpec(name="p", replicas=1, queue_size=2))
        async with trio.open_nursery() as n:
            for i in range(5):
                n.start_soon(pool.run, Task(prompt="!sleep 10"))
            await trio.sleep(1)
            # one running, two queued, two callers held back by the bounded queue
            assert pool.statistics().current_buffer_used == 2
            assert pool.statistics().tasks_waiting_send == 2
            await pool.scale(5)
            assert len(pool.workers) == 5
            t0 = trio.current_time()
        assert trio.current_time() - t0 <= 10
        await pool.scale(2)
        assert len(pool.workers) == 2 and len(engine.running()) == 2


async def test_snapshot_is_a_typed_tree(autojump_clock):
    async with fake_supervisor() as (sup, engine):
        w = await sup.spawn(WorkerSpec(id="solo", restart=FAST))
        await sup.start_pool(PoolSpec(name="p", replicas=2))
        inner = await sup.start_supervisor(SupervisorConfig(name="inner"))
        await inner.spawn(WorkerSpec(id="deep"))
        engine.kill(engine.container_of("solo").id)
        await wait_for_generation(w, 2)
        snap = await sup.snapshot()
        import msgspec
        data = msgspec.json.decode(msgspec.json.encode(snap))
        assert [c["type"] for c in data["children"]] == ["worker", "pool", "supervisor"]
        solo = snap.children[0]
        assert solo.info.generation == 2 and solo.info.restarts == 1
        assert solo.deaths[0].cause == "killed"
        assert [x.info.id for x in snap.children[1].workers] == ["p-1", "p-2"]
        assert snap.children[2].children[0].info.id == "deep"


async def test_state_changes_are_logged_with_context(autojump_clock):
    with capture_logs() as logs:
        async with fake_supervisor() as (sup, engine):
            w = await sup.spawn(WorkerSpec(id="ctx"))
    ready = [e for e in logs if e["event"] == "worker_state" and e["state"] == "ready"][0]
    assert ready["worker_id"] == "ctx" and ready["generation"] == 1 and ready["container_id"]


async def test_leftovers_of_a_dead_instance_are_reaped_a_live_one_is_adopted_or_swept(autojump_clock):
    """With the instance lock held, the previous instance is gone: its containers that no longer
    run are removed at once; a running one waits for its worker to adopt it, and one that no
    worker claimed is removed when the supervisor stops. Another name's containers: untouched."""
    async with FakeEngine() as engine:
        image = engine.add_image("corral/worker-shell:old")
        dead = await engine.container_create(ContainerSpec(
            image=image, name="corral-t-w-old-1", labels={"corral.supervisor": "t"}))
        live = await engine.container_create(ContainerSpec(
            image=image, name="corral-t-other-1", env={"CORRAL_WORKER_ID": "other"},
            labels={"corral.supervisor": "t", "corral.worker": "other"}, stdin_once=False))
        async with engine.attach(live):
            await engine.container_start(live)
        mine = await engine.container_create(ContainerSpec(
            image=image, name="not-ours", labels={"corral.supervisor": "u"}))
        from runtime import open_supervisor
        async with open_supervisor(SupervisorConfig(name="t"), engine=engine):
            assert dead not in engine.containers                  # reaped at once
            assert engine.containers[live].status == "running"    # left for worker "other"
        assert live not in engine.containers                      # unclaimed: swept at the end
        assert mine in engine.containers                          # another supervisor's: untouched
