"""The engine contract: the same cases run against every adapter of the engine port (as trio's
testing/_check_streams.py serves the socket, SSL and memory streams alike). A FakeEngine that
passes them is one that unit tests may trust.

``engine`` is parametrized over the adapters: "fake" (in memory, real clock, no autojump) and
"docker" (the real engine: marked ``integration``). Containers run corral's own worker image
(stub claude agent, built by actors.builder) so that FakeEngine, whose containers can only run the
fake wrapper, and Docker run the same workload. Every test has an absolute deadline and a unique
supervisor label; what carries it is removed afterwards (only that).
"""

import uuid

import pytest
import trio

from actors.builder import open_image_builder
from runtime.engines import open_engine
from runtime.errors import EngineError
from runtime.testing import FakeEngine, remove_containers


@pytest.fixture(params=["fake", pytest.param("docker", marks=pytest.mark.integration)])
async def engine(request):
    if request.param == "fake":
        async with FakeEngine() as e:
            yield e
        return
    try:
        async with open_engine() as e:
            yield e
    except EngineError as exc:  # pragma: no cover - scripts/setup provides the engine
        pytest.fail(f"the docker contract needs a Docker engine (run scripts/setup): {exc}")


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
