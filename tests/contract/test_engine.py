"""The engine port's contract, run against every adapter (see conftest.py)."""

import time
import uuid
from contextlib import AsyncExitStack

import pytest
import trio

from runtime.engines import ContainerState, ContainerSummary
from runtime.errors import (
    ContainerNotFound,
    ContainerNotRunning,
    EngineError,
    ImageNotFound,
    NameConflict,
    RemovalInProgress,
)
from runtime.protocol import Fatal, Hello, Ready, RunTask, Shutdown, TaskDone

from .conftest import flavour
from .helpers import DEADLINE, Session, collect, start_worker, story, worker_spec


async def test_a_worker_container_from_create_to_removal(engine, sup_name, image):
    with trio.fail_after(DEADLINE):
        spec = worker_spec(image, sup_name, "w1")
        t0 = time.time()
        cid = await engine.container_create(spec)
        state = await engine.container_inspect(cid)
        assert isinstance(state, ContainerState)
        assert (state.id, state.name, state.image, state.status, state.running, state.exit_code,
                state.started_at, state.finished_at) == (cid, spec.name, image, "created", False,
                                                         None, None, None)
        image_labels = (await engine.image_inspect(image)).labels
        assert state.labels == {**image_labels, **spec.labels}       # the image's, then the spec's
        [summary] = await engine.container_list(labels={"corral.supervisor": sup_name})
        assert summary == ContainerSummary(id=cid, name=spec.name, labels=state.labels,
                                           status="created", image_id=image)
        async with AsyncExitStack() as stack:
            session = Session(await stack.enter_async_context(engine.attach(cid)))
            await engine.container_start(cid)
            assert (await session.expect(Ready)).worker_id == "w1"
            state = await engine.container_inspect(cid)
            assert (state.status, state.running, state.exit_code) == ("running", True, None)
            assert state.pid and state.pid > 0
            assert t0 - 5 <= state.started_at <= time.time() + 5
            await session.send(RunTask(task_id="t1", prompt="hello"))
            done = await session.expect(TaskDone)
            assert (done.task_id, done.status, done.output) == ("t1", "ok", "stub-claude: hello")
            await session.send(Shutdown(grace_s=1))
            assert [f for f in await session.until_end() if not isinstance(f, TaskDone)] == []
        assert await engine.container_wait(cid) == 0
        state = await engine.container_inspect(cid)
        assert (state.status, state.running, state.exit_code, state.oom_killed, state.pid) == \
            ("exited", False, 0, False, None)
        assert state.started_at <= state.finished_at <= time.time() + 5
        assert [c.id for c in await engine.container_list(labels={"corral.supervisor": sup_name},
                                                          all=False)] == []
        [summary] = await engine.container_list(labels={"corral.supervisor": sup_name})
        assert summary.status == "exited"
        await engine.container_remove(cid)
        assert await engine.container_list(labels={"corral.supervisor": sup_name}) == []
        with pytest.raises(ContainerNotFound):
            await engine.container_inspect(cid)


async def test_wait_on_a_created_container_returns_at_once(engine, sup_name, image):
    with trio.fail_after(DEADLINE):
        cid = await engine.container_create(worker_spec(image, sup_name, "w1"))
        with trio.fail_after(5):
            assert await engine.container_wait(cid) == 0
        assert (await engine.container_inspect(cid)).status == "created"


async def test_kill_ends_a_container_with_128_plus_the_signal(engine, sup_name, image):
    with trio.fail_after(DEADLINE):
        async with AsyncExitStack() as stack:
            a, _ = await start_worker(stack, engine, worker_spec(image, sup_name, "a"))
            b, _ = await start_worker(stack, engine, worker_spec(image, sup_name, "b"))
            await engine.container_kill(a)                      # SIGKILL by default
            await engine.container_kill(b, "SIGTERM")
            assert await engine.container_wait(a) == 137
            assert await engine.container_wait(b) == 143
            assert (await engine.container_inspect(b)).exit_code == 143
            with pytest.raises(ContainerNotRunning):
                await engine.container_kill(a)
            with pytest.raises(ContainerNotRunning):
                await engine.container_exec(a, ["true"])


async def test_the_events_of_kill_stop_restart_and_remove(engine, sup_name, image):
    """What each way of ending a container tells, in order, with the corral labels and signals.
    Podman tells less: no kill for a stop, a restart or a forced removal, the restart before the
    death, and a stop event only when its stop call wins a race with the container's own cleanup
    (so a story there is told without its stop events); its kill events name no signal (the
    adapter takes it from the death that follows)."""
    podman = flavour(engine) == "podman"
    if podman:
        want = {"a": [("started", None), ("killed", 9), ("died", 137), ("removed", None)],
                "b": [("started", None), ("died", 143)],
                "c": [("started", None), ("restarted", None), ("died", 143), ("started", None)],
                "d": [("started", None), ("died", 137), ("removed", None)]}
    else:
        want = {"a": [("started", None), ("killed", 9), ("died", 137), ("removed", None)],
                "b": [("started", None), ("killed", 15), ("died", 143), ("stopped", None)],
                "c": [("started", None), ("killed", 15), ("died", 143), ("stopped", None),
                      ("started", None), ("restarted", None)],
                "d": [("started", None), ("killed", 9), ("died", 137), ("removed", None)]}
    with trio.fail_after(DEADLINE):
        t0 = time.time_ns()
        async with engine.events(labels={"corral.supervisor": sup_name}) as stream:
            async with AsyncExitStack() as stack:
                ids = {}
                for wid in "abcd":
                    ids[wid], _ = await start_worker(stack, engine, worker_spec(image, sup_name, wid))
                a, b, c, d = ids.values()
                await engine.container_kill(a, "SIGKILL")
                assert await engine.container_wait(a) == 137
                await engine.container_stop(b, grace_s=5)
                await engine.container_stop(b, grace_s=5)          # stopped already: nothing to do
                await engine.container_restart(c, grace_s=5)
                assert (await engine.container_inspect(c)).running
                await engine.container_remove(d, force=True)       # running: killed, then removed
                await engine.container_remove(a)

                def told(seen, cid):
                    return [e for e in story(seen, cid) if not (podman and e == ("stopped", None))]

                def done(seen):
                    return all(len(told(seen, ids[w])) >= len(want[w]) for w in ids)
                events = await collect(stream, done)
        assert {w: told(events, cid) for w, cid in ids.items()} == want
        for ev in events:
            assert (ev.supervisor, ev.generation) == (sup_name, 1)
            assert ev.worker_id == next(w for w, i in ids.items() if i == ev.container_id)
            assert t0 - 5e9 <= ev.time_ns <= time.time_ns() + 5e9
        for cid in ids.values():
            times = [ev.time_ns for ev in events if ev.container_id == cid]
            assert times == sorted(times)


async def test_events_since_replay_what_happened_while_unsubscribed(engine, sup_name, image):
    """A subscriber that drops its stream and subscribes again ``since`` the last event it saw
    misses nothing in between; ``kinds`` filters the replay as it filters live events."""
    with trio.fail_after(DEADLINE):
        async with engine.events(labels={"corral.supervisor": sup_name}) as stream:
            a = await engine.container_create(worker_spec(image, sup_name, "a"))
            await engine.container_start(a)
            [started] = await collect(stream, lambda seen: True)
        assert (started.kind, started.container_id) == ("started", a)
        await engine.container_kill(a)                      # nobody listens
        assert await engine.container_wait(a) == 137
        since = started.time - 0.001
        async with engine.events(labels={"corral.supervisor": sup_name}, since=since) as stream:
            events = await collect(stream, lambda seen: seen[-1].kind == "died")
            assert story(events, a) == [("started", None), ("killed", 9), ("died", 137)]
            b = await engine.container_create(worker_spec(image, sup_name, "b"))
            await engine.container_start(b)
            [live] = await collect(stream, lambda seen: True)   # then it goes live
            assert (live.kind, live.container_id) == ("started", b)
        async with engine.events(labels={"corral.supervisor": sup_name}, kinds=["died"],
                                 since=since) as stream:
            [died] = await collect(stream, lambda seen: True)
            assert (died.kind, died.container_id, died.exit_code) == ("died", a, 137)
        async with engine.events(labels={"corral.supervisor": "nobody-" + sup_name},
                                 since=since) as stream:
            with trio.move_on_after(0.5):
                ev = await stream.receive.receive()
                pytest.fail(f"another supervisor's event: {ev}")


async def test_errors_are_typed(engine, sup_name, image):
    with trio.fail_after(DEADLINE):
        spec = worker_spec(image, sup_name, "w1")
        cid = await engine.container_create(spec)
        with pytest.raises(NameConflict) as ei:
            await engine.container_create(spec)
        assert ei.value.status == 409
        missing_image = f"corral/no-such-image:{uuid.uuid4().hex[:12]}"
        with pytest.raises(ImageNotFound):
            await engine.container_create(worker_spec(missing_image, sup_name, "w2"))
        with pytest.raises(ImageNotFound):
            await engine.image_inspect(missing_image)
        with pytest.raises(ImageNotFound):
            await engine.image_remove(missing_image)
        missing = "corral-no-such-container-" + uuid.uuid4().hex
        calls = {
            "inspect": lambda: engine.container_inspect(missing),
            "start": lambda: engine.container_start(missing),
            "wait": lambda: engine.container_wait(missing),
            "kill": lambda: engine.container_kill(missing),
            "stop": lambda: engine.container_stop(missing, grace_s=1),
            "restart": lambda: engine.container_restart(missing, grace_s=1),
            "remove": lambda: engine.container_remove(missing, force=True),
            "logs": lambda: engine.container_logs(missing),
            "exec": lambda: engine.container_exec(missing, ["true"]),
        }
        for what, call in calls.items():
            with pytest.raises(ContainerNotFound):
                await call()
                pytest.fail(f"{what} of a missing container")
        with pytest.raises(ContainerNotFound):
            async with engine.attach(missing):
                pass
        with pytest.raises(ContainerNotRunning):
            await engine.container_kill(cid)


async def test_remove_of_a_running_container_needs_force(engine, sup_name, image):
    with trio.fail_after(DEADLINE):
        async with AsyncExitStack() as stack:
            cid, _ = await start_worker(stack, engine, worker_spec(image, sup_name, "w1"))
            with pytest.raises(EngineError) as ei:
                await engine.container_remove(cid, force=False)
            assert type(ei.value) is EngineError and ei.value.status == 409
            assert (await engine.container_inspect(cid)).running
            await engine.container_remove(cid, force=True)
            with pytest.raises(ContainerNotFound):
                await engine.container_inspect(cid)


async def test_of_two_forced_removals_one_removes_and_the_other_is_told_it_is_gone(
        engine, sup_name, image):
    """What a worker relies on to tell `docker rm -f` from its own removal (certificate cause
    "removed"): when two forced removals of one container overlap, only one of them returns;
    the other raises ContainerNotFound or RemovalInProgress. Podman answers both with 204: the
    adapter has to find out."""
    with trio.fail_after(DEADLINE):
        for round_, delay in enumerate([0.0, 0.02, 0.05, 0.1]):
            async with AsyncExitStack() as stack:
                cid, _ = await start_worker(stack, engine, worker_spec(image, sup_name, f"w{round_}"))
                told = {}

                async def remove(who):
                    try:
                        await engine.container_remove(cid, force=True)
                        told[who] = "removed"
                    except (ContainerNotFound, RemovalInProgress) as exc:
                        told[who] = type(exc).__name__
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(remove, "first")
                    await trio.sleep(delay)
                    nursery.start_soon(remove, "second")
                assert sorted(told.values()).count("removed") == 1, (delay, told)
                with pytest.raises(ContainerNotFound):
                    await engine.container_inspect(cid)


async def test_logs_hold_the_tail_of_stdout_and_stderr(engine, sup_name, image):
    with trio.fail_after(DEADLINE):
        cid = await engine.container_create(
            worker_spec(image, sup_name, "w1", env={"CORRAL_STUB_FAIL_PROBE": "1"}))
        assert await engine.container_logs(cid) == ""
        async with engine.attach(cid) as att:
            session = Session(att)
            await engine.container_start(cid)
            fatal = await session.expect(Fatal)
            assert "version probe" in fatal.reason
            assert await session.until_end() == []
        assert await engine.container_wait(cid) == 78
        assert (await engine.container_inspect(cid)).exit_code == 78
        logs = await engine.container_logs(cid)
        assert "version probe" in logs and '"fatal"' in logs        # stderr and the stdout frame
        tail = await engine.container_logs(cid, tail_bytes=20)
        assert 0 < len(tail) <= 20 and logs.endswith(tail)


async def test_attached_to_an_exited_container_the_output_ends_at_once(engine, sup_name, image):
    with trio.fail_after(DEADLINE):
        cid = await engine.container_create(
            worker_spec(image, sup_name, "w1", env={"CORRAL_STUB_FAIL_PROBE": "1"}))
        await engine.container_start(cid)
        assert await engine.container_wait(cid) == 78
        with trio.fail_after(5):
            async with engine.attach(cid) as att:
                assert [item async for item in att.output] == []


async def test_with_stdin_once_off_a_detach_does_not_end_the_container(engine, sup_name, image):
    """What a supervisor that restarts relies on: attached with stdin_once off, its detach leaves
    the wrapper and its task running, and a new attachment talks to the same wrapper (``hello``)
    and sees what it writes from then on (the task's result, live or replayed)."""
    if flavour(engine) == "podman":
        pytest.xfail("Podman 4.3 closes a container's stdin when the attach connection closes, "
                     "StdinOnce or not: the wrapper shuts down (README, Running on Podman)")
    with trio.fail_after(DEADLINE):
        spec = worker_spec(image, sup_name, "w1", stdin_once=False)
        async with AsyncExitStack() as stack:
            cid, session = await start_worker(stack, engine, spec)
            await session.send(RunTask(task_id="t1", prompt="!sleep 2 done"))
        state = await engine.container_inspect(cid)
        assert (state.status, state.running) == ("running", True)
        async with engine.attach(cid) as att:
            session = Session(att)
            await session.send(Hello(worker_id="w1"))
            ready = await session.expect(Ready)
            assert ready.resumed and (ready.running, ready.replay) in (("t1", []), (None, ["t1"]))
            done = await session.expect(TaskDone)
            assert (done.task_id, done.status, done.output) == ("t1", "ok", "stub-claude: done")
            await session.send(Shutdown(grace_s=1))
            assert [f for f in await session.until_end() if not isinstance(f, TaskDone)] == []
        assert await engine.container_wait(cid) == 0


async def test_oom_kill_under_a_memory_limit(engine, sup_name, image):
    """The stub agent's ``!oom`` under a memory limit: the wrapper says so and dies (137); the
    engine tells an oom event and the state says OOM killed. Podman on cgroup v1 tells neither
    (``reports_oom``): the wrapper's own word is all there is, and the state does not pretend."""
    with trio.fail_after(DEADLINE):
        async with engine.events(labels={"corral.supervisor": sup_name}) as stream:
            async with AsyncExitStack() as stack:
                cid, session = await start_worker(
                    stack, engine, worker_spec(image, sup_name, "w1", memory=64 << 20))
                await session.send(RunTask(task_id="t1", prompt="!oom"))
                fatal = await session.expect(Fatal)
                assert fatal.reason.startswith("oom_killed")
                assert await session.until_end() == []
            assert await engine.container_wait(cid) == 137
            events = await collect(stream, lambda seen: seen[-1].kind == "died")
        reports_oom = getattr(engine, "reports_oom", True)
        assert (("oom", None) in story(events, cid)) is reports_oom
        assert story(events, cid)[-1] == ("died", 137)
        state = await engine.container_inspect(cid)
        assert (state.status, state.exit_code, state.oom_killed) == ("exited", 137, reports_oom)


async def test_listing_filters_by_labels_and_running(engine, sup_name, image):
    with trio.fail_after(DEADLINE):
        async with AsyncExitStack() as stack:
            a, _ = await start_worker(stack, engine, worker_spec(image, sup_name, "a"))
            b = await engine.container_create(worker_spec(image, sup_name, "b"))
            mine = {"corral.supervisor": sup_name}
            assert {c.id for c in await engine.container_list(labels=mine)} == {a, b}
            assert {c.id for c in await engine.container_list(labels=[f"corral.supervisor={sup_name}",
                                                                      "corral.worker=b"])} == {b}
            assert {c.id for c in await engine.container_list(labels={**mine, "corral.worker": None})} \
                == {a, b}
            assert [c.id for c in await engine.container_list(labels=mine, all=False)] == [a]
            assert (await engine.container_exec(a, ["true"]))[0] == 0


async def test_images_list_inspect_tag_and_untag(engine, sup_name, image):
    with trio.fail_after(DEADLINE):
        listed = {i.id: i for i in await engine.image_list(labels={"corral.image": "1"})}
        ours = listed[image]
        assert ours.labels["corral.agent"] == "claude" and ours.labels["corral.stub"] == "1"
        assert any(t.startswith("corral/worker-claude:") for t in ours.tags)
        assert ours.size > 0 and ours.created > 0
        assert await engine.image_inspect(image) == ours
        assert (await engine.image_inspect(ours.tags[0])).id == image
        assert image not in {i.id for i in await engine.image_list(labels={"corral.image": "no"})}
        ref = f"corral/contract-test:{sup_name}"
        await engine.image_tag(image, "corral/contract-test", sup_name)
        try:
            tagged = await engine.image_inspect(ref)
            assert tagged.id == image and ref in tagged.tags and ours.tags[0] in tagged.tags
        finally:
            await engine.image_remove(ref)              # one of two tags: only the tag goes
        with pytest.raises(ImageNotFound):
            await engine.image_inspect(ref)
        assert ref not in (await engine.image_inspect(image)).tags


async def test_version_and_ping(engine):
    with trio.fail_after(DEADLINE):
        await engine.ping()
        v = await engine.version()
        assert v.version and v.api_version
