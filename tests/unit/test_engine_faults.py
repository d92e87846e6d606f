"""What the engine did, on FakeEngine with the autojump clock: `docker stop`, `docker kill -s TERM`
and `docker restart` are kills from outside, and when the engine itself stops or freezes the
workers are not blamed. On the chaos kit's fixtures (runtime.chaoskit): the faults it knows go
through its monkey, and every test ends by checking its invariants."""

import pytest
import trio

from actors.watcher import SETTLE_S
from runtime import Backoff, RestartPolicy, Task, WorkerSpec
from runtime.testing import capture_logs, wait_for_generation

NOJITTER = Backoff(initial_s=0.5, factor=2.0, max_s=4.0, jitter="none", stable_s=10.0)
PATIENT = RestartPolicy(max_restarts=1000, within_s=60, backoff=NOJITTER)


async def _first_death(w):
    return (await w.wait_until(lambda i: i.last_death is not None)).last_death


@pytest.mark.parametrize("how,reason,after_s", [
    ("stop", "stopped outside corral (docker stop: SIGTERM)", SETTLE_S),
    ("kill_term", "killed outside corral with SIGTERM", SETTLE_S),
    ("restart", "restarted outside corral (docker restart)", 0.3),
])
async def test_outside_stop_kill_and_restart_are_killed(corral_engine, corral_supervisor, chaos, invariants,
                                                        how, reason, after_s):
    """A stop signal from outside could be a docker stop, a docker restart or the engine shutting
    down: corral gives the engine SETTLE_S to show which (a restart shows at once)."""
    engine = corral_engine
    sup = await corral_supervisor()
    w = await sup.spawn(WorkerSpec(restart=PATIENT))
    old = engine.container_of(w.id).id
    t0 = trio.current_time()
    if how == "stop":
        await chaos.inject("stop", worker=w)
    elif how == "kill_term":
        await engine.container_kill(old, "SIGTERM")
    else:
        engine.restart(old, after_s=0.3)
    death = await _first_death(w)
    assert (death.cause, death.reason, death.exit_code) == ("killed", reason, 143)
    assert trio.current_time() - t0 == after_s
    await wait_for_generation(w, 2)       # replaced by corral's own next generation
    assert old not in engine.containers and engine.container_of(w.id).id != old
    assert (await w.run(Task(prompt="back"))).status == "ok"
    await invariants.check()


async def test_docker_kill_is_still_certified_at_once(corral_supervisor, chaos, invariants):
    sup = await corral_supervisor()
    w = await sup.spawn(WorkerSpec(restart=PATIENT))
    t0 = trio.current_time()
    fault = await chaos.inject("kill", worker=w)
    death = await _first_death(w)
    assert (death.cause, death.reason) == ("killed", "killed outside corral with SIGKILL")
    assert trio.current_time() - t0 == 0
    assert fault.cert == death and fault.cert_at == fault.t
    await invariants.check()


async def test_engine_shutdown_is_an_engine_error_not_the_workers(corral_engine, corral_supervisor, chaos,
                                                                  invariants):
    """dockerd stopping stops its containers as `docker stop` would (SIGTERM, exit 143, stop
    events), answers a little longer, then goes: the workers wait (engine_down); once it is
    back, the certificate blames the engine."""
    sup = await corral_supervisor(max_restarts=1000, within_s=60)
    ws = [await sup.spawn(WorkerSpec(id=f"w{i}", restart=PATIENT)) for i in range(2)]
    await chaos.inject("stop_engine")                 # FakeEngine.shut_down(): linger_s=0.5
    await trio.sleep(10)
    # nothing is certified while the engine is away (its events will say what happened)
    assert [(w.info_nowait().state, w.snapshot_nowait().deaths) for w in ws] == [("engine_down", [])] * 2
    corral_engine.come_up()
    for w in ws:
        await _first_death(w)
    for d in [w.snapshot_nowait().deaths[0] for w in ws]:
        assert (d.cause, d.exit_code) == ("engine_error", 143)
        assert d.reason == ("the engine went away (the container exited with 143): cannot reach "
                            "the Docker engine at fake://: fake engine is down")
    for w in ws:                                 # back once the engine is
        await w.wait_until(lambda i: i.state == "ready")
        assert (await w.run(Task(prompt="back"))).status == "ok"
    await invariants.check()                     # each worker's death certified engine_error


async def test_a_frozen_engine_does_not_make_workers_hung(corral_engine, corral_supervisor, invariants):
    """dockerd stopped for 20 s: no heartbeat reaches corral, and no call is answered. The
    workers are not declared hung (nor replaced); they serve again once the engine does."""
    engine = corral_engine
    sup = await corral_supervisor()
    ws = [await sup.spawn(WorkerSpec(id=f"w{i}", heartbeat_s=1, heartbeat_timeout_s=5, restart=PATIENT))
          for i in range(2)]
    cids = [engine.container_of(w.id).id for w in ws]
    with capture_logs() as logs:
        engine.freeze()
        await trio.sleep(20)
        engine.thaw()
        await trio.sleep(10)
    assert [e["event"] for e in logs if e["event"] in ("heartbeat_missed", "worker_died")] == []
    assert {e["worker_id"] for e in logs if e["event"] == "engine_unresponsive"} == {"w0", "w1"}
    for w, cid in zip(ws, cids):
        info = await w.info()
        assert (info.generation, info.container_id, info.last_death) == (1, cid, None)
        assert (await w.run(Task(prompt="still here"))).status == "ok"
    await invariants.check()


async def test_an_engine_that_goes_away_as_a_new_container_is_attached_costs_no_death(
        autojump_clock, monkeypatch):
    """The engine went away between a restart's create and its first attach (a dockerd that is
    shutting down still answers on the connections it has, and refuses new ones: corral chaos
    --restart-engine): the worker waits for the engine and attaches then. (The attach's error
    reached the worker wrapped in an ExceptionGroup: the worker crashed and its supervisor
    escalated; unwrapped, it was a death per attempt, a new generation each, until the engine
    was back.)"""
    from contextlib import asynccontextmanager

    from runtime.errors import EngineUnavailable
    from runtime.testing import FakeEngine, capture_logs, wait_for_generation

    from .helpers import fake_supervisor

    async with fake_supervisor() as (sup, engine):
        w = await sup.spawn(WorkerSpec(restart=PATIENT))
        attach, failures = FakeEngine.attach, [EngineUnavailable("fake: the engine went away")]

        @asynccontextmanager
        async def flaky_attach(self, cid):
            if failures:
                raise failures.pop()
            async with attach(self, cid) as att:
                yield att
        monkeypatch.setattr(FakeEngine, "attach", flaky_attach)
        with capture_logs() as logs:
            engine.kill(engine.container_of(w.id).id)
            await wait_for_generation(w, 2)
            await trio.sleep(5)
        assert failures == []
        assert [d.cause for d in sup._sup.all_workers()[0].deaths] == ["killed"]
        assert w.info_nowait().generation == 2 and w.info_nowait().state == "ready"
        assert [e["event"] for e in logs if e["event"] in ("engine_down", "engine_back")] == [
            "engine_down", "engine_back"]
        assert (await sup.snapshot()).state == "running"
