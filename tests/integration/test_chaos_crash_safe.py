"""`corral chaos --kill-supervisor` on the machine's Docker, and `--restart-engine` on a private
dockerd (the kit's ``private_docker``: never the machine's engine): a pool under fire whose
supervisor is killed and reopened, or whose engine restarts, with every task through the
journal; executions counted inside the containers. Short runs (about 20 s of chaos each)."""

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import trio

from runtime import PoolSpec, Task, WorkerSpec
from runtime.apps.chaos import run_chaos

pytestmark = pytest.mark.chaos

CORRAL = [sys.executable, "-m", "runtime.apps.cli"]
ROOT = Path(__file__).resolve().parents[2]


async def test_corral_chaos_kill_supervisor_on_docker(engine, corral_name):
    def chaos():
        return subprocess.run(CORRAL + ["--log-level", "ERROR", "chaos", "--kill-supervisor", "--every", "5",
                                        "--duration", "16", "--workers", "3", "--name", corral_name],
                              cwd=ROOT, capture_output=True, text=True, timeout=180)
    out = await trio.to_thread.run_sync(chaos)
    *json_lines, verdict = out.stdout.strip().splitlines()
    report = msgspec.json.decode("\n".join(json_lines))
    assert out.returncode == 0 and verdict == "chaos: invariants hold", (out.stdout[-3000:], out.stderr[-3000:])
    assert report["supervisor_kills"] == report["faults"]["kill_supervisor"] >= 2
    assert report["adopted"] + report["replaced"] == 3 * report["supervisor_kills"]
    assert report["adopted"] >= report["supervisor_kills"]                  # same ids served on
    assert report["adoption_s"]["n"] == report["supervisor_kills"] and report["adoption_s"]["max"] < 10
    assert report["journal_results"] == report["results"] == {"ok": report["tasks_submitted"]}
    assert report["executions"] >= report["tasks_submitted"] > 10
    assert all(v == [] for v in report["invariants"].values())
    assert report["containers_left"] == 0


async def test_corral_chaos_restart_engine_on_a_private_dockerd(private_docker):
    """Engine restarts alone (no worker faults: a worker restarting just as dockerd shuts down
    may still lose that container, see the README's `corral chaos`): not one death."""
    with trio.fail_after(240):
        report = await run_chaos(engine_control=private_docker, name="chaos", workers=3, duration_s=20,
                                 kill_interval_s=0, seed=5, restart_engine_every=6)
    assert report.ok, report.text()
    assert report.faults == {"restart_engine": report.engine_restarts} and report.engine_restarts >= 2
    assert 0 < report.engine_down_s["max"] < 30
    assert report.deaths == 0 and report.invariants["engine_restarts"] == []
    assert report.journal_results == report.results == {"ok": report.tasks_submitted}
    assert report.executions >= report.tasks_submitted > 10
    assert report.containers_left == 0


@pytest.mark.corral_engine("private", deadline=180)
async def test_the_kit_restarts_a_private_engine_under_a_pool(corral_engine, corral_supervisor, chaos,
                                                              invariants):
    sup = await corral_supervisor()
    pool = await sup.start_pool(PoolSpec(name="p", replicas=2, worker=WorkerSpec(agent="shell")))
    before = {w.id: w.info_nowait().container_id for w in pool.workers}
    restart = chaos.at(1).restart_engine()
    h = chaos.harness.history
    async with chaos.running(), trio.open_nursery() as n:
        for i in range(8):
            n.start_soon(pool.run, Task(prompt=f"sleep 0.5; echo {i}", task_id=f"t{i}"))
        await h.wait_until(lambda: any(f.back_at is not None for f in h.engine_restarts()))
    await invariants.check()
    assert restart.hit == 1 and h.engine_restarts()[0].back_at is not None
    assert h.deaths == [] and {w.id: w.info_nowait().container_id for w in pool.workers} == before
    assert sorted((tid, [res.status for _, res in r.results]) for tid, r in h.tasks.items()) == [
        (f"t{i}", ["ok"]) for i in range(8)]
