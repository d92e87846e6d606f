"""The engine contract: the same cases run against every adapter of the engine port (as trio's
testing/_check_streams.py serves the socket, SSL and memory streams alike). A FakeEngine that
passes them is one that unit tests may trust.

``engine`` is parametrized over the engines: "fake" (in memory, real clock, no autojump), and the
real ones named in CORRAL_TEST_ENGINES (default "docker,podman,podman-rootless"; marked
``integration``; "swarm" adds the Swarm engine on a 2-node test swarm, marked ``swarm`` too):
"docker" is the engine at DOCKER_HOST (else /var/run/docker.sock), "podman" the rootful Podman
service scripts/setup starts (CORRAL_PODMAN_HOST, else unix:///run/corral-podman/podman.sock),
spoken to through the same Docker adapter, which detects it. Where an engine honestly reports less
than another (Podman's events, OOM on cgroup v1), a case says so through ``flavour``.

Containers run corral's own worker image (stub claude agent, built by actors.builder) so that
FakeEngine, whose containers can only run the fake wrapper, and the real engines run the same
workload. Every test has an absolute deadline and a unique supervisor label; what carries it is
removed afterwards (only that).
"""

import os
import uuid

import pytest
import trio

from actors.builder import open_image_builder
from runtime.engines import open_engine
from runtime.errors import EngineError
from runtime.testing import FakeEngine, remove_containers

PODMAN_URL = "unix:///run/corral-podman/podman.sock"


def real_engines() -> list[str]:
    """The contract's real engines among CORRAL_TEST_ENGINES. Not rootless Podman: on cgroup v1
    it cannot enforce the limits the cases ask for, so corral refuses them there
    (tests/integration/test_podman_rootless.py covers it)."""
    names = os.environ.get("CORRAL_TEST_ENGINES", "docker,podman,podman-rootless")
    return [n.strip() for n in names.split(",") if n.strip() in ("docker", "podman", "swarm")]


def engine_url(name: str) -> str | None:
    if name == "podman":
        return os.environ.get("CORRAL_PODMAN_HOST", PODMAN_URL)
    return None        # docker: DOCKER_HOST, else the default socket


def flavour(engine) -> str:
    """"fake", "docker", "podman" or "swarm": what the adapter found answering."""
    return getattr(engine, "flavour", "fake")


@pytest.fixture(params=["fake"] + [pytest.param(n, marks=[pytest.mark.integration]
                                                + ([pytest.mark.swarm] if n == "swarm" else []))
                                   for n in real_engines()])
async def engine(request):
    if request.param == "fake":
        async with FakeEngine() as e:
            yield e
        return
    if request.param == "swarm":
        swarm = request.getfixturevalue("test_swarm")
        async with open_engine(swarm.url) as e:
            yield e
        return
    url = engine_url(request.param)
    try:
        async with open_engine(url) as e:
            if request.param == "podman" and flavour(e) != "podman":
                pytest.fail(f"{url} is not a Podman engine (it is {flavour(e)})")
            yield e
    except EngineError as exc:  # pragma: no cover - scripts/setup provides the engines
        pytest.fail(f"the {request.param} contract needs that engine (run scripts/setup; "
                    f"CORRAL_TEST_ENGINES says which engines to test): {exc}")


@pytest.fixture
async def sup_name(engine):
    """A unique ``corral.supervisor`` label for the test's containers, removed afterwards."""
    name = "k" + uuid.uuid4().hex[:10]
    yield name
    with trio.CancelScope(shield=True), trio.move_on_after(30):
        await remove_containers(engine, name)


@pytest.fixture
async def image(engine):
    """corral's worker image with the stub claude agent (built once per wrapper version)."""
    with trio.fail_after(300):
        async with open_image_builder(engine) as builder:
            return (await builder.image_for("claude", [], True)).image_id
