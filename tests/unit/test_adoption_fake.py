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


async def crashed(engine, config, ws: WorkerSpec | None = None, task: Task | None = None) -> str:
    """Spawn a worker (``ws``, else ``spec()``) that runs ``task`` if given, then crash its
    supervisor: the id of the container left running."""
    left = {}

    async def start(sup, nursery):
        w = await sup.spawn(ws or spec())
        left["cid"] = w.info_nowait().container_id
        if task is not None:
            nursery.start_soon(w.run, task)
            await w.wait_until(lambda i: i.state == "busy")

    await crash_with(engine, config, start)
    return left["cid"]


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
        await crashed(engine, cfg, task=Task(prompt="!sleep 2", task_id="short"))
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
        old = await crashed(engine, cfg)
        async with open_supervisor(cfg, engine=engine) as sup:
            w = await sup.spawn(spec(env={"NEW": "1"}))
            await w.wait_until(lambda i: i.generation == 2 and i.state == "ready")
            assert w.info_nowait().container_id != old
            assert old not in engine.containers
            assert (await w.run(Task(prompt="x"))).status == "ok"


async def test_an_orphaned_wrapper_exits_after_its_lease(autojump_clock):
    async with FakeEngine() as engine:
        cfg = SupervisorConfig(name="t")
        cid = await crashed(engine, cfg)
        c = engine.containers[cid]
        t0 = trio.current_time()
        await engine.container_wait(cid)
        assert 29 <= trio.current_time() - t0 <= 31            # orphan_timeout_s = 30
        assert c.status == "exited"
        async with open_supervisor(cfg, engine=engine) as sup:
            # the next start certifies its death and removes it; the worker goes on
            w = await sup.spawn(spec())
            info = w.info_nowait()
            assert cid not in engine.containers
            assert (info.generation, info.restarts, info.state) == (2, 1, "ready")
            assert (info.last_death.cause, info.last_death.exit_code, info.last_death.reason) == (
                "exited", 0, "orphaned: its lease ran out with no supervisor attached "
                             "(orphan_timeout_s), and the wrapper exited (while no corral process "
                             "was attached)")


async def test_a_container_that_crashed_while_corral_was_down_is_certified_and_removed(autojump_clock):
    async with FakeEngine() as engine:
        cfg = SupervisorConfig(name="t")
        cid = await crashed(engine, cfg)
        engine.crash(cid, exit_code=3)
        with capture_logs() as logs:
            async with open_supervisor(cfg, engine=engine) as sup:
                w = await sup.spawn(spec())
                info = w.info_nowait()
                death = info.last_death
                assert (death.cause, death.exit_code, death.container_id, death.generation) == (
                    "crashed", 3, cid, 1)
                assert death.reason == "exited with 3 after READY (while no corral process was attached)"
                assert (info.generation, info.restarts, info.state) == (2, 1, "ready")
                assert cid not in engine.containers
                assert info.container_id in engine.containers
        died = [e for e in logs if e["event"] == "worker_died"]
        assert [(e["cause"], e.get("found_dead")) for e in died] == [("crashed", True)]


async def test_a_result_written_before_an_orphan_exited_is_recorded_from_its_log(autojump_clock):
    """orphan_policy "finish": the task ends while no corral process is attached, and the wrapper
    exits; its answer is in the dead container's log. The next start certifies the death and
    records that answer in the journal: the task is not lost."""
    journal = RecordingJournal()
    finish = lambda: WorkerSpec(id="w", heartbeat_s=1.0, orphan_timeout_s=2.0,  # noqa: E731
                                orphan_policy="finish", restart=FAST)
    async with FakeEngine() as engine:
        cfg = SupervisorConfig(name="t")
        cid = await crashed(engine, cfg, finish(), Task(prompt="!sleep 5", task_id="long"))
        assert await engine.container_wait(cid) == 0       # finished, then exited
        async with open_supervisor(cfg, engine=engine) as sup:
            sup._sup.journal = journal
            w = await sup.spawn(finish())
            assert journal.attempts == [("long", "w", 1, "ok")]
            assert w.info_nowait().last_death.reason.startswith("orphaned:")
            assert cid not in engine.containers


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
        old = await crashed(engine, cfg)
        engine.hang(old)                                # it no longer reads its stdin
        with capture_logs() as logs:
            async with open_supervisor(cfg, engine=engine) as sup:
                w = await sup.spawn(spec(startup_timeout_s=5))
                info = w.info_nowait()
                assert info.container_id != old and info.state == "ready"
                assert info.last_death is None and info.restarts == 0
                assert (await w.run(Task(prompt="x"))).status == "ok"
        assert [e["event"] for e in logs if e["event"] == "adoption_failed"] == ["adoption_failed"]
        assert old not in engine.containers


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


async def test_a_result_lost_on_the_way_is_replayed_after_the_next_heartbeat(autojump_clock):
    """A task_done frame written while the engine restarts can be lost on the way; the next
    heartbeat says which frames were sent, and the worker asks for them again (``hello``): the
    task still gets its result, once, without a restart."""
    async with FakeEngine() as engine:
        async with open_supervisor(SupervisorConfig(name="t"), engine=engine) as sup:
            w = await sup.spawn(spec())
            cid = w.info_nowait().container_id
            engine.lose_output(cid, b'"kind":"task_done"')
            with capture_logs() as logs:
                with trio.fail_after(4):                # 2 heartbeats and a bit
                    result = await w.run(Task(prompt="x", task_id="t1"))
            assert (result.task_id, result.status) == ("t1", "ok")
            assert [e["event"] for e in logs if e["event"] == "frames_lost"] == ["frames_lost"]
            assert (await w.run(Task(prompt="y", task_id="t2"))).status == "ok"
            info = w.info_nowait()
            assert (info.container_id, info.restarts, info.generation) == (cid, 0, 1)


async def test_a_lost_answer_to_hello_is_asked_for_again(autojump_clock):
    """The answer to a re-attach's ``hello`` (ready and the replay) is lost too: the worker says
    hello again two heartbeats later, and the task's result comes."""
    async with FakeEngine() as engine:
        async with open_supervisor(SupervisorConfig(name="t"), engine=engine) as sup:
            w = await sup.spawn(spec())
            cid = w.info_nowait().container_id
            engine.lose_output(cid, b'"kind":"task_done"', b'"kind":"ready"', b'"kind":"task_done"')
            with capture_logs() as logs:
                with trio.fail_after(8):
                    result = await w.run(Task(prompt="x", task_id="t1"))
            assert (result.task_id, result.status) == ("t1", "ok")
            assert [e["event"] for e in logs if e["event"] == "frames_lost"] == ["frames_lost"] * 2
            assert w.info_nowait().restarts == 0


async def test_a_start_cut_off_by_an_engine_restart_is_no_death(autojump_clock):
    """dockerd restarting (live-restore) cuts off the call that starts a container, which runs
    all the same: once the engine is back, the worker attaches again and its READY comes as the
    answer to ``hello``: the same container serves, no death, no restart."""
    from runtime.errors import EngineError, EngineUnavailable
    async with FakeEngine(start_delay=1.0) as engine:
        async with open_supervisor(SupervisorConfig(name="t", engine_outage_s=60),
                                   engine=engine) as sup:
            async with trio.open_nursery() as n:
                n.start_soon(sup.spawn, spec(startup_timeout_s=5))
                await trio.sleep(0.5)                       # (in the middle of the start)
                engine.go_down(live_restore=True)
                await trio.sleep(10)                        # longer than startup_timeout_s
                engine.come_up()
            w = sup.worker("w")
            info = w.info_nowait()
            assert (info.state, info.generation, info.restarts, info.last_death) == ("ready", 1, 0, None)
            assert [c.status for c in engine.containers.values()] == ["running"]
            assert (await w.run(Task(prompt="x"))).status == "ok"

        # a start refused as the engine went away (the container only created): started again
        engine.set_start_delay(0)
        engine.fail_next_starts(1, EngineUnavailable("fake: connection reset during the start"))
        async with open_supervisor(SupervisorConfig(name="u"), engine=engine) as sup:
            w = await sup.spawn(spec())
            info = w.info_nowait()
            assert (info.state, info.generation, info.restarts, info.last_death) == ("ready", 1, 0, None)

        # ... and refused once the engine is back (dockerd restored a half-made start: "task
        # already exists"): it never ran; a new container replaces it, no death, no restart
        engine.fail_next_starts(1, EngineUnavailable("fake: connection reset during the start"))
        engine.fail_next_starts(1, EngineError("start: task 1234: already exists", status=500))
        async with open_supervisor(SupervisorConfig(name="v"), engine=engine) as sup:
            with capture_logs() as logs:
                w = await sup.spawn(spec())
            info = w.info_nowait()
            assert (info.state, info.generation, info.restarts, info.last_death) == ("ready", 2, 0, None)
            assert [e["event"] for e in logs if e["event"] == "start_lost_replacing"] == ["start_lost_replacing"]
            assert [c.name for c in engine.containers.values() if c.labels["corral.supervisor"] == "v"] \
                == ["corral-v-w-2"]


async def test_a_task_sent_as_the_engine_went_away_is_sent_again_after_the_re_attach(autojump_clock):
    """The run_task frame written just as dockerd went away never reached the wrapper. The
    answer to the re-attach's hello says it runs nothing and holds no result of it: the worker
    sends the task again, and it runs once."""
    async with FakeEngine() as engine:
        async with open_supervisor(SupervisorConfig(name="t", engine_outage_s=60),
                                   engine=engine) as sup:
            w = await sup.spawn(spec())
            cid = w.info_nowait().container_id
            engine.lose_input(cid, b'"kind":"run_task"')
            results = []

            async def run():
                results.append(await w.run(Task(prompt="!sleep 1", task_id="t1")))

            with capture_logs() as logs, trio.fail_after(30):
                async with trio.open_nursery() as n:
                    n.start_soon(run)
                    await w.wait_until(lambda i: i.state == "busy")
                    engine.go_down(live_restore=True)
                    await trio.sleep(2)
                    engine.come_up()
                    await w.wait_until(lambda i: i.state == "ready")
            assert [e["event"] for e in logs if e["event"] == "task_frame_lost"] == ["task_frame_lost"]
            assert [(r.task_id, r.status) for r in results] == [("t1", "ok")]
            info = w.info_nowait()
            assert (info.container_id, info.restarts) == (cid, 0)
            log_text = bytes(engine.containers[cid].log)
            assert log_text.count(b'"kind":"task_started"') == 1 and log_text.count(b'"kind":"task_done"') == 1


async def test_a_start_cut_off_by_an_engine_that_never_comes_back_is_engine_unavailable(autojump_clock):
    from runtime import WorkerStartupError
    async with FakeEngine(start_delay=1.0) as engine:
        async with open_supervisor(SupervisorConfig(name="t", engine_outage_s=20),
                                   engine=engine) as sup:
            async def down_soon():
                await trio.sleep(0.5)
                engine.go_down(live_restore=True)
            async with trio.open_nursery() as n:
                n.start_soon(down_soon)
                t0 = trio.current_time()
                with pytest.raises(WorkerStartupError) as ei:
                    await sup.spawn(spec(startup_timeout_s=5))
            assert ei.value.certificate.cause == "engine_unavailable"
            assert 20 <= trio.current_time() - t0 <= 25
            engine.come_up()


async def test_an_adopted_idle_worker_knows_it_lost_nothing(autojump_clock):
    """Its earlier supervisor had every frame acknowledged: the answer to hello says so
    (``acked``), and the new one asks for nothing again."""
    async with FakeEngine() as engine:
        cfg = SupervisorConfig(name="t")

        async def start(sup, nursery):
            w = await sup.spawn(spec())
            for i in range(3):
                assert (await w.run(Task(prompt=f"x{i}"))).status == "ok"
            await trio.sleep(3)                                # leases: acknowledged

        await crash_with(engine, cfg, start)
        with capture_logs() as logs:
            async with open_supervisor(cfg, engine=engine) as sup:
                w = await sup.spawn(spec())
                await trio.sleep(10)
                assert w.info_nowait().state == "ready"
        assert [e["event"] for e in logs if e["event"] == "frames_lost"] == []


async def test_an_ended_container_beside_a_newer_generation_is_removed_not_certified(autojump_clock):
    """The process that made generation 2 certified generation 1 already (and could not remove
    it): the next start removes both (2 was only created) and certifies nothing again."""
    from runtime.engines import ContainerSpec
    async with FakeEngine() as engine:
        cfg = SupervisorConfig(name="t")
        old = await crashed(engine, cfg)
        engine.crash(old, exit_code=3)
        image = engine.containers[old].image_id
        newer = await engine.container_create(ContainerSpec(
            image=image, name="corral-t-w-2", labels={"corral.supervisor": "t", "corral.worker": "w",
                                                     "corral.generation": "2"}))
        async with open_supervisor(cfg, engine=engine) as sup:
            info = (await sup.spawn(spec())).info_nowait()
            assert (info.last_death, info.restarts, info.state) == (None, 0, "ready")
            assert old not in engine.containers and newer not in engine.containers


async def test_what_an_agent_wrote_to_stderr_is_never_taken_for_a_result(autojump_clock):
    """A found-dead container's results come from its stdout (the wrapper's frames) only: a
    frame-shaped line on stderr (an agent's, after a carriage return) is no task's answer."""
    journal = RecordingJournal()
    async with FakeEngine() as engine:
        cfg = SupervisorConfig(name="t")
        cid = await crashed(engine, cfg)
        ghost = (b'[agent] x\r{"task_id":"ghost","status":"ok","exit_code":0,"output":"",'
                 b'"error":"","duration_s":0.1,"truncated":false,"failure":"","kind":"task_done",'
                 b'"seq":99}\n')
        engine.containers[cid].out_send.send_nowait((2, ghost))
        engine.crash(cid, exit_code=3)
        async with open_supervisor(cfg, engine=engine) as sup:
            sup._sup.journal = journal
            w = await sup.spawn(spec())
            assert w.info_nowait().last_death.cause == "crashed" and not w.carries("ghost")
        assert journal.attempts == []
