import trio

from runtime import PoolSpec, RestartPolicy, Task, WorkerSpec


async def test_my_pool_keeps_every_task_under_kills(corral_supervisor, chaos, invariants):
    sup = await corral_supervisor(max_restarts=20)
    pool = await sup.start_pool(PoolSpec(name="p", replicas=3, worker=WorkerSpec(
        agent="claude", stub_agent=True, restart=RestartPolicy(max_restarts=20))))
    chaos.every(2).kill(pool="p")                  # seeded: every 2 s, a serving worker of p
    async with chaos.running(), trio.open_nursery() as n:
        for i in range(30):
            n.start_soon(pool.run, Task(prompt=f"!sleep 1 task {i}", max_attempts=3))
    await invariants.check()   # one result each, executions <= max_attempts, causes, backoff...
