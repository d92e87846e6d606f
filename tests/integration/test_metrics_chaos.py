"""`curl --unix-socket SOCK http://corral/metrics` while a pool is under fire: the restart,
death, task and latency metrics move as the chaos run goes on (real Docker)."""

import re
import shutil
import subprocess

import pytest
import trio

from runtime import PoolSpec, RestartPolicy, SupervisorConfig, Task, WorkerSpec, open_supervisor
from runtime.apps.httpapi import serve_api


def sample(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pat = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" ([0-9.e+-]+)$"
    m = re.search(pat, text, re.M)
    return float(m.group(1)) if m else 0.0


def curl(sock: str) -> str:
    out = subprocess.run(["curl", "-sS", "--fail", "--unix-socket", sock, "http://corral/metrics"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.chaos
@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_metrics_move_as_a_chaos_run_goes_on(engine, corral_name, tmp_path):
    sock = str(tmp_path / "api.sock")
    worker = WorkerSpec(agent="shell", restart=RestartPolicy(max_restarts=100, within_s=60))
    cfg = SupervisorConfig(name=corral_name, max_restarts=100,
                           pools=[PoolSpec(name="shells", replicas=3, worker=worker)])
    with trio.fail_after(240):
        async with open_supervisor(cfg, engine=engine) as sup, trio.open_nursery() as n:
            api = await n.start(serve_api, sup, sock)
            await sup.wait_configured()
            first = await trio.to_thread.run_sync(curl, sock)
            assert sample(first, "corral_workers", state="ready") == 3
            assert sample(first, "corral_restarts_total", cause="killed") == 0
            pool = sup.pool("shells")

            async def load() -> None:
                while True:
                    await pool.run(Task(prompt="echo hi"))
            for _ in range(3):
                n.start_soon(load)
            scrapes = [first]
            for round_ in range(3):
                victim = pool.workers[round_ % 3]
                info = await victim.info()
                gen = info.generation
                await engine.container_kill(info.container_id, "SIGKILL")
                await victim.wait_until(lambda i: i.generation > gen and i.state in ("ready", "busy"))
                scrapes.append(await trio.to_thread.run_sync(curl, sock))
            kills = [sample(s, "corral_restarts_total", cause="killed") for s in scrapes]
            deaths = [sample(s, "corral_worker_deaths_total", cause="killed") for s in scrapes]
            latency = [sample(s, "corral_restart_latency_seconds_count") for s in scrapes]
            done = [sample(s, "corral_tasks_total", pool="shells", status="ok") for s in scrapes]
            assert kills == deaths == [0, 1, 2, 3], kills
            assert latency == [0, 1, 2, 3]
            assert done == sorted(done) and done[-1] > done[0]
            last = scrapes[-1]
            assert sample(last, "corral_task_duration_seconds_count", pool="shells") >= done[-1]
            assert sample(last, "corral_task_queue_wait_seconds_count", pool="shells") > 0
            assert 0 < sample(last, "corral_restart_latency_seconds_sum") < 3 * 30
            api.stop()
            n.cancel_scope.cancel()
