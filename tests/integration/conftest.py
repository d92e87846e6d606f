"""Real-engine fixtures: unique names per test, cleanup by label, absolute deadlines.

The engine is DOCKER_HOST's (else /var/run/docker.sock): Docker, or Podman for the Podman round
of scripts/test. On Podman, the few cases that assert Docker's own words (its JSON, its init's
name, its events) are skipped with the reason; tests/integration/test_podman*.py assert what
Podman says instead."""

import functools
import http.client
import os
import shutil
import socket
import uuid

import pytest
import trio

from runtime.apps.cli import default_state_dir
from runtime.engines import open_engine
from runtime.errors import EngineError
from runtime.testing import remove_containers

PODMAN_SAYS_OTHERWISE = {
    "test_certificates.py::test_docker_stop_is_killed_not_crashed":
        "Podman 4.3 tells no kill event for a stop, and a stop event only when its stop call wins "
        "a race with the container's cleanup: test_podman.py::test_an_outside_stop",
    "test_engine.py::test_every_container_gets_the_hardening_policy":
        "Podman lists CapDrop expanded, not ALL: test_podman.py::test_the_hardening_holds",
    "test_worker.py::test_claude_worker_with_git":
        "Podman lists CapDrop expanded, not ALL: test_podman.py::test_the_hardening_holds",
    "test_wrapper_hardening.py::test_fork_bomb_under_a_pids_limit_fails_alone":
        "asserts Docker's init (docker-init; Podman's is podman-init): "
        "test_podman.py::test_a_fork_bomb_under_a_pids_limit_fails_alone",
    "test_wrapper_hardening.py::test_the_sweep_covers_the_whole_container":
        "asserts Docker's init (docker-init; Podman's is podman-init): "
        "test_podman.py::test_the_init_is_catatonit_and_the_sweep_covers_the_container",
    "test_cli.py::test_chaos_keeps_every_task_exactly_once":
        "8 s hold too few kills on Podman (its kill takes ~0.3 s, restarts ~2x Docker's): "
        "test_podman.py::test_chaos_keeps_every_task_exactly_once (longer)",
}


@functools.lru_cache(maxsize=1)
def engine_flavour() -> str:
    """"podman" if DOCKER_HOST's engine is Podman (its ping answers with a Libpod-Api-Version
    header, as runtime.engines.docker tells)."""
    url = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if not url.startswith("unix://"):
        return "docker"

    class Conn(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(5)
            self.sock.connect(url[len("unix://"):])
    try:
        conn = Conn("localhost", timeout=5)
        conn.request("GET", "/_ping")
        answer = conn.getresponse()
        answer.read()
    except (OSError, http.client.HTTPException):
        return "docker"          # the engine fixture will say what is wrong
    return "podman" if answer.getheader("Libpod-Api-Version") else "docker"


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
            key = f"{item.fspath.basename}::{item.name}"
            if key in PODMAN_SAYS_OTHERWISE and engine_flavour() == "podman":
                item.add_marker(pytest.mark.skip(reason=f"on Podman: {PODMAN_SAYS_OTHERWISE[key]}"))


@pytest.fixture
async def engine():
    try:
        async with open_engine() as e:
            yield e
    except EngineError as exc:  # pragma: no cover - scripts/setup provides the engine
        pytest.fail(f"integration tests need a Docker engine (run scripts/setup): {exc}")


@pytest.fixture
async def sup_name(engine):
    """A unique label value for containers a test makes by hand; removed (only those) afterwards."""
    name = "t" + uuid.uuid4().hex[:10]
    yield name
    with trio.CancelScope(shield=True):
        await remove_containers(engine, name)


@pytest.fixture
async def corral_name(engine):
    """A unique supervisor name for tests that run corral itself: the test fails if corral leaves
    any container with this label behind, or a task journal in the name's default state
    directory (/var/lib/corral/NAME as root: tests pass --state-dir under tmp_path). Both are
    removed either way."""
    name = "t" + uuid.uuid4().hex[:10]
    yield name
    with trio.CancelScope(shield=True):
        left = await engine.container_list(labels={"corral.supervisor": name})
        await remove_containers(engine, name)
    state = default_state_dir(name)
    stray = os.path.lexists(state)
    if stray:
        shutil.rmtree(state, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(state))      # /var/lib/corral, if that made it
        except OSError:
            pass
    assert not left, f"corral left containers behind: {[c.name for c in left]}"
    assert not stray, f"corral kept state in the default state directory {state}"


@pytest.fixture
def deadline():
    """Absolute per-test deadline for real-Docker tests (no autojump here)."""
    return float(os.environ.get("CORRAL_TEST_DEADLINE", "120"))
