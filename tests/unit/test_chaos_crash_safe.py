"""Crash safety under the chaos kit, on FakeEngine (autojump clock): the monkey kills the
supervisor (``kill_supervisor``: a crash of corral, its containers left running; reopened with
the same name, it adopts them) and restarts the engine with live-restore (``restart_engine``).
Tasks that must outlive a supervisor go through its task journal (``corral_harness.submit``);
executions are counted inside the containers, in one ledger over every instance. And `corral
chaos --kill-supervisor / --restart-engine` on the same kit."""

from types import SimpleNamespace

import pytest
import trio

from runtime import Backoff, PoolSpec, RestartPolicy, SupervisorConfig, Task, WorkerSpec
from runtime.apps.chaos import run_chaos
from runtime.apps.cli import build_parser
from runtime.chaoskit import Chaos, ChaosError, open_harness
from runtime.testing import FakeEngine

POLICY = RestartPolicy(max_restarts=100, within_s=60,
                       backoff=Backoff(initial_s=1.0, factor=2.0, max_s=8.0, jitter="none", stable_s=5.0))


def durable(tmp_path, replicas: int = 3, **kw) -> SupervisorConfig:
    """A supervisor whose pool ``p`` is in its config (made again at each reopening) and which
    keeps a task journal."""
    return SupervisorConfig(name="s", state_dir=str(tmp_path), max_restarts=100, pools=[
        PoolSpec(name="p", replicas=replicas, worker=WorkerSpec(restart=POLICY, heartbeat_s=1.0))], **kw)


def running(engine: FakeEngine) -> dict[str, tuple[str, int]]:
    return {c.labels["corral.worker"]: (c.id, int(c.labels["corral.generation"]))
            for c in engine.containers.values() if c.status == "running"}


def outcome(h) -> dict[str, tuple[list[str], int]]:
    """task id -> (the statuses of its final results, executions counted in containers)"""
    return {tid: ([res.status for _, res in r.results], h.ledger[tid]) for tid, r in h.tasks.items()}


# -- kill_supervisor ------------------------------------------------------------------------------
@pytest.mark.parametrize("down_s", [1.0, 5.0])
async def test_a_killed_supervisor_adopts_its_containers_and_every_task_runs_once(
        corral_engine, corral_harness, corral_supervisor, chaos, invariants, tmp_path, down_s):
    """Six at-most-once tasks on three workers: three run, three wait in the queue when the
    supervisor is killed. Down 1 s, the running ones finish after the reopening (carried on);
    down 5 s, they finish while nobody listens (their results replayed). Either way every task
    runs exactly once and has one final result, and the same containers serve on."""
    h = corral_harness
    sup = await corral_supervisor(durable(tmp_path))
    await sup.wait_configured()
    before = running(corral_engine)
    assert sorted(before) == ["p-1", "p-2", "p-3"]
    kill = chaos.at(1).kill_supervisor(for_s=down_s)
    tids = [await h.submit(sup, "pool:p", Task(prompt="!sleep 3", task_id=f"t{i}")) for i in range(6)]
    async with chaos.running():
        await h.history.wait_until(lambda: all(h.history.tasks[t].results for t in tids))
    await invariants.check()

    assert kill.fired == kill.hit == 1
    assert outcome(h.history) == {t: (["ok"], 1) for t in tids}
    [k] = h.history.kills
    assert (k.t, k.reopened_at, k.adoption_s) == (1.0, 1.0 + down_s, 0.0)
    assert (k.adopted, k.replaced, k.problems, k.generation_resets) == (3, 0, [], [])
    assert k.running == before
    assert running(corral_engine) == before                      # same ids, same generations
    now = await corral_supervisor.current(sup)
    assert now is not sup and now.tasks is not None
    assert [w.info_nowait().restarts for w in now.workers()] == [0, 0, 0]
    assert h.history.deaths == []


async def test_kills_under_worker_faults_keep_every_task_within_its_attempts(
        corral_engine, corral_harness, corral_supervisor, chaos, invariants, tmp_path):
    """The supervisor killed every 10 s while workers are killed under their tasks: redelivered
    tasks stay within max_attempts over every instance, each has one final result, and every
    reopening finds each worker in the container it had."""
    h = corral_harness
    sup = await corral_supervisor(durable(tmp_path))
    await sup.wait_configured()
    chaos.every(10, until=45).kill_supervisor(for_s=0.5)
    chaos.every(1.5, start=0.7, until=45).kill(pool="p")
    tasks = [Task(prompt=f"!sleep {1 + i % 3}", max_attempts=10, task_id=f"t{i}") for i in range(60)]
    async with chaos.running():
        for t in tasks:
            await h.submit(sup, "pool:p", t)
            await trio.sleep(0.7)
        await h.history.wait_until(lambda: all(r.results for r in h.history.tasks.values()))
    await invariants.check()

    assert len(h.history.kills) == 4                              # at 10, 20, 30, 40
    # every worker with a running container at the reopening serves on in it; the others (in
    # their backoff after a kill) start a new one
    assert all(k.problems == [] and k.adopted == len(k.running) and k.adopted + k.replaced == 3
               for k in h.history.kills)
    assert sum(k.adopted for k in h.history.kills) >= 4
    result = outcome(h.history)
    assert {tid: statuses for tid, (statuses, _) in result.items()} == {t.task_id: ["ok"] for t in tasks}
    assert all(1 <= ran <= 10 for _, ran in result.values())
    assert sum(ran for _, ran in result.values()) > len(tasks)   # some were redelivered
    assert h.history.faults_by_kind()["kill_supervisor"] == 4


async def test_a_second_final_result_offered_to_the_journal_is_caught(
        corral_harness, corral_supervisor, invariants, tmp_path, monkeypatch):
    """A planted bug: the task service writes each final result twice. The journal keeps the
    first; the results invariant names the second."""
    from runtime.journal import TaskService
    finish = TaskService._finish

    async def twice(self, result, *, how):
        await finish(self, result, how=how)
        await finish(self, result, how=how)
    monkeypatch.setattr(TaskService, "_finish", twice)
    h = corral_harness
    sup = await corral_supervisor(durable(tmp_path))
    await sup.wait_configured()
    await h.submit(sup, "pool:p", Task(prompt="hello", task_id="once"))
    await h.settle()
    bad = [str(v) for v in await invariants.violations()]
    assert bad == ["[results] task once: a second final result was offered to the journal after its "
                   "first (ok): ok"]
    invariants.raised.update(await invariants.violations())      # (seen: not again at teardown)


async def test_a_reopened_supervisor_that_does_not_adopt_is_caught(autojump_clock, tmp_path, monkeypatch):
    """A planted bug: the reopened supervisor finds nothing to adopt (nor to remove)."""
    import runtime.api

    async def blind(engine, name):
        return {}
    monkeypatch.setattr(runtime.api, "claim_engine", blind)
    async with FakeEngine() as engine:
        async with open_harness(engine) as h:
            sup = await h.supervisor(durable(tmp_path, replicas=2))
            await sup.wait_configured()
            before = running(engine)
            await h.chaos.inject("kill_supervisor", supervisor=sup)
            await h.current(sup)
            await h.history.wait_until(lambda: h.history.kills[0].serving_at is not None)
            bad = sorted(str(v) for v in await h.invariants.violations() if v.invariant == "adoption")
            after = running(engine)
            problems = await h.close()
    assert bad == [f"[adoption] supervisor s-1 killed at t=0.000, reopened at t=0.000: worker {w} serves in "
                   f"container {after[w][0][:12]} gen 1, not in its container {before[w][0][:12]} gen 1 that "
                   f"ran at the reopening (not adopted)" for w in ("p-1", "p-2")]
    assert problems == []              # (the new containers replaced the old ones by name)


# -- restart_engine -------------------------------------------------------------------------------
async def test_engine_restarts_with_live_restore_restart_no_worker(
        corral_engine, corral_supervisor, chaos, invariants):
    sup = await corral_supervisor(max_restarts=100)
    pool = await sup.start_pool(PoolSpec(name="p", replicas=3, worker=WorkerSpec(restart=POLICY, heartbeat_s=1.0)))
    before = running(corral_engine)
    rule = chaos.every(10, times=2).restart_engine()
    results = []

    async def one(i: int) -> None:
        results.append(await pool.run(Task(prompt="!sleep 2", task_id=f"t{i}")))
    async with chaos.running():
        async with trio.open_nursery() as n:
            for i in range(15):
                n.start_soon(one, i)
        await trio.sleep(15)                          # past the second restart
    await invariants.check()

    h = chaos.harness.history
    assert (rule.fired, rule.hit) == (2, 2)
    assert [(f.t, f.back_at) for f in h.engine_restarts()] == [(10.0, 12.0), (20.0, 22.0)]
    assert sorted((r.task_id, r.status) for r in results) == sorted((f"t{i}", "ok") for i in range(15))
    assert {tid: ran for tid, (_, ran) in outcome(h).items()} == {f"t{i}": 1 for i in range(15)}
    assert h.deaths == [] and running(corral_engine) == before
    assert [w.info_nowait().restarts for w in pool.workers] == [0, 0, 0]
    assert "engine_down" in {state for r in h.workers.values() for _, state, _ in r.states}


async def test_an_engine_restart_that_kills_the_containers_is_caught(
        corral_engine, corral_supervisor, chaos, invariants, monkeypatch):
    """A planted bug: the engine forgets live-restore (its containers die with it)."""
    go_down = FakeEngine.go_down
    monkeypatch.setattr(FakeEngine, "go_down", lambda self, live_restore=False: go_down(self))
    sup = await corral_supervisor(max_restarts=100)
    await sup.start_pool(PoolSpec(name="p", replicas=2, worker=WorkerSpec(restart=POLICY, heartbeat_s=1.0)))
    chaos.at(2).restart_engine()
    await chaos.run_for(40)
    bad = [v for v in await invariants.violations() if v.invariant == "engine_restarts"]
    assert len(bad) == 2 and all("during the engine restart #1 (down at t=2.000, back at t=4.000)" in v.text
                                 for v in bad)
    invariants.raised.update(await invariants.violations())


def test_restart_engine_needs_an_engine_the_run_started():
    chaos = Chaos(SimpleNamespace(engine=SimpleNamespace(url="unix:///var/run/docker.sock"),
                                  engine_control=None), seed=0)
    with pytest.raises(ChaosError, match="restart_engine: needs FakeEngine .* an engine the test "
                                         "started itself: corral_engine\\('private'\\) with live-restore"):
        chaos.every(10).restart_engine()
    no_live_restore = Chaos(SimpleNamespace(engine=SimpleNamespace(url="unix:///x/docker.sock"),
                                            engine_control=SimpleNamespace(live_restore=False)), seed=0)
    with pytest.raises(ChaosError, match="restart_engine"):
        no_live_restore.every(10).restart_engine()
    chaos.every(10).kill_supervisor()                 # any engine


# -- corral chaos ---------------------------------------------------------------------------------
async def test_corral_chaos_kill_supervisor(autojump_clock):
    async with FakeEngine() as engine:
        report = await run_chaos(engine=engine, name="c", workers=3, duration_s=60, kill_interval_s=1.0,
                                 seed=4, kill_supervisor_every=10)
    assert report.ok, report.text()
    assert report.faults["kill_supervisor"] == report.supervisor_kills >= 4
    assert report.adopted + report.replaced == 3 * report.supervisor_kills
    assert report.adopted >= 2 * report.supervisor_kills
    assert report.adoption_s["n"] == report.supervisor_kills and report.adoption_s["max"] == 0.0
    assert report.journal_results == report.results == {"ok": report.tasks_submitted}
    assert report.executions >= report.tasks_submitted > 500
    assert report.invariants == {name: [] for name in ("results", "executions", "orphans", "certificates",
                                                       "restart_delays", "escalations", "adoption",
                                                       "engine_restarts")}
    assert report.containers_left == 0 and report.left_behind == []
    assert f"supervisor: killed {report.supervisor_kills} times; adopted {report.adopted}" in report.text()


async def test_corral_chaos_restart_engine(autojump_clock):
    async with FakeEngine() as engine:
        report = await run_chaos(engine=engine, name="c", workers=3, duration_s=60, kill_interval_s=0,
                                 seed=2, restart_engine_every=10)
    assert report.ok, report.text()
    assert report.faults == {"restart_engine": report.engine_restarts} and report.engine_restarts >= 4
    assert report.engine_down_s["p50"] == report.engine_down_s["max"] == 2.0
    assert report.deaths == report.deaths_during_engine_restarts == 0
    assert report.journal_results == report.results == {"ok": report.tasks_submitted}
    assert report.executions == report.tasks_submitted > 500            # nothing ran twice
    assert "engine:    restarted" in report.text()


async def test_corral_chaos_refuses_to_restart_an_engine_it_did_not_start(autojump_clock):
    with pytest.raises(ChaosError, match="restarts an engine this chaos run starts itself"):
        await run_chaos(engine_url="unix:///var/run/docker.sock", restart_engine_every=10)
    async with FakeEngine() as engine:
        with pytest.raises(ChaosError, match="must be positive"):
            await run_chaos(engine=engine, kill_supervisor_every=0)


def test_the_cli_refuses_restart_engine_on_a_given_engine(capsys):
    args = build_parser().parse_args(["--engine", "unix:///var/run/docker.sock", "chaos", "--restart-engine"])
    assert args.fn(args) == 2
    err = capsys.readouterr().err
    assert "corral chaos: --restart-engine restarts an engine this chaos run starts itself" in err
    args = build_parser().parse_args(["chaos", "--every", "5"])
    assert args.fn(args) == 2
    assert "--every goes with --kill-supervisor or --restart-engine" in capsys.readouterr().err
