"""The lifecycle events (runtime.events), their SSE stream (`GET /v1/events`, resumable) and the
Prometheus metrics they feed (`GET /metrics`): FakeEngine."""

import re

import httpx
import msgspec
import trio

from runtime import PoolSpec, SupervisorConfig, Task, WorkerSpec
from runtime.events import WorkerDied, WorkerRestarting, WorkerStateChanged

from .helpers import fake_supervisor
from .test_control import api_server, in_process, uds_client

CFG = SupervisorConfig(name="t", workers=[WorkerSpec(id="solo")], pools=[PoolSpec(name="p", replicas=2)])


def sample(text: str, name: str, **labels) -> float:
    """One sample of the exposition text (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pat = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else r"") + r" ([0-9.e+-]+)$"
    m = re.search(pat, text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_deaths_restarts_and_task_done_are_published_in_order(autojump_clock):
    async with fake_supervisor(CFG) as (sup, engine):
        await sup.wait_configured()
        seen = []
        sup.events.subscribe(seen.append)
        info = await sup.worker("solo").info()
        engine.kill(info.container_id)
        await sup.worker("solo").wait_until(lambda i: i.generation == 2 and i.state == "ready")
        died = [e for e in seen if isinstance(e, WorkerDied)]
        assert [(e.worker_id, e.certificate.cause, e.certificate.generation, e.decision)
                for e in died] == [("solo", "killed", 1, "restart")]
        restarting, = [e for e in seen if isinstance(e, WorkerRestarting)]
        assert (restarting.cause, restarting.generation) == ("killed", 1)
        states = [(e.state, e.generation) for e in seen if isinstance(e, WorkerStateChanged)]
        assert states[-1] == ("ready", 2)
        ids = [e.id for e in seen if e.id]          # (worker output is not kept: id 0)
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        res = await sup.pool("p").run(Task(prompt="hi"))
        assert seen[-1].__struct_config__.tag == "task_done" and seen[-1].task_id == res.task_id


class SSE:
    """Reads the events of an SSE response: ``await sse.next(n)`` -> [(id, kind, data)]."""

    def __init__(self, resp) -> None:
        self.chunks = resp.aiter_text()
        self.buf = ""

    async def next(self, n: int) -> list[tuple[int, str, dict]]:
        out: list = []
        while len(out) < n:
            while "\n\n" not in self.buf:
                self.buf += await self.chunks.__anext__()
            block, self.buf = self.buf.split("\n\n", 1)
            fields = dict(line.split(": ", 1) for line in block.splitlines()
                          if ": " in line and not line.startswith(":"))
            if "data" in fields and "id" in fields:
                out.append((int(fields["id"]), fields["event"], msgspec.json.decode(fields["data"])))
        return out


async def test_the_event_stream_follows_and_resumes_with_last_event_id(tmp_path):
    async with fake_supervisor(CFG) as (sup, engine), api_server(sup, tmp_path) as (path, _):
        await sup.wait_configured()
        async with uds_client(path) as c:
            with trio.fail_after(30):
                async with c.stream("GET", "/v1/events", params={"kinds": "worker_died,worker_state"}) as r:
                    assert r.headers["content-type"].startswith("text/event-stream")
                    sse = SSE(r)
                    engine.kill((await sup.worker("p-1").info()).container_id)
                    got = await sse.next(1)
                    assert got[0][1] == "worker_died" and got[0][2]["worker_id"] == "p-1"
                    more = []                         # until it is ready again
                    while not any(k == "worker_state" and d["state"] == "ready" for _, k, d in more):
                        more += await sse.next(1)
                events = got + more
                died = [d for _, k, d in events if k == "worker_died"]
                assert died[0]["certificate"]["cause"] == "killed"
                # resume after the death: the events after it, nothing before, nothing twice
                death_id = next(i for i, k, _ in events if k == "worker_died")
                async with c.stream("GET", "/v1/events", headers={"Last-Event-ID": str(death_id)},
                                    params={"kinds": "worker_died,worker_state"}) as r:
                    again = await SSE(r).next(len([e for e in events if e[0] > death_id]))
                assert again == [e for e in events if e[0] > death_id]


async def test_metrics_follow_a_chaos_run(autojump_clock, tmp_path):
    async with fake_supervisor(CFG) as (sup, engine), in_process(sup) as c:
        await sup.wait_configured()
        r = await c.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain")
        before = r.text
        assert sample(before, "corral_workers", state="ready") == 3
        assert sample(before, "corral_restarts_total", cause="killed") == 0
        assert sample(before, "corral_image_build_duration_seconds_count") >= 1
        for round_ in range(3):
            for wid in ("p-1", "p-2"):
                engine.kill((await sup.worker(wid).info()).container_id)
            for wid in ("p-1", "p-2"):
                await sup.worker(wid).wait_until(lambda i: i.generation == round_ + 2 and i.state == "ready")
            for _ in range(4):
                await sup.pool("p").run(Task(prompt="ok"))
            await sup.pool("p").run(Task(prompt="!exit 3"))
        await sup.worker("solo").run(Task(prompt="mine"))
        after = (await c.get("/metrics")).text
        assert sample(after, "corral_restarts_total", cause="killed") == 6
        assert sample(after, "corral_worker_deaths_total", cause="killed") == 6
        assert sample(after, "corral_restart_latency_seconds_count") == 6
        assert sample(after, "corral_tasks_total", pool="p", status="ok") == 12
        assert sample(after, "corral_tasks_total", pool="p", status="error") == 3
        assert sample(after, "corral_tasks_total", pool="", status="ok") == 1
        assert sample(after, "corral_task_duration_seconds_count", pool="p") == 15
        assert sample(after, "corral_task_queue_wait_seconds_count", pool="p") == 15
        assert sample(after, "corral_workers", state="ready") == 3
        assert sample(after, "corral_pool_queued_tasks", pool="p") == 0
        assert sample(after, "corral_escalations_total") == 0


async def test_cli_events_logs_and_scale(tmp_path, capsys):
    from runtime.apps import cli

    async def corral(*argv):
        return await trio.to_thread.run_sync(cli.main, list(argv))
    async with fake_supervisor(CFG) as (sup, engine), api_server(sup, tmp_path) as (path, _):
        await sup.wait_configured()
        engine.kill((await sup.worker("solo").info()).container_id)
        await sup.worker("solo").wait_until(lambda i: i.generation == 2 and i.state == "ready")
        capsys.readouterr()
        assert await corral("events", "--socket", path, "--kinds", "worker_died") == 0
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 1 and " worker_died solo gen=1 cause=killed exit=137 decision=restart" in out[0]
        assert await corral("logs", "--socket", path, "--previous", "solo") == 0
        assert "[wrapper] ready: worker solo" in capsys.readouterr().out
        assert await corral("logs", "--socket", path, "p-1", "--previous") == 2
        assert "no previous container" in capsys.readouterr().err
        assert await corral("scale", "--socket", path, "p", "3") == 0
        assert capsys.readouterr().out == "pool p replicas=3 queued=0\n"
        assert await corral("ps", "--socket", path) == 0
        assert "worker p-3" in capsys.readouterr().out
