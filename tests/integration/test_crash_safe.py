"""Crash safety on the real engine (issue 12, part 5).

- `corral run` SIGKILLed while a pool of 3 runs 30 durable tasks, then started again with the
  same config and state directory: the same containers serve again (adopted, not replaced), the
  tasks that finished while no corral ran deliver their results, the queued ones run, and every
  task has exactly one result in the journal and ran exactly once in a container.
- A container whose supervisor is gone (no lease renewed) exits by itself once its lease runs
  out: exit code 0, its log says why; the next start certifies that death and removes it.

The tasks are shell commands that append to /workspace/ran in their container, so the runs are
counted where they happen, not where corral says they happened."""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from runtime import SupervisorConfig, Task, WorkerSpec, open_supervisor
from runtime.errors import ContainerNotFound
from runtime.journal import JOURNAL_FILE

from .test_run_service import CORRAL, ROOT, Service, call, stop_process

POOL = '''
[[pools]]
name = "shells"
replicas = 3
[pools.worker]
agent = "shell"
heartbeat_s = 30
heartbeat_timeout_s = 90
'''
"""corral renews the lease, acknowledging the answers it has, every heartbeat_s: that slowly, the
answers of the first process are (nearly always) unacknowledged at the SIGKILL, and replayed to
the next one, which has them in the journal already"""
WORKERS = ["shells-1", "shells-2", "shells-3"]
LONG_S = 10
"""the tasks in flight at the SIGKILL: they end while no corral runs"""


def prompt(label: str, sleep_s: float = 0) -> str:
    """A task that notes its start and end in its container, then answers ``out-<label>``."""
    nap = f"sleep {sleep_s}; " if sleep_s else ""
    return (f'echo "{label} start $(date +%s.%N)" >> /workspace/ran; {nap}'
            f'echo "{label} end $(date +%s.%N)" >> /workspace/ran; echo out-{label}')


@asynccontextmanager
async def corral_processes():
    """Start `corral run` processes; each one still running at the end gets SIGTERM (then
    SIGKILL), by its pid."""
    procs: list[trio.Process] = []
    async with trio.open_nursery() as nursery:

        async def start(cfg: Path, sock: str, state_dir: Path) -> Service:
            proc = await trio.lowlevel.open_process(
                CORRAL + ["--log-json", "run", "--config", str(cfg), "--socket", sock,
                          "--state-dir", str(state_dir)],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE)
            procs.append(proc)
            svc = Service(proc, sock)
            nursery.start_soon(svc.read_stderr)
            return svc
        try:
            yield start
        finally:
            for proc in procs:
                await stop_process(proc)
            nursery.cancel_scope.cancel()


async def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    with trio.fail_after(timeout):
        return await trio.run_process([*CORRAL, *args], cwd=ROOT, check=False,
                                      capture_stdout=True, capture_stderr=True)


async def wait_count(svc: Service, event: str, n: int) -> list[dict]:
    """The first ``n`` log entries of ``event`` (waits for them)."""
    while True:
        found = [e for e in svc.logs if e.get("event") == event]
        if len(found) >= n:
            return found[:n]
        if svc.eof:
            raise AssertionError(f"corral run ended with {len(found)} {event} of {n}:\n"
                                 + svc.stderr())
        await svc._more.wait()


async def containers(engine, labels: dict) -> list[tuple[str, str, str, str]]:
    """Every container of the label: (worker, id, status, generation), by worker."""
    return sorted((c.labels.get("corral.worker", ""), c.id, c.status,
                   c.labels.get("corral.generation", "")) for c in await engine.container_list(
        labels=labels))


async def ran_in(engine, cid: str) -> dict[str, dict[str, list[float]]]:
    """What ran in the container: label -> {"start": [times], "end": [times]}."""
    code, out = await engine.container_exec(cid, ["cat", "/workspace/ran"])
    runs: dict[str, dict[str, list[float]]] = {}
    if code != 0:
        return runs                 # no task ran there yet
    for line in out.splitlines():
        label, what, at = line.split()
        runs.setdefault(label, {"start": [], "end": []})[what].append(float(at))
    return runs


def journal_rows(state_dir: Path) -> dict[str, tuple[int, int, int]]:
    """Straight from the SQLite file (read-only): task id -> (final results, dispatches,
    attempt results)."""
    db = sqlite3.connect(f"file:{state_dir / JOURNAL_FILE}?mode=ro", uri=True)
    try:
        return {tid: (done, disp, att) for tid, done, disp, att in db.execute(
            "SELECT task_id, result IS NOT NULL, "
            "(SELECT count(*) FROM dispatches d WHERE d.task_id = t.task_id), "
            "(SELECT count(*) FROM attempts a WHERE a.task_id = t.task_id) FROM tasks t")}
    finally:
        db.close()


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def log_time(entry: dict) -> float:
    return datetime.datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()


async def test_sigkill_of_corral_run_under_a_pool_run_then_a_restart(engine, corral_name, tmp_path):
    cfg = tmp_path / "corral.toml"
    cfg.write_text(f'name = "{corral_name}"\n{POOL}')
    sock, state = str(tmp_path / "ctl.sock"), tmp_path / "state"
    labels = {"corral.supervisor": corral_name}
    ids: dict[str, str] = {}                  # label -> task id
    expect: dict[str, str] = {}               # label -> its output

    async def submit(label: str, sleep_s: float = 0) -> None:
        out = await cli("task", "--detach", "--pool", "shells", "--socket", sock,
                        prompt(label, sleep_s))
        assert out.returncode == 0, out.stderr.decode()
        ids[label] = out.stdout.decode().strip()
        expect[label] = f"out-{label}\n"

    async def state_of(label: str) -> str:
        return (await call(sock, {"op": "result", "task_id": ids[label]}))["state"]

    async def where(numbers) -> dict:
        """What the journal says of these tasks (for failure messages)."""
        out = {}
        for i in numbers:
            r = await call(sock, {"op": "result", "task_id": ids[f"t{i:02}"]})
            out[f"t{i:02}"] = (r["state"], [(d["worker_id"], d["generation"]) for d in r["dispatches"]],
                               [(a["worker_id"], a["result"]["status"], a["result"]["output"])
                                for a in r["attempts"]])
        return out

    with trio.fail_after(300):
        async with corral_processes() as start:
            first = await start(cfg, sock, state)
            await first.wait_log("configured_children_started")
            before = await containers(engine, labels)
            assert [(w, status, gen) for w, _, status, gen in before] == \
                [(w, "running", "1") for w in WORKERS]
            # 24 tasks, every fourth one sleeping a second
            for i in range(24):
                await submit(f"t{i:02}", 1 if i % 4 == 3 else 0)
            # 3 long ones, that take the whole pool...
            for i in range(24, 27):
                await submit(f"t{i:02}", LONG_S)
            while [await state_of(f"t{i:02}") for i in range(24, 27)] != ["dispatched"] * 3:
                await trio.sleep(0.1)
            # ...so that the last 3 wait in the pool's queue
            for i in range(27, 30):
                await submit(f"t{i:02}")
            out = await cli("result", ids["t27"], "--socket", sock)
            assert (out.returncode, out.stderr.decode()) == (
                75, f"corral: task {ids['t27']} is queued: not finished yet (--wait to wait for it)\n"), \
                (out, await where(range(20, 30)))
            assert [await state_of(f"t{i}") for i in range(27, 30)] == ["queued"] * 3
            done_before = {label for label in ids if await state_of(label) == "done"}
            assert done_before == {f"t{i:02}" for i in range(24)}

            first.proc.kill()                                   # SIGKILL, by its pid
            t_kill = time.time()
            assert await first.wait() == -signal.SIGKILL

            # the containers run on without any corral
            assert await containers(engine, labels) == before
            # the long tasks end while no corral runs; the queued ones do not start
            while True:
                runs: dict[str, dict[str, list[float]]] = {}
                for _, cid, _, _ in before:
                    runs.update(await ran_in(engine, cid))
                if all(runs.get(f"t{i}", {}).get("end") for i in range(24, 27)):
                    break
                await trio.sleep(0.2)
            t_restart = time.time()
            for i in range(24, 27):
                assert t_kill < runs[f"t{i}"]["end"][0] < t_restart
            assert not {f"t{i}" for i in range(27, 30)} & set(runs)

            # the restart, same config and state directory
            t_exec = time.time()
            second = await start(cfg, sock, state)
            adopted = await wait_count(second, "worker_adopted", 3)
            await second.wait_log("configured_children_started")
            survey = await second.wait_log("containers_to_adopt")
            assert (survey["count"], survey["workers"]) == (3, WORKERS)
            print(f"\nrestart to all {len(WORKERS)} workers adopted: "
                  f"{log_time(adopted[-1]) - t_exec:.3f} s from exec (of which "
                  f"{log_time(survey) - t_exec:.3f} s Python start, engine connection and "
                  f"survey), {log_time(adopted[-1]) - log_time(survey):.3f} s from the survey; "
                  f"per worker adopt_s={[e.get('adopt_s') for e in adopted]}")

            # every task: one result, ok, with its own output (read as an operator reads it)
            results = {}
            for label, tid in ids.items():
                out = await cli("result", tid, "--wait", "--json", "--socket", sock)
                assert out.returncode == 0, (label, out)
                results[label] = json.loads(out.stdout)
            assert {k: (r["status"], r["output"]) for k, r in results.items()} == \
                {k: ("ok", expect[k]) for k in ids}
            assert {r["task_id"] for r in results.values()} == set(ids.values())

            resumed = await second.wait_log("tasks_resumed")
            print(f"resumed: {resumed}")
            assert (resumed["requeued"], resumed["continued"] + resumed["finalized"],
                    resumed["retried"], resumed["lost"]) == (3, 3, 0, 0), resumed
            # the journal: one final result, one dispatch and one container answer per task
            rows = journal_rows(state)
            assert rows == {tid: (1, 1, 1) for tid in ids.values()}, \
                {label: rows.get(tid) for label, tid in ids.items() if rows.get(tid) != (1, 1, 1)}

            # no container duplicated or orphaned: the same three, same generation, each
            # task ran exactly once in them
            assert await containers(engine, labels) == before
            for w, cid, _, _ in before:
                info = await second.worker(w)
                assert (info["container_id"], info["generation"], info["restarts"], info["state"]) \
                    == (cid, 1, 0, "ready")
            starts: dict[str, int] = {}
            for _, cid, _, _ in before:
                for label, times in (await ran_in(engine, cid)).items():
                    assert len(times["start"]) == len(times["end"]) == 1, (label, times)
                    starts[label] = starts.get(label, 0) + 1
            assert starts == dict.fromkeys(ids, 1)
            assert not any(e.get("event") in ("worker_ready", "stale_container_removed")
                           for e in second.logs)          # no container made or reaped
            replayed = 0
            for _, cid, _, _ in before:
                hello = [line for line in (await engine.container_logs(cid, tail_bytes=65536))
                         .splitlines() if "hello: a supervisor attached" in line]
                assert len(hello) == 1, hello
                replayed += int(re.search(r"(\d+) task_done", hello[0]).group(1))
            assert replayed >= 3                # at least the answers given while corral was down
            print(f"answers replayed to the restarted corral: {replayed}")

            second.signal(signal.SIGTERM)
            assert await second.wait() == 0, second.stderr()
        assert await engine.container_list(labels=labels) == []
        assert processes_mentioning(str(cfg)) == []


@pytest.mark.parametrize("policy", ["cancel", "finish"])
async def test_an_orphaned_container_exits_after_its_lease(engine, corral_name, policy):
    lease_s, heartbeat_s, task_s = 2.0, 0.5, (60 if policy == "cancel" else 5)
    spec = WorkerSpec(id="orphan", agent="shell", heartbeat_s=heartbeat_s,
                      orphan_timeout_s=lease_s, orphan_policy=policy)
    abandon = trio.Event()
    labels = {"corral.supervisor": corral_name}
    with trio.fail_after(120):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine,
                                   abandon=abandon) as sup:
            w = await sup.spawn(spec)
            cid = (await w.info()).container_id
            async with trio.open_nursery() as n:
                t_task = time.time()                 # the task starts after this
                n.start_soon(w.run, Task(prompt=f"echo begun >&2; sleep {task_s}; echo ended",
                                         task_id="long"))
                while "[agent] begun" not in await engine.container_logs(cid):
                    await trio.sleep(0.05)           # the task runs in the container
                abandon.set()                        # a crash: the block ends, nothing is stopped
                t_abandon = time.time()
                await trio.sleep_forever()
        try:
            assert [c.id for c in await engine.container_list(labels=labels)] == [cid]
            with trio.fail_after(lease_s + task_s + 10):
                code = await engine.container_wait(cid)
            st = await engine.container_inspect(cid)
            logs = await engine.container_logs(cid, tail_bytes=8192)
            # the next start certifies the orphan's death, removes it, and starts a new one
            async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
                info = await (await sup.spawn(spec)).info()
                left = [c.id for c in await engine.container_list(labels=labels)]
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await engine.container_remove(cid, force=True)
                except ContainerNotFound:
                    pass
    assert (code, st.exit_code, st.running) == (0, 0, False), logs
    death = info.last_death
    assert (death.cause, death.exit_code, death.container_id, info.generation, info.restarts) == (
        "exited", 0, cid, 2, 1)
    assert death.reason == ("orphaned: its lease ran out with no supervisor attached "
                            "(orphan_timeout_s), and the wrapper exited (while no corral process "
                            "was attached)")
    assert left == [info.container_id] and cid != info.container_id
    lived = st.finished_at - t_abandon
    print(f"\norphan ({policy}): exited {lived:.2f} s after its supervisor went (lease "
          f"{lease_s:g} s, renewed every {heartbeat_s:g} s)")
    lines = [line for line in logs.splitlines() if "orphaned:" in line]
    if policy == "cancel":
        # the last lease came at most heartbeat_s before the crash
        assert lease_s - heartbeat_s <= lived <= lease_s + 5, lived
        assert lines[0].endswith("orphaned: no supervisor for 2 s: cancelling task long, then exiting")
    else:
        # the task ends by itself, then the wrapper exits
        assert st.finished_at - t_task >= task_s and lived <= task_s + 5, lived
        assert lines[0].endswith("orphaned: no supervisor for 2 s: task long may finish, then "
                                 "the wrapper exits")
    assert lines[-1].endswith("orphaned: task long ended, exiting"), logs
    assert await engine.container_list(labels=labels) == []
