"""corral on rootful Podman (4.3, Docker-compatible API): each way Podman differs from Docker,
and what corral makes of it (runtime/engines/docker.py, PodmanEngine). The engine is the Podman
service scripts/setup starts (CORRAL_PODMAN_HOST, else unix:///run/corral-podman/podman.sock);
the rest of the integration suite runs against it too, in scripts/test's Podman round."""

import io
import os
import tarfile
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from runtime import (Backoff, RestartPolicy, SupervisorConfig, Task, WorkerSpec, WorkerStartupError,
                     open_supervisor)
from runtime.apps.chaos import run_chaos
from runtime.engines import ContainerSpec, TmpfsMount, open_engine
from runtime.engines.docker import PodmanEngine
from runtime.errors import EngineError, ImageBuildError, NameConflict
from runtime.testing import wait_for_generation
from tests.contract.helpers import start_worker, story, worker_spec

PODMAN_URL = os.environ.get("CORRAL_PODMAN_HOST", "unix:///run/corral-podman/podman.sock")
ENGINES = os.environ.get("CORRAL_TEST_ENGINES", "docker,podman,podman-rootless").split(",")
pytestmark = pytest.mark.skipif("podman" not in ENGINES, reason="CORRAL_TEST_ENGINES has no podman")
LIST_PROCESSES = 'for p in /proc/[0-9]*; do read -r c < "$p/comm" && echo "$c"; done'


@pytest.fixture
async def engine():
    try:
        async with open_engine(PODMAN_URL) as e:
            assert isinstance(e, PodmanEngine) and e.flavour == "podman", e
            yield e
    except EngineError as exc:  # pragma: no cover - scripts/setup provides the engine
        pytest.fail(f"the Podman tests need the Podman service (run scripts/setup): {exc}")


@pytest.fixture
async def image(engine):
    from actors.builder import open_image_builder
    with trio.fail_after(300):
        async with open_image_builder(engine) as builder:
            return (await builder.image_for("claude", [], True)).image_id


async def processes(w) -> list[str]:
    r = await w.run(Task(prompt=LIST_PROCESSES))
    assert r.status == "ok", r
    return sorted(r.output.split())


async def test_podman_is_detected_and_says_how_it_runs(engine):
    v = await engine.version()
    assert v.version.split(".")[0] >= "4" and v.api_version
    assert engine.rootless is False and engine.cgroup_version in ("1", "2")
    assert engine.reports_oom is (engine.cgroup_version == "2")


async def test_the_init_is_catatonit_and_the_sweep_covers_the_container(engine, corral_name):
    """``Init`` needs catatonit (setup installs it): it is pid 1 as ``podman-init``. The wrapper's
    sweep works as on Docker: what a task leaves behind is gone when it ends."""
    with trio.fail_after(120):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            w = await sup.spawn(WorkerSpec(agent="shell"))
            r = await w.run(Task(prompt="cat /proc/1/comm; setsid sh -c 'sleep 1000 & sleep 1000' "
                                        ">/dev/null 2>&1 & (setsid sleep 1000 >/dev/null 2>&1 &)"))
            assert (r.status, r.output) == ("ok", "podman-init\n")
            assert await processes(w) == ["podman-init", "python3", "sh"]


async def test_a_fork_bomb_under_a_pids_limit_fails_alone(engine, corral_name):
    """Rootful Podman enforces the pids limit (cgroup v1 too)."""
    with trio.fail_after(120):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            w = await sup.spawn(WorkerSpec(agent="shell", pids_limit=64))
            host = (await engine.container_inspect_raw((await w.info()).container_id))["HostConfig"]
            assert host["PidsLimit"] == 64
            r = await w.run(Task(prompt="f(){ f & f & wait; }; f; sleep 30", timeout_s=3))
            assert r.status in ("timeout", "error"), r
            assert r.duration_s < 3 + 2 + 2, r
            r = await w.run(Task(prompt="echo alive"))
            assert (r.status, r.output) == ("ok", "alive\n")
            assert await processes(w) == ["podman-init", "python3", "sh"]
            info = await w.info()
            assert (info.generation, info.restarts) == (1, 0)


async def test_the_hardening_holds(engine, corral_name):
    """Podman lists CapDrop expanded (every capability it would have granted), not ``ALL``: the
    container has none all the same, cannot gain any, and has no network."""
    with trio.fail_after(120):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            w = await sup.spawn(WorkerSpec(agent="shell"))
            raw = await engine.container_inspect_raw((await w.info()).container_id)
            host = raw["HostConfig"]
            assert host["NetworkMode"] == "none" and host["Init"] is True
            assert "no-new-privileges" in host["SecurityOpt"]
            assert host["CapDrop"] != ["ALL"] and {"CHOWN", "SETUID", "KILL"} <= set(host["CapDrop"])
            assert not host.get("CapAdd")
            r = await w.run(Task(prompt="grep -E '^(CapPrm|CapEff|CapBnd|NoNewPrivs)' /proc/self/status; "
                                        "ls /sys/class/net; id -un"))
            assert r.output.split() == ["CapPrm:", "0" * 16, "CapEff:", "0" * 16, "CapBnd:", "0" * 16,
                                        "NoNewPrivs:", "1", "lo", "worker"]


async def test_a_tmpfs_for_the_worker_uses_podman_s_U_option(engine, corral_name):
    """Podman 4.3 rejects ``uid=1000,gid=1000`` from a client; ``U`` gives the tmpfs to the
    container's user (Podman then lists it with the uid and gid it resolved)."""
    spec = ContainerSpec(image="i", tmpfs=(TmpfsMount(path="/w", mode=0o755, uid=1000, gid=1000),))
    assert PodmanEngine(None, None, PODMAN_URL)._create_body(spec)["HostConfig"]["Tmpfs"] == \
        {"/w": "U,mode=0755"}
    with trio.fail_after(120):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            w = await sup.spawn(WorkerSpec(agent="shell", read_only_rootfs=True, disk=16 << 20))
            r = await w.run(Task(prompt="stat -c '%n %U' /workspace /home/worker /tmp; "
                                        "touch /workspace/x /home/worker/y && echo written"))
            assert r.output.splitlines() == ["/workspace worker", "/home/worker worker",
                                             "/tmp root", "written"]


async def test_runtime_errors_come_back_at_attach_as_the_start_s_failure(engine, sup_name, image):
    """Podman prepares a container when it is attached: the runtime's failure is a 409 there,
    before start. The adapter reports it as the start's failure, with the runtime's words."""
    with trio.fail_after(60):
        spec = ContainerSpec(image=image, name=f"{sup_name}-bad", user="no-such-user",
                             labels={"corral.supervisor": sup_name})
        cid = await engine.container_create(spec)
        with pytest.raises(EngineError) as ei:
            async with engine.attach(cid):
                await engine.container_start(cid)
        msg = str(ei.value)
        assert ei.value.status == 409, msg
        assert msg.startswith(f"start {cid[:12]} (Podman starts the runtime on attach): ") and \
            "no-such-user" in msg, msg


def test_podman_s_failures_that_a_host_causes_come_with_a_hint():
    e = PodmanEngine(None, None, "unix:///podman.sock")
    rlimit = e._map_status(409, "preparing container c for attach: runc: runc create failed: unable to "
                           "start container process: error during container init: error setting "
                           "rlimits for ready process: error setting rlimit type 7: operation not "
                           "permitted: OCI permission denied", what="attach c")
    assert str(rlimit).startswith("start c (Podman starts the runtime on attach): ")
    assert "CAP_SYS_RESOURCE" in str(rlimit) and "default_ulimits" in str(rlimit)
    init = e._map_status(500, "container create: container-init binary not found on the host: stat "
                         "/usr/libexec/podman/catatonit: no such file or directory", what="create n")
    assert "apt-get install catatonit" in str(init)
    conflict = e._map_status(500, 'container create: creating container storage: the container name '
                             '"n" is already in use by 1f. You have to remove that container to be '
                             'able to reuse that name: that name is already in use')
    assert isinstance(conflict, NameConflict) and conflict.status == 409


def test_the_rlimit_workaround_is_applied_only_where_it_is_needed():
    """scripts/setup gives its Podman service ``default_ulimits`` only where root cannot raise a
    hard limit (no CAP_SYS_RESOURCE), as runc would for rootful Podman's defaults."""
    conf = Path(os.environ.get("CORRAL_PODMAN_CONF", "/etc/corral/podman/containers.conf"))
    if not conf.exists():
        pytest.skip(f"{conf}: not the Podman service scripts/setup starts")
    cap_eff = int(next(line.split()[1] for line in open("/proc/self/status")
                       if line.startswith("CapEff:")), 16)
    can_raise = bool(cap_eff & (1 << 24)) and os.geteuid() == 0     # CAP_SYS_RESOURCE
    assert ("default_ulimits" in conf.read_text()) is (not can_raise)
    assert "exit_command_delay" in conf.read_text()


async def test_a_stale_name_is_recovered(engine, corral_name, image):
    """Podman says a name conflict with HTTP 500: corral still recognises its own leftover
    (same supervisor, worker, generation) when it creates the next generation, removes it and
    goes on."""
    with trio.fail_after(120):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            w = await sup.spawn(WorkerSpec(id="w-stale", agent="claude", stub_agent=True))
            name = f"corral-{corral_name}-w-stale-2"
            stale = await engine.container_create(ContainerSpec(
                image=image, name=name, command=["sleep", "300"],
                labels={"corral.supervisor": corral_name, "corral.worker": "w-stale"}))
            with pytest.raises(NameConflict):
                await engine.container_create(ContainerSpec(image=image, name=name))
            with capture_logs() as logs:
                await engine.container_kill((await w.info()).container_id)
                await wait_for_generation(w, 2)
            info = await w.info()
            assert info.container_id != stale
            assert [e["name"] for e in logs if e["event"] == "stale_container_removed"] == [name]
            assert (await w.run(Task(prompt="hi"))).output == "stub-claude: hi"


async def test_kill_events_get_their_signal_from_the_death(engine, sup_name, image):
    """Podman's kill events carry no signal: the death right after names it (128 + n). A kill
    that does not end the container keeps no signal (nothing is guessed); a death and a removal
    are seen through filters that ask for Podman's own names (``died``, ``remove``)."""
    with trio.fail_after(60):
        async with engine.events(labels={"corral.supervisor": sup_name},
                                 kinds=["killed", "died", "removed"]) as stream:
            async with AsyncExitStack() as stack:
                a, _ = await start_worker(stack, engine, worker_spec(image, sup_name, "a"))
                b, _ = await start_worker(stack, engine, worker_spec(image, sup_name, "b"))
                await engine.container_kill(a, "SIGTERM")
                await engine.container_kill(b, "SIGWINCH")          # ignored: it lives on
                assert await engine.container_wait(a) == 143
                await engine.container_kill(b, "SIGKILL")
                assert await engine.container_wait(b) == 137
                await engine.container_remove(a)
                seen = []
                async for ev in stream.receive:
                    seen.append(ev)
                    if story(seen, a)[-1:] == [("removed", None)] and ("died", 137) in story(seen, b):
                        break
        assert story(seen, a) == [("killed", 15), ("died", 143), ("removed", None)]
        assert story(seen, b) == [("killed", None), ("killed", 9), ("died", 137)]


async def test_an_outside_kill_is_a_kill_and_the_restart_is_prompt(engine, corral_name):
    """The death event reaches the Watcher (the filter asks for ``died``): the restart does not
    wait for a fallback, and the kill is told as one (its signal filled from the death)."""
    policy = RestartPolicy(backoff=Backoff(initial_s=0.05, max_s=0.2))
    with trio.fail_after(60):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            w = await sup.spawn(WorkerSpec(agent="claude", stub_agent=True, restart=policy))
            cid = (await w.info()).container_id
            t0 = time.monotonic()
            await engine.container_kill(cid, "SIGTERM")
            await wait_for_generation(w, 2)
            took = time.monotonic() - t0
            death = (await w.info()).last_death
            assert (death.cause, death.exit_code) == ("killed", 143)
            assert death.reason == "killed outside corral with SIGTERM"
            assert took < 5, took
            assert (await w.run(Task(prompt="back"))).output == "stub-claude: back"


async def test_an_outside_stop(engine, corral_name):
    """Podman 4.3 tells no kill event for a stop, and its stop event only when the stop call wins
    a race with the container's cleanup. The death is by SIGTERM (143) either way: with the stop
    event corral says "stopped outside corral" (cause killed; no kill event names the signal, its
    exit code does: SIGTERM), without it it cannot tell the stop from a crash by SIGTERM (cause crashed, the
    reason names SIGTERM). The worker comes back either way."""
    with trio.fail_after(60):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            w = await sup.spawn(WorkerSpec(agent="claude", stub_agent=True))
            cid = (await w.info()).container_id
            await engine.container_stop(cid, grace_s=1)
            await wait_for_generation(w, 2)
            death = (await w.info()).last_death
            assert (death.exit_code, death.ready) == (143, True)
            assert (death.cause, death.reason) == ("killed", "stopped outside corral (docker stop: SIGTERM)") \
                or (death.cause == "crashed" and "SIGTERM" in death.reason), death
            assert (await w.run(Task(prompt="back"))).output == "stub-claude: back"


async def test_oom_is_the_wrapper_s_word_where_podman_tells_nothing(engine, corral_name):
    """On cgroup v1 Podman tells no ``oom`` event and its state never says OOMKilled: the
    wrapper's own cgroup OOM counter is what classifies the death, and the engine's state is
    reported as it is (not made up)."""
    with trio.fail_after(120):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            async with engine.events(labels={"corral.supervisor": corral_name}) as stream:
                w = await sup.spawn(WorkerSpec(agent="claude", stub_agent=True, memory=64 << 20))
                cid = (await w.info()).container_id
                r = await w.run(Task(prompt="!oom"))
                assert r.status == "worker_died" and r.death.cause == "oom_killed", r
                assert r.death.reason.startswith("oom_killed")
                kinds = []
                async for ev in stream.receive:
                    if ev.container_id == cid:
                        kinds.append(ev.kind)
                        if ev.kind == "died":
                            break
        assert ("oom" in kinds) is engine.reports_oom


async def test_a_failing_build_names_its_step_and_leaves_no_layers(engine):
    """Podman's build output (``STEP 2/3: RUN ...``, ``--> id``) is read like Docker's: the
    failing step is named, and the images its earlier steps made are removed. Tags come back as
    given (not ``docker.io/...`` or ``localhost/...``)."""
    mark = uuid.uuid4().hex[:10]

    def context(dockerfile: str) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            ti = tarfile.TarInfo("Dockerfile")
            ti.size = len(dockerfile.encode())
            tar.addfile(ti, io.BytesIO(dockerfile.encode()))
        return buf.getvalue()
    labels = {"corral.test": mark}
    with trio.fail_after(120):
        with pytest.raises(ImageBuildError) as ei:
            await engine.image_build(context(f"FROM corral/worker-base:latest\nRUN echo {mark} > /m\n"
                                             "RUN echo failing && exit 3\nRUN true\n"),
                                     tag=f"corral/podman-test:{mark}", labels=labels)
        assert ei.value.step == "RUN echo failing && exit 3"
        assert "failing" in ei.value.output_tail
        assert await engine.image_list(labels=labels) == []
        tag = f"corral/podman-test:{mark}-ok"
        image_id = await engine.image_build(context("FROM corral/worker-base:latest\nRUN true\n"),
                                            tag=tag, labels=labels)
        try:
            [listed] = await engine.image_list(labels=labels)
            assert listed.id == image_id and listed.tags == [tag]
            assert (await engine.image_inspect(tag)).tags == [tag]
            assert (await engine.image_inspect("corral/worker-base:latest")).tags == \
                ["corral/worker-base:latest"]
        finally:
            await engine.image_remove(tag)


def _conmons(cid: str) -> list[int]:
    """conmon processes on this host that monitor the container ``cid`` (or its exec sessions)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"conmon") and cid.encode() in cmd:
                found.append(int(p.name))
    return found


async def test_exec_sessions_leave_no_conmon_behind(engine, sup_name, image):
    """Every exec keeps two conmon processes for containers.conf's ``exit_command_delay`` (300 s
    by default), even past the container's removal; setup's service has it at 5 s."""
    if not Path(PODMAN_URL[len("unix://"):]).exists():
        pytest.skip("the Podman service is not on this host")
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            cid, _ = await start_worker(stack, engine, worker_spec(image, sup_name, "x"))
            for i in range(3):
                assert await engine.container_exec(cid, ["sh", "-c", f"echo {i}"]) == (0, f"{i}\n")
            assert len(_conmons(cid)) >= 1 + 2 * 3
        await engine.container_remove(cid, force=True)
        while _conmons(cid):
            await trio.sleep(0.5)


async def test_chaos_keeps_every_task_exactly_once(engine, corral_name):
    with trio.fail_after(150):
        report = await run_chaos(engine_url=PODMAN_URL, name=corral_name, workers=3, duration_s=14,
                                 kill_interval_s=0.7, seed=7)
    assert sum(report.actions.values()) >= 4
    assert report.tasks_submitted > 20
    assert report.ok, report


async def test_a_worker_survives_the_limits_check(engine, corral_name):
    """Every create is checked for the limits the spec asks for; rootful Podman applies them."""
    with trio.fail_after(60):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            w = await sup.spawn(WorkerSpec(agent="shell", memory=128 << 20, cpus=0.5, pids_limit=100))
            host = (await engine.container_inspect_raw((await w.info()).container_id))["HostConfig"]
            assert (host["Memory"], host["PidsLimit"], host["NanoCpus"]) == (128 << 20, 100, 500_000_000)
            r = await w.run(Task(prompt="cat /sys/fs/cgroup/pids.max /sys/fs/cgroup/pids/pids.max 2>/dev/null"))
            assert r.output.split() == ["100"]
