"""Workers outlive their supervisor and the engine's restarts (FakeEngine, autojump clock).

A crash of the corral process is simulated with ``open_supervisor(abandon=...)``: the block ends
at once and every container is left running, as a SIGKILL leaves them. The next supervisor of
the same name on the same engine adopts them."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from runtime import Backoff, RestartPolicy, SupervisorConfig, Task, WorkerSpec, open_supervisor
from runtime.testing import FakeEngine, capture_logs

FAST = RestartPolicy(max_restarts=1000, within_s=60,
                     backoff=Backoff(initial_s=0.5, jitter="none", stable_s=10))


class RecordingJournal:
    """Stands in for runtime.journal.TaskJournal: what the workers record."""

    def __init__(self) -> None:
        self.dispatches: list[tuple[str, str, int]] = []
        self.attempts: list[tuple[str, str, int, str]] = []
        self.changed = trio.Event()

    async def dispatched(self, task_id, worker_id, generation) -> None:
        self.dispatches.append((task_id, worker_id, generation))

    async def attempt_done(self, task_id, worker_id, generation, result) -> None:
        self.attempts.append((task_id, worker_id, generation, result.status))
        self.changed.set()
        self.changed = trio.Event()

    async def wait_attempts(self, n: int) -> None:
        while len(self.attempts) < n:
            await self.changed.wait()


def spec(**kw) -> WorkerSpec:
    kw.setdefault("restart", FAST)
    return WorkerSpec(id="w", heartbeat_s=1.0, orphan_timeout_s=30.0, **kw)


async def crash_with(engine, config, body):
    """Run ``body(sup, nursery)`` under a supervisor, then crash it (abandon): containers stay,
    and whatever ``body`` left running in ``nursery`` is cancelled with it."""
    abandon = trio.Event()
    async with open_supervisor(config, engine=engine, abandon=abandon) as sup:
        async with trio.open_nursery() as nursery:
            await body(sup, nursery)
            abandon.set()
            await trio.sleep_forever()


async def test_a_restarted_supervisor_adopts_the_running_container_and_its_task(autojump_clock):
    journal = RecordingJournal()
    async with FakeEngine() as engine:
        cfg = SupervisorConfig(name="t")
        before = {}

        async def start(sup, nursery):
            w = await sup.spawn(spec())
            engine.kill(engine.container_of("w").id)          # one restart, to carry over
            await w.wait_until(lambda i: i.generation == 2 and i.state == "ready")
            before.update(cid=w.info_nowait().container_id, gen=w.info_nowait().generation,
                          restarts=w.info_nowait().restarts,
                          death=w.info_nowait().last_death.cause)
            nursery.start_soon(w.run, Task(prompt="!sleep 20", task_id="long"))
            await w.wait_until(lambda i: i.state == "busy")

        await crash_with(engine, cfg, start)
        c = engine.containers[before["cid"]]
        assert c.status == "running"                           # the crash left it running

        with capture_logs() as logs:
            async with open_supervisor(cfg, engine=engine) as sup:
                sup._sup.journal = journal
                w = await sup.spawn(spec())
                info = w.info_nowait()
                assert (info.container_id, info.generation, info.restarts) == (
                    before["cid"], before["gen"], before["restarts"])
                assert info.last_death is not None and info.last_death.cause == before["death"]
                assert info.state == "busy" and w.carries("long")
                assert len([c for c in engine.containers.values() if c.status == "running"]) == 1
                await journal.wait_attempts(1)
                assert journal.attempts == [("long", "w", before["gen"], "ok")]
                await w.wait_until(lambda i: i.state == "ready")
                assert (await w.run(Task(prompt="after"))).status == "ok"
        assert [e["event"] for e in logs if e["event"] == "worker_adopted"] == ["worker_adopted"]


async def test_a_result_that_finished_while_corral_was_down_is_replayed_exactly_once(autojump_clock):
    journal = RecordingJournal()
    async with FakeEngine() as engine:
        cfg = SupervisorConfig(name="t")

        async def start(sup, nursery):
            w = await sup.spawn(spec())
            nursery.start_soon(w.run, Task(prompt="!sleep 2", task_id="short"))
            await w.wait_until(lambda i: i.state == "busy")

        await crash_with(engine, cfg, start)
        await trio.sleep(10)                                   # it finishes while nobody listens
        async with open_supervisor(cfg, engine=engine) as sup:
            sup._sup.journal = journal
            w = await sup.spawn(spec())
            assert w.info_nowait().state == "ready" and w.carries("short")
            await journal.wait_attempts(1)
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(5)                                # several leases: acknowledged
            assert journal.attempts == [("short", "w", 1, "ok")]


async def test_an_adopted_container_whose_spec_changed_is_drained_and_replaced(autojump_clock):
    async with FakeEngine() as engine:
        cfg = SupervisorConfig(name="t")
        old = {}

        async def start(sup, nursery):
            w = await sup.spawn(spec())
            old["cid"] = w.info_nowait().container_id

        await crash_with(engine, cfg, start)
        async with open_supervisor(cfg, engine=engine) as sup:
            w = await sup.spawn(spec(env={"NEW": "1"}))
            await w.wait_until(lambda i: i.generation == 2 and i.state == "ready")
            assert w.info_nowait().container_id != old["cid"]
            assert old["cid"] not in engine.containers
            assert (await w.run(Task(prompt="x"))).status == "ok"


async def test_an_orphaned_wrapper_exits_after_its_lease(autojump_clock):
    async with FakeEngine() as engine:
        cfg = SupervisorConfig(name="t")
        cid = {}

        async def start(sup, nursery):
            w = await sup.spawn(spec())
            cid["id"] = w.info_nowait().container_id

        await crash_with(engine, cfg, start)
        c = engine.containers[cid["id"]]
        t0 = trio.current_time()
        await engine.container_wait(cid["id"])
        assert 29 <= trio.current_time() - t0 <= 31            # orphan_timeout_s = 30
        assert c.status == "exited"
        async with open_supervisor(cfg, engine=engine):        # the next start removes it
            assert cid["id"] not in engine.containers


async def test_a_live_restore_engine_restart_restarts_no_worker(autojump_clock):
    async with FakeEngine() as engine:
        async with open_supervisor(SupervisorConfig(name="t", engine_outage_s=60),
                                   engine=engine) as sup:
            ws = [await sup.spawn(WorkerSpec(id=f"w{i}", heartbeat_s=1.0, restart=FAST))
                  for i in range(3)]
            cids = [w.info_nowait().container_id for w in ws]
            results = []

            async def one(w, i):
                results.append(await w.run(Task(prompt=f"!sleep 5", task_id=f"t{i}")))

            async with trio.open_nursery() as n:
                for i, w in enumerate(ws):
                    n.start_soon(one, w, i)
                await trio.sleep(1)
                engine.go_down(live_restore=True)
                await trio.sleep(1)
                assert {w.info_nowait().state for w in ws} == {"engine_down"}
                await trio.sleep(10)                          # the tasks end while it is away
                engine.come_up()
            assert sorted(r.task_id for r in results) == ["t0", "t1", "t2"]
            assert {r.status for r in results} == {"ok"}
            assert [w.info_nowait().container_id for w in ws] == cids
            assert [w.info_nowait().restarts for w in ws] == [0, 0, 0]
            assert all(w.info_nowait().state == "ready" for w in ws)


async def test_a_container_that_does_not_answer_hello_is_replaced_not_a_failed_start(autojump_clock):
    """Adoption that fails (the wrapper found does not answer ``hello`` within startup_timeout_s)
    is no death of the worker and no failed start: a new container serves instead."""
    async with FakeEngine() as engine:
        cfg = SupervisorConfig(name="t")
        old = {}

        async def start(sup, nursery):
            w = await sup.spawn(spec())
            old["cid"] = w.info_nowait().container_id

        await crash_with(engine, cfg, start)
        engine.hang(old["cid"])                                # it no longer reads its stdin
        with capture_logs() as logs:
            async with open_supervisor(cfg, engine=engine) as sup:
                w = await sup.spawn(spec(startup_timeout_s=5))
                info = w.info_nowait()
                assert info.container_id != old["cid"] and info.state == "ready"
                assert info.last_death is None and info.restarts == 0
                assert (await w.run(Task(prompt="x"))).status == "ok"
        assert [e["event"] for e in logs if e["event"] == "adoption_failed"] == ["adoption_failed"]
        assert old["cid"] not in engine.containers


async def test_a_kill_just_after_a_live_restore_engine_restart_is_certified_killed(autojump_clock):
    """After the engine came back, the worker serves again before its supervisor's watcher has
    a new events stream; a `docker kill` then is certified from the events the new stream
    replays: killed, not a crash."""
    async with FakeEngine() as engine:
        async with open_supervisor(SupervisorConfig(name="t"), engine=engine) as sup:
            w = await sup.spawn(spec())
            engine.go_down(live_restore=True)
            await trio.sleep(2)
            engine.come_up()
            await w.wait_until(lambda i: i.state == "ready")
            assert not sup._sup.watcher.alive                 # (the case: not subscribed yet)
            engine.kill(w.info_nowait().container_id)
            await w.wait_until(lambda i: i.generation == 2)
            death = w.info_nowait().last_death
            assert (death.cause, death.reason) == ("killed", "killed outside corral with SIGKILL")
