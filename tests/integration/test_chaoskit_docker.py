"""The chaos kit's fixtures on the real engine: a unique supervisor name, a seeded monkey that
`docker kill`s, `docker rm -f`s and crashes wrappers from inside, the invariants, and cleanup by
label (teardown fails the test if anything is left)."""

import pytest
import trio

from runtime import Backoff, PoolSpec, RestartPolicy, Task, WorkerSpec
from runtime.engines.fake import FakeEngine

pytestmark = [pytest.mark.chaos, pytest.mark.corral_engine("docker", deadline=240)]

POLICY = RestartPolicy(max_restarts=50, within_s=60, backoff=Backoff(initial_s=0.05, max_s=0.5, stable_s=2.0))


async def test_a_pool_under_fire_on_docker_keeps_its_invariants(corral_engine, corral_supervisor, chaos,
                                                               invariants):
    assert not isinstance(corral_engine, FakeEngine)
    with trio.fail_after(180):
        sup = await corral_supervisor(max_restarts=50)
        assert sup.name.startswith("t-") and len(sup.name) == 12          # t-<10 hex>: unique
        pool = await sup.start_pool(PoolSpec(name="p", replicas=2, worker=WorkerSpec(
            agent="claude", stub_agent=True, restart=POLICY)))
        chaos.every(1.5, until=6).any({"kill": 2.0, "remove": 1.0}, pool="p")
        chaos.at(2.2).crash_wrapper(pool="p")
        async with chaos.running(), trio.open_nursery() as n:
            for i in range(12):
                n.start_soon(pool.run, Task(prompt=f"!sleep 0.5 task {i}", max_attempts=5))
            await trio.sleep(7)
        await invariants.check()
    faults = chaos.harness.history.live_faults()
    assert len(faults) >= 3 and "crash_wrapper" in {f.kind for f in faults}
    assert [(f.kind, f.cert.cause) for f in faults] == [(f.kind, {"kill": "killed", "remove": "removed",
                                                                  "crash_wrapper": "crashed"}[f.kind])
                                                        for f in faults]
    assert all(r.results and r.results[0][1].status == "ok" for r in chaos.harness.history.tasks.values())
