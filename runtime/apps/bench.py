"""`corral bench`: corral measured side by side with what users would do instead, in one run,
on the same engine and image. Prints medians, p95 and the ratio; `--json FILE` keeps them.

Scenarios (see BENCHMARKS.md for what limits each number):
  restart   kill -> replacement READY, vs Docker's own `--restart on-failure` (kill -> start event)
  spawn     N workers from a cached image to READY, vs N parallel `docker run -d`
  task      a trivial task on a READY worker, vs `docker exec <container> true`
  scale     10,000 workers on FakeEngine (time to READY, RSS per worker); 100 idle real workers' CPU
            (bare, and with the HTTP API serving an open dashboard's event stream and /metrics scrapes)
  mailbox   actor ask/reply round trips per second, vs a bare trio memory channel round trip
  journal   tasks/s through a FakeEngine pool with the task journal (SQLite, `corral run`'s
            default) vs without it, side by side; then the same through a pool of 4 stub workers
            on the real engine (journal_real)
  swarm     (only when named: --only swarm; root) a 2-node test swarm vs the single engine: spawn
            throughput, restart latency; the time to see a lost node (dockerd stopped, and
            dockerd SIGKILLed) and until its workers serve again on the other node

CORRAL_BENCH_COMPARE_ENGINE=URL (or a ``compare_engine`` argument) runs restart and spawn again on
a second engine (e.g. Podman's unix:///run/corral-podman/podman.sock) in the same run, with ``lifecycle`` on both: one worker
container's engine calls timed one at a time (create, attach, start to READY, a kill's call, the
kill to the end of output and to the death event, wait + inspect, remove), which says what
limits each engine's restart.
"""

from __future__ import annotations

import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

import trio

COMPARE_ENV = "CORRAL_BENCH_COMPARE_ENGINE"
QUICK = {"swarm_spawn": 8, "swarm_restart": 3, "restart": 3, "spawn": 10, "spawn_rounds": 1, "task": 30, "exec": 10, "fake": 1000, "idle": 10, "idle_s": 5.0,
         "mailbox": 20_000, "journal": 1000, "journal_real": 200, "adopt": [10]}
FULL = {"swarm_spawn": 20, "swarm_restart": 10, "restart": 10, "spawn": 50, "spawn_rounds": 5, "task": 300, "exec": 50, "fake": 10_000, "idle": 100, "idle_s": 60.0,
        "mailbox": 200_000, "journal": 10_000, "journal_real": 2000, "adopt": [10, 100]}


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "p95": pct(values, 95), "n": len(values)}


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Bench:
    def __init__(self, sizes: dict[str, Any], engine_url: str | None,
                 compare_url: str | None = None) -> None:
        self.sizes = sizes
        self.engine_url = engine_url
        self.compare_url = compare_url
        self.name = "bench" + uuid.uuid4().hex[:6]
        self.results: dict[str, Any] = {}
        self.suffix = ""
        """"" on the first engine, "@<flavour>" on the one compared with it"""
        self.cli_env: dict[str, str] | None = None
        """the docker CLI's environment: DOCKER_HOST of the engine being measured"""

    def report(self, key: str, **data: Any) -> None:
        key += self.suffix
        self.results[key] = data
        print(f"\n[{key}]", flush=True)
        for k, v in data.items():
            if isinstance(v, dict):
                v = "  ".join(f"{kk}={vv:.4g}" if isinstance(vv, float) else f"{kk}={vv}" for kk, vv in v.items())
            elif isinstance(v, float):
                v = f"{v:.4g}"
            print(f"  {k:28} {v}", flush=True)

    # -- helpers -------------------------------------------------------------------------------
    async def docker(self, *args: str) -> str:
        p = await trio.run_process(["docker", *args], capture_stdout=True, capture_stderr=True, check=False,
                                   env=self.cli_env)
        if p.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {p.stderr.decode().strip()}")
        return p.stdout.decode().strip()

    def docker_run_args(self, image: str, *extra: str) -> list[str]:
        return ["run", "-d", "-i", "--network", "none", "--label", f"corral.supervisor={self.name}",
                "--label", "corral.bench=1", "-e", "CORRAL_WORKER_ID=bench", "-e", "CORRAL_AGENT=shell",
                *extra, image]

    async def cleanup(self, engine) -> None:
        from ..testing import remove_containers
        await remove_containers(engine, self.name)

    # -- scenarios -----------------------------------------------------------------------------
    async def restart(self, sup, engine, image: str) -> None:
        from ..specs import Backoff, RestartPolicy, WorkerSpec
        n = self.sizes["restart"]
        w = await sup.spawn(WorkerSpec(agent="shell", restart=RestartPolicy(
            max_restarts=1000, backoff=Backoff(stable_s=0.5))))
        corral = []
        for _ in range(n):
            await trio.sleep(1.0)      # a stable period: the next restart is the "first" one
            info = await w.info()
            pid = (await engine.container_inspect(info.container_id)).pid
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            await w.wait_until(lambda i: i.generation > info.generation and i.state == "ready")
            corral.append(time.perf_counter() - t0)
        await w.stop()
        docker = []
        for _ in range(n):
            cid = await self.docker(*self.docker_run_args(image, "--restart", "on-failure"))
            await trio.sleep(1.0)
            pid = (await engine.container_inspect(cid)).pid
            async with engine.events(labels={"corral.bench": "1"}, kinds=["started"]) as events:
                t0 = time.perf_counter()
                os.kill(pid, signal.SIGKILL)
                async for ev in events.receive:
                    if ev.container_id == cid:
                        docker.append(time.perf_counter() - t0)
                        break
            await engine.container_remove(cid, force=True)
        c, d = summary(corral), summary(docker)
        self.report("restart", corral_s=c, docker_restart_policy_s=d,
                    ratio_corral_over_docker=c["median"] / d["median"],
                    target="corral <= 1.5x docker and < 0.6 s",
                    met=c["median"] <= 1.5 * d["median"] and c["median"] < 0.6)

    async def spawn(self, sup, engine, image: str) -> None:
        from ..specs import PoolSpec, WorkerSpec
        n, rounds = self.sizes["spawn"], self.sizes["spawn_rounds"]
        corral, cli = [], []

        async def corral_round() -> None:
            t0 = time.perf_counter()
            await sup.start_pool(PoolSpec(name="spawn", replicas=n, worker=WorkerSpec(agent="shell")))
            corral.append(time.perf_counter() - t0)
            await sup.stop_child("pool:spawn")

        async def cli_round() -> None:
            t0 = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(self.docker, *self.docker_run_args(image))
            cli.append(time.perf_counter() - t0)
            await self.cleanup(engine)

        for r in range(rounds):       # alternate who goes first, so drift hits both alike
            for fn in ((corral_round, cli_round) if r % 2 == 0 else (cli_round, corral_round)):
                await fn()
        c_rate, d_rate = n / statistics.median(corral), n / statistics.median(cli)
        self.report("spawn", workers=n, rounds=rounds, corral_to_ready_s=summary(corral),
                    corral_per_s=c_rate, docker_run_d_s=summary(cli), docker_run_d_per_s=d_rate,
                    ratio_corral_over_cli=c_rate / d_rate,
                    target="corral rate >= 0.9x the CLI's", met=c_rate >= 0.9 * d_rate)

    async def lifecycle(self, sup, engine, image: str) -> None:
        """One shell worker container at a time, each engine call timed on its own."""
        from contextlib import AsyncExitStack

        from ..engines import STDOUT, ContainerSpec
        from ..protocol import LineSplitter, Ready, decode_wrapper_frame
        phases: dict[str, list[float]] = {}

        def took(phase: str, t0: float) -> float:
            now = time.perf_counter()
            phases.setdefault(phase, []).append(now - t0)
            return now

        async def ready(att) -> None:
            split = LineSplitter()
            async for stream, data in att.output:
                if stream == STDOUT and any(isinstance(decode_wrapper_frame(line), Ready)
                                            for line in split.feed(data)):
                    return
            raise RuntimeError("the wrapper's output ended before READY")

        async def drained(att) -> None:
            async for _ in att.output:
                pass

        def spec(i: int) -> ContainerSpec:
            return ContainerSpec(image=image, name=f"{self.name}-life-{i}", user="worker",
                                 labels={"corral.supervisor": self.name, "corral.bench": "1"},
                                 env={"CORRAL_WORKER_ID": f"life-{i}", "CORRAL_AGENT": "shell"},
                                 pids_limit=512, working_dir="/workspace")
        labels = {"corral.supervisor": self.name}
        async with engine.events(labels=labels, kinds=["died"]) as events:
            for i in range(self.sizes["restart"]):
                await trio.sleep(0.5)
                async with AsyncExitStack() as stack:
                    t = time.perf_counter()
                    cid = await engine.container_create(spec(i))
                    t = took("create", t)
                    att = await stack.enter_async_context(engine.attach(cid))
                    t = took("attach", t)
                    await engine.container_start(cid)
                    t = took("start_call", t)
                    await ready(att)
                    took("start_call_to_ready", t)
                    pid = (await engine.container_inspect(cid)).pid
                    t0 = time.perf_counter()
                    os.kill(pid, signal.SIGKILL)
                    await drained(att)
                    took("kill_to_output_end", t0)
                    async for ev in events.receive:
                        if ev.container_id == cid:
                            break
                    t = took("kill_to_die_event", t0)
                t = time.perf_counter()
                await engine.container_wait(cid)
                await engine.container_inspect(cid)
                t = took("wait_and_inspect", t)
                await engine.container_remove(cid, force=True)
                took("remove", t)
                # a kill through the engine's API (what `docker kill` costs): the call alone
                cid = await engine.container_create(spec(i))
                async with engine.attach(cid) as att:
                    await engine.container_start(cid)
                    await ready(att)
                    t = time.perf_counter()
                    await engine.container_kill(cid, "SIGKILL")
                    took("kill_call", t)
                await engine.container_remove(cid, force=True)
        self.report("lifecycle", **{k: summary(v) for k, v in phases.items()},
                    target="reported (no target)", met=True)

    async def task(self, sup, engine, image: str) -> None:
        from ..specs import Task, WorkerSpec
        w = await sup.spawn(WorkerSpec(agent="shell"))
        for _ in range(3):
            await w.run(Task(prompt="true"))
        corral = []
        for _ in range(self.sizes["task"]):
            t0 = time.perf_counter()
            r = await w.run(Task(prompt="true"))
            corral.append(time.perf_counter() - t0)
            assert r.status == "ok", r
        cid = (await w.info()).container_id
        docker = []
        for _ in range(self.sizes["exec"]):
            t0 = time.perf_counter()
            await self.docker("exec", cid, "true")
            docker.append(time.perf_counter() - t0)
        await w.stop()
        c, d = summary(corral), summary(docker)
        self.report("task", corral_s=c, docker_exec_s=d, speedup=d["median"] / c["median"],
                    target="corral >= 5x faster", met=d["median"] / c["median"] >= 5)

    async def idle(self, sup, engine, image: str) -> None:
        from ..specs import PoolSpec, WorkerSpec
        n, secs = self.sizes["idle"], self.sizes["idle_s"]
        await sup.start_pool(PoolSpec(name="idle", replicas=n, worker=WorkerSpec(agent="shell")))
        await trio.sleep(2.0)

        async def cpu_percent() -> float:
            c0, t0 = time.process_time(), time.perf_counter()
            await trio.sleep(secs)
            return (time.process_time() - c0) / (time.perf_counter() - t0) * 100
        bare = await cpu_percent()
        served = await self._idle_served(sup, cpu_percent)
        await sup.stop_child("pool:idle")
        self.report("idle", workers=n, seconds=secs, supervisor_cpu_percent_of_one_core=bare,
                    with_api_metrics_dashboard_percent=served,
                    api_cost_percent_points=served - bare,
                    target="< 2% of one core, with and without the API",
                    met=bare < 2.0 and served < 2.0)

    async def _idle_served(self, sup, cpu_percent) -> float:
        """The same measure while the HTTP API serves: an open dashboard's event stream (a
        `curl -N` client in its own process, so that only the supervisor's CPU is counted),
        the page loaded once, and Prometheus scraping /metrics every 15 s."""
        import shutil
        import subprocess
        import tempfile

        from .httpapi import serve_api
        if shutil.which("curl") is None:
            return float("nan")
        sock = os.path.join(tempfile.mkdtemp(prefix="corral-bench-"), "api.sock")
        curl = ["curl", "-s", "--unix-socket", sock]
        async with trio.open_nursery() as n:
            api = await n.start(serve_api, sup, sock)
            await trio.run_process(curl + ["-o", "/dev/null", "http://corral/"])
            sse = await trio.lowlevel.open_process(curl + ["-N", "http://corral/v1/events"],
                                                   stdout=subprocess.DEVNULL)

            async def scrape() -> None:
                while True:
                    await trio.run_process(curl + ["-o", "/dev/null", "http://corral/metrics"])
                    await trio.sleep(15)
            n.start_soon(scrape)
            try:
                await trio.sleep(1.0)
                return await cpu_percent()
            finally:
                sse.kill()
                with trio.CancelScope(shield=True):
                    await sse.wait()
                api.stop()
                n.cancel_scope.cancel()

    def scale_fake(self) -> None:
        n = self.sizes["fake"]

        def child(mode: str) -> dict[str, float]:
            out = subprocess.run([sys.executable, "-m", "runtime.apps.bench", "--scale-child", str(n), mode],
                                 capture_output=True, text=True,
                                 env={**os.environ, "CORRAL_LOG_LEVEL": "ERROR"})
            if out.returncode != 0:
                raise RuntimeError(f"scale child ({mode}) failed: {out.stderr[-2000:]}")
            return json.loads(out.stdout.strip().splitlines()[-1])
        total, engine = child("corral"), child("engine")
        per_total = total["rss_kib_delta"] / n
        per_engine = engine["rss_kib_delta"] / n
        per_sup = per_total - per_engine
        self.report("scale", workers=n, time_to_all_ready_s=total["ready_s"],
                    rss_kib_per_worker_total=per_total, rss_kib_per_container_fake_engine=per_engine,
                    rss_kib_per_worker_supervisor=per_sup, stop_all_s=total["stop_s"],
                    target="10,000 to READY under 20 s; supervisor under 30 KiB per worker",
                    met=total["ready_s"] * (10_000 / n) < 20 and per_sup < 30)

    async def mailbox(self) -> None:
        from ..api import open_supervisor
        from ..messages import InfoRequest, ask
        from ..specs import SupervisorConfig, WorkerSpec
        from ..testing import FakeEngine
        m = self.sizes["mailbox"]
        async with FakeEngine() as engine:
            async with open_supervisor(SupervisorConfig(name="mb"), engine=engine) as sup:
                w = await sup.spawn(WorkerSpec(heartbeat_s=3600, heartbeat_timeout_s=7200,
                                               orphan_timeout_s=7200))
                mailbox = w._actor.mailbox
                t0 = time.perf_counter()
                for _ in range(m):
                    await ask(mailbox, lambda r: InfoRequest(reply=r))
                actor_s = time.perf_counter() - t0
        req_s, req_r = trio.open_memory_channel(0)
        rep_s, rep_r = trio.open_memory_channel(0)

        async def echo() -> None:
            async for x in req_r:
                await rep_s.send(x)
        async with trio.open_nursery() as n:
            n.start_soon(echo)
            t0 = time.perf_counter()
            for i in range(m):
                await req_s.send(i)
                await rep_r.receive()
            bare_s = time.perf_counter() - t0
            n.cancel_scope.cancel()
        self.report("mailbox", round_trips=m, actor_ask_per_s=m / actor_s, bare_channel_per_s=m / bare_s,
                    ratio_actor_over_bare=(m / actor_s) / (m / bare_s),
                    target="reported (no target)", met=True)

    async def journal(self) -> None:
        """The task journal's cost: the same tasks through the same FakeEngine pool, with the
        journal (each task accepted, dispatched, answered and finished in SQLite, through its
        thread) and without it (straight to the pool). Rounds alternate; the best of each."""
        from ..testing import FakeEngine

        @asynccontextmanager
        async def fake():
            async with FakeEngine() as engine:
                yield engine
        await self._journal_cost("journal", fake, self.sizes["journal"], engine_url=None)

    async def journal_real(self, engine, url: str) -> None:
        """The same on the real engine: a pool of 4 stub workers, trivial tasks (so the journal's
        share of a task's round trip is as large as it gets)."""
        @asynccontextmanager
        async def same():
            yield engine
        await self._journal_cost("journal_real", same, self.sizes["journal_real"], engine_url=url)

    async def _journal_cost(self, key: str, open_engine_, n: int, *, engine_url: str | None) -> None:
        import tempfile
        from ..api import open_supervisor
        from ..specs import PoolSpec, SupervisorConfig, Task, WorkerSpec
        replicas, in_flight = 4, 64

        async def one_round(journaled: bool) -> float:
            with tempfile.TemporaryDirectory() as d:
                cfg = SupervisorConfig(name=f"{self.name}j" if engine_url else "jb",
                                       engine_url=engine_url, state_dir=d if journaled else None,
                                       pools=[PoolSpec(name="p", replicas=replicas,
                                                       queue_size=in_flight, worker=WorkerSpec())])
                async with open_engine_() as engine, open_supervisor(cfg, engine=engine) as sup:
                    await sup.wait_configured()
                    pool, tasks = sup.pool("p"), sup.tasks
                    if tasks is not None:
                        await tasks.wait_resumed()
                    limit = trio.Semaphore(in_flight)

                    async def go(i: int) -> None:
                        try:
                            task = Task(prompt="true")
                            if tasks is None:
                                res = await pool.run(task)
                            else:
                                res = (await tasks.result(await tasks.submit("pool:p", task),
                                                          wait=True)).result
                            assert res is not None and res.status == "ok", res
                        finally:
                            limit.release()
                    t0 = time.perf_counter()
                    async with trio.open_nursery() as nursery:
                        for i in range(n):
                            await limit.acquire()
                            nursery.start_soon(go, i)
                    return n / (time.perf_counter() - t0)
        rates: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(3):
            for journaled in (False, True):
                rates[journaled].append(await one_round(journaled))
        plain, journaled = max(rates[False]), max(rates[True])
        self.report(key, tasks=n, pool_replicas=replicas, in_flight=in_flight,
                    tasks_per_s_without_journal=plain, tasks_per_s_with_journal=journaled,
                    ratio_with_over_without=journaled / plain,
                    journal_ms_per_task=(1 / journaled - 1 / plain) * 1000,
                    target="reported (no target)", met=True)

    async def swarm(self) -> None:
        """A 2-node test swarm (runtime/chaoskit/swarm.py; root) against the single engine, in
        one run: spawn throughput (a pool of N to READY) and restart latency (a kill through
        the engine -> the replacement READY) on each; then the time to see a lost node, for a
        node whose dockerd stops (SIGTERM) and one whose dockerd is SIGKILLed (its containers run
        on, headless: only the manager's heartbeats tell), with the time until its workers serve
        again on the other node."""
        from ..api import open_supervisor
        from ..chaoskit.swarm import TestSwarm
        from ..engines import open_engine
        from ..specs import Backoff, PoolSpec, RestartPolicy, SupervisorConfig, WorkerSpec
        n, kills = self.sizes["swarm_spawn"], self.sizes["swarm_restart"]
        swarm = TestSwarm(2)
        await swarm.open()
        data: dict[str, Any] = {"swarm_up_s": swarm.up_s}
        try:
            for label, url in (("single", self.engine_url), ("swarm", swarm.url)):
                async with open_engine(url) as engine:
                    name = f"{self.name}{label[:2]}"
                    try:
                        async with open_supervisor(SupervisorConfig(name=name, max_restarts=10_000,
                                                                    max_concurrent_starts=16),
                                                   engine=engine) as sup:
                            policy = RestartPolicy(max_restarts=1000, backoff=Backoff(stable_s=0.5))
                            warm = await sup.spawn(WorkerSpec(agent="shell"))   # image built, copied
                            await warm.stop()
                            spawn_s = []
                            for r in range(self.sizes["spawn_rounds"]):
                                t0 = time.perf_counter()
                                await sup.start_pool(PoolSpec(name=f"s{r}", replicas=n, queue_size=n,
                                                              worker=WorkerSpec(agent="shell")))
                                spawn_s.append(time.perf_counter() - t0)
                                await sup.stop_child(f"pool:s{r}")
                            w = await sup.spawn(WorkerSpec(agent="shell", restart=policy))
                            restart_s = []
                            for _ in range(kills):
                                await trio.sleep(1.0)     # stable: the next restart is immediate
                                info = await w.info()
                                t0 = time.perf_counter()
                                await engine.container_kill(info.container_id)
                                await w.wait_until(lambda i: i.generation > info.generation
                                                   and i.state == "ready")
                                restart_s.append(time.perf_counter() - t0)
                            await w.stop()
                            data[f"spawn_per_s_{label}"] = n / statistics.median(spawn_s)
                            data[f"restart_s_{label}"] = summary(restart_s)
                            if label == "swarm":
                                data.update(await self._swarm_node_loss(sup, engine, swarm))
                    finally:
                        with trio.CancelScope(shield=True):
                            await self.cleanup_name(engine, name)
        finally:
            await swarm.aclose()
        data["swarm_down_s"] = swarm.down_s
        data["spawn_ratio_swarm_over_single"] = data["spawn_per_s_swarm"] / data["spawn_per_s_single"]
        data["restart_ratio_swarm_over_single"] = (data["restart_s_swarm"]["median"]
                                                   / data["restart_s_single"]["median"])
        self.report("swarm", workers=n, rounds=self.sizes["spawn_rounds"], kills=kills, **data,
                    target="a lost node seen within 5 s", met=data["node_lost_kill_s"] < 5.0)

    async def _swarm_node_loss(self, sup, engine, swarm) -> dict[str, float]:
        from ..specs import PoolSpec, WorkerSpec
        out: dict[str, float] = {}
        for how in ("stop", "kill"):
            pool = await sup.start_pool(PoolSpec(name=f"loss{how}", replicas=4,
                                                 worker=WorkerSpec(agent="shell")))
            infos = [await w.info() for w in pool.workers]
            placed = {i.id: (await engine.placement(i.container_id))[0].hostname for i in infos}
            moved = [w for w in pool.workers if placed[w.id] == "n2"]
            node = swarm.node("n2")
            t0 = time.perf_counter()
            if how == "stop":
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(swarm.stop_node, "n2")
                    while node.node_id not in engine.lost:
                        await engine._changed.wait()
                    out["node_lost_stop_s"] = time.perf_counter() - t0
            else:
                await trio.to_thread.run_sync(node.kill_sync)
                while node.node_id not in engine.lost:
                    await engine._changed.wait()
                out["node_lost_kill_s"] = time.perf_counter() - t0
            gens = {i.id: i.generation for i in infos}
            for w in moved:
                await w.wait_until(lambda i, g=gens[w.id]: i.generation > g and i.state == "ready")
            out[f"workers_back_after_{how}_s"] = time.perf_counter() - t0
            out[f"workers_moved_by_{how}"] = len(moved)
            await sup.stop_child(f"pool:loss{how}")
            await swarm.start_node("n2")
            await trio.to_thread.run_sync(lambda: swarm.wait_nodes({"n2": "ready"}))
            while node.node_id in engine.lost:
                await engine._changed.wait()
        return out

    async def cleanup_name(self, engine, name: str) -> None:
        from ..testing import remove_containers
        await remove_containers(engine, name)

    async def run(self, only: list[str] | None) -> dict[str, Any]:
        want = set(only or ["restart", "spawn", "task", "scale", "idle", "mailbox", "journal",
                            "adopt"])
        print(f"corral bench ({'quick' if self.sizes is QUICK else 'full'}) on {platform.node()}: "
              f"{os.cpu_count()} cores, python {platform.python_version()}", flush=True)
        if "mailbox" in want:
            await self.mailbox()
        if "journal" in want:
            await self.journal()
        if "scale" in want:
            await trio.to_thread.run_sync(self.scale_fake)
        if "swarm" in want:       # only when named: it needs root, and a test swarm of its own
            await self.swarm()
            want = want - {"swarm"}
            if not want:
                return self.results
        compared = want & {"restart", "spawn"}
        if self.compare_url and compared:
            want |= {"lifecycle"}
        first = await self.on_engine(self.engine_url, want)
        self.results["engine"] = first
        if self.compare_url and compared:
            second = await self.on_engine(self.compare_url, compared | {"lifecycle"}, second=True)
            self.results["engine" + self.suffix] = second
            self.compare(first, second, sorted(compared))
        return self.results

    async def on_engine(self, url: str | None, want: set[str], *, second: bool = False) -> dict[str, Any]:
        """The real-engine scenarios in ``want`` on the engine at ``url``; what engine it is."""
        from ..api import open_supervisor
        from ..engines import open_engine
        from ..engines.docker import resolve_url
        from ..specs import SupervisorConfig
        url = resolve_url(url)
        self.cli_env = {**os.environ, "DOCKER_HOST": url}
        async with open_engine(url) as engine:
            v = await engine.version()
            flavour = getattr(engine, "flavour", "docker")
            label = flavour + ("-rootless" if getattr(engine, "rootless", False) else "")
            self.suffix = f"@{label}" if second else ""
            about = {"url": url, "flavour": label, "version": v.version, "api": v.api_version,
                     "kernel": v.kernel_version}
            print(f"\n== {label} {v.version} at {url}", flush=True)
            try:
                async with open_supervisor(SupervisorConfig(name=self.name, engine_url=url,
                                                            max_restarts=10_000), engine=engine) as sup:
                    image = (await sup.builder.image_for("shell", [], False)).tag
                    for key in ("restart", "spawn", "lifecycle", "task", "idle"):
                        if key in want:
                            await getattr(self, key)(sup, engine, image)
                    # the real-agent scenarios (image builds, spawn, gateway overhead) run when
                    # named: `corral bench --only agent-image --only agent-spawn --only gateway`
                    from .bench_agents import AGENT_SCENARIOS, run_agent_scenarios
                    if want & set(AGENT_SCENARIOS):
                        await run_agent_scenarios(self, sup, engine, want & set(AGENT_SCENARIOS))
            finally:
                with trio.CancelScope(shield=True):
                    await self.cleanup(engine)
            if "journal" in want and not second:
                await self.journal_real(engine, url)
            if "adopt" in want and not second:
                if flavour == "docker":
                    await self.adopt(engine, url)
                else:       # Podman closes a container's stdin with its attach: no adoption
                    print(f"\n[adopt] skipped on {label}: crash safety needs Docker", flush=True)
        return about

    async def adopt(self, engine, url: str) -> None:
        """A restart of corral with N workers running: the previous instance is "killed"
        (``abandon``: every container left running, as a SIGKILL leaves them), then a new one
        with the same name adopts them. Time from the new ``open_supervisor`` to every worker
        serving (its pool started), and whether the same containers serve."""
        from ..api import open_supervisor
        from ..specs import PoolSpec, SupervisorConfig, WorkerSpec
        figures: dict[str, Any] = {}
        for n in self.sizes["adopt"]:
            name = f"{self.name}a{n}"
            cfg = SupervisorConfig(name=name, engine_url=url, max_concurrent_starts=16,
                                   pools=[PoolSpec(name="p", replicas=n, queue_size=n,
                                                   worker=WorkerSpec(agent="shell"))])
            try:
                abandon = trio.Event()
                async with open_supervisor(cfg, engine=engine, abandon=abandon) as sup:
                    await sup.wait_configured()
                    before = {w.id: w.info_nowait().container_id for w in sup.pool("p").workers}
                    abandon.set()
                t0 = time.perf_counter()
                async with open_supervisor(cfg, engine=engine) as sup:
                    await sup.wait_configured()
                    ready = time.perf_counter() - t0
                    after = {w.id: w.info_nowait().container_id for w in sup.pool("p").workers}
                    states = {w.info_nowait().state for w in sup.pool("p").workers}
                figures[f"adopt_{n}_s"] = ready
                figures[f"adopt_{n}_same_containers"] = before == after and len(after) == n
                figures[f"adopt_{n}_states"] = ",".join(sorted(states))
            finally:
                with trio.CancelScope(shield=True):
                    from ..testing import remove_containers
                    await remove_containers(engine, name)
        self.report("adopt", **figures,
                    target="10 workers adopted and serving in under 1 s",
                    met=figures.get("adopt_10_s", 99) < 1.0 and bool(figures.get("adopt_10_same_containers")))

    def compare(self, first: dict[str, Any], second: dict[str, Any], keys: list[str]) -> None:
        """The two engines' figures side by side (each measured on its own engine, one run)."""
        a, b, sfx = first["flavour"], second["flavour"], self.suffix
        self.suffix = ""
        data: dict[str, Any] = {"engines": f"{a} {first['version']} vs {b} {second['version']}"}
        r = self.results
        if "restart" in keys:
            ra, rb = r["restart"]["corral_s"]["median"], r["restart" + sfx]["corral_s"]["median"]
            data[f"restart_median_s_{a}"] = ra
            data[f"restart_median_s_{b}"] = rb
            data[f"restart_ratio_{b}_over_{a}"] = rb / ra
            data[f"engine_restart_policy_median_s_{b}"] = r["restart" + sfx]["docker_restart_policy_s"]["median"]
        if "spawn" in keys:
            sa, sb = r["spawn"]["corral_per_s"], r["spawn" + sfx]["corral_per_s"]
            data[f"spawn_per_s_{a}"] = sa
            data[f"spawn_per_s_{b}"] = sb
            data[f"spawn_rate_ratio_{b}_over_{a}"] = sb / sa
        self.report("compare", **data, target="reported (no target)", met=True)


async def _scale_child(n: int, mode: str) -> None:
    """Runs in its own process so RSS is clean. mode "corral": N pool workers on FakeEngine;
    mode "engine": the same N fake containers started and attached without corral (the in-memory
    engine's own share, which a real deployment keeps in dockerd, not in the supervisor)."""
    import gc
    from contextlib import AsyncExitStack
    from ..api import open_supervisor
    from ..specs import PoolSpec, SupervisorConfig, WorkerSpec
    from ..engines import ContainerSpec
    from ..testing import FakeEngine
    gc.collect()
    before = rss_kib()
    async with FakeEngine() as engine:
        t0 = time.perf_counter()
        if mode == "engine":
            image = engine.add_image("corral/worker-shell:bench")
            async with AsyncExitStack() as stack:
                for i in range(n):
                    cid = await engine.container_create(ContainerSpec(
                        image=image, name=f"corral-scale-s-{i}-1",
                        labels={"corral.supervisor": "scale", "corral.worker": f"s-{i}"},
                        env={"CORRAL_WORKER_ID": f"s-{i}", "CORRAL_AGENT": "shell",
                             "CORRAL_HEARTBEAT_S": "5.0"}))
                    await stack.enter_async_context(engine.attach(cid))
                    await engine.container_start(cid)
                await trio.sleep(0.5)
                ready_s = time.perf_counter() - t0
                gc.collect()
                after = rss_kib()
                t1 = time.perf_counter()
                engine.go_down()
        else:
            async with open_supervisor(SupervisorConfig(name="scale", max_concurrent_starts=n),
                                       engine=engine, rng=random.Random(0)) as sup:
                await sup.start_pool(PoolSpec(name="s", replicas=n, queue_size=n,
                                              worker=WorkerSpec(agent="shell")))
                ready_s = time.perf_counter() - t0
                await trio.sleep(0.5)
                gc.collect()
                after = rss_kib()
                t1 = time.perf_counter()
    stop_s = time.perf_counter() - t1
    print(json.dumps({"ready_s": ready_s, "rss_kib_before": before, "rss_kib_after": after,
                      "rss_kib_delta": after - before, "stop_s": stop_s}))


def main(args) -> int:
    sizes = QUICK if args.quick else FULL
    compare = getattr(args, "compare_engine", None) or os.environ.get(COMPARE_ENV) or None
    bench = Bench(sizes, args.engine, compare)
    results = trio.run(bench.run, args.only)
    missed = [k for k, v in results.items() if isinstance(v, dict) and v.get("met") is False]
    print("\nsummary: " + ("all targets met" if not missed else f"missed: {', '.join(missed)}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"quick": args.quick, "cores": os.cpu_count(), "results": results}, f, indent=2,
                      default=str)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--scale-child":
        from ..logging import configure_logging
        configure_logging(os.environ.get("CORRAL_LOG_LEVEL", "ERROR"))
        trio.run(_scale_child, int(sys.argv[2]), sys.argv[3])
