"""The embedding API: `open_supervisor()`."""

from __future__ import annotations

import random
from contextlib import AsyncExitStack, asynccontextmanager
from typing import AsyncIterator

import trio

import structlog

from .configcheck import check_config
from .engines import Engine, open_engine
from .events import EventBus, reset_bus, set_bus
from .errors import ContainerNotFound, CorralError, EngineError, RemovalInProgress, SupervisorEscalation
from .instance import claim_engine, hold_instance
from .journal import TaskService, open_journal, open_task_service
from .specs import SupervisorConfig
from .util import leaf_exceptions


log = structlog.get_logger("corral.api")


@asynccontextmanager
async def open_supervisor(config: SupervisorConfig | None = None, *, engine: Engine | None = None,
                          rng: random.Random | None = None,
                          force_stop: trio.Event | None = None,
                          ledger=None, abandon: trio.Event | None = None
                          ) -> AsyncIterator["SupervisorHandle"]:
    """Run a supervisor tree for the duration of the block.

    ``engine``: None opens the real Docker engine (``config.engine_url``, else DOCKER_HOST, else
    unix:///var/run/docker.sock); pass a `runtime.testing.FakeEngine` for in-memory tests.
    Leaving the block (normally, by exception or by cancellation) stops every worker and removes
    every container it created. A top-level SupervisorEscalation ends the block with that
    exception.

    Before anything starts: the config's static errors raise ConfigError (runtime.configcheck),
    and one instance per supervisor name per engine is enforced (runtime.instance): another
    live instance raises AlreadyRunning (a CorralError) naming it; containers of a dead one that
    no longer run are removed.

    ``force_stop``: set it to cut the graceful stop short: the children are cancelled at once
    (no grace period for their tasks); their containers are still killed and removed.

    ``ledger``: a `runtime.executions.ExecutionLedger` that counts every task execution the
    wrappers report (tests and chaos runs check delivery guarantees with it).

    Adoption: containers of this supervisor name that still run (a corral process that died,
    or was killed, left them) are adopted by the workers of the same id as they are made
    (configured ones at once, others when spawned): no new container, same generation, the
    running task carried on, results that finished meanwhile replayed by the wrapper. Those no
    worker claimed are removed when the block ends.

    ``abandon``: set it to simulate a crash of this process (tests, chaos runs): the block ends
    at once, and every container is left running, for the next `open_supervisor()` of the same
    name to adopt. Nothing is stopped or removed.

    The handle's ``events`` is the tree's `runtime.events.EventBus`: lifecycle events (state
    changes, deaths with their certificates, restarts, escalations, tasks), kept and numbered
    for readers that resume, and handed to subscribers (metrics).

    ``config.state_dir``: the task journal (runtime.journal) lives there. The handle's ``tasks``
    is then a `TaskService` (durable tasks: ``submit``, ``result``; the journal's unfinished
    tasks are resumed once the configured tree is up); without a state_dir ``tasks`` is None
    and nothing is journaled.
    """
    from actors.builder import ImageBuilder
    from actors.supervisor import Supervisor
    from actors.watcher import Watcher

    config = config or SupervisorConfig()
    check_config(config)
    bus = EventBus()
    token = set_bus(bus)            # the actors started below publish to it (runtime.events)
    try:
        async with AsyncExitStack() as stack:
            if engine is None:
                engine = await stack.enter_async_context(open_engine(config.engine_url))
            stack.enter_context(hold_instance(engine, config.name))
            adoptable = await claim_engine(engine, config.name)
            leftovers: set[str] = set()
            stack.push_async_callback(_sweep, engine, config.name, abandon, adoptable, leftovers)
            journal = None
            if config.state_dir is not None:
                journal = await stack.enter_async_context(
                    open_journal(config.state_dir, retention_s=config.result_retention_s))
            async with trio.open_nursery() as nursery:
                if abandon is not None:
                    nursery.start_soon(_cancel_when_set, abandon, nursery.cancel_scope)
                builder = await nursery.start(ImageBuilder(engine, base_image=config.base_image,
                                                           build_network=config.build_network).run)
                watcher = await nursery.start(Watcher(engine, supervisor=config.name).run)
                sup = Supervisor(config, engine=engine, builder=builder, watcher=watcher, rng=rng,
                                 ledger=ledger, journal=journal, adoptable=adoptable,
                                 abandon=abandon, leftovers=leftovers)
                handle = await nursery.start(sup.run)
                tasks: TaskService | None = None
                async with AsyncExitStack() as service:
                    if journal is not None:
                        tasks = await service.enter_async_context(open_task_service(handle, journal))
                        nursery.start_soon(_resume_when_configured, handle, tasks)
                    handle.tasks = tasks
                    handle.events = bus
                    try:
                        yield handle
                    finally:
                        if tasks is not None:
                            tasks.close()        # what the stop brings about is no task's result
                        if abandon is None or not abandon.is_set():
                            await _stop_gracefully(handle, config.name, force_stop)
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
    finally:
        bus.close()
        reset_bus(token)


async def _stop_gracefully(handle, name: str, force_stop: trio.Event | None) -> None:
    with trio.CancelScope(shield=True) as cs:
        cs.deadline = trio.current_time() + 300
        async with trio.open_nursery() as graceful:
            if force_stop is not None:
                graceful.start_soon(_cancel_when_set, force_stop, cs)
            await handle.shutdown()
            graceful.cancel_scope.cancel()
    if cs.cancelled_caught:
        log.warning("graceful_stop_cut_short", supervisor=name,
                    forced=force_stop is not None and force_stop.is_set())


async def _sweep(engine: Engine, name: str, abandon: trio.Event | None, adoptable: dict,
                 leftovers: set[str]) -> None:
    """The last step of a supervisor's stop: remove what is left of its containers: adopted ones
    no worker claimed, and ones the engine could not remove while it was away. Nothing when
    abandoned (a simulated crash leaves them all)."""
    if abandon is not None and abandon.is_set():
        return
    doomed = [c.id for c in adoptable.values()] + sorted(leftovers)
    with trio.CancelScope(shield=True), trio.move_on_after(30):
        for cid in doomed:
            try:
                await engine.container_remove(cid, force=True)
                log.info("container_swept", supervisor=name, container_id=cid[:12])
            except (ContainerNotFound, RemovalInProgress):
                pass
            except EngineError as exc:
                log.warning("final_sweep_failed", supervisor=name, container_id=cid[:12],
                            error=str(exc))


async def _resume_when_configured(handle: "SupervisorHandle", tasks: TaskService) -> None:
    """After a restart: once the configured tree is up (its containers adopted), the journal's
    unfinished tasks are requeued, continued or finished (TaskService.resume)."""
    await handle.wait_configured()
    try:
        await tasks.resume()
    except CorralError as exc:
        log.error("tasks_resume_failed", error=str(exc))


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


from actors.supervisor import SupervisorHandle  # noqa: E402  (for type hints and re-export)
