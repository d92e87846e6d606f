"""The chaos-testing kit on FakeEngine: the fixtures, the seeded schedule, each fault's
certificate, the invariants catching planted bugs, teardown catching what a test leaves behind,
and `corral chaos` rebuilt on the kit."""

from types import SimpleNamespace

import msgspec
import pytest
import trio
import trio.testing

from actors.worker import life, restart
from runtime import (Backoff, PoolSpec, RestartPolicy, SupervisorConfig, SupervisorEscalation, Task,
                     WorkerSpec)
from runtime.apps.chaos import run_chaos
from runtime.chaoskit import Chaos, ChaosError, InvariantViolation, open_harness
from runtime.testing import FakeEngine

pytest_plugins = ["pytester"]

NONE = RestartPolicy(max_restarts=100, within_s=60,
                     backoff=Backoff(initial_s=1.0, factor=2.0, max_s=8.0, jitter="none", stable_s=5.0))


async def test_the_fake_engine_runs_under_the_autojump_clock(corral_engine, corral_supervisor):
    assert isinstance(corral_engine, FakeEngine)
    t0 = trio.current_time()
    await trio.sleep(1000)                          # virtual: instant and exact
    assert trio.current_time() - t0 == 1000
    a, b = await corral_supervisor(), await corral_supervisor(name="app")
    assert (a.name, b.name) == ("t-1", "app-2")     # unique per test; a real engine adds random hex


async def test_each_fault_gives_the_certificate_of_its_cause(corral_supervisor, chaos, invariants):
    sup = await corral_supervisor(max_restarts=100)
    for i in range(6):
        await sup.spawn(WorkerSpec(id=f"w{i}", restart=NONE, heartbeat_s=1.0, heartbeat_timeout_s=5.0))
    kinds = ["kill", "remove", "stop", "crash_wrapper", "oom", "pause"]
    faults = [await chaos.inject(kind, worker=f"w{i}") for i, kind in enumerate(kinds)]
    await invariants.check()
    assert [(f.kind, f.worker_id, f.cert.cause) for f in faults] == [
        ("kill", "w0", "killed"), ("remove", "w1", "removed"), ("stop", "w2", "killed"),
        ("crash_wrapper", "w3", "crashed"), ("oom", "w4", "oom_killed"), ("pause", "w5", "hung")]
    assert [f.cert_at - f.t for f in faults][-1] == 5.0      # hung: heartbeat_timeout_s later
    assert all(f.back_at is not None for f in faults)


async def test_a_schedule_fires_when_it_says_and_hits_only_serving_workers(corral_supervisor, chaos):
    sup = await corral_supervisor(max_restarts=100)
    await sup.start_pool(PoolSpec(name="p", replicas=2, worker=WorkerSpec(restart=NONE)))
    w = await sup.spawn(WorkerSpec(id="solo", restart=NONE))
    every = chaos.every(2, until=7).kill(pool="p")          # 2, 4, 6
    once = chaos.at(5).crash_wrapper(worker=w)
    twice = chaos.every(3, start=1, times=2).remove(pool="p")   # 1, 4
    t0 = trio.current_time()
    await chaos.run_for(10)
    assert trio.current_time() - t0 == 10
    faults = chaos.harness.history.live_faults()
    assert [(f.t, f.kind) for f in faults] == [(1.0, "remove"), (2.0, "kill"), (4.0, "kill"),
                                               (4.0, "remove"), (5.0, "crash_wrapper"), (6.0, "kill")]
    assert {f.worker_id for f in faults if f.kind != "crash_wrapper"} <= {"p-1", "p-2"}
    assert (every.fired, once.fired, twice.fired) == (3, 1, 2)
    assert "every 2 s until 7 s: kill (pool='p')" in chaos.describe()


async def test_the_same_seed_injects_the_same_faults(autojump_clock):
    async def run(seed):
        async with FakeEngine() as engine, open_harness(engine, seed=seed) as h:
            sup = await h.supervisor(max_restarts=1000)
            await sup.start_pool(PoolSpec(name="p", replicas=4, worker=WorkerSpec(restart=NONE)))
            h.chaos.every(1, jitter=0.5).any({"kill": 1, "remove": 1, "crash_wrapper": 1}, pool="p")
            await h.chaos.run_for(30)
            return [(round(f.t, 6), f.kind, f.worker_id, f.generation) for f in h.history.live_faults()]
    a, b, c = await run(7), await run(7), await run(8)
    assert len(a) > 20 and a == b and a != c


def test_faults_that_need_the_fake_engine_say_so():
    chaos = Chaos(SimpleNamespace(engine=SimpleNamespace(url="unix:///var/run/docker.sock")), seed=0)
    chaos.every(1).kill(pool="p")
    chaos.every(1).pause(pool="p")                  # a SIGSTOP to the wrapper, from inside
    with pytest.raises(ChaosError, match="^oom: needs FakeEngine .* this engine is unix:///var/run/docker.sock$"):
        chaos.every(1).oom()
    with pytest.raises(ChaosError, match="unknown fault"):
        chaos.at(1).any({"explode": 1})
    with pytest.raises(ChaosError, match="a target is worker=, pool= or supervisor="):
        chaos.at(1).kill(container="x")


# -- the invariants catch planted bugs ----------------------------------------------------------
async def kill_a_worker_thrice(corral_supervisor, chaos, invariants, *, policy=NONE, **config):
    sup = await corral_supervisor(**{"max_restarts": 100, **config})
    await sup.spawn(WorkerSpec(id="w", restart=policy))
    for _ in range(3):
        await chaos.inject("kill", worker="w")
        await trio.sleep(3)
    with pytest.raises(InvariantViolation) as ei:
        await invariants.check()
    invariants.raised.update(ei.value.violations)        # reported here; not again at teardown
    return ei.value


async def test_a_restart_that_ignores_backoff_is_caught(corral_supervisor, chaos, invariants, monkeypatch):
    def no_backoff(self, *, stable, rng):
        self.consecutive = 1 if stable else self.consecutive + 1
        return 0.0
    monkeypatch.setattr(restart.BackoffState, "next_delay", no_backoff)
    err = await kill_a_worker_thrice(corral_supervisor, chaos, invariants)
    assert [str(v) for v in err.violations] == [
        "[restart_delays] w gen 2 (killed, t=3.000): restart in 0.000 s; the policy says 1.000 s after 2 failures in a row",
        "[restart_delays] w gen 3 (killed, t=6.000): restart in 0.000 s; the policy says 2.000 s after 3 failures in a row"]
    assert "timeline:" in str(err) and "FAULT #1 kill w gen 1" in str(err)


async def test_a_supervisor_that_ignores_its_intensity_is_caught(corral_supervisor, chaos, invariants, monkeypatch):
    monkeypatch.setattr(restart.RestartWindow, "admit", lambda self, now: True)
    err = await kill_a_worker_thrice(corral_supervisor, chaos, invariants, max_restarts=2, within_s=60)
    assert [str(v) for v in err.violations] == ["[escalations] supervisor t-1 should have escalated (intensity) at t=6.000: restart 3 "
                     "within 60 s (max_restarts=2; counted at t=0.000, 3.000, 6.000); it did not"]


async def test_a_wrong_cause_is_caught(corral_supervisor, chaos, invariants, monkeypatch):
    real = life.classify
    monkeypatch.setattr(life, "classify", lambda facts: ("crashed", "?") if real(facts)[0] == "killed" else real(facts))
    err = await kill_a_worker_thrice(corral_supervisor, chaos, invariants)
    assert [(v.invariant, v.text.split(": ", 1)[1]) for v in err.violations] == \
        [("certificates", "the certificate says crashed (?), the fault makes killed")] * 3
    assert err.violations[0].text.startswith("fault #1 (kill w gen 1 (")


async def test_escalations_that_the_intensity_calls_for_pass(corral_supervisor, chaos, invariants):
    sup = await corral_supervisor(max_restarts=2, within_s=60)
    await sup.spawn(WorkerSpec(id="w", restart=NONE))
    for _ in range(3):
        await chaos.inject("kill", worker="w")
        await trio.sleep(3)
    esc = await corral_supervisor.wait_escalation(sup)
    assert isinstance(esc, SupervisorEscalation) and esc.reason == "intensity"
    await invariants.check()                              # exactly when the intensity says so


# -- teardown: what a test leaves behind fails it -----------------------------------------------
@pytest.fixture
def inner(pytester):
    pytester.makeini("[pytest]\ntrio_mode = true\naddopts = -p no:asyncio -p no:cacheprovider\n")
    return pytester


def test_teardown_fails_a_test_that_leaves_things_behind(inner):
    inner.makepyfile(test_inner="""
        import trio
        from runtime import PoolSpec, Task, WorkerSpec
        from runtime.engines import ContainerSpec

        async def test_container_left(corral_supervisor, corral_engine):
            sup = await corral_supervisor()
            await corral_engine.container_create(ContainerSpec(
                image="corral/worker-base:latest", name="stray", labels={"corral.supervisor": sup.name}))

        async def test_task_left(corral_supervisor, corral_harness):
            sup = await corral_supervisor()
            pool = await sup.start_pool(PoolSpec(name="p"))
            corral_harness._nursery.start_soon(pool.run, Task(prompt="!sleep 100000"))

        async def test_escalation_nobody_looked_at(corral_supervisor, corral_engine):
            sup = await corral_supervisor(max_restarts=0)
            w = await sup.spawn(WorkerSpec(id="w"))
            corral_engine.kill(corral_engine.container_of("w").id)
            await trio.sleep(10)

        async def test_clean(corral_supervisor):
            sup = await corral_supervisor()
            pool = await sup.start_pool(PoolSpec(name="p"))
            assert (await pool.run(Task(prompt="hi"))).status == "ok"
    """)
    result = inner.runpytest("-q")
    result.assert_outcomes(passed=1, failed=3)
    out = result.stdout.str()
    assert "left behind: 1 container(s) of supervisor t-1: ['stray'] (removed now)" in out
    assert "left behind: task t-" in out and "('!sleep 100000', sent to pool:p) has no answer" in out
    assert "left behind: worker p-1 is still running a task" in out
    assert "supervisor t-1 escalated and the test did not look at it" in out


def test_a_failing_chaos_test_prints_its_seed_and_schedule(inner):
    inner.makepyfile(test_inner="""
        from runtime import PoolSpec, RestartPolicy, WorkerSpec

        async def test_fails(corral_supervisor, chaos):
            sup = await corral_supervisor(max_restarts=100)
            await sup.start_pool(PoolSpec(name="p", replicas=2, worker=WorkerSpec(restart=RestartPolicy(max_restarts=100))))
            chaos.every(2).kill(pool="p")
            await chaos.run_for(5)
            assert False, "the application broke"
    """)
    result = inner.runpytest("-q", "--corral-seed=42")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*corral chaos*", "seed 42 (rerun with --corral-seed=42)", "schedule:",
                                 "  #1 every 2 s: kill (pool='p')  -> fired 2, hit 2",
                                 "faults injected (2):", "  t=    2.000  #1 kill p-* gen 1 *"])


# -- corral chaos on the kit ---------------------------------------------------------------------
async def test_corral_chaos_reports_faults_deaths_latency_and_invariants(autojump_clock):
    async with FakeEngine() as engine:
        report = await run_chaos(engine=engine, name="c", workers=3, duration_s=30, kill_interval_s=1.0, seed=3)
    assert report.ok, report.text()
    assert sum(report.faults.values()) > 20 and set(report.faults) == {"kill", "remove"}
    assert report.deaths == sum(report.deaths_by_cause.values()) >= sum(report.faults.values())
    assert report.deaths_by_cause["killed"] >= report.faults["kill"]
    assert report.deaths_by_cause["removed"] >= report.faults["remove"]
    assert report.restart_latency_s["n"] == sum(report.faults.values())
    assert 0 <= report.restart_latency_s["p50"] <= report.restart_latency_s["p99"] <= report.restart_latency_s["max"]
    assert report.invariants == {name: [] for name in ("results", "executions", "orphans", "certificates",
                                                       "restart_delays", "escalations", "adoption",
                                                       "engine_restarts")}
    assert (report.supervisor_kills, report.engine_restarts) == (0, 0)
    assert report.executions >= report.tasks_submitted > 100
    text = report.text()
    assert "faults:    " in text and "deaths:    " in text and "restarts:  " in text and " p99 " in text
    assert text.endswith("chaos: invariants hold")
    assert msgspec.json.decode(msgspec.json.encode(report))["deaths_by_cause"] == report.deaths_by_cause


async def test_corral_chaos_says_when_an_invariant_breaks(autojump_clock, monkeypatch):
    from actors.pool import Pool
    requeue = Pool._requeue

    def forgetful(self, job):                 # a redelivery that forgets the attempts made
        job.attempts = 0
        requeue(self, job)
    monkeypatch.setattr(Pool, "_requeue", forgetful)
    async with FakeEngine() as engine:
        report = await run_chaos(engine=engine, name="c", workers=2, duration_s=20, kill_interval_s=0.5, seed=1)
    assert not report.ok
    assert report.invariants["executions"] and report.delivery_violations
    assert "executions      VIOLATED" in report.text() and report.text().endswith("INVARIANT VIOLATED")


# -- a real bug the generated histories found (fixed in actors/pool.py) --------------------------
async def test_a_pool_that_stops_answers_the_task_its_dispatcher_holds(corral_engine, corral_harness):
    """A rest_for_one history found it: a task the pool's dispatcher had taken from the queue while
    no worker was idle was never answered when the pool stopped (its caller hung)."""
    history = corral_harness.history
    sup = await corral_harness.supervisor()
    pool = await sup.start_pool(PoolSpec(name="p", replicas=1, worker=WorkerSpec(restart=NONE)))
    await trio.testing.wait_all_tasks_blocked()          # the dispatcher waits for a job
    corral_engine.set_start_delay(5)
    corral_engine.kill(corral_engine.container_of("p-1").id)
    await trio.testing.wait_all_tasks_blocked()          # p-1 restarts, slowly
    async with trio.open_nursery() as n:
        n.start_soon(pool.run, Task(prompt="hello", task_id="held"))
        await trio.testing.wait_all_tasks_blocked()      # taken by the dispatcher, no idle worker
        await sup.stop_child("pool:p")
        with trio.move_on_after(60):
            await history.wait_until(lambda: not history.unanswered())
        n.cancel_scope.cancel()
    assert [res.status for _, res in history.tasks["held"].results] == ["cancelled"]


async def test_an_engine_outage_leaves_no_container_behind(corral_supervisor, chaos, invariants):
    sup = await corral_supervisor(max_restarts=100)
    await sup.spawn(WorkerSpec(id="w", restart=NONE))
    stop = await chaos.inject("stop_engine", for_s=10)
    await invariants.check()
    assert stop is not None and chaos.harness.history.faults[-1].cert.cause == "engine_error"
    # teardown: "left behind: 1 container(s) of supervisor t-1: ['corral-t-1-w-1'] (removed now)"


async def test_a_late_death_during_a_group_restart_does_not_hang_the_group(corral_supervisor, chaos,
                                                                          invariants):
    """Found by the generated histories (one_for_all, 4 steps: spawn, spawn, stop w1, a task that
    kills w2's wrapper)."""
    sup = await corral_supervisor(strategy="one_for_all", max_restarts=10)
    w1 = await sup.spawn(WorkerSpec(id="w1", restart=NONE))
    w2 = await sup.spawn(WorkerSpec(id="w2", restart=NONE))
    await chaos.inject("stop", worker=w1)        # its death is told SETTLE_S (2 s) later
    with trio.fail_after(60):                      # (autojump clock: a hang fails at once)
        result = await w2.run(Task(prompt="!crash-wrapper", max_attempts=2))
        assert result.status == "worker_died" and result.attempts == 2
        for w in (w1, w2):                         # the group comes back and serves
            assert (await w.run(Task(prompt="echo back"))).status == "ok"
