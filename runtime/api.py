"""The embedding API: `open_supervisor()`."""

from __future__ import annotations

import random
from contextlib import AsyncExitStack, asynccontextmanager
from typing import AsyncIterator

import trio

import structlog

from .errors import ContainerNotFound, SupervisorEscalation
from .specs import SupervisorConfig
from .util import leaf_exceptions


log = structlog.get_logger("corral.api")


async def reap_stale_containers(engine, supervisor: str) -> int:
    """Remove what a previous run of this supervisor left behind (a crashed process): containers
    with its label that no longer run. Running ones are left alone and reported: they belong to a
    live supervisor of the same name (names must be unique per engine)."""
    removed = 0
    for c in await engine.container_list(labels={"corral.supervisor": supervisor}):
        if c.get("State") == "running":
            log.warning("foreign_running_container", supervisor=supervisor, names=c.get("Names"),
                        hint="another corral process uses this supervisor name")
            continue
        try:
            await engine.container_remove(c["Id"], force=True)
            removed += 1
            log.info("stale_container_removed", supervisor=supervisor, names=c.get("Names"))
        except ContainerNotFound:
            pass
    return removed


@asynccontextmanager
async def open_supervisor(config: SupervisorConfig | None = None, *, engine=None,
                          rng: random.Random | None = None) -> AsyncIterator["SupervisorHandle"]:
    """Run a supervisor tree for the duration of the block.

    ``engine``: None opens the real Docker engine (``config.engine_url``, else DOCKER_HOST, else
    unix:///var/run/docker.sock); pass a `runtime.testing.FakeEngine` for in-memory tests.
    Leaving the block (normally, by exception or by cancellation) stops every worker and removes
    every container it created. A top-level SupervisorEscalation ends the block with that
    exception.
    """
    from actors.builder import ImageBuilder
    from actors.supervisor import Supervisor
    from actors.watcher import Watcher

    config = config or SupervisorConfig()
    try:
        async with AsyncExitStack() as stack:
            if engine is None:
                from .engine import open_engine
                engine = await stack.enter_async_context(open_engine(config.engine_url))
            await reap_stale_containers(engine, config.name)
            async with trio.open_nursery() as nursery:
                builder = await nursery.start(ImageBuilder(engine, base_image=config.base_image,
                                                           build_network=config.build_network).run)
                watcher = await nursery.start(Watcher(engine, supervisor=config.name).run)
                sup = Supervisor(config, engine=engine, builder=builder, watcher=watcher, rng=rng)
                handle = await nursery.start(sup.run)
                try:
                    yield handle
                finally:
                    with trio.CancelScope(shield=True) as cs:
                        cs.deadline = trio.current_time() + 300
                        await handle.shutdown()
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        leaves = leaf_exceptions(group)
        escalations = [e for e in leaves if isinstance(e, SupervisorEscalation)]
        if escalations:
            raise escalations[0] from None
        real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
        if len(real) == 1:
            raise real[0]
        if len(leaves) == 1:
            raise leaves[0]
        raise


from actors.supervisor import SupervisorHandle  # noqa: E402  (for type hints and re-export)
