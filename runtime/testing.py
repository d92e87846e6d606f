"""Helpers for testing corral, and for users testing their own code against it (like
trio.testing): the in-memory engine and a few helpers for tests against any engine.

`FakeEngine` (runtime.engines.fake) is a trio-native, in-memory engine behind the same port as the
real one: each "container" runs a fake worker-wrapper that speaks the real wire protocol, so the
real Worker/Supervisor code runs unchanged - with trio's autojump clock, thousands of restarts
take milliseconds and every time is exact. Its controls (kill, stop, restart, crash, hang, wedge,
remove, oom, go_down/come_up, shut_down, freeze/thaw, ...) are documented there.
"""

from __future__ import annotations

import contextlib

from .engines.base import Engine
from .engines.fake import BASE as BASE
from .engines.fake import FakeContainer as FakeContainer
from .engines.fake import FakeEngine as FakeEngine
from .engines.fake import FakeImage as FakeImage
from .engines.fake import open_fake_engine as open_fake_engine
from .errors import ContainerNotFound, RemovalInProgress


async def remove_containers(engine: Engine, supervisor: str) -> int:
    """Remove every container labelled for ``supervisor`` (only those). Returns how many."""
    n = 0
    for c in await engine.container_list(labels={"corral.supervisor": supervisor}):
        try:
            await engine.container_remove(c.id, force=True)
            n += 1
        except (ContainerNotFound, RemovalInProgress):
            pass
    return n


async def wait_for_generation(worker, generation: int) -> None:
    """Wait until ``worker`` (a WorkerHandle) is READY at ``generation`` or later."""
    await worker.wait_until(lambda i: i.generation >= generation and i.state in ("ready", "busy"))


@contextlib.contextmanager
def capture_logs():
    """Like structlog.testing.capture_logs, but with the bound context (worker_id, generation,
    container_id...) merged into each captured event, as the real log lines have it."""
    import structlog
    from structlog.testing import LogCapture

    cap = LogCapture()
    old = structlog.get_config()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, cap],
                        wrapper_class=structlog.make_filtering_bound_logger(0))
    try:
        yield cap.entries
    finally:
        structlog.configure(**old)
