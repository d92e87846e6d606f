import os
from types import SimpleNamespace

import pytest
import structlog

from runtime.logging import configure_logging

configure_logging("INFO", json=True, cache=False)


@pytest.fixture(autouse=True)
def _clear_contextvars():
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()


# -- the test swarm (tests/contract with CORRAL_TEST_ENGINES=...,swarm, and tests/swarm) ---------
_swarm_state: dict = {}


@pytest.fixture(scope="session")
def test_swarm():
    """A 2-node test swarm for the session (runtime/chaoskit/swarm.py: namespaces, 198.18.0.I,
    no default route, --bridge=none), with corral's base image in each node. Torn down at the end
    of the session (and at exit, whatever happens); the session fails if anything is left.
    CORRAL_SWARM_URL: use the swarm `scripts/swarm up` holds instead (its URL only: enough for the
    contract suite, not for tests that stop nodes)."""
    from runtime.chaoskit.dockerd import DockerdError
    from runtime.chaoskit.swarm import TestSwarm, swarm_unavailable_reason

    if os.environ.get("CORRAL_SWARM_URL"):       # one that `scripts/swarm up` holds (contract only)
        yield SimpleNamespace(url=os.environ["CORRAL_SWARM_URL"], held=True)
        return
    reason = swarm_unavailable_reason()
    if reason is not None:
        pytest.skip(f"test swarm: {reason}")
    if "failed" in _swarm_state:
        pytest.fail(f"test swarm: {_swarm_state['failed']}", pytrace=False)
    swarm = TestSwarm(2)
    swarm.close_at_exit()
    try:
        swarm.open_sync()
    except DockerdError as exc:
        _swarm_state["failed"] = str(exc)
        pytest.fail(f"test swarm: {exc}", pytrace=False)
    try:
        yield swarm
    finally:
        swarm.close_sync()          # DockerdError (something is left) fails the session
        assert swarm.leftovers() == []
