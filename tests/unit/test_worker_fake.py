"""Worker actor semantics on FakeEngine with the autojump clock: exact virtual times. Restarts and
deaths run on the chaos kit's fixtures (runtime.chaoskit): faults through the seeded monkey, each
certified with its cause, and the invariants (delays, budgets, one result per task) checked."""

import pytest
import trio

from runtime import Backoff, RestartPolicy, Task, WorkerSpec, WorkerStartupError
from runtime.testing import wait_for_generation

from .helpers import fake_supervisor

NOJITTER = Backoff(initial_s=0.5, factor=2.0, max_s=4.0, jitter="none", stable_s=10.0)


async def test_spawn_returns_ready_worker_with_worker_id(autojump_clock):
    async with fake_supervisor() as (sup, engine):
        w = await sup.spawn(WorkerSpec(agent="claude", capabilities=["git"], stub_agent=True))
        info = await w.info()
        assert w.id.startswith("w-") and info.id == w.id
        assert info.container_id and info.container_id != w.id and not info.container_id.startswith(w.id)
        assert info.state == "ready" and info.generation == 1
        assert info.container_name == f"corral-t-{w.id}-1"
        c = engine.container_of(w.id)
        assert c.labels["corral.supervisor"] == "t" and c.labels["corral.worker"] == w.id
        assert c.spec.user == "worker" and c.spec.working_dir == "/workspace"
        assert c.spec.pids_limit == 512 and c.spec.env["CORRAL_WORKER_ID"] == w.id


async def test_task_results(autojump_clock):
    async with fake_supervisor() as (sup, engine):
        w = await sup.spawn(WorkerSpec(agent="claude", stub_agent=True))
        r = await w.run(Task(prompt="hello"))
        assert (r.status, r.output, r.worker_id) == ("ok", "stub-claude: hello", w.id)
        r = await w.run(Task(prompt="!exit 3"))
        assert (r.status, r.exit_code) == ("error", 3)
        r = await w.run(Task(prompt="!sleep 5", timeout_s=1))
        assert r.status == "timeout"


async def test_cancelling_the_caller_cancels_the_task(autojump_clock):
    async with fake_supervisor() as (sup, engine):
        w = await sup.spawn(WorkerSpec())
        with trio.move_on_after(1):
            await w.run(Task(prompt="!sleep 100"))
        # the worker is free again at once: the next task does not wait 100 s
        t0 = trio.current_time()
        r = await w.run(Task(prompt="next"))
        assert r.status == "ok" and trio.current_time() - t0 < 1


async def test_killed_worker_restarts_immediately_with_new_generation(corral_engine, corral_supervisor,
                                                                    chaos, invariants):
    sup = await corral_supervisor()
    w = await sup.spawn(WorkerSpec(restart=RestartPolicy(backoff=NOJITTER)))
    old = (await w.info()).container_id
    t0 = trio.current_time()
    fault = await chaos.inject("kill", worker=w)
    await wait_for_generation(w, 2)
    assert trio.current_time() - t0 == 0
    info = await w.info()
    assert info.container_id != old and info.container_name == f"corral-{sup.name}-{w.id}-2"
    assert info.last_death.cause == "killed" and info.last_death.exit_code == 137
    assert info.last_death.generation == 1 and info.last_death.ready
    assert old not in corral_engine.containers  # the old container is removed
    assert fault.container_id == old and fault.cert == info.last_death
    await invariants.check()


async def test_backoff_grows_then_resets_after_stable_period(corral_supervisor, chaos, invariants):
    sup = await corral_supervisor()
    w = await sup.spawn(WorkerSpec(restart=RestartPolicy(backoff=NOJITTER, max_restarts=100)))
    delays = []
    for gen in range(1, 7):
        t0 = trio.current_time()
        await chaos.inject("crash_wrapper", worker=w)
        await wait_for_generation(w, gen + 1)
        delays.append(trio.current_time() - t0)
    # first restart immediate, then 0.5, 1, 2, 4 (cap), 4
    assert delays == [0, 0.5, 1.0, 2.0, 4.0, 4.0]
    # READY and up for stable_s: the next death restarts immediately again
    await trio.sleep(10)
    t0 = trio.current_time()
    await chaos.inject("crash_wrapper", worker=w)
    await wait_for_generation(w, 8)
    assert trio.current_time() - t0 == 0
    deaths = (await sup.snapshot()).children[0].deaths
    assert [d.cause for d in deaths[-3:]] == ["crashed"] * 3
    assert [d.restart_in_s for d in deaths] == [0, 0.5, 1.0, 2.0, 4.0, 4.0, 0]
    await invariants.check()                   # and each next container waited its delay


async def test_config_error_is_reported_at_once_not_retried(autojump_clock):
    async with fake_supervisor() as (sup, engine):
        t0 = trio.current_time()
        with pytest.raises(WorkerStartupError) as ei:
            await sup.spawn(WorkerSpec(agent="claude", stub_agent=True, env={"CORRAL_STUB_FAIL_PROBE": "1"}))
        cert = ei.value.certificate
        assert cert.cause == "config_error" and cert.exit_code == 78
        assert "version probe failed" in cert.reason and "version probe failed" in cert.logs_tail
        assert trio.current_time() - t0 < 1
        assert engine.stats["creates"] == 1 and not engine.containers


async def test_a_placement_on_a_single_engine_is_a_config_error_at_spawn(autojump_clock):
    async with fake_supervisor() as (sup, engine):
        with pytest.raises(WorkerStartupError) as ei:
            await sup.spawn(WorkerSpec(placement=["node.hostname==n2"]))
        cert = ei.value.certificate
        assert (cert.cause, cert.reason) == (
            "config_error", "placement ['node.hostname==n2'] needs a Docker Swarm engine "
                            "(swarm+unix://...): fake:// runs every container on its own host")
        assert engine.stats["creates"] == 0


def test_placement_constraints_are_checked_and_change_the_spec_hash_only_when_given():
    from runtime import ConfigError
    for bad in ["hostname==n2", "node.hostname=n2", "node.hostname==", "node.role == a b", "x\x00"]:
        with pytest.raises(ConfigError):
            WorkerSpec(placement=[bad])
    for good in ["node.hostname==n2", "node.labels.zone != b", "engine.labels.gpu==1"]:
        assert WorkerSpec(placement=[good]).placement == [good]
    # a spec without a placement keeps the hash it had before the field existed (containers
    # made by an older corral are adopted, not drained)
    assert WorkerSpec(id="w").fingerprint() == "8438e69026c7592f"
    assert WorkerSpec(id="w", placement=["node.role==worker"]).fingerprint() != WorkerSpec(id="w").fingerprint()


@pytest.mark.parametrize("slow", [{"ready_delay": 100}, {"start_delay": 1000}],
                         ids=["wrapper_never_ready", "engine_start_hangs"])
async def test_startup_timeout(autojump_clock, slow):
    """The deadline covers the engine's start as well as the wait for READY."""
    async with fake_supervisor(**slow) as (sup, engine):
        t0 = trio.current_time()
        with pytest.raises(WorkerStartupError) as ei:
            await sup.spawn(WorkerSpec(startup_timeout_s=3))
        assert ei.value.certificate.cause == "startup_timeout"
        assert trio.current_time() - t0 == 3
        assert not engine.containers


async def test_missed_heartbeats_mean_hung(corral_supervisor, chaos, invariants):
    sup = await corral_supervisor()
    w = await sup.spawn(WorkerSpec(heartbeat_s=1, heartbeat_timeout_s=5))
    t0 = trio.current_time()
    await chaos.inject("pause", worker=w)      # the wrapper freezes: no heartbeat, no answer
    await wait_for_generation(w, 2)
    assert (await w.info()).last_death.cause == "hung"
    assert trio.current_time() - t0 == 5     # the READY frame was the last one, at t0
    await invariants.check()


@pytest.mark.parametrize("fault,cause", [("oom", "oom_killed"), ("remove", "removed"),
                                         ("crash_wrapper", "crashed"), (0, "exited"), (2, "crashed")])
async def test_exit_classification(corral_engine, corral_supervisor, chaos, invariants, fault, cause):
    sup = await corral_supervisor()
    w = await sup.spawn(WorkerSpec())
    if isinstance(fault, int):                 # the wrapper exits on its own with this code
        corral_engine.crash(corral_engine.container_of(w.id).id, fault)
    else:
        await chaos.inject(fault, worker=w)
    await wait_for_generation(w, 2)
    assert (await w.info()).last_death.cause == cause
    await invariants.check()                   # a chaos fault: certified with its own cause


async def test_in_flight_task_is_at_most_once_unless_attempts(corral_supervisor, chaos, invariants):
    sup = await corral_supervisor()
    w = await sup.spawn(WorkerSpec())
    r = await w.run(Task(prompt="!crash-wrapper"))
    assert r.status == "worker_died" and r.death.cause == "crashed" and r.attempts == 1
    async with trio.open_nursery() as n:
        results = []

        async def go():
            results.append(await w.run(Task(prompt="!sleep 2 done", max_attempts=2)))
        n.start_soon(go)
        await trio.sleep(1)
        await chaos.inject("kill", worker=w)
    assert results[0].status == "ok" and results[0].attempts == 2
    await invariants.check()                   # one result each; executions counted inside: 1, 2


async def test_worker_budget_spent_escalates_with_certificates(corral_supervisor, chaos, invariants):
    spec = WorkerSpec(restart=RestartPolicy(max_restarts=2, within_s=60, backoff=NOJITTER))
    sup = await corral_supervisor(max_restarts=100)
    w = await sup.spawn(spec)
    for gen in (1, 2, 3):
        await chaos.inject("kill", worker=w)
        if gen < 3:
            await wait_for_generation(w, gen + 1)
    esc = await corral_supervisor.wait_escalation(sup)
    assert esc.reason == "child_failed"
    assert [c.cause for c in esc.certificates] == ["killed"] * 3
    assert esc.certificates[-1].restart_in_s is None
    await invariants.check()                   # it gave up exactly when its budget said so


async def test_protocol_error_is_the_workers_not_the_supervisors(corral_engine, corral_supervisor, invariants):
    sup = await corral_supervisor()
    w = await sup.spawn(WorkerSpec())
    c = corral_engine.container_of(w.id)
    c.out_send.send_nowait((1, b'{"kind": "no_such_frame"}\n'))
    await wait_for_generation(w, 2)
    assert (await w.info()).last_death.cause == "protocol_error"
    assert (await w.run(Task(prompt="still fine"))).status == "ok"
    await invariants.check()


async def test_a_missing_image_is_rebuilt_on_restart(corral_engine, corral_supervisor, chaos, invariants):
    sup = await corral_supervisor()
    w = await sup.spawn(WorkerSpec(agent="claude", stub_agent=True, restart=RestartPolicy(backoff=NOJITTER)))
    tag = (await w.info()).image_tag
    builds = corral_engine.stats["builds"]
    corral_engine.remove_image(tag)                # e.g. `corral images prune` by mistake
    await chaos.inject("kill", worker=w)
    await wait_for_generation(w, 2)
    deaths = [d.cause for d in (await sup.snapshot()).children[0].deaths]
    assert deaths == ["killed"]                    # the rebuild is no second death
    assert corral_engine.stats["builds"] == builds + 1 and tag in corral_engine.images
    assert (await w.run(Task(prompt="back"))).status == "ok"
    await invariants.check()


async def test_shared_cause_when_images_cannot_be_rebuilt(corral_engine, corral_supervisor, chaos, invariants):
    """Image and base image gone: every restart fails the same way -> one escalation."""
    sup = await corral_supervisor(shared_cause_threshold=3)
    ws = [await sup.spawn(WorkerSpec(id=f"w{i}", restart=RestartPolicy(backoff=NOJITTER))) for i in range(3)]
    corral_engine.remove_image((await ws[0].info()).image_tag)
    corral_engine.remove_image("corral/worker-base:latest")
    for w in ws:
        await chaos.inject("kill", worker=w)
    esc = await corral_supervisor.wait_escalation(sup)
    assert esc.reason == "shared_cause"
    assert "base image corral/worker-base:latest is missing" in esc.certificates[-1].reason
    await invariants.check()                   # exactly when shared_cause_threshold says
