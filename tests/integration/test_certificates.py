"""Death certificates say what really happened, on the real engine: `docker stop`,
`docker kill -s TERM` and `docker restart` are kills from outside corral; a SIGKILL that did not
go through the engine is said to be one; the chaos kit (what `corral chaos` runs on) counts every
death and certifies each fault with its cause."""

import os
import time

import pytest
import trio

from runtime import (Backoff, PoolSpec, RestartPolicy, SupervisorConfig, Task, WorkerSpec,
                     open_supervisor)
from runtime.testing import wait_for_generation


async def _spawn(sup):
    w = await sup.spawn(WorkerSpec(agent="claude", stub_agent=True))
    return w, (await w.info()).container_id


async def _replaced(engine, w, old_cid):
    """The worker's next generation serves; its old container is gone; the certificate."""
    await wait_for_generation(w, 2)
    info = await w.info()
    assert info.container_id != old_cid
    assert (await w.run(Task(prompt="back"))).output == "stub-claude: back"
    left = await engine.container_list(labels={"corral.worker": w.id})
    assert [c.id for c in left] == [info.container_id]
    return info.last_death


async def test_docker_stop_is_killed_not_crashed(engine, corral_name):
    with trio.fail_after(60):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            w, cid = await _spawn(sup)
            await trio.run_process(["docker", "stop", "-t", "1", cid], capture_stdout=True)
            death = await _replaced(engine, w, cid)
            assert (death.cause, death.exit_code, death.ready) == ("killed", 143, True)
            assert death.reason == "stopped outside corral (docker stop: SIGTERM)"


async def test_docker_kill_s_term_is_killed_not_crashed(engine, corral_name):
    with trio.fail_after(60):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            w, cid = await _spawn(sup)
            await engine.container_kill(cid, "SIGTERM")        # docker kill -s TERM
            death = await _replaced(engine, w, cid)
            assert (death.cause, death.exit_code) == ("killed", 143)
            assert death.reason == "killed outside corral with SIGTERM"


async def test_docker_restart_is_killed_and_corral_brings_its_own_next_generation(engine, corral_name):
    with trio.fail_after(60):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            w, cid = await _spawn(sup)
            await trio.run_process(["docker", "restart", "-t", "1", cid], capture_stdout=True)
            death = await _replaced(engine, w, cid)          # the restarted container is removed
            assert (death.cause, death.exit_code) == ("killed", 143)
            assert death.reason == "restarted outside corral (docker restart)"


async def test_docker_rm_f_is_removed_not_crashed(engine, corral_name):
    """`docker rm -f` kills, then removes, while corral removes the dead container too: the
    certificate says removed out of band, each time (on Podman both removals are answered 204,
    and the adapter has to tell corral's that it was not its doing)."""
    policy = RestartPolicy(backoff=Backoff(initial_s=0.05, max_s=0.2))
    with trio.fail_after(90):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            w = await sup.spawn(WorkerSpec(agent="claude", stub_agent=True, restart=policy))
            for generation in range(2, 7):
                cid = (await w.info()).container_id
                await trio.run_process(["docker", "rm", "-f", cid], capture_stdout=True)
                await wait_for_generation(w, generation)
                death = (await w.info()).last_death
                assert (death.cause, death.container_id, death.ready) == ("removed", cid, True), death
                assert death.reason == "the container was removed out of band"
            assert (await w.run(Task(prompt="back"))).output == "stub-claude: back"


async def test_a_host_kill_of_the_init_process_is_told_as_such(engine, corral_name):
    """`kill -9` on the host of the container's init process: no kill event through the engine,
    exit 137. The certificate says so instead of blaming the container's insides."""
    with trio.fail_after(60):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            w, cid = await _spawn(sup)
            pid = (await engine.container_inspect(cid)).pid
            assert pid > 0
            os.kill(pid, 9)
            death = await _replaced(engine, w, cid)
            assert (death.cause, death.exit_code) == ("crashed", 137)
            assert death.reason == ("exited with 137 after READY (SIGKILL, not sent through the engine "
                                    "API: a kill on the host, or a process inside the container)")


@pytest.mark.corral_engine("docker", deadline=180)
async def test_chaos_counts_every_death_by_cause(corral_supervisor, chaos, invariants):
    """The kit `corral chaos` runs on (runtime.chaoskit), through its pytest fixtures: every fault
    gets its own certificate with its cause (the invariants check it), every death is counted."""
    policy = RestartPolicy(max_restarts=1000, within_s=60,
                           backoff=Backoff(initial_s=0.05, max_s=1.0, stable_s=2.0))
    t0 = time.monotonic()
    with trio.fail_after(120):
        sup = await corral_supervisor(max_restarts=1000)
        await sup.start_pool(PoolSpec(name="chaos", replicas=2, worker=WorkerSpec(
            agent="claude", stub_agent=True, restart=policy)))
        chaos.every(0.3, jitter=0.5, until=5).any({"kill": 4, "remove": 1}, pool="chaos")
        await chaos.run_for(6)
        await invariants.check()
    assert time.monotonic() - t0 < 60
    history = chaos.harness.history
    faults, causes = history.faults_by_kind(), history.deaths_by_cause()
    assert sum(faults.values()) > 0
    assert sum(causes.values()) >= sum(faults.values())
    assert causes.get("killed", 0) >= faults.get("kill", 0)
    assert causes.get("removed", 0) >= faults.get("remove", 0)
    assert all(f.cert is not None for f in history.live_faults())
