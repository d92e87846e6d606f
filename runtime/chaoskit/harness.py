"""One chaos run's world: an engine, the supervisors started on it (unique names, cleaned up by
label), the history, the monkey and the invariants. The pytest plugin, the stateful tests and
`corral chaos` all stand on it.

    async with open_harness(engine, seed=7) as h:
        sup = await h.supervisor(strategy="one_for_all")     # a SupervisorHandle
        ...
        problems = await h.close(check_invariants=True)     # [] when all is well

Supervisors run in the harness's own nursery (a test's fixture, or the caller's block), so they
outlive the code that starts them. Closing settles first (tasks answered, faults certified), then
names what was left behind: a task without an answer or still running, an image build in flight,
a container with the supervisor's label after it stopped (removed, and reported), an escalation
nobody looked at.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import random
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import trio
import trio.testing

from ..api import open_supervisor
from ..engines import Engine
from ..engines.fake import FakeEngine
from ..errors import EngineError, SupervisorEscalation
from ..specs import SupervisorConfig
from .history import History
from .invariants import Invariants
from .schedule import Chaos


@dataclass
class SupervisorRun:
    name: str
    config: SupervisorConfig
    rng: random.Random
    handle: Any = None
    actor: Any = None
    close: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    escalation: SupervisorEscalation | None = None
    observed: bool = False
    """someone looked at its escalation (escalation(), wait_escalation(), the invariants)"""


class SupervisorFactory:
    """``await factory(config=None, **config_fields)`` -> a running supervisor's handle, named
    uniquely (``<name>-<suffix>``), stopped and cleaned up when the harness closes."""

    def __init__(self, harness: "Harness") -> None:
        self._h = harness

    async def __call__(self, config: SupervisorConfig | None = None, /, **fields: Any):
        return await self._h.supervisor(config, **fields)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self._h.runs]

    def escalation(self, sup) -> SupervisorEscalation | None:
        """The SupervisorEscalation that ended ``sup`` (None if it did not escalate); the test
        has looked at it, so teardown does not report it."""
        run = self._h.run_of(sup)
        run.observed = True
        return run.escalation

    async def wait_escalation(self, sup) -> SupervisorEscalation | None:
        """Until ``sup`` has ended; its escalation (None if it stopped without one)."""
        run = self._h.run_of(sup)
        await run.done.wait()
        run.observed = True
        return run.escalation


class Harness:
    def __init__(self, engine: Engine, nursery: trio.Nursery, *, seed: int = 0,
                 unique_names: bool = True, engine_control: Any = None) -> None:
        self.engine = engine
        self.fake = isinstance(engine, FakeEngine)
        self.engine_control = engine_control
        """what can stop and start a real engine (a `runtime.chaoskit.dockerd.PrivateDockerd`:
        ``running``, ``live_restore``, async ``stop()`` / ``start()``), or None"""
        self.seed = seed
        self.unique_names = unique_names
        self._nursery = nursery
        self.history = History()
        self.chaos = Chaos(self, seed=seed)
        self.invariants = Invariants(self)
        self.supervisors = SupervisorFactory(self)
        self.runs: list[SupervisorRun] = []
        self._count = itertools.count(1)
        self.closed = False
        self.check_at_end = False
        """close() checks the invariants too (the plugin sets it when a test asks for them)"""
        self.show_chaos = False
        self.described = False
        """a failure's text has shown the seed, the schedule and the timeline already"""
        self.containers_left: dict[str, list[str]] = {}
        """supervisor name -> the containers with its label found after it stopped"""

    # -- supervisors --------------------------------------------------------------------------
    async def supervisor(self, config: SupervisorConfig | None = None, /, **fields: Any):
        """Start a supervisor; returns its handle once it runs."""
        if config is not None and fields:
            import msgspec
            config = msgspec.structs.replace(config, **fields)
        elif config is None:
            config = SupervisorConfig(**{"name": "t", **fields})
        n = next(self._count)
        name = config.name
        if self.unique_names:
            suffix = str(n) if self.fake else uuid.uuid4().hex[:10]
            name = f"{config.name[:40]}-{suffix}"
            import msgspec
            config = msgspec.structs.replace(config, name=name)
        if any(r.name == name for r in self.runs):
            raise ValueError(f"a supervisor named {name!r} runs already in this harness")
        run = SupervisorRun(name, config, random.Random(f"{self.seed}:{n}"))
        self.runs.append(run)
        return await self._nursery.start(self._run_supervisor, run)

    async def _run_supervisor(self, run: SupervisorRun, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with open_supervisor(run.config, engine=self.engine, rng=run.rng,
                                       ledger=self.history.ledger) as sup:
                run.handle, run.actor = sup, sup._sup
                self._instrument(run.actor, parent=None)
                task_status.started(sup)
                await run.close.wait()
        except SupervisorEscalation as exc:
            run.escalation = exc
            self.history.supervisor_escalated(run.name, exc)
        finally:
            run.done.set()
            if run.name in self.history.supervisors:
                self.history.supervisors[run.name].closed_at = self.history.now()

    def run_of(self, sup) -> SupervisorRun:
        for r in self.runs:
            if r.handle is sup or r.name == sup or r.name == getattr(sup, "name", None):
                return r
        raise LookupError(f"{sup!r} was not started by this harness")

    def record_handles(self, setattr: Callable[[Any, str, Any], None]) -> None:
        """Record every task run through a pool's or a worker's handle: wrap their ``run``
        with ``setattr`` (pytest's ``monkeypatch.setattr``, undone after the test)."""
        from actors.pool import PoolHandle
        from actors.worker.handle import WorkerHandle

        history = self.history
        for cls in (PoolHandle, WorkerHandle):
            original = cls.run

            @functools.wraps(original)
            async def run(handle, task, _original=original):
                return await history.run_task(handle, task, run=_original)
            setattr(cls, "run", run)

    # -- following the tree -------------------------------------------------------------------
    def _instrument(self, sup_actor: Any, parent: str | None) -> None:
        """Record a Supervisor actor; follow every worker it makes from now on (and those it has),
        and its nested supervisors."""
        name = sup_actor.config.name
        self.history.supervisor_started(name, sup_actor.config, parent, sup_actor)
        if not getattr(sup_actor, "_corral_kit_followed", False):
            make = sup_actor._make_worker
            history = self.history

            def make_worker(spec, pool=None):
                worker = make(spec, pool=pool)
                history.watch_worker(worker, name)
                return worker
            sup_actor._make_worker = make_worker
            sup_actor._corral_kit_followed = True
        for child in list(sup_actor.children.values()):
            if child.kind == "worker":
                self.history.watch_worker(child.actor, name)
            elif child.kind == "pool":
                for w in list(child.actor.members):
                    self.history.watch_worker(w, name)
            elif child.kind == "supervisor":
                self._instrument(child.actor, parent=name)

    def census(self) -> None:
        """Find what the tree holds now (nested supervisors and their workers)."""
        for run in self.runs:
            if run.actor is not None and not run.done.is_set():
                self._instrument(run.actor, parent=None)

    def worker_actors(self, *, worker: Any = None, pool: Any = None, supervisor: Any = None) -> list[Any]:
        """The Worker actors of the harness's supervisors that have not ended, narrowed to a
        worker (handle or id), a pool (handle or name) or a supervisor (handle or name)."""
        self.census()
        actors = [r.actor for r in self.history.workers.values() if not r.actor.finished.is_set()]
        if worker is not None:
            wid = worker if isinstance(worker, str) else worker.id
            actors = [a for a in actors if a.id == wid]
        if pool is not None:
            pname = pool if isinstance(pool, str) else pool.name
            actors = [a for a in actors if a.pool == pname]
        if supervisor is not None:
            sname = supervisor if isinstance(supervisor, str) else supervisor.name
            rec = self.history.supervisors.get(sname)
            ids = {w.id for w in rec.actor.all_workers()} if rec is not None and rec.actor else set()
            actors = [a for a in actors if a.id in ids]
        return actors

    def group_pending(self, actor: Any) -> bool:
        """Is ``actor`` waiting to be restarted by its supervisor as part of a group?"""
        rec = self.history.workers.get(actor.id)
        sup = self.history.supervisors.get(rec.supervisor) if rec else None
        return bool(sup and sup.actor is not None and actor.id in getattr(sup.actor, "_group_pending", ()))

    def call_later(self, delay: float, fn: Callable[[], Any]) -> None:
        """``fn()`` (awaited, if it gives an awaitable) ``delay`` seconds from now."""
        async def later() -> None:
            await trio.sleep(delay)
            result = fn()
            if inspect.isawaitable(result):
                await result
        self._nursery.start_soon(later)

    # -- settling and closing -----------------------------------------------------------------
    def _quiet(self) -> bool:
        if self.history.unanswered():
            return False
        for f in self.history.live_faults():
            if f.worker_id is None or f.cert is not None:
                continue
            rec = self.history.workers.get(f.worker_id)
            if rec is not None and not rec.actor.finished.is_set():
                return False
        return True

    async def settle(self, timeout: float | None = None) -> bool:
        """Until every task has its answer and every fault its certificate (or its worker
        ended), at most ``timeout`` seconds (default: 600 virtual seconds on FakeEngine, 60 on a
        real engine). Returns whether it got there."""
        timeout = timeout if timeout is not None else (600.0 if self.fake else 60.0)
        if self.fake:
            await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(timeout):
            await self.history.wait_until(self._quiet)
        if self.fake:
            await trio.testing.wait_all_tasks_blocked()
        return self._quiet()

    def _in_flight(self) -> list[str]:
        out: list[str] = []
        for rec in self.history.unanswered():
            out.append(f"task {rec.task.task_id} ({rec.task.prompt[:40]!r}, sent to {rec.target}) "
                       f"has no answer")
        for a in self.worker_actors():
            life = getattr(a, "_life", None)
            if a.state == "busy" and life is not None and not life.ended.is_set():
                out.append(f"worker {a.id} is still running a task")
        for sup in self.history.supervisors.values():
            if sup.actor is None or sup.actor.finished.is_set():
                continue
            for child in list(sup.actor.children.values()):
                if child.kind == "pool":
                    queued = child.actor.snapshot().queued
                    if queued:
                        out.append(f"pool {child.actor.spec.name} still has {queued} queued task(s)")
        for run in self.runs:
            if run.actor is None or run.done.is_set():
                continue
            builder = getattr(run.handle.builder, "_actor", None)
            for tag in list(getattr(builder, "_inflight", {})):
                out.append(f"an image build of {tag} is still running")
        return out

    async def close(self, *, check_invariants: bool = False) -> list[str]:
        """Stop every supervisor (newest first) and say what was left behind, and, with
        ``check_invariants``, every invariant that does not hold. [] when all is well."""
        if self.closed:
            return []
        self.closed = True
        problems: list[str] = []
        with trio.CancelScope(shield=True) as cs:
            cs.deadline = trio.current_time() + (3600.0 if self.fake else 180.0)
            if self.fake and self.engine.down:
                self.engine.come_up()
                self.history.note("engine", "the engine came back up for the cleanup")
            control = self.engine_control
            if control is not None and not control.running:
                try:
                    await control.start()
                    self.history.note("engine", "the engine was started again for the cleanup")
                except Exception as exc:
                    problems.append(f"could not start the engine again for the cleanup: {exc}")
            await self.settle()
            self.census()
            problems += [f"left behind: {p}" for p in self._in_flight()]
            for run in reversed(self.runs):
                run.close.set()
                await run.done.wait()
            for run in self.runs:
                try:
                    left = await self.engine.container_list(labels={"corral.supervisor": run.name})
                except EngineError as exc:
                    problems.append(f"could not list the containers of {run.name}: {exc}")
                    continue
                self.containers_left[run.name] = sorted(c.name for c in left)
                if left:
                    problems.append(f"left behind: {len(left)} container(s) of supervisor {run.name}: "
                                    f"{sorted(c.name for c in left)} (removed now)")
                    from ..testing import remove_containers
                    await remove_containers(self.engine, run.name)
            if cs.cancelled_caught:
                problems.append("closing the supervisors took too long")
            if check_invariants:
                problems += [str(v) for v in await self.invariants.violations(final=True)
                             if v.invariant != "orphans"    # (reported above as left behind)
                             and v not in self.invariants.raised]
            for run in self.runs:
                if run.escalation is not None and not run.observed:
                    problems.append(f"supervisor {run.name} escalated and the test did not look at it "
                                    f"(corral_supervisor.escalation(sup)): {run.escalation}")
        return problems


@asynccontextmanager
async def open_harness(engine: Engine | None = None, *, seed: int = 0, unique_names: bool = True,
                       engine_url: str | None = None, engine_control: Any = None) -> AsyncIterator[Harness]:
    """A harness for the block, on ``engine`` (None: the Docker engine at ``engine_url``, or
    ``engine_control``'s: a `runtime.chaoskit.dockerd.PrivateDockerd`, which the chaos monkey
    may then stop). Leaving the block stops its supervisors (see `Harness.close` to check what
    was left)."""
    async with trio.open_nursery() as nursery:
        if engine is None:
            from ..engines import open_engine
            if engine_url is None and engine_control is not None:
                engine_url = engine_control.url
            async with open_engine(engine_url) as real:
                h = Harness(real, nursery, seed=seed, unique_names=unique_names,
                            engine_control=engine_control)
                try:
                    yield h
                finally:
                    await h.close()
                    nursery.cancel_scope.cancel()
            return
        h = Harness(engine, nursery, seed=seed, unique_names=unique_names, engine_control=engine_control)
        try:
            yield h
        finally:
            await h.close()
            nursery.cancel_scope.cancel()
