"""corral's pytest plugin: chaos tests of your own supervision trees.

Registered through the ``pytest11`` entry point (``pip install corral[test]``); it follows
pytest-trio's conventions (async fixtures, a ``trio`` marker with a ``run=`` runner, a Clock
fixture argument wins). Fixtures:

``corral_engine``
    FakeEngine under trio's autojump clock (virtual time: every wait is instant and exact) by
    default; the real engine with ``--corral-engine=docker`` (or an engine URL), the
    ``corral_engine`` ini option, or ``@pytest.mark.corral_engine("docker")``.
    ``@pytest.mark.corral_engine("fake", start_delay=0.1)`` passes FakeEngine's arguments.
``corral_supervisor``
    ``sup = await corral_supervisor(strategy="one_for_all", max_restarts=3)`` (or a
    SupervisorConfig): a running supervisor, named uniquely. Teardown stops it and fails the
    test if a task, an image build or a container was left behind, or if it escalated and
    the test never looked (``corral_supervisor.escalation(sup)``).
``chaos``
    the seeded monkey: ``chaos.every(2).kill(pool="p")``, ``chaos.at(5).crash_wrapper(worker=w)``,
    ``remove``, ``stop``, ``oom``, ``pause``, ``stop_engine``, ``restart_engine`` (live-restore:
    FakeEngine or ``corral_engine("private")``), ``kill_supervisor`` (a crash of corral: the
    supervisor is reopened and adopts its containers; ``corral_supervisor.current(sup)`` is its
    new handle, ``corral_harness.submit(sup, "pool:p", task)`` a task through its journal that
    outlives it), ``any({...})``;
    ``async with chaos.running(): ...``. The seed comes from ``--corral-seed`` (default: derived
    from the test's id, so a rerun repeats it); a failing test prints the seed, the schedule and
    what it injected.
``invariants``
    ``await invariants.check()``: results, executions, orphans, certificates, restart delays,
    escalations (runtime.chaoskit.invariants); checked again at teardown.
``corral_harness``
    what the others stand on (history, timeline, ...).
``private_docker``
    a dockerd of the test's own (`runtime.chaoskit.dockerd.PrivateDockerd`: ``.url``,
    ``.stop()``, ``.start()``, ``.restart()``, ``.kill()``, ``.pid``), with live-restore and
    corral/worker-base copied in from the machine's engine. One per session (the image copy is
    what costs), started at a test's beginning if a test before left it stopped; every container
    in it is removed after each test. ``@pytest.mark.corral_private_docker(live_restore=False,
    images=(...))`` asks for another one (one per set of options). Skipped, saying why, when not
    root or dockerd is not installed. ``@pytest.mark.corral_engine("private")`` (or
    ``--corral-engine=private``) runs the corral fixtures on it, and then the ``chaos`` fixture
    can ``stop_engine`` (SIGTERM its dockerd; ``for_s=`` starts it again).

Every task run through a pool's or a worker's handle during the test is recorded (the handles'
``run`` is wrapped for the test), and every worker the supervisors make is followed.

A test on the real engine gets an absolute deadline (``corral_deadline`` ini option, default
300 s); on FakeEngine the deadline is 3600 virtual seconds. Either can be set per test:
``@pytest.mark.corral_engine("docker", deadline=120)``.
"""

from __future__ import annotations

import functools
import inspect
import random
import zlib
from contextlib import AsyncExitStack

import pytest
import trio
import trio.testing

from ..engines.fake import FakeEngine
from ..errors import EngineError
from .dockerd import DockerdError, PrivateDockerd, reap_stale, unavailable_reason
from .harness import Harness

FIXTURES = frozenset({"corral_engine", "corral_supervisor", "chaos", "invariants", "corral_harness"})
FAKE_DEADLINE_S = 3600.0
_PRIVATE_NOTES = pytest.StashKey[list]()
"""what the session's private dockerds cost, for the terminal summary"""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("corral", "corral chaos testing")
    group.addoption("--corral-engine", default=None,
                    help="engine of the corral fixtures: fake (default: FakeEngine, autojump clock), "
                         "docker (DOCKER_HOST, else /var/run/docker.sock), private (a dockerd of "
                         "the test session's own: the chaos fixture may stop it), or an engine URL")
    group.addoption("--corral-seed", default=None,
                    help="seed of the chaos fixture: a number, or 'random' (default: derived from "
                         "each test's id, so a rerun repeats it)")
    parser.addini("corral_engine", "default engine of the corral fixtures (fake, docker, private, a URL)",
                  default="fake")
    parser.addini("corral_deadline", "absolute per-test deadline on a real engine, seconds",
                  default="300")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "corral_engine(kind='fake', *, deadline=None, **fake_engine_kwargs): the engine of "
                   "the corral fixtures: 'fake' (FakeEngine under the autojump clock), 'docker', "
                   "'private' (the private_docker fixture's engine), or an engine URL")
    config.addinivalue_line(
        "markers", "corral_private_docker(*, live_restore=True, images=('corral/worker-base:latest',)): "
                   "the options of the private_docker fixture's dockerd (one per set of options "
                   "and session)")


def engine_choice(node) -> tuple[str, str | None, dict, float]:
    """(``fake`` | ``docker`` | ``private``, URL or None, FakeEngine kwargs, deadline) for a
    test."""
    config = node.config
    marker = node.get_closest_marker("corral_engine")
    kwargs: dict = {}
    deadline = None
    if marker is not None:
        kind = marker.args[0] if marker.args else marker.kwargs.get("kind", "fake")
        kwargs = {k: v for k, v in marker.kwargs.items() if k not in ("kind", "deadline")}
        deadline = marker.kwargs.get("deadline")
    else:
        kind = config.getoption("corral_engine") or config.getini("corral_engine") or "fake"
    url = None
    if kind not in ("fake", "docker", "private"):
        if "://" not in kind:
            raise pytest.UsageError(f"corral_engine: {kind!r} is not fake, docker, private or an engine URL")
        kind, url = "docker", kind
    if deadline is None:
        deadline = FAKE_DEADLINE_S if kind == "fake" else float(config.getini("corral_deadline"))
    return kind, url, kwargs, float(deadline)


def _run(fn, *, fake: bool, deadline: float, clock=None, instruments=()):
    """pytest-trio's ``run=``: the autojump clock on FakeEngine (unless the test asks for a clock
    of its own), and an absolute deadline over fixtures and test."""
    if fake and clock is None:
        clock = trio.testing.MockClock(autojump_threshold=0)

    async def main():
        # (a deadline that cancels pytest-trio's fixtures surfaces as their errors: say why)
        with trio.CancelScope(deadline=trio.current_time() + deadline) as scope:
            try:
                return await fn()
            except BaseException:
                if not scope.cancel_called:
                    raise
        pytest.fail(f"corral: the test did not finish within {deadline:g} "
                    f"{'virtual ' if fake else ''}seconds (its deadline)", pytrace=False)
    return trio.run(main, clock=clock, instruments=list(instruments))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not FIXTURES & set(getattr(item, "fixturenames", ())):
            continue
        obj = getattr(item, "obj", None)
        if obj is None or hasattr(obj, "hypothesis") or not inspect.iscoroutinefunction(obj):
            continue
        kind, _, _, deadline = engine_choice(item)
        # first among the trio markers: pytest-trio takes the closest one's ``run``
        item.add_marker(pytest.mark.trio(run=functools.partial(_run, fake=kind == "fake",
                                                               deadline=deadline)), append=False)


def _seed(request: pytest.FixtureRequest) -> int:
    opt = request.config.getoption("corral_seed")
    if opt is None:
        return zlib.crc32(request.node.nodeid.encode())
    if opt == "random":
        return random.SystemRandom().randrange(2**32)
    return int(opt)


class PrivateDockerds:
    """The private dockerds of a test session, one per set of options, each started when a test
    first asks for it and closed at the session's end (or at the interpreter's exit)."""

    def __init__(self, notes: list[str] | None = None) -> None:
        self.engines: dict[tuple, PrivateDockerd] = {}
        self.failed: dict[tuple, str] = {}
        self.notes = notes if notes is not None else []
        self._reaped = False

    def get(self, node) -> PrivateDockerd:
        """The dockerd for ``node``'s options, running; skips the test if none can run here."""
        reason = unavailable_reason()
        if reason is not None:
            pytest.skip(f"private_docker: {reason}")
        marker = node.get_closest_marker("corral_private_docker")
        options = dict(marker.kwargs) if marker is not None else {}
        options.setdefault("live_restore", True)
        if "images" in options:
            options["images"] = tuple(options["images"])
        key = tuple(sorted(options.items()))
        if key in self.failed:
            pytest.fail(f"private_docker: {self.failed[key]}", pytrace=False)
        d = self.engines.get(key)
        if d is None:
            if not self._reaped:
                self._reaped = True
                reap_stale()
            d = PrivateDockerd(**options)
            d.close_at_exit()
            try:
                d.open_sync()
            except DockerdError as exc:
                self.failed[key] = str(exc)
                pytest.fail(f"private_docker: {exc}", pytrace=False)
            self.engines[key] = d
            self.notes.append(f"private dockerd {d.root} ({', '.join(f'{k}={v}' for k, v in key)}): "
                              f"started in {d.start_costs[0]:.2f} s, {len(d.images)} image(s) copied "
                              f"in {d.copy_cost or 0:.1f} s ({d.copy_bytes / 1e6:.0f} MB)")
            return d
        d.start_sync()                 # a test before may have left it stopped or killed
        return d

    def close(self) -> None:
        problems = []
        for d in self.engines.values():
            starts = d.start_costs[1:]
            try:
                d.close_sync()
            except DockerdError as exc:
                problems.append(str(exc))
            if starts:
                self.notes.append(f"private dockerd {d.root}: {len(starts)} more start(s), "
                                  f"{sum(starts) / len(starts):.2f} s on average")
        self.engines.clear()
        if problems:
            raise DockerdError("\n".join(problems))


@pytest.fixture(scope="session")
def corral_private_dockerds(request: pytest.FixtureRequest) -> PrivateDockerds:
    """The session's private dockerds (see `PrivateDockerds`)."""
    holder = PrivateDockerds(request.config.stash.setdefault(_PRIVATE_NOTES, []))
    request.addfinalizer(holder.close)
    return holder


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    notes = config.stash.get(_PRIVATE_NOTES, [])
    if notes:
        terminalreporter.write_sep("-", "corral private_docker")
        for line in notes:
            terminalreporter.write_line(line)


def _after_test(d: PrivateDockerd) -> None:
    """Leave the engine as the next test wants it: running, without containers."""
    d.start_sync()
    d.remove_containers_sync()


@pytest.fixture
def private_docker(request: pytest.FixtureRequest, corral_private_dockerds: PrivateDockerds):
    """A dockerd of the test's own (see the module's docstring), running and without containers;
    what the test leaves in it is removed afterwards."""
    d = corral_private_dockerds.get(request.node)
    d.remove_containers_sync()
    yield d
    _after_test(d)


@pytest.fixture
def corral_engine_control(request: pytest.FixtureRequest, corral_private_dockerds: PrivateDockerds):
    """What controls the engine of the corral fixtures: the PrivateDockerd with
    ``corral_engine("private")``, else None (FakeEngine has controls of its own)."""
    kind, _, _, _ = engine_choice(request.node)
    if kind != "private":
        yield None
        return
    d = corral_private_dockerds.get(request.node)
    yield d
    _after_test(d)


@pytest.fixture
async def corral_engine(request: pytest.FixtureRequest, corral_engine_control):
    """The engine of the corral fixtures (see the module's docstring)."""
    kind, url, kwargs, _ = engine_choice(request.node)
    if corral_engine_control is not None:
        url = corral_engine_control.url
    if kind == "fake":
        async with FakeEngine(**kwargs) as engine:
            yield engine
        return
    from ..engines import open_engine
    async with AsyncExitStack() as stack:
        try:
            engine = await stack.enter_async_context(open_engine(url))
        except EngineError as exc:
            pytest.fail(f"corral_engine: no Docker engine at {url or 'DOCKER_HOST / /var/run/docker.sock'}: "
                        f"{exc}", pytrace=False)
        yield engine


@pytest.fixture
async def corral_harness(corral_engine, corral_engine_control, request: pytest.FixtureRequest,
                         monkeypatch: pytest.MonkeyPatch):
    """The harness behind corral_supervisor, chaos and invariants."""
    async with trio.open_nursery() as nursery:
        harness = Harness(corral_engine, nursery, seed=_seed(request), engine_control=corral_engine_control)
        harness.record_handles(monkeypatch.setattr)
        request.node._corral_harness = harness
        yield harness
        problems = await harness.close(check_invariants=harness.check_at_end)
        nursery.cancel_scope.cancel()
    if problems:
        text = "corral: " + "\n  ".join(["teardown found problems:"] + problems)
        if harness.show_chaos:
            text += "\n" + harness.chaos.describe()
        text += "\ntimeline:\n" + harness.history.timeline()
        pytest.fail(text, pytrace=False)


@pytest.fixture
def corral_supervisor(corral_harness: Harness):
    """A factory of running supervisors: ``sup = await corral_supervisor(**config_fields)``."""
    return corral_harness.supervisors


@pytest.fixture
def chaos(corral_harness: Harness):
    """The seeded chaos monkey of this test (runtime.chaoskit.schedule.Chaos)."""
    corral_harness.show_chaos = True
    return corral_harness.chaos


@pytest.fixture
def invariants(corral_harness: Harness):
    """The invariants of this test's supervision trees (runtime.chaoskit.invariants.Invariants);
    they are checked at teardown too."""
    corral_harness.check_at_end = True
    return corral_harness.invariants


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    harness = getattr(item, "_corral_harness", None)
    if harness is None or call.when != "call" or not report.failed:
        return
    if harness.show_chaos and not harness.described:
        report.sections.append(("corral chaos", harness.chaos.describe()))
