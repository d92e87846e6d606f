"""The control protocol of `corral run`, one instance per name, static config checks: FakeEngine."""

import json
import os
import re
import subprocess
import sys
from contextlib import asynccontextmanager

import msgspec
import pytest
import trio

from runtime import (ConfigError, CorralError, PoolSpec, SupervisorConfig, WorkerSpec,
                     open_supervisor)
from runtime.apps.control import call, handle, serve_control
from runtime.engines import ContainerSpec
from runtime.testing import FakeEngine, capture_logs

from .helpers import fake_supervisor

CFG = SupervisorConfig(name="t", workers=[WorkerSpec(id="solo")], pools=[PoolSpec(name="p", replicas=1)])


async def ask(sup, **req):
    return await handle(sup, msgspec.json.encode(req))


@asynccontextmanager
async def control_server(sup, tmp_path):
    """serve_control on a real unix socket; yields (path, the cancel scope that stops it)."""
    path = str(tmp_path / "ctl.sock")
    async with trio.open_nursery() as n:
        await n.start(serve_control, sup, path)
        yield path, n.cancel_scope
        n.cancel_scope.cancel()


async def send(path, req) -> trio.SocketStream:
    stream = await trio.open_unix_socket(path)
    await stream.send_all(msgspec.json.encode(req) + b"\n")
    return stream


async def receive_answer(stream) -> dict:
    buf = b""
    while b"\n" not in buf:
        chunk = await stream.receive_some()
        assert chunk, f"the server closed the connection without answering (got {buf!r})"
        buf += chunk
    return json.loads(buf.split(b"\n", 1)[0])


async def test_control_ops(autojump_clock):
    cfg = SupervisorConfig(name="t", workers=[WorkerSpec(id="solo")], pools=[PoolSpec(name="p", replicas=2)])
    async with fake_supervisor(cfg) as (sup, engine):
        await sup.wait_configured()
        res = await ask(sup, op="spawn", spec={"id": "extra", "agent": "claude", "stub_agent": True})
        assert res["ok"] and res["result"]["id"] == "extra" and res["result"]["state"] == "ready"
        res = await ask(sup, op="task", pool="p", prompt="hi")
        assert res["ok"] and res["result"]["output"] == "stub-shell: hi"
        assert sup.worker("p-1").id == "p-1"          # pool workers are found by id too
        res = await ask(sup, op="task", worker_id="extra", prompt="yo")
        assert res["result"]["output"] == "stub-claude: yo"
        snap = await ask(sup, op="snapshot")
        kinds = sorted(c["type"] for c in snap["result"]["children"])
        assert kinds == ["pool", "worker", "worker"]
        assert (await ask(sup, op="stop", worker_id="extra"))["ok"]
        res = await ask(sup, op="stop", worker_id="nobody")
        assert not res["ok"] and "no worker 'nobody'" in res["error"]
        res = await ask(sup, op="spawn", spec={"agent": "shell", "bogus": 1})
        assert not res["ok"] and "bogus" in res["error"]
        res = await ask(sup, op="dance")
        assert not res["ok"] and "unknown op" in res["error"]
        res = await handle(sup, b"{not json")
        assert not res["ok"] and res["error"].startswith("bad request")


# -- finding 12: every request is checked at the edge -------------------------------------------
BAD_REQUESTS = [
    ({"op": "task", "pool": "p", "prompt": "x", "max_attempts": 0}, "max_attempts"),
    ({"op": "task", "pool": "p", "prompt": "x", "max_attempts": -5}, "max_attempts"),
    ({"op": "task", "pool": "p", "prompt": "x", "timeout_s": -1}, "timeout_s"),
    ({"op": "task", "pool": "p", "prompt": "x", "timeout_s": "abc"}, "timeout_s"),
    ({"op": "task", "pool": "p", "prompt": 5}, "prompt"),
    ({"op": "task", "pool": "p", "prompt": ["x"]}, "prompt"),
    ({"op": "task", "pool": "p", "prompt": "a\x00b"}, "NUL"),
    ({"op": "task", "pool": "p", "prompt": "x", "args": "-v"}, "args"),
    ({"op": "task", "pool": "p", "prompt": "x", "max_output_bytes": 10}, "max_output_bytes"),
    ({"op": "task", "pool": "p", "prompt": "x", "bogus": 1}, "bogus"),
    ({"op": "task", "prompt": "x"}, "worker_id"),
    ({"op": "task", "pool": "p", "worker_id": "solo", "prompt": "x"}, "worker_id"),
    ({"op": "task", "pool": 3, "prompt": "x"}, "pool"),
    ({"op": "task", "pool": "p"}, "prompt"),
    ({"op": "stop"}, "worker_id"),
    ({"op": "restart", "worker_id": 7}, "worker_id"),
    ({"op": "spawn", "spec": {"memory": "lots"}}, "$.spec.memory"),
    ({"op": "spawn", "spec": "shell"}, "$.spec"),
    ({"op": "snapshot", "extra": 1}, "extra"),
    ({"op": 3}, "unknown op"),
    ({"prompt": "x"}, "op"),
]
BAD_LINES = [
    (b"[1, 2]", "JSON object"),
    (b'"task"', "JSON object"),
    (b"null", "JSON object"),
    (b"42", "JSON object"),
    (b"\xff\xfe{}", "JSON"),
    (b'{"op": "task", "pool": "p", "prompt": "\xff"}', "UTF-8"),
    (b'{"op": "task", "pool": "p", "prompt": "\\ud800"}', "JSON"),
    (b"{not json", "JSON"),
]


async def test_invalid_requests_are_clear_errors_naming_the_field(autojump_clock):
    async with fake_supervisor(CFG) as (sup, engine):
        await sup.wait_configured()
        wrong = []
        with capture_logs() as logs:
            cases = [(line, needle) for line, needle in BAD_LINES]
            cases += [(msgspec.json.encode(req), needle) for req, needle in BAD_REQUESTS]
            for line, needle in cases:
                res = await handle(sup, line)
                if res["ok"] is not False or not res["error"].startswith("bad request: ") \
                        or needle not in res["error"]:
                    wrong.append((line, res))
        assert not wrong, "\n".join(map(repr, wrong))
        assert not [e for e in logs if e["event"] in ("task_done", "control_request_failed")]
        res = await ask(sup, op="task", pool="p", prompt="still fine", max_attempts=2, timeout_s=5)
        assert res["ok"] and res["result"]["output"] == "stub-shell: still fine"


# -- finding 6: a client that goes away cancels its request --------------------------------------
async def test_a_client_that_disconnects_cancels_its_running_task(autojump_clock, tmp_path):
    async with fake_supervisor(CFG) as (sup, engine), control_server(sup, tmp_path) as (path, _):
        await sup.wait_configured()
        client = await send(path, {"op": "task", "worker_id": "solo", "prompt": "!sleep 600"})
        await trio.sleep(1)
        assert (await sup.worker("solo").info()).state == "busy"
        await client.aclose()
        await trio.sleep(1)
        info = await sup.worker("solo").info()
        assert (info.state, info.generation) == ("ready", 1)   # cancelled in its container


async def test_a_client_that_disconnects_takes_its_queued_task_away(autojump_clock, tmp_path):
    async with fake_supervisor(CFG) as (sup, engine), control_server(sup, tmp_path) as (path, _):
        await sup.wait_configured()
        running = await send(path, {"op": "task", "pool": "p", "prompt": "!sleep 600"})
        await trio.sleep(1)
        queued = await send(path, {"op": "task", "pool": "p", "prompt": "!sleep 600"})
        await trio.sleep(1)
        await queued.aclose()
        await trio.sleep(1)
        await running.aclose()
        await trio.sleep(1)
        t0 = trio.current_time()
        res = await ask(sup, op="task", pool="p", prompt="next")
        assert res["result"]["output"] == "stub-shell: next"
        assert trio.current_time() - t0 < 1       # nobody's !sleep 600 ran in between
        assert (await sup.worker("p-1").info()).generation == 1


async def test_in_flight_requests_are_answered_when_the_server_stops(autojump_clock, tmp_path):
    async with fake_supervisor(CFG) as (sup, engine):
        await sup.wait_configured()
        async with control_server(sup, tmp_path) as (path, stop):
            client = await send(path, {"op": "task", "pool": "p", "prompt": "!sleep 600"})
            await trio.sleep(1)
            stop.cancel()
        assert await receive_answer(client) == {"ok": False, "error": "corral is shutting down"}
        await client.aclose()


# -- finding 9: requests that need the configured tree wait for it -------------------------------
async def test_requests_arriving_during_startup_wait_for_the_configured_tree(autojump_clock):
    cfg = SupervisorConfig(name="t", pools=[PoolSpec(name="stubs", replicas=2)])
    async with fake_supervisor(cfg, start_delay=1.0) as (sup, engine):
        t0 = trio.current_time()
        snap = await ask(sup, op="snapshot")
        assert snap["ok"] and trio.current_time() == t0        # snapshot answers at once
        res = await ask(sup, op="task", pool="stubs", prompt="early")
        assert res["ok"] and res["result"]["output"] == "stub-shell: early", res
        assert trio.current_time() - t0 >= 1.0
    async with fake_supervisor(cfg, start_delay=1.0) as (sup, engine):
        res = await ask(sup, op="restart", worker_id="stubs-2")
        assert res["ok"], res


# -- finding 7: static configuration errors, before anything starts -----------------------------
@pytest.mark.parametrize("cfg, needle", [
    (SupervisorConfig(name="t", workers=[WorkerSpec(agent="gpt")]), "`$.workers[0].agent`: unknown agent 'gpt'"),
    (SupervisorConfig(name="t", workers=[WorkerSpec(capabilities=["git", "kubectl"])]),
     "unknown capability 'kubectl'"),
    (SupervisorConfig(name="t", pools=[PoolSpec(name="p", worker=WorkerSpec(agent="nope"))]),
     "`$.pools[0].worker.agent`"),
    (SupervisorConfig(name="t", workers=[WorkerSpec(id="a"), WorkerSpec(id="b"), WorkerSpec(id="a")]),
     "`$.workers[2].id`: duplicate worker id 'a'"),
    (SupervisorConfig(name="t", pools=[PoolSpec(name="p"), PoolSpec(name="p")]), "duplicate pool name 'p'"),
    (SupervisorConfig(name="t", workers=[WorkerSpec(id="p-2")], pools=[PoolSpec(name="p")]),
     "'p-2' is the id of a member of pool 'p'"),
])
async def test_static_config_errors_are_found_before_anything_starts(autojump_clock, cfg, needle):
    async with FakeEngine() as engine:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            async with open_supervisor(cfg, engine=engine):
                pytest.fail("the supervisor started")
        assert engine.stats["creates"] == engine.stats["builds"] == 0


# -- finding 3: one instance per supervisor name per engine --------------------------------------
async def test_one_instance_per_supervisor_name_per_engine(autojump_clock):
    async with FakeEngine() as engine, FakeEngine() as other:
        async with open_supervisor(SupervisorConfig(name="t"), engine=engine) as sup:
            w = await sup.spawn(WorkerSpec(id="w"))
            with pytest.raises(CorralError, match="supervisor 't' is already running"):
                async with open_supervisor(SupervisorConfig(name="t"), engine=engine):
                    pytest.fail("a second instance started")
            info = await w.info()
            assert (info.state, info.generation) == ("ready", 1)
            assert engine.containers[info.container_id].status == "running"
            async with open_supervisor(SupervisorConfig(name="t"), engine=other):
                pass                                    # the same name on another engine
            async with open_supervisor(SupervisorConfig(name="u"), engine=engine):
                pass                                    # another name on the same engine
        async with open_supervisor(SupervisorConfig(name="t"), engine=engine):
            pass                                        # released on exit


def test_the_instance_lock_file_is_per_engine_and_name_and_names_its_holder(tmp_path):
    from runtime.instance import AlreadyRunning, acquire_file_lock

    d = str(tmp_path)
    lock = acquire_file_lock("unix:///var/run/docker.sock", "x", directory=d)
    with pytest.raises(AlreadyRunning, match=f"pid {os.getpid()} holds .*x@"):
        acquire_file_lock("unix:///var/run/docker.sock", "x", directory=d)
    acquire_file_lock("unix:///var/run/docker.sock", "y", directory=d).release()
    acquire_file_lock("tcp://127.0.0.1:2375", "x", directory=d).release()
    lock.release()
    acquire_file_lock("unix:///var/run/docker.sock", "x", directory=d).release()


def test_the_instance_lock_dies_with_its_process(tmp_path):
    from runtime.instance import AlreadyRunning, acquire_file_lock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from runtime.instance import acquire_file_lock; "
         f"acquire_file_lock('unix:///var/run/docker.sock', 'x', directory={str(tmp_path)!r}); "
         "print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(AlreadyRunning, match=f"pid {holder.pid} "):
            acquire_file_lock("unix:///var/run/docker.sock", "x", directory=str(tmp_path))
        holder.kill()                       # a crash: no cleanup ran
        holder.wait(10)
        acquire_file_lock("unix:///var/run/docker.sock", "x", directory=str(tmp_path)).release()
    finally:
        holder.kill()
        holder.wait()


# -- finding 14: many simultaneous clients ------------------------------------------------------
async def test_500_simultaneous_clients_all_get_answers(tmp_path):
    cfg = SupervisorConfig(name="t", pools=[PoolSpec(name="p", replicas=4, queue_size=500)])
    async with fake_supervisor(cfg) as (sup, engine), control_server(sup, tmp_path) as (path, _):
        await sup.wait_configured()
        answers, errors = [], []

        async def one(i: int) -> None:
            req = {"op": "task", "pool": "p", "prompt": f"n{i}"} if i % 5 == 0 else {"op": "snapshot"}
            try:
                answers.append(await call(path, req))
            except Exception as exc:
                errors.append(repr(exc))
        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                for i in range(500):
                    n.start_soon(one, i)
        assert not errors, f"{len(errors)} of 500 clients failed, e.g. {errors[:3]}"
        assert len(answers) == 500
        assert sorted(a["output"] for a in answers if "output" in a) == sorted(
            f"stub-shell: n{i}" for i in range(0, 500, 5))
