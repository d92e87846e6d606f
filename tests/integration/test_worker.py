"""Worker actor + worker-wrapper against the real engine (stub agents). The restart and death
tests run on the chaos kit's fixtures with the docker engine (runtime.chaoskit: unique names,
cleanup by label, faults through its monkey, invariants checked)."""

import time

import pytest
import trio

from runtime import (Backoff, RestartPolicy, SupervisorConfig, Task, WorkerSpec,
                     WorkerStartupError, open_supervisor)
from runtime.testing import wait_for_generation


def cfg(name, **kw):
    return SupervisorConfig(name=name, **kw)


async def test_claude_worker_with_git(engine, corral_name):
    with trio.fail_after(120):
        async with open_supervisor(cfg(corral_name), engine=engine) as sup:
            w = await sup.spawn(WorkerSpec(agent="claude", capabilities=["git"], stub_agent=True))
            info = await w.info()
            assert w.id == info.id and w.id.startswith("w-")
            assert info.container_id and not info.container_id.startswith(w.id)
            state = await engine.container_inspect(info.container_id)
            assert state.running is True
            code, out = await engine.container_exec(info.container_id, ["sh", "-c", "id -un; git --version"])
            assert code == 0 and out.splitlines()[0] == "worker" and "git version" in out
            labels = (await engine.container_inspect(info.container_id)).labels
            assert labels["corral.worker"] == w.id and labels["corral.supervisor"] == corral_name
            host = (await engine.container_inspect_raw(info.container_id))["HostConfig"]   # the adapter's policy
            assert host["NetworkMode"] == "none" and host["CapDrop"] == ["ALL"]
            assert "no-new-privileges" in host["SecurityOpt"] and host["Init"] is True


async def test_factory_worker_with_curl(engine, corral_name):
    with trio.fail_after(120):
        async with open_supervisor(cfg(corral_name), engine=engine) as sup:
            w = await sup.spawn(WorkerSpec(agent="factory", capabilities=["curl"], stub_agent=True))
            cid = (await w.info()).container_id
            assert (await engine.container_inspect(cid)).running
            code, out = await engine.container_exec(cid, ["curl", "--version"])
            assert code == 0 and out.startswith("curl ")
            r = await w.run(Task(prompt="hi"))
            assert (r.status, r.output) == ("ok", "stub-factory: hi")


async def test_claude_tasks_ok_and_error(engine, corral_name):
    with trio.fail_after(120):
        async with open_supervisor(cfg(corral_name), engine=engine) as sup:
            w = await sup.spawn(WorkerSpec(agent="claude", stub_agent=True))
            r = await w.run(Task(prompt="hello"))
            assert (r.status, r.output, r.exit_code) == ("ok", "stub-claude: hello", 0)
            r = await w.run(Task(prompt="!exit 3"))
            assert (r.status, r.exit_code) == ("error", 3)
            c = await sup.spawn(WorkerSpec(agent="codex", stub_agent=True))
            r = await c.run(Task(prompt="hello"))
            assert (r.status, r.output) == ("ok", "stub-codex: hello")
            r = await c.run(Task(prompt="!exit 2"))
            assert (r.status, r.exit_code) == ("error", 2)
            s = await sup.spawn(WorkerSpec(agent="shell"))
            r = await s.run(Task(prompt="echo $((6*7)); whoami"))
            assert (r.status, r.output) == ("ok", "42\nworker\n")
            r = await s.run(Task(prompt="sleep 30", timeout_s=0.5))
            assert r.status == "timeout"


async def test_failing_probe_is_a_config_error_reported_at_once(engine, corral_name):
    t0 = time.monotonic()
    with trio.fail_after(60):
        async with open_supervisor(cfg(corral_name), engine=engine) as sup:
            with pytest.raises(WorkerStartupError) as ei:
                await sup.spawn(WorkerSpec(agent="claude", stub_agent=True,
                                           env={"CORRAL_STUB_FAIL_PROBE": "1"}))
            assert time.monotonic() - t0 < 10
            cert = ei.value.certificate
            assert cert.cause == "config_error" and cert.exit_code == 78 and not cert.ready
            assert "version probe" in cert.reason and "CORRAL_STUB_FAIL_PROBE" in cert.logs_tail
            assert cert.generation == 1
            # no restart loop: nothing of that worker runs, and nothing is left
            assert await engine.container_list(labels={"corral.supervisor": corral_name}) == []


@pytest.mark.corral_engine("docker", deadline=180)
async def test_docker_kill_brings_a_new_generation_back_fast(corral_engine, corral_supervisor, chaos, invariants):
    with trio.fail_after(120):
        sup = await corral_supervisor()
        w = await sup.spawn(WorkerSpec(agent="claude", stub_agent=True))
        old = await w.info()
        t0 = time.monotonic()
        fault = await chaos.inject("kill", worker=w)          # what `docker kill` does
        await wait_for_generation(w, 2)
        r = await w.run(Task(prompt="again"))
        elapsed = time.monotonic() - t0
        new = await w.info()
        assert r.status == "ok" and elapsed < 3, elapsed
        assert new.generation == 2 and new.container_name != old.container_name
        assert new.container_name.endswith("-2")
        assert new.last_death.cause == "killed" and new.last_death.exit_code == 137
        assert fault.container_id == old.container_id and fault.cert == new.last_death
        left = await corral_engine.container_list(labels={"corral.worker": w.id})
        assert [c.id for c in left] == [new.container_id]
        await invariants.check()


@pytest.mark.corral_engine("docker", deadline=180)
async def test_crash_wrapper_during_task(corral_supervisor, invariants):
    with trio.fail_after(120):
        sup = await corral_supervisor()
        w = await sup.spawn(WorkerSpec(agent="claude", stub_agent=True))
        r = await w.run(Task(prompt="!crash-wrapper"))
        assert r.status == "worker_died" and r.death.cause == "crashed" and r.death.ready
        assert "killing the worker-wrapper" in r.death.logs_tail
        await wait_for_generation(w, 2)
        assert (await w.run(Task(prompt="back"))).output == "stub-claude: back"
        # opt-in redelivery: the same task runs again on the restarted container
        r = await w.run(Task(prompt="!crash-wrapper", max_attempts=2))
        assert r.status == "worker_died" and r.attempts == 2
        await invariants.check()     # executions counted inside: 1, 1, 2; charged deaths never escalate


@pytest.mark.corral_engine("docker", deadline=180)
async def test_oom_with_memory_limit(corral_supervisor, invariants):
    with trio.fail_after(120):
        sup = await corral_supervisor()
        w = await sup.spawn(WorkerSpec(agent="claude", stub_agent=True, memory=64 * 1024 * 1024))
        r = await w.run(Task(prompt="!oom"))
        assert r.status == "worker_died"
        assert r.death.cause == "oom_killed" and r.death.oom_killed
        await wait_for_generation(w, 2)
        await invariants.check()


async def test_spawn_and_stop_the_same_worker_20_times(engine, corral_name):
    with trio.fail_after(240):
        async with open_supervisor(cfg(corral_name), engine=engine) as sup:
            for i in range(20):
                w = await sup.spawn(WorkerSpec(id="same", agent="shell"))
                assert w.id == "same" and (await w.info()).container_name == f"corral-{corral_name}-same-1"
                await w.stop()
                assert w.state == "stopped"
            assert await engine.container_list(labels={"corral.supervisor": corral_name}) == []


@pytest.mark.corral_engine("docker", deadline=180)
async def test_hung_worker_is_killed_and_restarted(corral_supervisor, chaos, invariants):
    with trio.fail_after(120):
        sup = await corral_supervisor()
        w = await sup.spawn(WorkerSpec(agent="shell", heartbeat_s=0.2, heartbeat_timeout_s=1.5))
        # freeze the wrapper (SIGSTOP): no heartbeats, no answers (the container itself runs on)
        fault = await chaos.inject("pause", worker=w)
        await wait_for_generation(w, 2)
        assert (await w.info()).last_death.cause == "hung"
        assert fault.cert.cause == "hung" and fault.cert_at - fault.t >= 1.5
        await invariants.check()


async def test_cancelling_the_caller_kills_the_agent_in_the_container(engine, corral_name):
    with trio.fail_after(60):
        async with open_supervisor(cfg(corral_name), engine=engine) as sup:
            w = await sup.spawn(WorkerSpec(agent="shell"))
            with trio.move_on_after(1.0):
                await w.run(Task(prompt="sleep 30; echo never"))
            t0 = time.monotonic()
            r = await w.run(Task(prompt="echo next"))
            assert r.output == "next\n" and time.monotonic() - t0 < 5
            code, out = await engine.container_exec((await w.info()).container_id,
                                                    ["sh", "-c", "ps -eo args 2>/dev/null || ls /proc"])
            assert "sleep 30" not in out


async def test_resource_limits_and_read_only_root(engine, corral_name):
    with trio.fail_after(60):
        async with open_supervisor(cfg(corral_name), engine=engine) as sup:
            w = await sup.spawn(WorkerSpec(agent="shell", read_only_rootfs=True, cpus=0.5,
                                           memory=128 * 1024 * 1024, pids_limit=64))
            host = (await engine.container_inspect_raw((await w.info()).container_id))["HostConfig"]
            assert host["ReadonlyRootfs"] is True and host["NanoCpus"] == 500_000_000
            assert host["Memory"] == 128 * 1024 * 1024 and host["PidsLimit"] == 64
            r = await w.run(Task(prompt="echo ok > /workspace/f && cat /workspace/f"))
            assert (r.status, r.output) == ("ok", "ok\n")
            r = await w.run(Task(prompt="touch /opt/nope"))
            assert r.status == "error" and "Read-only file system" in r.error
