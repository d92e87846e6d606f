"""One chaos run's world: an engine, the supervisors started on it (unique names, cleaned up by
label), the history, the monkey and the invariants. The pytest plugin, the stateful tests and
`corral chaos` all stand on it.

    async with open_harness(engine, seed=7) as h:
        sup = await h.supervisor(strategy="one_for_all")     # a SupervisorHandle
        ...
        problems = await h.close(check_invariants=True)     # [] when all is well

Supervisors run in the harness's own nursery (a test's fixture, or the caller's block), so they
outlive the code that starts them, and a supervisor the monkey kills (``kill_supervisor``: a
crash, its containers left running) is opened again there with the same name: it adopts them.
Its handle then changes (`SupervisorFactory.current`); tasks that must outlive it go through its
task journal (``state_dir`` in its config) with `Harness.submit`, and their results are read
from the journal. Closing settles first (tasks answered, faults certified), then
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
from ..errors import CorralError, EngineError, SupervisorEscalation, SupervisorStopped
from ..specs import SupervisorConfig, Task
from .history import Fault, History, SupervisorKill
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
    up: bool = False
    """an instance runs (False before the first, between a kill and the reopening, at the end)"""
    abandon: trio.Event = field(default_factory=trio.Event)
    """the running instance's: set, it is killed (a crash: its containers are left running)"""
    instance_ended: trio.Event = field(default_factory=trio.Event)
    """set when the running instance has ended"""
    kills: list[SupervisorKill] = field(default_factory=list)
    down_s: float = 0.0
    """after a kill, how long until it is opened again"""
    scopes: set = field(default_factory=set)
    """cancel scopes of calls on the running instance (`Harness.submit`), cancelled when it ends"""


class SupervisorFactory:
    """``await factory(config=None, **config_fields)`` -> a running supervisor's handle, named
    uniquely (``<name>-<suffix>``), stopped and cleaned up when the harness closes."""

    def __init__(self, harness: "Harness") -> None:
        self._h = harness

    async def __call__(self, config: SupervisorConfig | None = None, /, **fields: Any):
        return await self._h.supervisor(config, **fields)

    async def current(self, sup):
        """The handle of ``sup``'s running instance (a killed supervisor is reopened with a new
        handle); waits while it is down."""
        return await self._h.current(sup)

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
        self._durable: dict[str, SupervisorRun] = {}
        """task id -> the run whose journal it was submitted to (`submit`)"""

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
        """Run ``run``'s supervisor until the harness closes; open it again after each kill."""
        if self.fake:
            # under a virtual clock, a journal in a worker thread would let the clock run away
            from ..journal import INLINE
            INLINE.set(True)
        kill: SupervisorKill | None = None
        try:
            while True:
                abandon = run.abandon = trio.Event()
                ended = run.instance_ended = trio.Event()
                try:
                    async with open_supervisor(run.config, engine=self.engine, rng=run.rng,
                                               ledger=self.history.ledger, abandon=abandon) as sup:
                        # (no checkpoint before the journal's hook: nothing has finished yet)
                        run.handle, run.actor = sup, sup._sup
                        self._hook_journal(sup)
                        self._instrument(run.actor, parent=None)
                        run.up = True
                        self.history._poke()
                        if kill is None:
                            task_status.started(sup)
                            await run.close.wait()
                        else:
                            async with trio.open_nursery() as n:
                                n.start_soon(self._adopted, run, sup, kill)
                                await run.close.wait()
                                n.cancel_scope.cancel()
                finally:
                    run.up = False
                    for scope in list(run.scopes):
                        scope.cancel()
                    ended.set()
                    self.history._poke()
                if not abandon.is_set():
                    break
                # killed: its containers run on; open it again (also when the harness is
                # closing: the next instance adopts them and stops them properly)
                kill = run.kills[-1]
                if run.down_s > 0 and not run.close.is_set():
                    with trio.move_on_after(run.down_s):
                        await run.close.wait()
                kill.running = await self._running(run.name)
                kill.reopened_at = self.history.now()
        except SupervisorEscalation as exc:
            run.escalation = exc
            self.history.supervisor_escalated(run.name, exc)
        finally:
            run.done.set()
            if run.name in self.history.supervisors:
                self.history.supervisors[run.name].closed_at = self.history.now()

    def _hook_journal(self, sup) -> None:
        """Record every final result the instance's task journal is given (the first one it
        takes, and any later one it refuses)."""
        tasks = getattr(sup, "tasks", None)
        if tasks is None:
            return
        journal = tasks.journal
        original = journal.finished
        history = self.history

        async def finished(result, _original=original):
            first = await _original(result)
            history.journal_result(result, first)
            return first
        journal.finished = finished

    async def _running(self, name: str) -> dict[str, tuple[str, int]]:
        """Worker id -> (container id, generation) of the running containers of ``name``."""
        try:
            listing = await self.engine.container_list(labels={"corral.supervisor": name}, all=False)
        except EngineError:
            return {}
        out: dict[str, tuple[str, int]] = {}
        for c in listing:
            wid = c.labels.get("corral.worker")
            try:
                gen = int(c.labels.get("corral.generation", "0"))
            except ValueError:
                gen = 0
            if wid and (wid not in out or gen > out[wid][1]):
                out[wid] = (c.id, gen)
        return out

    async def _adopted(self, run: SupervisorRun, sup, kill: SupervisorKill) -> None:
        """After a reopening: once the configured tree is up, check that every worker serves in
        the container it had (adopted), that none has two, and read from the journal the final
        results the kill kept the kit from seeing."""
        await sup.wait_configured()
        kill.serving_at = self.history.now()
        self.census()                          # (its configured pools may predate the kit's hook)
        current = {w.id: w for w in run.actor.all_workers()}
        for wid, (cid, gen) in sorted(kill.running.items()):
            actor = current.get(wid)
            if actor is None:
                continue                       # not made again (yet): spawned, not configured
            rec = self.history.workers.get(wid)
            first = rec.first_serving.get(id(actor)) if rec is not None else None
            if first is None:
                kill.problems.append(f"worker {wid} is not serving once the tree is up (its container "
                                     f"{cid[:12]} gen {gen} ran at the reopening)")
            elif first == (cid, gen):
                kill.adopted += 1
            else:
                kill.problems.append(f"worker {wid} serves in container {first[0][:12] if first[0] else '?'} "
                                     f"gen {first[1]}, not in its container {cid[:12]} gen {gen} that ran "
                                     f"at the reopening (not adopted)")
        kill.replaced = 0
        for wid, actor in sorted(current.items()):
            if wid in kill.running:
                continue
            kill.replaced += 1
            rec = self.history.workers.get(wid)
            before = rec.actors[-2] if rec is not None and len(rec.actors) > 1 else None
            first = rec.first_serving.get(id(actor)) if rec is not None else None
            if before is not None and first is not None and first[1] <= before.generation:
                kill.generation_resets.append(f"{wid}: gen {before.generation} before the kill, gen "
                                              f"{first[1]} after")
        try:
            listing = await self.engine.container_list(labels={"corral.supervisor": run.name}, all=False)
        except EngineError:
            listing = []
        by_worker: dict[str, list[str]] = {}
        for c in listing:
            by_worker.setdefault(c.labels.get("corral.worker", "?"), []).append(c.name)
        for wid, names in sorted(by_worker.items()):
            if len(names) > 1:
                kill.problems.append(f"worker {wid} has {len(names)} running containers: {sorted(names)}")
        for f in self.history.faults:
            if f.kind == "kill_supervisor" and f.t == kill.t and f.detail.endswith(run.name):
                f.back_at = kill.serving_at
        self.history.note("supervisor", f"supervisor {run.name} serves again after "
                                        f"{kill.adoption_s:.3f} s: {kill.adopted} worker(s) adopted their "
                                        f"container, {kill.replaced} started a new one"
                                        + (f" (generation reset: {'; '.join(kill.generation_resets)})"
                                           if kill.generation_resets else ""))
        await self._reconcile(run, sup)

    async def _reconcile(self, run: SupervisorRun, sup) -> None:
        """Final results the journal has and the kit did not see written (a kill cut the
        write's caller short after it was committed)."""
        tasks = getattr(sup, "tasks", None)
        if tasks is None:
            return
        for tid in [t for t, r in self._durable.items() if r is run]:
            rec = self.history.tasks.get(tid)
            if rec is None or rec.results:
                continue
            try:
                jrec = await tasks.journal.get(tid)
            except CorralError:
                return
            if jrec is not None and jrec.result is not None and not rec.results:
                self.history.note("task", f"task {tid}: its final result ({jrec.result.status}) found "
                                          f"in the journal")
                self.history.journal_result(jrec.result, True)

    async def current(self, sup):
        """The handle of ``sup``'s running instance; waits while it is down (killed, not yet
        reopened). SupervisorStopped once it has ended for good."""
        run = self.run_of(sup)
        await self.history.wait_until(lambda: run.up or run.done.is_set())
        if not run.up:
            raise SupervisorStopped(f"supervisor {run.name} has stopped")
        return run.handle

    def all_up(self) -> bool:
        """Every supervisor the harness started runs (none is killed and not yet back)."""
        return all(r.up for r in self.runs if not r.done.is_set())

    def _engine_down(self) -> bool:
        if self.fake:
            return self.engine.down
        control = self.engine_control
        return control is not None and not control.running

    async def kill_supervisor(self, sup: Any = None, *, for_s: float = 0.0, rule: str = "") -> Fault | None:
        """Kill ``sup`` (a handle or a name; None: one drawn among the running ones) as a crash
        of its process would: it ends at once, its containers run on. It is opened again with
        the same name ``for_s`` seconds later and adopts them (`SupervisorFactory.current` has
        its new handle). Returns the recorded Fault once the instance has ended, or None if no
        supervisor runs (or the engine is down: nothing could reopen it)."""
        if sup is not None:
            runs = [self.run_of(sup)]
        else:
            runs = [r for r in self.runs if r.up and not r.done.is_set()]
        runs = [r for r in runs if r.up and not r.close.is_set()]
        if not runs or self._engine_down():
            return None
        run = runs[0] if len(runs) == 1 else self.chaos.rng.choice(runs)
        n = self.chaos.next_number()
        t = self.history.now()
        fault = self.history.fault(Fault(n, "kill_supervisor", t, rule=rule,
                                         detail=f"supervisor {run.name}"
                                                + (f", down {for_s:g} s" if for_s else "")))
        fault.outcome = "certified"          # no death expected: it adopts its containers
        run.kills.append(SupervisorKill(run.name, t))
        self.history.kills.append(run.kills[-1])
        self.history.note("supervisor", f"supervisor {run.name} killed (instance "
                                        f"{len(run.kills)}): its containers run on")
        run.down_s = for_s
        ended = run.instance_ended
        run.abandon.set()
        await ended.wait()
        return fault

    async def submit(self, sup: Any, target: str, task: Task | str) -> str:
        """Submit ``task`` to ``target`` (``pool:NAME`` / ``worker:ID``) through ``sup``'s task
        journal (its config needs a ``state_dir``), recorded in the history; its final result is
        recorded when the journal takes it. A kill of ``sup`` on the way does not lose it: it is
        submitted again to the next instance unless the journal had accepted it already.
        Returns the task id."""
        if isinstance(task, str):
            task = Task(prompt=task)
        run = self.run_of(sup)
        self.history.submitted(task, target)
        self._durable[task.task_id] = run
        from ..journal import DuplicateTask, UnknownTask
        while True:
            try:
                handle = await self.current(run)
            except SupervisorStopped as exc:
                self.history.failed(task, exc)
                raise
            tasks = getattr(handle, "tasks", None)
            if tasks is None:
                raise CorralError(f"supervisor {run.name} keeps no task journal: give its config a "
                                  f"state_dir to submit tasks that outlive it")
            abandon, ended = run.abandon, run.instance_ended
            try:
                with trio.CancelScope() as scope:      # cancelled when the instance ends
                    run.scopes.add(scope)
                    try:
                        try:
                            await tasks.result(task.task_id)
                            return task.task_id        # accepted before a kill
                        except UnknownTask:
                            pass
                        try:
                            return await tasks.submit(target, task)
                        except DuplicateTask:
                            return task.task_id
                    finally:
                        run.scopes.discard(scope)
            except CorralError as exc:
                if not (abandon.is_set() or isinstance(exc, SupervisorStopped) and not run.close.is_set()):
                    self.history.failed(task, exc)
                    raise
            # the instance ended under it (killed): once more on the next one
            if run.close.is_set() and not abandon.is_set():
                self.history.failed(task, SupervisorStopped(f"supervisor {run.name} has stopped"))
                raise SupervisorStopped(f"supervisor {run.name} has stopped")
            await ended.wait()

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
        durable = self._durable
        for cls in (PoolHandle, WorkerHandle):
            original = cls.run

            @functools.wraps(original)
            async def run(handle, task, _original=original):
                if not isinstance(task, str) and task.task_id in durable:
                    return await _original(handle, task)    # a journal's: its result is recorded there
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
            actor = f.actor if f.actor is not None else (rec.actor if rec is not None else None)
            if actor is not None and not actor.finished.is_set():
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
