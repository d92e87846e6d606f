"""corral on Docker Swarm, as a user sees it: a pool spreads over the nodes and serves; a worker
killed on either node is certified ``killed`` and comes back; when a node's engine stops, its
workers come back on the other node with ``node_lost`` certificates.

The swarm is the session's 2-node test swarm (runtime/chaoskit/swarm.py); every test has an
absolute deadline, a unique supervisor name, and leaves no service behind."""

import uuid

import pytest
import trio

from runtime import PoolSpec, SupervisorConfig, Task, WorkerSpec, open_supervisor
from runtime.engines import open_engine
from runtime.testing import wait_for_generation


@pytest.fixture
async def swarm_engine(test_swarm):
    async with open_engine(test_swarm.url) as engine:
        yield engine


@pytest.fixture
async def name(swarm_engine):
    name = "s" + uuid.uuid4().hex[:10]
    yield name
    with trio.CancelScope(shield=True), trio.move_on_after(30):
        left = await swarm_engine.container_list(labels={"corral.supervisor": name})
        for c in left:
            await swarm_engine.container_remove(c.id, force=True)
    assert left == [], f"corral left services behind: {[c.name for c in left]}"


async def nodes_of(engine, pool_info) -> dict[str, str]:
    """worker id -> the hostname of the node its container runs on"""
    return {w.id: (await engine.placement(w.container_id))[0].hostname for w in pool_info}


async def test_a_pool_spreads_over_both_nodes_serves_and_survives_docker_kill_on_each(
        test_swarm, swarm_engine, name):
    with trio.fail_after(240):
        async with open_supervisor(SupervisorConfig(name=name), engine=swarm_engine) as sup:
            pool = await sup.start_pool(PoolSpec(name="p", replicas=4,
                                                 worker=WorkerSpec(agent="claude", stub_agent=True)))
            infos = [await w.info() for w in pool.workers]
            placed = await nodes_of(swarm_engine, infos)
            assert sorted(set(placed.values())) == ["n1", "n2"], placed
            results = []
            async with trio.open_nursery() as n:
                async def one(i):
                    results.append(await pool.run(Task(prompt=f"hello {i}")))
                for i in range(8):
                    n.start_soon(one, i)
            assert sorted(r.output for r in results) == sorted(f"stub-claude: hello {i}" for i in range(8))
            assert {r.status for r in results} == {"ok"}
            # `docker kill` of one worker's container on each node, through that node's engine
            for node in ("n1", "n2"):
                w = next(w for w in pool.workers if placed[w.id] == node)
                info = await w.info()
                where, real_cid = await swarm_engine.placement(info.container_id)
                await trio.run_process(["docker", "-H", where.labels["corral.engine"], "kill", real_cid],
                                       capture_stdout=True)
                await wait_for_generation(w, info.generation + 1)
                after = await w.info()
                assert (after.last_death.cause, after.last_death.exit_code, after.last_death.reason) == \
                    ("killed", 137, "killed outside corral with SIGKILL")
                assert after.last_death.container_id == info.container_id
                assert after.container_id != info.container_id
                assert (await w.run(Task(prompt="back"))).output == "stub-claude: back"
            live = await swarm_engine.container_list(labels={"corral.supervisor": name})
            assert sorted(c.id for c in live) == sorted([(await w.info()).container_id for w in pool.workers])


async def test_the_workers_of_a_stopped_node_come_back_on_the_other_with_node_lost(
        test_swarm, swarm_engine, name):
    if getattr(test_swarm, "held", False):
        pytest.skip("needs a test swarm of its own (CORRAL_SWARM_URL is set)")
    with trio.fail_after(240):
        async with open_supervisor(SupervisorConfig(name=name), engine=swarm_engine) as sup:
            pool = await sup.start_pool(PoolSpec(name="p", replicas=4,
                                                 worker=WorkerSpec(agent="claude", stub_agent=True)))
            before = {w.id: await w.info() for w in pool.workers}
            placed = await nodes_of(swarm_engine, before.values())
            on_n2 = [w for w in pool.workers if placed[w.id] == "n2"]
            on_n1 = [w for w in pool.workers if placed[w.id] == "n1"]
            assert on_n2 and on_n1, placed
            t0 = trio.current_time()
            await test_swarm.stop_node("n2")
            try:
                for w in on_n2:
                    await wait_for_generation(w, before[w.id].generation + 1)
                back_s = trio.current_time() - t0
                for w in on_n2:
                    info = await w.info()
                    death = info.last_death
                    assert (death.cause, death.container_id, death.ready) == \
                        ("node_lost", before[w.id].container_id, True), death
                    assert death.reason.startswith("its node was lost: node n2 ("), death.reason
                    assert (await swarm_engine.placement(info.container_id))[0].hostname == "n1"
                    assert (await w.run(Task(prompt="moved"))).output == "stub-claude: moved"
                for w in on_n1:                  # untouched
                    info = await w.info()
                    assert (info.generation, info.container_id) == \
                        (before[w.id].generation, before[w.id].container_id)
                print(f"workers of the lost node serving again on n1 after {back_s:.1f} s")
            finally:
                with trio.CancelScope(shield=True):
                    await test_swarm.start_node("n2")
                    await trio.to_thread.run_sync(lambda: test_swarm.wait_nodes({"n2": "ready"}))


async def test_a_worker_s_placement_puts_its_containers_on_the_node_named(test_swarm, swarm_engine, name):
    with trio.fail_after(180):
        async with open_supervisor(SupervisorConfig(name=name), engine=swarm_engine) as sup:
            for node in ("n2", "n1"):
                w = await sup.spawn(WorkerSpec(agent="shell", placement=[f"node.hostname=={node}"]))
                info = await w.info()
                assert (await swarm_engine.placement(info.container_id))[0].hostname == node
                assert (await w.run(Task(prompt="echo placed"))).status == "ok"
                # and after a restart too
                await w.restart()
                await wait_for_generation(w, 2)
                info = await w.info()
                assert (info.generation, (await swarm_engine.placement(info.container_id))[0].hostname) \
                    == (2, node)
