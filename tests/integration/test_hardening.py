"""Hardening on the real engine: bad tasks fail alone, limits hold."""

import trio

from runtime import (Backoff, PoolSpec, RestartPolicy, SupervisorConfig, Task, WorkerSpec,
                     open_supervisor)


async def test_poison_tasks_fail_alone_and_the_tree_stays_up(engine, corral_name):
    """Four tasks that each kill their wrapper, three attempts each: twelve deaths, with a
    supervisor allowing 2 restarts. Each task fails alone, marked poison; nothing escalates."""
    policy = RestartPolicy(max_restarts=2, within_s=60, backoff=Backoff(initial_s=0.05, max_s=0.2))
    with trio.fail_after(180):
        async with open_supervisor(SupervisorConfig(name=corral_name, max_restarts=2), engine=engine) as sup:
            bystander = await sup.spawn(WorkerSpec(id="bystander", agent="shell"))
            pool = await sup.start_pool(PoolSpec(name="p", replicas=2, worker=WorkerSpec(
                agent="claude", stub_agent=True, restart=policy)))
            results = []

            async def poison(i):
                results.append(await pool.run(Task(prompt="!crash-wrapper", max_attempts=3)))
            async with trio.open_nursery() as n:
                for i in range(4):
                    n.start_soon(poison, i)
            assert [(r.status, r.attempts, r.poison) for r in results] == [("worker_died", 3, True)] * 4
            snap = await sup.snapshot()
            assert snap.state == "running" and snap.restarts_in_window == 0
            assert sum(w.deaths_by_cause.get("crashed", 0) for w in snap.children[1].workers) == 12
            assert (await bystander.info()).generation == 1
            assert (await pool.run(Task(prompt="still here"))).output == "stub-claude: still here"


async def test_disk_limit_fails_the_writing_task_not_the_worker(engine, corral_name):
    with trio.fail_after(120):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            w = await sup.spawn(WorkerSpec(agent="shell", disk=32 << 20, memory=256 << 20))
            r = await w.run(Task(prompt="head -c 64m /dev/zero > /workspace/big"))
            assert r.status == "error" and "No space left on device" in r.error
            r = await w.run(Task(prompt="head -c 64m /dev/zero > /tmp/big"))
            assert r.status == "error" and "No space left on device" in r.error
            r = await w.run(Task(prompt="rm -f /workspace/big /tmp/big; df -k /workspace | tail -1"))
            assert r.status == "ok" and r.output.split()[1] == str(32 * 1024)
            info = await w.info()
            assert (info.generation, info.restarts) == (1, 0)
