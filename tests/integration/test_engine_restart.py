"""corral under a restart of its engine (issue 12, part 4 "The engine may restart"): dockerd is
restarted under load with live-restore, on a private dockerd the test may restart
(runtime.chaoskit.dockerd, the ``private_docker`` fixture). The containers survive the restart;
corral must not blame the workers: no worker restarts, the same containers serve on, and every
task has exactly one result."""

import uuid

import pytest
import trio

from runtime import PoolSpec, SupervisorConfig, Task, WorkerSpec, open_supervisor

pytestmark = [pytest.mark.chaos]


async def test_a_pool_keeps_its_workers_and_every_task_across_a_dockerd_restart(private_docker):
    name = "t" + uuid.uuid4().hex[:10]
    tasks = [Task(prompt=f"sleep 2; echo slept {i}" if i % 3 == 0 else f"sleep 0.3; echo task {i}")
             for i in range(12)]
    results: dict[str, list] = {t.task_id: [] for t in tasks}

    async def run(pool, task):
        try:
            results[task.task_id].append(await pool.run(task))
        except Exception as exc:      # an answer all the same (PoolStopped, ...): counted, and wrong
            results[task.task_id].append(exc)

    with trio.fail_after(240):
        async with open_supervisor(SupervisorConfig(name=name, engine_url=private_docker.url,
                                                    engine_outage_s=60)) as sup:
            pool = await sup.start_pool(PoolSpec(name="p", replicas=3, worker=WorkerSpec(agent="shell")))
            before = {w.id: await w.info() for w in pool.workers}
            assert len(before) == 3 and all(i.generation == 1 for i in before.values())
            async with trio.open_nursery() as n:
                for t in tasks:
                    n.start_soon(run, pool, t)
                # the restart in the middle: every worker busy, the 2 s sleeps in flight
                await pool.workers[0].wait_until(lambda i: i.state == "busy")
                await trio.sleep(0.5)
                await private_docker.restart()
            after = {w.id: await w.info() for w in pool.workers}

        left = await _containers_of(private_docker, name)

    answers = {tid: [r.status if not isinstance(r, Exception) else repr(r) for r in rs]
               for tid, rs in results.items()}
    assert all(len(rs) == 1 for rs in results.values()), answers
    assert all(a == ["ok"] for a in answers.values()), answers
    assert sorted(rs[0].output for rs in results.values()) == sorted(
        f"slept {i}\n" if i % 3 == 0 else f"task {i}\n" for i in range(12))
    assert {w: (i.container_id, i.generation, i.restarts) for w, i in after.items()} == \
           {w: (i.container_id, 1, 0) for w, i in before.items()}
    assert left == []


async def _containers_of(private_docker, name: str) -> list[str]:
    from runtime.engines import open_engine
    async with open_engine(private_docker.url) as engine:
        return [c.name for c in await engine.container_list(labels={"corral.supervisor": name})]
