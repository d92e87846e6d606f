"""corral on rootless Podman: the service scripts/setup runs as user corral-rootless
(CORRAL_PODMAN_ROOTLESS_HOST, else unix:///run/corral-podman-rootless/podman.sock). Spawn, a task,
kill -> restart and a startup failure; and the limits rootless Podman cannot enforce on cgroup v1
(it drops them without a word): refused with a clear error, or run with a warning when the user
allows it. Never pretended."""

import os

import pytest
import trio
from structlog.testing import capture_logs

from runtime import SupervisorConfig, Task, WorkerSpec, WorkerStartupError, open_supervisor
from runtime.engines import open_engine
from runtime.engines.podman import LIMITS_ENV
from runtime.errors import EngineError
from runtime.testing import wait_for_generation

ROOTLESS_URL = os.environ.get("CORRAL_PODMAN_ROOTLESS_HOST",
                              "unix:///run/corral-podman-rootless/podman.sock")
ENGINES = os.environ.get("CORRAL_TEST_ENGINES", "docker,podman,podman-rootless").split(",")
pytestmark = pytest.mark.skipif("podman-rootless" not in ENGINES,
                                reason="CORRAL_TEST_ENGINES has no podman-rootless")


@pytest.fixture
async def engine():
    try:
        async with open_engine(ROOTLESS_URL) as e:
            assert (e.flavour, e.rootless) == ("podman", True), e
            yield e
    except EngineError as exc:  # pragma: no cover - scripts/setup provides the engine
        pytest.fail(f"the rootless Podman tests need its service (run scripts/setup): {exc}")


async def test_limits_it_would_drop_are_refused_with_a_clear_error(engine, corral_name, monkeypatch):
    monkeypatch.delenv(LIMITS_ENV, raising=False)
    with trio.fail_after(120):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            if engine.cgroup_version != "1":
                w = await sup.spawn(WorkerSpec(agent="shell", memory=128 << 20, pids_limit=100))
                host = (await engine.container_inspect_raw((await w.info()).container_id))["HostConfig"]
                assert (host["Memory"], host["PidsLimit"]) == (128 << 20, 100)
                return
            with pytest.raises(WorkerStartupError) as ei:
                await sup.spawn(WorkerSpec(agent="shell", memory=128 << 20, pids_limit=100))
    cert = ei.value.certificate
    assert cert.cause == "engine_error" and not cert.ready
    assert "did not apply memory=134217728, pids_limit=100" in cert.reason, cert.reason
    assert "rootless Podman cannot enforce resource limits on cgroup v1" in cert.reason
    assert f"{LIMITS_ENV}=1" in cert.reason


async def test_spawn_task_kill_restart_and_a_startup_failure(engine, corral_name, monkeypatch):
    monkeypatch.setenv(LIMITS_ENV, "1")
    with trio.fail_after(180):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            with capture_logs() as logs:
                w = await sup.spawn(WorkerSpec(agent="claude", stub_agent=True))
            warned = [e for e in logs if e["event"] == "limits_not_enforced"]
            if engine.cgroup_version == "1":       # said, every time: never pretended
                assert [e["dropped"] for e in warned] == [["pids_limit=512"]]
            r = await w.run(Task(prompt="hello"))
            assert (r.status, r.output) == ("ok", "stub-claude: hello")
            cid = (await w.info()).container_id
            code, out = await engine.container_exec(cid, ["sh", "-c", "id -un; grep CapEff /proc/self/status"])
            assert (code, out.split()) == (0, ["worker", "CapEff:", "0" * 16])

            await engine.container_kill(cid)                            # podman kill, from outside
            await wait_for_generation(w, 2)
            info = await w.info()
            assert info.container_id != cid
            assert (info.last_death.cause, info.last_death.exit_code) == ("killed", 137)
            assert info.last_death.reason == "killed outside corral with SIGKILL"
            assert (await w.run(Task(prompt="back"))).output == "stub-claude: back"

            with pytest.raises(WorkerStartupError) as ei:
                await sup.spawn(WorkerSpec(agent="codex", stub_agent=True,
                                           env={"CORRAL_STUB_FAIL_PROBE": "1"}))
            cert = ei.value.certificate
            assert (cert.cause, cert.exit_code, cert.ready) == ("config_error", 78, False)
            assert "version probe" in cert.reason
