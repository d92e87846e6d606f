"""The HTTP API of `corral run` (its routes, errors, clients that leave, a stopping server),
one instance per name, static config checks: FakeEngine."""

import json
import os
import re
import subprocess
import sys
from contextlib import asynccontextmanager

import httpx
import msgspec
import pytest
import trio

from runtime import (ConfigError, CorralError, PoolSpec, SupervisorConfig, WorkerSpec,
                     open_supervisor)
from runtime.apps.httpapi import CorralAPI, serve_api
from runtime.engines import ContainerSpec
from runtime.testing import FakeEngine, capture_logs

from .helpers import fake_supervisor

CFG = SupervisorConfig(name="t", workers=[WorkerSpec(id="solo")], pools=[PoolSpec(name="p", replicas=1)])


@asynccontextmanager
async def api_server(sup, tmp_path):
    """serve_api on a real unix socket; yields (path, the CorralAPI: ``.stop()`` stops it)."""
    path = str(tmp_path / "api.sock")
    async with trio.open_nursery() as n:
        api = await n.start(serve_api, sup, path)
        try:
            yield path, api
        finally:
            api.stop()


@asynccontextmanager
async def in_process(sup):
    """An httpx client that calls the ASGI app in process (no socket)."""
    api = CorralAPI(sup)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api.app),
                                     base_url="http://corral") as c:
            yield c
    finally:
        api.close()


def uds_client(path) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=path), base_url="http://corral",
                             timeout=None)


async def send(path, method, target, body=None) -> trio.SocketStream:
    """A raw HTTP/1.1 request on the unix socket: the caller may close it before the answer."""
    data = msgspec.json.encode(body) if body is not None else b""
    stream = await trio.open_unix_socket(path)
    await stream.send_all(f"{method} {target} HTTP/1.1\r\nHost: corral\r\nContent-Type: "
                          f"application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return stream


async def receive_answer(stream) -> tuple[int, dict]:
    buf = b""
    while True:
        head, sep, body = buf.partition(b"\r\n\r\n")
        if sep:
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            if len(body) >= length:
                return int(head.split()[1]), json.loads(body[:length])
        chunk = await stream.receive_some()
        assert chunk, f"the server closed the connection without answering (got {buf!r})"
        buf += chunk


async def test_api_routes(autojump_clock):
    cfg = SupervisorConfig(name="t", workers=[WorkerSpec(id="solo")], pools=[PoolSpec(name="p", replicas=2)])
    async with fake_supervisor(cfg) as (sup, engine), in_process(sup) as c:
        await sup.wait_configured()
        r = await c.post("/v1/workers", json={"id": "extra", "agent": "claude", "stub_agent": True})
        assert r.status_code == 201 and r.json()["id"] == "extra" and r.json()["state"] == "ready"
        r = await c.post("/v1/tasks", json={"pool": "p", "prompt": "hi", "wait": True})
        assert r.status_code == 200 and r.json()["output"] == "stub-shell: hi"
        assert sup.worker("p-1").id == "p-1"          # pool workers are found by id too
        r = await c.post("/v1/tasks", json={"worker_id": "extra", "prompt": "yo", "wait": True})
        assert r.json()["output"] == "stub-claude: yo"
        tree = (await c.get("/v1/tree")).json()
        assert sorted(ch["type"] for ch in tree["children"]) == ["pool", "worker", "worker"]
        w = (await c.get("/v1/workers/p-1")).json()
        assert w["info"]["id"] == "p-1" and w["deaths"] == []
        r = await c.post("/v1/pools/p/scale", json={"replicas": 3})
        assert r.status_code == 200 and r.json()["replicas"] == 3
        assert [x["info"]["state"] for x in r.json()["workers"]] == ["ready"] * 3
        assert (await c.post("/v1/workers/extra/stop")).json() == {"ok": True}
        r = await c.post("/v1/workers/nobody/stop")
        assert r.status_code == 404 and r.json()["code"] == "no_such_child"
        assert "no worker 'nobody'" in r.json()["message"]
        r = await c.post("/v1/workers", json={"agent": "shell", "bogus": 1})
        assert r.status_code == 400 and r.json()["code"] == "bad_request" and "bogus" in r.json()["message"]
        r = await c.get("/v1/dance")
        assert r.status_code == 404 and r.json()["code"] == "not_found"
        r = await c.delete("/v1/tree")
        assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"
        r = await c.post("/v1/tasks", content=b"{not json")
        assert r.status_code == 400 and r.json()["message"].startswith("bad request")
        r = await c.post("/v1/tasks", json={"pool": "p", "prompt": "x"})      # no journal
        assert r.status_code == 409 and r.json()["code"] == "no_journal"


async def test_restart_is_answered_once_the_container_is_replaced(autojump_clock):
    async with fake_supervisor(CFG) as (sup, engine), in_process(sup) as c:
        await sup.wait_configured()
        old = (await sup.worker("solo").info()).container_id
        r = await c.post("/v1/workers/solo/restart")
        assert r.json() == {"ok": True}
        w = (await c.get("/v1/workers/solo")).json()["info"]
        assert (w["generation"], w["restarts"]) == (2, 1)
        assert old not in engine.containers


# -- finding 12: every request is checked at the edge -------------------------------------------
BAD_TASKS = [
    ({"pool": "p", "prompt": "x", "max_attempts": 0}, "max_attempts"),
    ({"pool": "p", "prompt": "x", "max_attempts": -5}, "max_attempts"),
    ({"pool": "p", "prompt": "x", "timeout_s": -1}, "timeout_s"),
    ({"pool": "p", "prompt": "x", "timeout_s": "abc"}, "timeout_s"),
    ({"pool": "p", "prompt": 5}, "prompt"),
    ({"pool": "p", "prompt": ["x"]}, "prompt"),
    ({"pool": "p", "prompt": "a\x00b"}, "NUL"),
    ({"pool": "p", "prompt": "x", "args": "-v"}, "args"),
    ({"pool": "p", "prompt": "x", "max_output_bytes": 10}, "max_output_bytes"),
    ({"pool": "p", "prompt": "x", "bogus": 1}, "bogus"),
    ({"prompt": "x"}, "worker_id"),
    ({"pool": "p", "worker_id": "solo", "prompt": "x"}, "worker_id"),
    ({"pool": 3, "prompt": "x"}, "pool"),
    ({"pool": "p"}, "prompt"),
    ({"pool": "p", "prompt": "x", "task_id": "../etc"}, "task_id"),
]
BAD_OTHERS = [
    ("POST", "/v1/workers", {"memory": "lots"}, "$.memory"),
    ("POST", "/v1/workers", "shell", "JSON object"),
    ("POST", "/v1/pools/p/scale", {"replicas": -1}, "replicas"),
    ("POST", "/v1/pools/p/scale", {}, "replicas"),
    ("POST", "/v1/pools/P!/scale", {"replicas": 1}, "$.pool"),
    ("POST", "/v1/workers/NOPE!/restart", None, "$.worker_id"),
    ("GET", "/v1/tasks/a%20b", None, "$.task_id"),
    ("GET", "/v1/events?kinds=dance", None, "unknown event kind"),
]
BAD_BODIES = [
    (b"[1, 2]", "JSON object"),
    (b'"task"', "JSON object"),
    (b"null", "JSON object"),
    (b"42", "JSON object"),
    (b"\xff\xfe{}", "JSON"),
    (b'{"pool": "p", "prompt": "\xff"}', "UTF-8"),
    (b'{"pool": "p", "prompt": "\\ud800"}', "JSON"),
    (b"{not json", "JSON"),
]


async def test_invalid_requests_are_clear_errors_naming_the_field(autojump_clock):
    async with fake_supervisor(CFG) as (sup, engine), in_process(sup) as c:
        await sup.wait_configured()
        wrong = []
        with capture_logs() as logs:
            cases = [("POST", "/v1/tasks", body, needle) for body, needle in BAD_BODIES]
            cases += [("POST", "/v1/tasks", msgspec.json.encode(dict(req, wait=True)), needle)
                      for req, needle in BAD_TASKS]
            cases += [(m, url, msgspec.json.encode(b) if b is not None else b"", needle)
                      for m, url, b, needle in BAD_OTHERS]
            for method, url, body, needle in cases:
                r = await c.request(method, url, content=body)
                err = r.json()
                if r.status_code != 400 or err.get("code") != "bad_request" \
                        or not err["message"].startswith("bad request: ") or needle not in err["message"]:
                    wrong.append((url, body, r.status_code, err))
        assert not wrong, "\n".join(map(repr, wrong))
        assert not [e for e in logs if e["event"] in ("task_done", "api_request_failed")]
        r = await c.post("/v1/tasks", json={"pool": "p", "prompt": "still fine", "max_attempts": 2,
                                            "timeout_s": 5, "wait": True})
        assert r.json()["output"] == "stub-shell: still fine"


# -- finding 6: a client that goes away cancels its request --------------------------------------
async def test_a_client_that_disconnects_cancels_its_running_task(autojump_clock, tmp_path):
    async with fake_supervisor(CFG) as (sup, engine), api_server(sup, tmp_path) as (path, _):
        await sup.wait_configured()
        client = await send(path, "POST", "/v1/tasks",
                            {"worker_id": "solo", "prompt": "!sleep 600", "wait": True})
        await sup.worker("solo").wait_until(lambda i: i.state == "busy")
        await client.aclose()
        info = await sup.worker("solo").wait_until(lambda i: i.state == "ready")
        assert info.generation == 1           # cancelled in its container, not restarted
        assert trio.current_time() < 600


async def test_a_client_that_disconnects_takes_its_queued_task_away(autojump_clock, tmp_path):
    async with fake_supervisor(CFG) as (sup, engine), api_server(sup, tmp_path) as (path, _):
        await sup.wait_configured()
        running = await send(path, "POST", "/v1/tasks", {"pool": "p", "prompt": "!sleep 600", "wait": True})
        await trio.sleep(1)
        queued = await send(path, "POST", "/v1/tasks", {"pool": "p", "prompt": "!sleep 600", "wait": True})
        await trio.sleep(1)
        await queued.aclose()
        await trio.sleep(1)
        await running.aclose()
        await trio.sleep(1)
        t0 = trio.current_time()
        async with uds_client(path) as c:
            r = await c.post("/v1/tasks", json={"pool": "p", "prompt": "next", "wait": True})
        assert r.json()["output"] == "stub-shell: next"
        assert trio.current_time() - t0 < 1       # nobody's !sleep 600 ran in between
        assert (await sup.worker("p-1").info()).generation == 1


async def test_in_flight_requests_are_answered_when_the_server_stops(autojump_clock, tmp_path):
    async with fake_supervisor(CFG) as (sup, engine):
        await sup.wait_configured()
        async with api_server(sup, tmp_path) as (path, api):
            client = await send(path, "POST", "/v1/tasks", {"pool": "p", "prompt": "!sleep 600", "wait": True})
            await sup.worker("p-1").wait_until(lambda i: i.state == "busy")
            api.stop()
            assert await receive_answer(client) == (
                503, {"code": "shutting_down", "message": "corral is shutting down"})
        await client.aclose()
        assert not os.path.exists(path)           # the socket file is removed


async def test_the_socket_is_its_owners_only(tmp_path):
    async with fake_supervisor(CFG) as (sup, engine), api_server(sup, tmp_path) as (path, _):
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)


# -- finding 9: requests that need the configured tree wait for it -------------------------------
async def test_requests_arriving_during_startup_wait_for_the_configured_tree(autojump_clock):
    cfg = SupervisorConfig(name="t", pools=[PoolSpec(name="stubs", replicas=2)])
    async with fake_supervisor(cfg, start_delay=1.0) as (sup, engine), in_process(sup) as c:
        t0 = trio.current_time()
        r = await c.get("/v1/tree")
        assert r.status_code == 200 and trio.current_time() == t0        # answered at once
        r = await c.post("/v1/tasks", json={"pool": "stubs", "prompt": "early", "wait": True})
        assert r.json()["output"] == "stub-shell: early", r.json()
        assert trio.current_time() - t0 >= 1.0
    async with fake_supervisor(cfg, start_delay=1.0) as (sup, engine), in_process(sup) as c:
        r = await c.post("/v1/workers/stubs-2/restart")
        assert r.status_code == 200, r.json()


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
    async with fake_supervisor(cfg) as (sup, engine), api_server(sup, tmp_path) as (path, _):
        await sup.wait_configured()
        answers, errors = [], []

        async def one(i: int) -> None:
            try:
                async with uds_client(path) as c:      # a connection of its own
                    if i % 5 == 0:
                        r = await c.post("/v1/tasks", json={"pool": "p", "prompt": f"n{i}", "wait": True})
                    else:
                        r = await c.get("/v1/tree")
                    r.raise_for_status()
                    answers.append(r.json())
            except Exception as exc:
                errors.append(repr(exc))
        with trio.fail_after(120):
            async with trio.open_nursery() as n:
                for i in range(500):
                    n.start_soon(one, i)
        assert not errors, f"{len(errors)} of 500 clients failed, e.g. {errors[:3]}"
        assert len(answers) == 500
        assert sorted(a["output"] for a in answers if "output" in a) == sorted(
            f"stub-shell: n{i}" for i in range(0, 500, 5))
