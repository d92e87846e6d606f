"""`corral task --detach` and `corral result ID [--wait]`: the control ops over the task journal,
and the CLI commands, against a control server on FakeEngine."""

import random
from contextlib import asynccontextmanager

import msgspec
import pytest
import trio

from runtime import PoolSpec, SupervisorConfig, WorkerSpec, open_supervisor
from runtime.apps import cli
from runtime.apps.control import call, handle
from runtime.journal import open_journal
from runtime.testing import FakeEngine

from .helpers import fake_supervisor
from .test_control import control_server, receive_answer, send
from .test_task_service import occupied, occupy


def config(state_dir) -> SupervisorConfig:
    return SupervisorConfig(name="t", state_dir=str(state_dir), workers=[WorkerSpec(id="solo")],
                            pools=[PoolSpec(name="p", replicas=1)])


@asynccontextmanager
async def journaled(state_dir):
    async with FakeEngine() as engine:
        async with open_supervisor(config(state_dir), engine=engine, rng=random.Random(1)) as sup:
            yield sup


async def ask(sup, **req):
    return await handle(sup, msgspec.json.encode(req))


async def test_detach_then_result_then_result_wait(autojump_clock, tmp_path):
    async with journaled(tmp_path) as sup:
        waited = []
        async with trio.open_nursery() as n:
            async with occupied(sup, "solo"):
                res = await ask(sup, op="task", worker_id="solo", prompt="hi", detach=True)
                assert res["ok"], res
                tid = res["result"]["task_id"]
                res = await ask(sup, op="result", task_id=tid)
                assert res["ok"] and res["result"]["result"] is None
                assert res["result"]["state"] == "queued"
                assert res["result"]["task"]["prompt"] == "hi"
                assert res["result"]["target"] == "worker:solo"

                async def wait() -> None:
                    waited.append(await ask(sup, op="result", task_id=tid, wait=True))
                n.start_soon(wait)
                await trio.sleep(60)
                assert waited == []                 # it waits while the task cannot run
        res, = waited
        assert res["ok"] and res["result"]["state"] == "done"
        assert res["result"]["result"]["output"] == "stub-shell: hi", res["result"]["result"]


async def test_a_task_without_detach_goes_through_the_journal_too(autojump_clock, tmp_path):
    async with journaled(tmp_path) as sup:
        res = await ask(sup, op="task", worker_id="solo", prompt="hi", task_id="t-attached")
        assert res["ok"] and res["result"]["output"] == "stub-shell: hi"
        res = await ask(sup, op="result", task_id="t-attached")
        assert res["result"]["result"]["output"] == "stub-shell: hi", res["result"]["result"]


async def test_result_after_corral_run_restarted(autojump_clock, tmp_path):
    async with journaled(tmp_path) as sup, control_server(sup, tmp_path) as (path, _):
        tid = (await call(path, {"op": "task", "pool": "p", "prompt": "one", "detach": True}))["task_id"]
        first = await call(path, {"op": "result", "task_id": tid, "wait": True})
        late = (await call(path, {"op": "task", "worker_id": "solo", "prompt": "!sleep 600",
                                  "detach": True}))["task_id"]
        queued = (await call(path, {"op": "task", "worker_id": "solo", "prompt": "after it",
                                    "detach": True}))["task_id"]
    async with journaled(tmp_path) as sup, control_server(sup, tmp_path) as (path, _):
        again = await call(path, {"op": "result", "task_id": tid})
        assert again == first and again["result"]["output"] == "stub-shell: one"
        rec = await call(path, {"op": "result", "task_id": queued, "wait": True})
        assert rec["result"]["output"] == "stub-shell: after it"     # resumed, then ran
        assert (await call(path, {"op": "result", "task_id": late}))["task"]["prompt"] == "!sleep 600"


async def test_unknown_ids_and_a_service_without_journal_are_clear_errors(autojump_clock, tmp_path):
    async with journaled(tmp_path) as sup:
        res = await ask(sup, op="result", task_id="t-nope")
        assert not res["ok"] and res["error"].startswith("UnknownTask: no task 't-nope' in the journal")
        res = await ask(sup, op="result", task_id="t-nope", wait=True)
        assert not res["ok"] and "no task 't-nope'" in res["error"]
        res = await ask(sup, op="result", task_id="../etc")
        assert not res["ok"] and "bad request" in res["error"] and "task_id" in res["error"]
        res = await ask(sup, op="task", pool="nope", prompt="x", detach=True)
        assert not res["ok"] and "no pool 'nope'" in res["error"]
    async with fake_supervisor(SupervisorConfig(name="t", workers=[WorkerSpec(id="solo")])) as (sup, _):
        for req in ({"op": "result", "task_id": "t-1"},
                    {"op": "task", "worker_id": "solo", "prompt": "x", "detach": True}):
            res = await ask(sup, **req)
            assert not res["ok"] and "keeps no task journal" in res["error"] \
                and "--no-journal" in res["error"], res
        res = await ask(sup, op="task", worker_id="solo", prompt="x")     # as before
        assert res["ok"] and res["result"]["output"] == "stub-shell: x"


async def test_a_client_that_disconnects_cancels_its_journaled_task(autojump_clock, tmp_path):
    async with journaled(tmp_path) as sup, control_server(sup, tmp_path) as (path, _):
        client = await send(path, {"op": "task", "worker_id": "solo", "prompt": "!sleep 86400",
                                   "task_id": "t-1"})
        await sup.worker("solo").wait_until(lambda i: i.state == "busy")
        await client.aclose()
        rec = await call(path, {"op": "result", "task_id": "t-1", "wait": True})
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
        async with control_server(sup, tmp_path) as (path, stop):
            client = await send(path, {"op": "task", "worker_id": "solo", "prompt": "queued",
                                       "task_id": "t-1"})
            await accepted.wait()
            stop.cancel()
        assert await receive_answer(client) == {"ok": False, "error": "corral is shutting down"}
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
    async with journaled(tmp_path) as sup, control_server(sup, tmp_path) as (path, _):
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
    async with fake_supervisor(cfg) as (sup, _), control_server(sup, tmp_path) as (path, _):
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
