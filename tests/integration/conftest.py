"""Real-Docker fixtures: unique names per test, cleanup by label, absolute deadlines."""

import os
import uuid

import pytest
import trio

from runtime.engines import open_engine
from runtime.errors import EngineError
from runtime.testing import remove_containers



def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


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
    any container with this label behind (they are removed either way)."""
    name = "t" + uuid.uuid4().hex[:10]
    yield name
    with trio.CancelScope(shield=True):
        left = await engine.container_list(labels={"corral.supervisor": name})
        await remove_containers(engine, name)
    assert not left, f"corral left containers behind: {[c.name for c in left]}"


@pytest.fixture
def deadline():
    """Absolute per-test deadline for real-Docker tests (no autojump here)."""
    return float(os.environ.get("CORRAL_TEST_DEADLINE", "120"))
