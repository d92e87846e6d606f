import pytest
import structlog

from runtime.logging import configure_logging

configure_logging("INFO", json=True, cache=False)


@pytest.fixture(autouse=True)
def _clear_contextvars():
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()
