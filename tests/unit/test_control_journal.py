"""`corral task --detach` and `corral result ID [--wait]`: the HTTP API's task routes over the
task journal (submit, status and result with long-poll), and the CLI commands, against the API
served on FakeEngine."""

import random
from contextlib import asynccontextmanager

import msgspec
import pytest
import trio

from runtime import PoolSpec, SupervisorConfig, WorkerSpec, open_supervisor
from runtime.apps import cli
from runtime.journal import open_journal
from runtime.testing import FakeEngine

from .helpers import fake_supervisor
from .test_control import api_server, in_process, receive_answer, send, uds_client
from .test_task_service import _journal_on_trios_thread, occupied, occupy  # noqa: F401 (autouse)




def config(state_dir) -> SupervisorConfig:
    return SupervisorConfig(name="t", state_dir=str(state_dir), workers=[WorkerSpec(id="solo")],
                            pools=[PoolSpec(name="p", replicas=1)])


@asynccontextmanager
async def journaled(state_dir):
    async with FakeEngine() as engine:
        async with open_supervisor(config(state_dir), engine=engine, rng=random.Random(1)) as sup:
            yield sup


async def submit(c, **req) -> str:
    r = await c.post("/v1/tasks", json=req)
    assert r.status_code == 202, r.json()
    return r.json()["task_id"]


async def result(c, tid, wait=None) -> dict:
    r = await c.get(f"/v1/tasks/{tid}", params={"wait": wait} if wait else None)
    assert r.status_code == 200, r.json()
    return r.json()


async def done(c, tid) -> dict:
    """Long-poll until the task is done (as `corral result --wait` does)."""
    while (rec := await result(c, tid, wait=300))["state"] != "done":
        pass
    return rec


async def test_detach_then_result_then_result_long_poll(autojump_clock, tmp_path):
    async with journaled(tmp_path) as sup, in_process(sup) as c:
        waited = []
        async with trio.open_nursery() as n:
            async with occupied(sup, "solo"):
                tid = await submit(c, worker_id="solo", prompt="hi")
                rec = await result(c, tid)
                assert rec["result"] is None and rec["state"] == "queued"
                assert rec["task"]["prompt"] == "hi" and rec["target"] == "worker:solo"
                t0 = trio.current_time()
                rec = await result(c, tid, wait=30)      # a long-poll that ends unfinished
                assert trio.current_time() - t0 == 30 and rec["state"] == "queued"

                async def wait() -> None:
                    waited.append(await result(c, tid, wait=300))
                n.start_soon(wait)
                await trio.sleep(60)
                assert waited == []                 # it waits while the task cannot run
        rec, = waited
        assert rec["state"] == "done"
        assert rec["result"]["output"] == "stub-shell: hi", rec["result"]


async def test_a_task_without_detach_goes_through_the_journal_too(autojump_clock, tmp_path):
    async with journaled(tmp_path) as sup, in_process(sup) as c:
        r = await c.post("/v1/tasks", json={"worker_id": "solo", "prompt": "hi",
                                            "task_id": "t-attached", "wait": True})
        assert r.json()["output"] == "stub-shell: hi"
        rec = await result(c, "t-attached")
        assert rec["result"]["output"] == "stub-shell: hi", rec["result"]


async def test_result_after_corral_run_restarted(autojump_clock, tmp_path):
    async with journaled(tmp_path) as sup, api_server(sup, tmp_path) as (path, _), \
            uds_client(path) as c:
        tid = await submit(c, pool="p", prompt="one")
        first = await done(c, tid)
        late = await submit(c, worker_id="solo", prompt="!sleep 600")
        queued = await submit(c, worker_id="solo", prompt="after it")
    async with journaled(tmp_path) as sup, api_server(sup, tmp_path) as (path, _), \
            uds_client(path) as c:
        again = await result(c, tid)
        assert again == first and again["result"]["output"] == "stub-shell: one"
        rec = await done(c, queued)
        assert rec["result"]["output"] == "stub-shell: after it"     # resumed, then ran
        assert (await result(c, late))["task"]["prompt"] == "!sleep 600"


async def test_unknown_ids_and_a_service_without_journal_are_clear_errors(autojump_clock, tmp_path):
    async with journaled(tmp_path) as sup, in_process(sup) as c:
        r = await c.get("/v1/tasks/t-nope")
        assert r.status_code == 404 and r.json()["code"] == "unknown_task"
        assert r.json()["message"].startswith("UnknownTask: no task 't-nope' in the journal")
        r = await c.get("/v1/tasks/t-nope", params={"wait": 10})
        assert r.status_code == 404 and "no task 't-nope'" in r.json()["message"]
        r = await c.get("/v1/tasks/..etc")
        assert r.status_code == 400 and "bad request" in r.json()["message"] and "task_id" in r.json()["message"]
        r = await c.post("/v1/tasks", json={"pool": "nope", "prompt": "x"})
        assert r.status_code == 404 and "no pool 'nope'" in r.json()["message"]
        tid = await submit(c, pool="p", prompt="x", task_id="t-twice")
        r = await c.post("/v1/tasks", json={"pool": "p", "prompt": "x", "task_id": "t-twice"})
        assert r.status_code == 409 and r.json()["code"] == "duplicate_task", r.json()
    cfg = SupervisorConfig(name="t", workers=[WorkerSpec(id="solo")])
    async with fake_supervisor(cfg) as (sup, _), in_process(sup) as c:
        for method, url, body in (("GET", "/v1/tasks/t-1", None),
                                  ("POST", "/v1/tasks", {"worker_id": "solo", "prompt": "x"})):
            r = await c.request(method, url, json=body)
            assert r.status_code == 409 and r.json()["code"] == "no_journal"
            assert "keeps no task journal" in r.json()["message"] and "--no-journal" in r.json()["message"]
        r = await c.post("/v1/tasks", json={"worker_id": "solo", "prompt": "x", "wait": True})
        assert r.json()["output"] == "stub-shell: x"          # as before


async def test_a_client_that_disconnects_cancels_its_journaled_task(autojump_clock, tmp_path):
    async with journaled(tmp_path) as sup, api_server(sup, tmp_path) as (path, _):
        client = await send(path, "POST", "/v1/tasks", {"worker_id": "solo", "prompt": "!sleep 86400",
                                                        "task_id": "t-1", "wait": True})
        await sup.worker("solo").wait_until(lambda i: i.state == "busy")
        await client.aclose()
        async with uds_client(path) as c:
            rec = await done(c, "t-1")
        assert rec["result"]["status"] == "cancelled"
        info = await sup.worker("solo").wait_until(lambda i: i.state == "ready")
        assert info.generation == 1                     # cancelled in its container


async def test_a_stopping_server_keeps_the_journaled_task_of_a_waiting_client(autojump_clock, tmp_path):
    """corral stopping is not its client giving up: the task stays in the journal and runs
    after the restart."""
    async with trio.open_nursery() as n, journaled(tmp_path) as sup:
        await occupy(n, sup, "solo")          # (still busy when corral stops)
        accepted = trio.Event()
        record = sup.tasks.journal.accepted

        async def accepted_then_tell(task, target):
            await record(task, target)
            if task.task_id == "t-1":
                accepted.set()
        sup.tasks.journal.accepted = accepted_then_tell
        async with api_server(sup, tmp_path) as (path, api):
            client = await send(path, "POST", "/v1/tasks", {"worker_id": "solo", "prompt": "queued",
                                                            "task_id": "t-1", "wait": True})
            await accepted.wait()
            api.stop()
            assert await receive_answer(client) == (
                503, {"code": "shutting_down", "message": "corral is shutting down"})
        await client.aclose()
    async with open_journal(str(tmp_path)) as j:
        assert (await j.get("t-1")).result is None
    async with journaled(tmp_path) as sup:
        rec = await sup.tasks.result("t-1", wait=True)
        assert rec.result.output == "stub-shell: queued"


# -- the CLI ---------------------------------------------------------------------------------------
async def corral(*argv: str) -> int:
    return await trio.to_thread.run_sync(cli.main, list(argv))


async def test_cli_task_detach_and_result(tmp_path, capsys):
    async with journaled(tmp_path) as sup, api_server(sup, tmp_path) as (path, _):
        await sup.wait_configured()
        assert await corral("task", "--socket", path, "--pool", "p", "--detach", "quick") == 0
        tid = capsys.readouterr().out.strip()
        assert tid.startswith("t-") and len(tid.split()) == 1
        assert await corral("result", "--socket", path, "--wait", tid) == 0
        assert capsys.readouterr().out == "stub-shell: quick\n"
        assert await corral("result", "--socket", path, "--json", tid) == 0
        assert msgspec.json.decode(capsys.readouterr().out)["output"] == "stub-shell: quick"
        # not finished yet: says where it is, exit 75
        async with occupied(sup, "solo"):
            assert await corral("task", "--socket", path, "--worker", "solo", "--detach", "later") == 0
            later = capsys.readouterr().out.strip()
            assert await corral("result", "--socket", path, later) == cli.EX_TEMPFAIL
            assert f"task {later} is queued: not finished yet" in capsys.readouterr().err
        # a failed task: the same exit code as `corral task`
        assert await corral("task", "--socket", path, "--pool", "p", "--detach", "!exit 3") == 0
        tid = capsys.readouterr().out.strip()
        assert await corral("result", "--socket", path, "--wait", tid) == 1
        assert await corral("task", "--socket", path, "--pool", "p", "!exit 3") == 1
        capsys.readouterr()
        assert await corral("result", "--socket", path, "t-nope") == 2
        captured = capsys.readouterr()
        assert "corral: error: UnknownTask: no task 't-nope'" in captured.err
        assert "Traceback" not in captured.err + captured.out


async def test_cli_without_journal(tmp_path, capsys):
    cfg = SupervisorConfig(name="t", workers=[WorkerSpec(id="solo")])
    async with fake_supervisor(cfg) as (sup, _), api_server(sup, tmp_path) as (path, _):
        assert await corral("result", "--socket", path, "t-1") == 2
        assert "keeps no task journal" in capsys.readouterr().err
        assert await corral("task", "--socket", path, "--worker", "solo", "--detach", "x") == 2
        assert "keeps no task journal" in capsys.readouterr().err


def test_corral_run_state_dir(monkeypatch):
    cfg = SupervisorConfig(name="svc")
    monkeypatch.setenv("XDG_STATE_HOME", "/srv/state")
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)
    assert cli.with_state_dir(cfg, None).state_dir == "/srv/state/corral/svc"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", "/home/u")
    assert cli.with_state_dir(cfg, None).state_dir == "/home/u/.local/state/corral/svc"
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    assert cli.with_state_dir(cfg, None).state_dir == "/var/lib/corral/svc"
    assert cli.with_state_dir(cfg, "/x").state_dir == "/x"
    assert cli.with_state_dir(cfg, "/x", no_journal=True).state_dir is None
    own = msgspec.structs.replace(cfg, state_dir="/from/config")
    assert cli.with_state_dir(own, None).state_dir == "/from/config"
    assert cli.with_state_dir(own, None, no_journal=True).state_dir is None
    args = cli.build_parser().parse_args(["run", "--config", "c.toml", "--no-journal"])
    assert args.no_journal and args.state_dir is None
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--config", "c.toml", "--no-journal", "--state-dir", "/x"])
