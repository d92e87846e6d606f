"""one_for_all and rest_for_one exactly as OTP's supervisor.erl: the affected children are
stopped in reverse start order, then started again in start order, each READY before the next
starts; a group restart counts once in the intensity window; pools and nested supervisors are
children like any other. FakeEngine, autojump clock: every time below is exact. On the chaos
kit's fixtures (runtime.chaoskit), with its invariants checked after each group restart."""

import pytest
import trio

from runtime import PoolSpec, SupervisorConfig, WorkerSpec

START = 1.0          # each container start takes 1 s (virtual): order shows in the times

pytestmark = pytest.mark.corral_engine("fake", start_delay=START)


async def record(engine, sup, log, *, task_status=trio.TASK_STATUS_IGNORED):
    async with engine.events(labels={"corral.supervisor": sup.name}, kinds=["started", "removed"]) as es:
        task_status.started()
        async for ev in es.receive:
            log.append((round(trio.current_time(), 6), ev.kind, ev.worker_id, ev.generation))


async def test_rest_for_one_stops_in_reverse_and_starts_in_order(corral_engine, corral_supervisor, chaos,
                                                                invariants):
    sup = await corral_supervisor(strategy="rest_for_one")
    ws = [await sup.spawn(WorkerSpec(id=i)) for i in "abcd"]
    log = []
    async with trio.open_nursery() as n:
        await n.start(record, corral_engine, sup, log)
        t0 = trio.current_time()
        await chaos.inject("kill", worker="b")
        await ws[3].wait_until(lambda i: i.generation == 2 and i.state == "ready")
        n.cancel_scope.cancel()
    rel = [(round(t - t0, 6), what, w, g) for t, what, w, g in log]
    assert rel == [
        (0.0, "removed", "b", 1),            # the dead one, removed by its worker
        (0.0, "removed", "d", 1),            # then the rest in reverse start order
        (0.0, "removed", "c", 1),
        (1.0, "started", "b", 2),              # then in start order, each READY first
        (2.0, "started", "c", 2),
        (3.0, "started", "d", 2),
    ]
    assert (await ws[0].info()).generation == 1
    snap = await sup.snapshot()
    assert snap.restarts_in_window == 1      # the group restart counts once
    assert [c.info.restarts for c in snap.children] == [0, 1, 1, 1]
    await invariants.check()


async def test_one_for_all_includes_pools_and_nested_supervisors(corral_engine, corral_supervisor, chaos,
                                                                 invariants):
    sup = await corral_supervisor(strategy="one_for_all")
    first = await sup.spawn(WorkerSpec(id="first"))
    pool = await sup.start_pool(PoolSpec(name="p", replicas=2))
    nested = await sup.start_supervisor(SupervisorConfig(name="inner"))
    inner = await nested.spawn(WorkerSpec(id="inner"))
    last = await sup.spawn(WorkerSpec(id="last"))
    log = []
    async with trio.open_nursery() as n:
        await n.start(record, corral_engine, sup, log)
        t0 = trio.current_time()
        await chaos.inject("kill", worker=last)
        await last.wait_until(lambda i: i.generation == 2 and i.state == "ready")
        n.cancel_scope.cancel()
    rel = [(round(t - t0, 6), what, w) for t, what, w, g in log]
    destroys = [w for _, what, w in rel if what == "removed"]
    assert destroys[:2] == ["last", "inner"] and sorted(destroys[2:4]) == ["p-1", "p-2"] \
        and destroys[4:] == ["first"]
    starts = sorted((t, w) for t, what, w in rel if what == "started")
    assert starts == [(1.0, "first"), (2.0, "p-1"), (2.0, "p-2"), (3.0, "inner"), (4.0, "last")]
    for h in (first, inner, last, *pool.workers):
        assert (await h.info()).generation == 2
    assert (await sup.snapshot()).restarts_in_window == 1
    assert (await nested.snapshot()).restarts_in_window == 0
    await invariants.check()


async def test_a_death_the_group_restart_covers_is_absorbed_as_in_otp(corral_supervisor, chaos, invariants):
    """c dies, then a (still to be restarted by c's group restart) dies too: as in OTP, where the
    second EXIT comes from a process the group restart already replaced, one group restart
    covers both and counts once."""
    sup = await corral_supervisor(strategy="one_for_all", max_restarts=10)
    ws = [await sup.spawn(WorkerSpec(id=i)) for i in "abc"]
    await chaos.inject("kill", worker="c")
    await chaos.inject("kill", worker="a")     # at once: c's group restart has not taken a yet
    for w in ws:
        await w.wait_until(lambda i: i.generation >= 2 and i.state == "ready")
    await trio.sleep(10)
    infos = [await w.info() for w in ws]
    assert [(i.state, i.generation) for i in infos] == [("ready", 2)] * 3
    assert (await sup.snapshot()).restarts_in_window == 1
    await invariants.check()                   # the absorbed death is not counted


async def test_a_death_after_its_restart_is_a_new_group_restart_never_lost(corral_supervisor, chaos,
                                                                          invariants):
    """a is already READY again while the group restart goes on (b is starting) and dies again:
    that restart request is not lost: a second group restart follows the first."""
    sup = await corral_supervisor(strategy="one_for_all", max_restarts=10)
    ws = [await sup.spawn(WorkerSpec(id=i)) for i in "abc"]
    await chaos.inject("kill", worker="c")
    await ws[0].wait_until(lambda i: i.generation == 2 and i.state == "ready")
    b = await ws[1].info()
    assert b.state in ("held", "creating", "starting") and b.generation <= 2   # not yet READY
    assert await chaos.inject("kill", worker="a") is not None   # a serves: no longer group-pending
    await ws[2].wait_until(lambda i: i.generation == 3 and i.state == "ready")
    await trio.sleep(10)
    infos = [await w.info() for w in ws]
    assert [(i.state, i.generation) for i in infos] == [("ready", 3)] * 3
    assert (await sup.snapshot()).restarts_in_window == 2
    await invariants.check()
