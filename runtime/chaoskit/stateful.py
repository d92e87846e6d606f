"""Generated fault histories: a Hypothesis state machine over FakeEngine that interleaves spawns,
tasks, faults and time steps, checks the invariants after every step, and shrinks a failure to
the smallest history that still fails.

Subclass `CorralStateMachine` for your own supervision tree::

    class MyTree(CorralStateMachine):
        config = SupervisorConfig(name="app", strategy="rest_for_one", max_restarts=3, within_s=30)

        async def build(self, sup):
            await sup.start_pool(PoolSpec(name="agents", replicas=2, worker=WorkerSpec(...)))

    TestMyTree = MyTree.TestCase          # collected by pytest (MyTree.hypothesis_settings)

How it runs: each rule only appends a step to the example's plan; ``teardown`` replays the whole
plan in one ``trio.run`` under the autojump clock (virtual time, exact and instant) on a fresh
FakeEngine: steps in order, every invariant checked after each (``complete=False``: what must
hold at any instant), then a settle (every task answered, every fault certified), the supervisors
closed and everything checked once more. One trio run per example keeps the example
deterministic - Hypothesis seeds trio's scheduler - which shrinking needs. A failure raises
`HistoryFailed` naming the steps, the violations and the timeline, and is kept in
``MyTree.failures`` (the last one is the shrunk history Hypothesis reports).

Class attributes (override them): ``config``, ``worker_spec(n, restart)`` (workers the ``spawn``
rule starts), ``faults``, ``prompts`` (the stub agent's directives: ``!sleep S``, ``!exit N``,
``!crash-wrapper``, ``!oom`` ...), ``max_attempts``, ``advances`` (seconds a time step may take),
``max_spawns``, ``restart_types``, ``targets``, ``engine_kwargs`` (FakeEngine's),
``engine_down_s`` (how long a ``stop_engine`` fault lasts; add it to ``faults`` to have it),
``settle_s``, ``log_level``, ``hypothesis_settings`` (max_examples, stateful_step_count...:
``TestCase`` runs with them).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec
import structlog
import trio
import trio.testing
from hypothesis import HealthCheck, settings as Settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from ..engines.fake import FakeEngine
from ..errors import CorralError
from ..specs import Backoff, RestartPolicy, SupervisorConfig, Task, WorkerSpec
from .harness import Harness
from .schedule import FAULTS


@contextlib.contextmanager
def _log_level(level: int | None):
    if level is None:
        yield
        return
    old = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))
    try:
        yield
    finally:
        structlog.configure(**old)


DEFAULT_POLICY = RestartPolicy(max_restarts=2, within_s=20,
                               backoff=Backoff(initial_s=1.0, factor=2.0, max_s=8.0, jitter="none",
                                               stable_s=5.0))


@dataclass(frozen=True)
class Step:
    kind: str
    """spawn | submit | fault | advance"""
    args: dict = field(default_factory=dict)

    def describe(self) -> str:
        a = self.args
        if self.kind == "spawn":
            return f"spawn a {a['restart']} worker"
        if self.kind == "submit":
            return f"submit {a['prompt']!r} (max_attempts={a['max_attempts']}) to target #{a['to']}"
        if self.kind == "fault":
            return f"{a['kind']} worker #{a['worker']}"
        return f"advance {a['seconds']:g} s"


class HistoryFailed(AssertionError):
    """A generated history broke an invariant (or left something behind)."""

    def __init__(self, message: str, plan: list[Step], failed_at: int | None,
                 violations: list[str]) -> None:
        super().__init__(message)
        self.plan = plan
        self.failed_at = failed_at
        """the index of the step after which the check failed; None: at the end"""
        self.violations = violations


class CorralStateMachine(RuleBasedStateMachine):
    """The base of a generated-fault-history test; see the module's docstring."""

    config: ClassVar[SupervisorConfig] = SupervisorConfig(name="sm", max_restarts=3, within_s=30)
    faults: ClassVar[tuple[str, ...]] = ("kill", "remove", "stop", "crash_wrapper", "oom", "pause")
    prompts: ClassVar[tuple[str, ...]] = ("hello", "!sleep 1", "!sleep 5", "!exit 3", "!crash-wrapper")
    max_attempts: ClassVar[tuple[int, ...]] = (1, 2, 3)
    advances: ClassVar[tuple[float, ...]] = (0.5, 2.0, 10.0, 40.0)
    max_spawns: ClassVar[int] = 3
    targets: ClassVar[int] = 6
    """how many workers (and task targets) the rules tell apart: the n-th in a stable order"""
    restart_types: ClassVar[tuple[str, ...]] = ("permanent", "transient", "temporary")
    engine_kwargs: ClassVar[dict] = {}
    settle_s: ClassVar[float] = 600.0
    log_level: ClassVar[int | None] = logging.WARNING
    """structlog events below this level are dropped while an example runs (hundreds of runs'
    INFO lines say less than one timeline, and rendering them is most of a run's cost); None:
    leave the logging as it is"""
    engine_down_s: ClassVar[float] = 10.0
    """how long a ``stop_engine`` fault keeps FakeEngine down"""
    seed: ClassVar[int] = 0
    hypothesis_settings: ClassVar[Settings] = Settings(
        max_examples=25, stateful_step_count=15, deadline=None,
        suppress_health_check=[HealthCheck.too_slow])
    failures: ClassVar[list[HistoryFailed]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.failures = []
        # the rules, drawn from this class's own lists (a subclass may narrow them)
        faults = tuple(k for k in cls.faults if k in FAULTS)

        # (every rule takes an argument: a rule without one is the "simplest" step to
        # Hypothesis's shrinker, which then keeps it instead of deleting it)
        def spawn(self, restart: str) -> None:
            self.plan.append(Step("spawn", {"restart": restart}))
        cls.spawn = precondition(lambda self: self._spawns() < self.max_spawns)(
            rule(restart=st.sampled_from(cls.restart_types))(spawn))

        def submit(self, prompt: str, max_attempts: int, to: int) -> None:
            self.plan.append(Step("submit", {"prompt": prompt, "max_attempts": max_attempts, "to": to}))
        cls.submit = rule(prompt=st.sampled_from(cls.prompts), max_attempts=st.sampled_from(cls.max_attempts),
                          to=st.integers(0, cls.targets - 1))(submit)

        if faults:
            def fault(self, kind: str, worker: int) -> None:
                self.plan.append(Step("fault", {"kind": kind, "worker": worker}))
            cls.fault = rule(kind=st.sampled_from(faults), worker=st.integers(0, cls.targets - 1))(fault)

        def advance(self, seconds: float) -> None:
            self.plan.append(Step("advance", {"seconds": seconds}))
        cls.advance = rule(seconds=st.sampled_from(cls.advances))(advance)

        cls.TestCase.settings = cls.hypothesis_settings

    def __init__(self) -> None:
        super().__init__()
        self.plan: list[Step] = []

    def _spawns(self) -> int:
        return sum(1 for s in self.plan if s.kind == "spawn")

    # -- what a subclass provides ---------------------------------------------------------------
    async def build(self, sup) -> None:
        """Start the tree under test under ``sup`` (pools, workers, nested supervisors)."""

    def worker_spec(self, n: int, restart: str) -> WorkerSpec:
        """The worker the n-th ``spawn`` step starts (``restart``: permanent, transient or
        temporary)."""
        return WorkerSpec(id=f"w{n}", restart=msgspec.structs.replace(DEFAULT_POLICY, restart=restart),
                          heartbeat_s=4.0, heartbeat_timeout_s=10.0)

    # -- the replay ---------------------------------------------------------------------------
    def teardown(self) -> None:
        if not self.plan:
            return
        with _log_level(self.log_level):
            failure = trio.run(self._replay, clock=trio.testing.MockClock(autojump_threshold=0))
        if failure is not None:
            type(self).failures.append(failure)
            raise failure

    async def _replay(self) -> HistoryFailed | None:
        async with FakeEngine(**self.engine_kwargs) as engine:
            async with trio.open_nursery() as nursery:
                h = Harness(engine, nursery, seed=self.seed)
                self.harness = h
                try:
                    return await self._play(h, nursery)
                finally:
                    if not h.closed:
                        await h.close()
                    nursery.cancel_scope.cancel()

    async def _play(self, h: Harness, nursery: trio.Nursery) -> HistoryFailed | None:
        sup = await h.supervisor(self.config)
        self.sup = sup
        await self.build(sup)
        await trio.testing.wait_all_tasks_blocked()
        for i, step in enumerate(self.plan):
            await self._do(h, sup, i, nursery)
            await trio.testing.wait_all_tasks_blocked()
            bad = await h.invariants.violations(complete=False)
            if bad:
                return self._failure(h, i, [str(v) for v in bad])
        await h.settle(self.settle_s)
        for run in h.runs:
            run.observed = True          # escalations are the model's to judge (invariants)
        problems = await h.close(check_invariants=True)
        if problems:
            return self._failure(h, None, problems)
        return None

    # Steps name their target by its place in an order that deleting an earlier step rarely
    # changes (the tree's own children first, spawned ones after, in spawn order), and a step
    # whose target is not there does nothing: Hypothesis can then delete steps while shrinking
    # without the later ones changing their meaning.
    def _targets(self, h: Harness) -> list[Any]:
        """Where tasks go: the tree's pools, then its workers outside pools, in start order."""
        h.census()
        out: list[tuple[int, int, Any]] = []
        for s, rec in enumerate(h.history.supervisors.values()):
            for child in list(rec.actor.children.values()) if rec.actor is not None else ():
                if child.kind in ("pool", "worker") and child.handle is not None:
                    out.append((s, child.order, child.handle))
        return [handle for _, _, handle in sorted(out, key=lambda x: x[:2])]

    def _workers(self, h: Harness) -> list[str]:
        """Every worker the tree has had, in the order the kit first saw them."""
        h.census()
        return list(h.history.workers)

    async def _do(self, h: Harness, sup, i: int, nursery: trio.Nursery) -> None:
        step = self.plan[i]
        a = step.args
        if step.kind == "spawn":
            n = sum(1 for s in self.plan[:i + 1] if s.kind == "spawn")
            try:
                await sup.spawn(self.worker_spec(n, a["restart"]))
            except CorralError as exc:
                h.history.note("step", f"spawn failed: {type(exc).__name__}: {exc}")
        elif step.kind == "submit":
            targets = self._targets(h)
            if a["to"] >= len(targets):
                h.history.note("step", f"submit: no target #{a['to']}")
                return
            target = targets[a["to"]]
            task = Task(prompt=a["prompt"], max_attempts=a["max_attempts"],
                        task_id=f"task-{len(h.history.tasks) + 1}")

            async def one() -> None:
                try:
                    await h.history.run_task(target, task)
                except CorralError:
                    pass                      # recorded as its answer
            nursery.start_soon(one)
        elif step.kind == "fault":
            workers = self._workers(h)
            if a["worker"] >= len(workers):
                h.history.note("step", f"{a['kind']}: no worker #{a['worker']}")
                return
            fault = await h.chaos.inject(a["kind"], worker=workers[a["worker"]], rule=f"step {i + 1}",
                                         for_s=self.engine_down_s if a["kind"] == "stop_engine" else None)
            if fault is None:
                h.history.note("step", f"{a['kind']}: {workers[a['worker']]} is not serving")
        elif step.kind == "advance":
            await trio.sleep(a["seconds"])

    def _failure(self, h: Harness, at: int | None, problems: list[str]) -> HistoryFailed:
        lines = [f"corral: a generated fault history of {len(self.plan)} step(s) broke the invariants"
                 + (f" after step {at + 1}:" if at is not None else " (checked at the end):")]
        lines += [f"  {p}" for p in problems]
        lines.append("the history:")
        lines += [f"  {i + 1}. {s.describe()}" for i, s in enumerate(self.plan)]
        lines.append("timeline:")
        lines.append(h.history.timeline())
        return HistoryFailed("\n".join(lines), list(self.plan), at, problems)
