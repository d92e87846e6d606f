"""The chaos monkey: a seeded, declarative fault schedule on any engine.

    chaos.every(2).kill(pool="p")                  # every 2 s, a serving worker of pool p
    chaos.every(1, jitter=0.5).any({"kill": 4, "remove": 1})   # weighted, any worker
    chaos.at(5).crash_wrapper(worker=w)            # once, 5 s after the schedule starts
    async with chaos.running():
        ...                                        # the workload
    await chaos.inject("oom", worker=w)            # one fault, now

One task drives every rule from a single queue, ordered by (time, rule), and every choice (jitter,
target, weighted kind) comes from ``random.Random(seed)``: the same seed on the same workload
injects the same faults into the same workers. Only serving workers are hit (READY or busy, their
container running, not already hit, not waiting for their supervisor to restart them as part of
a group), so that each fault has one expected cause of death:

=================  ====================================  ==========================  ==========
fault              FakeEngine                            real engine                 cause
=================  ====================================  ==========================  ==========
``kill``           ``engine.kill`` (SIGKILL)             ``container_kill``          killed
``remove``         ``engine.remove`` (``rm -f``)         ``container_remove``        removed
``stop``           ``engine.stop`` (SIGTERM, stop)       ``container_stop``          killed
``crash_wrapper``  ``engine.crash`` (the wrapper exits)  SIGKILL inside (exec)       crashed
``oom``            ``engine.oom`` (the OOM killer)       -                           oom_killed
``pause``          ``engine.hang`` (SIGSTOP-like)        SIGSTOP to the wrapper      hung
                                                         inside (exec)
``stop_engine``    ``engine.shut_down`` (+ come_up)      SIGTERM to a private        engine_error
                                                         dockerd (+ start)
``restart_engine`` ``go_down(live_restore=True)``,       a private dockerd with      (none)
                   ``come_up()`` ``for_s`` later          live-restore: stop, start
``kill_supervisor`` a supervisor's ``abandon`` (a crash:  the same                    (none)
                   its containers run on), reopened
                   ``for_s`` later with the same name
=================  ====================================  ==========================  ==========

``oom`` needs FakeEngine: the engine port has no way to set off the OOM killer from outside.
``pause`` on a real engine stops the wrapper's process (SIGSTOP, from an exec in the container;
the agent it runs is not stopped, as with FakeEngine's hang): no more heartbeats or answers, the
container runs on, and corral finds it hung after ``heartbeat_timeout_s``.
``stop_engine`` needs FakeEngine or an engine the test started itself: a
`runtime.chaoskit.dockerd.PrivateDockerd` as the harness's ``engine_control`` (the plugin's
``corral_engine("private")``). Such a dockerd runs with live-restore by default: its containers
run on while it is stopped, so the fault expects no death at all (only the engine-wide record
is kept); without live-restore, dockerd stops them as it goes (``engine_error``, or ``killed``
when the engine is back before corral concludes so).

``restart_engine`` restarts such an engine (FakeEngine, or a private dockerd that runs with
live-restore): the containers run on, and no worker may die of it (the ``engine_restarts``
invariant). ``for_s``: how long it stays down (FakeEngine: default 2 s; a private dockerd: as long
as its stop and start take, plus ``for_s``). ``kill_supervisor`` kills a supervisor the harness
started (``supervisor=``, else one drawn among them) as a crash of its process would, and opens it
again with the same name ``for_s`` later (default at once): it adopts the containers that run on
(the ``adoption`` invariant). Its workers' tasks die with it unless they went through its task
journal (a ``state_dir`` in its config; `Harness.submit` submits a task that way, surviving the
kill). Neither fires while the other has the engine or a supervisor down.
"""

from __future__ import annotations

import heapq
import random
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Mapping

import trio

from ..engines.fake import FakeEngine
from ..errors import ContainerNotFound, ContainerNotRunning, EngineError, RemovalInProgress
from .history import Fault

if TYPE_CHECKING:
    from .harness import Harness

EXPECTED: dict[str, tuple[str, ...]] = {
    "kill": ("killed",),
    "remove": ("removed",),
    "stop": ("killed",),
    "crash_wrapper": ("crashed",),
    "oom": ("oom_killed",),
    "pause": ("hung",),
    "stop_engine": ("engine_error",),
    "restart_engine": (),
    "kill_supervisor": (),
}
"""fault -> the causes its death certificate may give"""
FAULTS = tuple(EXPECTED)
FAKE_ONLY = frozenset({"oom", "stop_engine", "restart_engine"})
"""faults of FakeEngine only (stop_engine and restart_engine: or an engine the run started)"""
RESTART_ENGINE_FAKE_S = 2.0
"""how long ``restart_engine`` keeps FakeEngine down by default"""
FREEZE_WRAPPER = """\
import os, signal, sys
hit = 0
for p in os.listdir('/proc'):
    if p.isdigit() and int(p) != os.getpid():
        try:
            cmdline = open('/proc/%s/cmdline' % p, 'rb').read()
        except OSError:
            continue
        if b'wrapper.py' in cmdline:
            os.kill(int(p), signal.SIGSTOP)
            hit += 1
sys.exit(0 if hit else 3)
"""
"""``pause`` on a real engine: SIGSTOP every worker-wrapper process in the container"""


class ChaosError(Exception):
    """A schedule that cannot run (a fault the engine cannot inject, a bad rule)."""


@dataclass
class When:
    """When a rule fires: ``at`` seconds after the start (once), or every ``interval`` seconds
    (``jitter``: each gap is ``interval * uniform(1 - jitter, 1 + jitter)``), from ``start``
    (default: one interval in), until ``until`` seconds or ``times`` firings."""
    chaos: "Chaos"
    at: float | None = None
    interval: float | None = None
    jitter: float = 0.0
    start: float | None = None
    until: float | None = None
    times: int | None = None

    def describe(self) -> str:
        if self.at is not None:
            return f"at {self.at:g} s"
        text = f"every {self.interval:g} s"
        if self.jitter:
            text += f" (jitter {self.jitter:g})"
        if self.start is not None:
            text += f" from {self.start:g} s"
        if self.until is not None:
            text += f" until {self.until:g} s"
        if self.times is not None:
            text += f", {self.times} times"
        return text

    # -- what: each returns the rule it adds ---------------------------------------------------
    def kill(self, **target: Any) -> "Rule":
        return self.chaos._add(self, {"kill": 1.0}, target)

    def remove(self, **target: Any) -> "Rule":
        return self.chaos._add(self, {"remove": 1.0}, target)

    def stop(self, **target: Any) -> "Rule":
        return self.chaos._add(self, {"stop": 1.0}, target)

    def crash_wrapper(self, **target: Any) -> "Rule":
        return self.chaos._add(self, {"crash_wrapper": 1.0}, target)

    def oom(self, **target: Any) -> "Rule":
        return self.chaos._add(self, {"oom": 1.0}, target)

    def pause(self, **target: Any) -> "Rule":
        return self.chaos._add(self, {"pause": 1.0}, target)

    def stop_engine(self, *, for_s: float | None = None) -> "Rule":
        return self.chaos._add(self, {"stop_engine": 1.0}, {}, for_s=for_s)

    def restart_engine(self, *, for_s: float | None = None) -> "Rule":
        """Restart the engine (live-restore: its containers run on), down for ``for_s``."""
        return self.chaos._add(self, {"restart_engine": 1.0}, {}, for_s=for_s)

    def kill_supervisor(self, supervisor: Any = None, *, for_s: float | None = None) -> "Rule":
        """Kill a supervisor as a crash would and reopen it ``for_s`` later (it adopts)."""
        return self.chaos._add(self, {"kill_supervisor": 1.0},
                               {} if supervisor is None else {"supervisor": supervisor}, for_s=for_s)

    def any(self, kinds: Mapping[str, float] | None = None, **target: Any) -> "Rule":
        """A fault of a kind drawn at each firing (weights; default: kill and remove)."""
        return self.chaos._add(self, dict(kinds or {"kill": 4.0, "remove": 1.0}), target)


@dataclass
class Rule:
    n: int
    when: When
    kinds: dict[str, float]
    target: dict[str, Any]
    for_s: float | None = None
    fired: int = 0
    hit: int = 0
    """firings that found a serving worker to hit"""
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def describe(self) -> str:
        what = ("/".join(self.kinds) if len(self.kinds) == 1
                else "one of " + ", ".join(f"{k} ({w:g})" for k, w in self.kinds.items()))
        default = ("the engine" if set(self.kinds) <= {"stop_engine", "restart_engine"}
                   else "any supervisor" if set(self.kinds) == {"kill_supervisor"} else "any worker")
        where = ", ".join(f"{k}={_target_name(v)}" for k, v in self.target.items()) or default
        extra = f", for {self.for_s:g} s" if self.for_s is not None else ""
        return f"#{self.n} {self.when.describe()}: {what} ({where}{extra})"

    def first(self, t0: float) -> float | None:
        w = self.when
        if w.at is not None:
            return t0 + w.at
        return t0 + (w.start if w.start is not None else self._gap())

    def following(self, t0: float, t: float) -> float | None:
        w = self.when
        if w.at is not None:
            return None
        if w.times is not None and self.fired >= w.times:
            return None
        nxt = t + self._gap()
        if w.until is not None and nxt > t0 + w.until:
            return None
        return nxt

    def _gap(self) -> float:
        w = self.when
        assert w.interval is not None
        if not w.jitter:
            return w.interval
        return w.interval * self.rng.uniform(1 - w.jitter, 1 + w.jitter)


def _target_name(v: Any) -> str:
    for attr in ("id", "name"):
        if isinstance(getattr(v, attr, None), str):
            return repr(getattr(v, attr))
    return repr(v)


class Chaos:
    """A seeded monkey with a declarative schedule. See the module's docstring."""

    def __init__(self, harness: "Harness", *, seed: int = 0) -> None:
        self.harness = harness
        self.seed = seed
        self.rng = random.Random(seed)
        self.rules: list[Rule] = []
        self.started_at: float | None = None
        self._hit: set[str] = set()
        self._n = 0
        self.skipped = 0
        """firings that found no serving worker to hit"""

    # -- the schedule -------------------------------------------------------------------------
    def at(self, seconds: float) -> When:
        return When(self, at=float(seconds))

    after = at

    def every(self, seconds: float, *, jitter: float = 0.0, start: float | None = None,
              until: float | None = None, times: int | None = None) -> When:
        if seconds <= 0:
            raise ChaosError("every(): the interval must be positive")
        if not 0 <= jitter < 1:
            raise ChaosError("every(): jitter must be in [0, 1)")
        return When(self, interval=float(seconds), jitter=jitter, start=start, until=until, times=times)

    def _add(self, when: When, kinds: dict[str, float], target: dict[str, Any], *,
             for_s: float | None = None) -> Rule:
        unknown = set(kinds) - set(FAULTS)
        if unknown:
            raise ChaosError(f"unknown fault(s) {sorted(unknown)}; the faults are {list(FAULTS)}")
        bad = set(target) - {"worker", "pool", "supervisor"}
        if bad:
            raise ChaosError(f"a target is worker=, pool= or supervisor=, not {sorted(bad)}")
        self._check_engine(kinds)
        rule = Rule(len(self.rules) + 1, when, kinds, dict(target), for_s=for_s,
                    rng=random.Random(f"{self.seed}:{len(self.rules)}"))
        self.rules.append(rule)
        return rule

    def _check_engine(self, kinds) -> None:
        if not isinstance(self.harness.engine, FakeEngine):
            need = set(kinds) & FAKE_ONLY
            control = getattr(self.harness, "engine_control", None)
            if control is not None:
                need.discard("stop_engine")
                if "restart_engine" in need and getattr(control, "live_restore", False):
                    need.discard("restart_engine")
            if need:
                engine_wide = need & {"stop_engine", "restart_engine"}
                raise ChaosError(f"{', '.join(sorted(need))}: needs FakeEngine (the engine port has "
                                 f"no outside OOM kill and no engine stop"
                                 + (f"; {' and '.join(sorted(engine_wide))} also run"
                                    f"{'s' if len(engine_wide) == 1 else ''} on an engine the test "
                                    f"started itself: corral_engine('private')"
                                    + (" with live-restore" if "restart_engine" in engine_wide else "")
                                    if engine_wide else "")
                                 + f"); this engine is {self.harness.engine.url}")

    def describe(self) -> str:
        """The seed, the schedule, and what ran."""
        lines = [f"seed {self.seed} (rerun with --corral-seed={self.seed})"]
        if self.rules:
            lines.append("schedule:")
            lines += [f"  {r.describe()}  -> fired {r.fired}, hit {r.hit}" for r in self.rules]
        faults = self.harness.history.live_faults()
        if faults:
            lines.append(f"faults injected ({len(faults)}):")
            for f in faults:
                lines.append(f"  t={f.t:9.3f}  #{f.n} {f.describe()}" + (f" [{f.rule}]" if f.rule else "")
                             + (f" -> {f.cert.cause}" if f.cert else f" -> {f.outcome}"))
        return "\n".join(lines)

    # -- running it ---------------------------------------------------------------------------
    @asynccontextmanager
    async def running(self) -> AsyncIterator["Chaos"]:
        """Run the schedule for the duration of the block (its times count from here)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._monkey)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()

    async def run_for(self, seconds: float) -> None:
        """Run the schedule for ``seconds``."""
        with trio.move_on_after(seconds):
            async with self.running():
                await trio.sleep_forever()

    async def _monkey(self) -> None:
        t0 = trio.current_time()
        self.started_at = t0 - self.harness.history.t0
        queue: list[tuple[float, int]] = []
        for i, rule in enumerate(self.rules):
            first = rule.first(t0)
            if first is not None:
                heapq.heappush(queue, (first, i))
        while queue:
            t, i = heapq.heappop(queue)
            await trio.sleep_until(t)
            rule = self.rules[i]
            rule.fired += 1
            kind = self._draw(rule)
            fault = await self.inject(kind, rule=f"rule #{rule.n}", for_s=rule.for_s, **rule.target)
            if fault is not None:
                rule.hit += 1
            nxt = rule.following(t0, t)
            if nxt is not None:
                heapq.heappush(queue, (nxt, i))

    def _draw(self, rule: Rule) -> str:
        kinds = sorted(rule.kinds)
        if len(kinds) == 1:
            return kinds[0]
        return self.rng.choices(kinds, weights=[rule.kinds[k] for k in kinds])[0]

    # -- one fault ----------------------------------------------------------------------------
    def serving(self, *, worker: Any = None, pool: Any = None, supervisor: Any = None) -> list[tuple[Any, str]]:
        """(Worker actor, container id) of every worker the monkey may hit now, by worker id."""
        h = self.harness
        h.census()
        out = []
        for actor in h.worker_actors(worker=worker, pool=pool, supervisor=supervisor):
            cid = self._serving_container(actor)
            if cid is not None:
                out.append((actor, cid))
        return sorted(out, key=lambda x: x[0].id)

    def _serving_container(self, actor: Any) -> str | None:
        if actor.state not in ("ready", "busy") or actor.finished.is_set():
            return None
        life = getattr(actor, "_life", None)
        if life is None or not life.ready or life.ended.is_set():
            return None
        cid = life.container_id
        if cid in self._hit:
            return None
        if self.harness.group_pending(actor):
            return None                      # its death would be absorbed by a group restart
        engine = self.harness.engine
        if isinstance(engine, FakeEngine):
            c = engine.containers.get(cid)
            if c is None or c.status != "running" or engine.down:
                return None
        control = getattr(self.harness, "engine_control", None)
        if control is not None and not control.running:
            return None                      # the engine is stopped: nothing answers
        return cid

    async def inject(self, kind: str, *, worker: Any = None, pool: Any = None, supervisor: Any = None,
                     rule: str = "", for_s: float | None = None) -> Fault | None:
        """Inject one fault now into a serving worker (drawn with the seeded rng among those the
        target names). Returns the recorded Fault, or None if nothing could be hit."""
        if kind not in EXPECTED:
            raise ChaosError(f"unknown fault {kind!r}; the faults are {list(FAULTS)}")
        self._check_engine({kind: 1})
        if kind == "stop_engine":
            return await self._stop_engine(rule, for_s)
        if kind == "restart_engine":
            return await self._restart_engine(rule, for_s)
        if kind == "kill_supervisor":
            fault = await self.harness.kill_supervisor(supervisor, for_s=for_s or 0.0, rule=rule)
            if fault is None:
                self.skipped += 1
            return fault
        h = self.harness
        candidates = self.serving(worker=worker, pool=pool, supervisor=supervisor)
        if not candidates:
            self.skipped += 1
            return None
        actor, cid = self.rng.choice(candidates)
        self._n += 1
        expected = EXPECTED[kind]
        if kind == "pause" and actor.state == "busy":
            # FakeEngine's hang freezes the wrapper, not the agent it runs: a task that ends
            # the wrapper (!crash-wrapper, !oom) still does
            expected = ("hung", "crashed", "oom_killed")
        fault = h.history.fault(Fault(self._n, kind, h.history.now(), actor.id, cid, actor.generation,
                                      expected, rule=rule, actor=actor))
        self._hit.add(cid)
        try:
            await self._apply(kind, cid)
        except (ContainerNotRunning, ContainerNotFound, RemovalInProgress) as exc:
            fault.outcome, fault.detail = "missed", str(exc)
            return None
        return fault

    async def _apply(self, kind: str, cid: str) -> None:
        engine = self.harness.engine
        if isinstance(engine, FakeEngine):
            # the fake's own controls: synchronous, so the worker chosen is the worker hit
            match kind:
                case "kill":
                    engine.kill(cid, "SIGKILL")
                case "remove":
                    engine.remove(cid)
                case "stop":
                    engine.stop(cid)
                case "crash_wrapper":
                    engine.crash(cid, 1)
                case "oom":
                    engine.oom(cid)
                case "pause":
                    engine.hang(cid)
            await trio.lowlevel.checkpoint()
            return
        match kind:
            case "kill":
                await engine.container_kill(cid, "SIGKILL")
            case "remove":
                await engine.container_remove(cid, force=True)
            case "stop":
                await engine.container_stop(cid, grace_s=2.0)
            case "crash_wrapper":
                # SIGKILL every process of the container's user but its init: the wrapper dies,
                # the init exits 137, and no kill went through the engine
                try:
                    await engine.container_exec(cid, ["sh", "-c", "kill -9 -1"], user="worker")
                except ContainerNotRunning:
                    raise
                except EngineError:
                    pass                    # the exec's own stream may end with the container
            case "pause":
                code, out = await engine.container_exec(cid, ["python3", "-c", FREEZE_WRAPPER])
                if code != 0:
                    raise ChaosError(f"pause: could not stop the wrapper in {cid[:12]} (exit {code}): "
                                     f"{out.strip()[-200:]}")

    def next_number(self) -> int:
        self._n += 1
        return self._n

    async def _restart_engine(self, rule: str, for_s: float | None) -> Fault | None:
        h = self.harness
        engine = h.engine
        control = h.engine_control
        fake = isinstance(engine, FakeEngine)
        if (engine.down if fake else not control.running) or not h.all_up():
            self.skipped += 1                # down already, or a supervisor is (killed, not back)
            return None
        down_s = (RESTART_ENGINE_FAKE_S if fake else 0.0) if for_s is None else for_s
        fault = h.history.fault(Fault(self.next_number(), "restart_engine", h.history.now(), rule=rule,
                                      detail=f"engine {engine.url}, down "
                                             + (f"{down_s:g} s" if fake else
                                                "while it stops and starts" + (f" + {down_s:g} s" if down_s else ""))
                                             + " (live-restore: the containers run on)"))
        fault.outcome = "certified"          # engine-wide: no certificate expected

        async def back() -> None:
            if fake:
                engine.come_up()
            else:
                await control.start()
            fault.back_at = h.history.now()
            h.history.note("engine", f"the engine answers again (restart #{fault.n}, down "
                                     f"{fault.back_at - fault.t:.3f} s)")
        if fake:
            engine.go_down(live_restore=True)
        else:
            await control.stop()
        h.call_later(down_s, back)
        await trio.lowlevel.checkpoint()
        return fault

    async def _stop_engine(self, rule: str, for_s: float | None) -> Fault | None:
        h = self.harness
        engine = h.engine
        control = h.engine_control
        fake = isinstance(engine, FakeEngine)
        if (engine.down if fake else not control.running):
            self.skipped += 1
            return None
        self._n += 1
        n = self._n
        t = h.history.now()
        # a death while the engine is gone is the engine's; it may come back before corral
        # concludes so (for_s under a few seconds), and then the stop is an outside kill
        expected = ("engine_error",) if for_s is None or for_s >= 5 else ("engine_error", "killed")
        survive = not fake and control.live_restore
        top = h.history.fault(Fault(n, "stop_engine", t, expected=expected, rule=rule,
                                    detail=f"engine {engine.url}"
                                           + (f" for {for_s:g} s" if for_s is not None else "")
                                           + (" (live-restore: the containers run on)" if survive else "")))
        top.outcome = "certified"            # the engine-wide record; each container has its own
        if not fake:
            if not survive:
                for actor, cid in self.serving():
                    h.history.fault(Fault(n, "stop_engine", t, actor.id, cid, actor.generation, expected,
                                          rule=rule, counted=False))
                    self._hit.add(cid)
            await control.stop()
            if for_s is not None:
                h.call_later(for_s, control.start)
            return top
        for actor, cid in self.serving():
            f = h.history.fault(Fault(n, "stop_engine", t, actor.id, cid, actor.generation, expected,
                                      rule=rule, counted=False))
            self._hit.add(cid)
            del f
        engine.shut_down()
        if for_s is not None:
            h.call_later(for_s, engine.come_up)
        await trio.lowlevel.checkpoint()
        return top
