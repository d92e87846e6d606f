"""FakeEngine's worker-wrapper: the wrapper's real core, driven by trio, with the stub agent's plan
standing in for the agent process.

The container process runs ``runtime/wrapper/core.py`` with threads and subprocesses
(``wrapper.py``); here the same core runs with trio tasks, so every frame, limit and decision is
the real one: frame validation, busy, task_output chunks, the output cap, timeouts, cancel,
shutdown with grace, heartbeats, the startup checks (exit 78), the OOM decision (exit 137). Timers
use trio's clock, so the autojump clock makes them instant and exact.

The agent is not a process: ``stub_plan()`` (runtime/wrapper/stub_agent.py, the same function the
stub CLI runs) says what it does with its command line: sleep, print in the real CLI's output
format, exit with a code; ``!crash-wrapper`` ends the wrapper (exit 137, like the SIGKILL the stub
sends it); ``!oom`` is the kernel's OOM kill of the agent (``controls.oom_kills`` grows and
``controls.on_oom`` is called; the core then writes ``fatal`` and the wrapper exits 137). The
shell agent is simulated too: any script answers ``stub-shell: <script>``.

Usage (one call per container start; the container's exit code is what it returns)::

    controls = FakeControls(on_oom=...)     # kept by the engine, to hang/wedge/crash later
    code = await run_fake_wrapper(env=env, stdin=stdin_receive_channel, write=write,
                                  controls=controls)

- ``env``: the container's environment (CORRAL_WORKER_ID, CORRAL_AGENT, CORRAL_HEARTBEAT_S,
  CORRAL_REQUIRED_ENV, CORRAL_STUB_FAIL_PROBE, ...).
- ``stdin``: what the attached side writes to the container's stdin, in chunks of bytes; the
  channel's end (closed sender) is stdin's end of file, which makes the wrapper shut down. (With
  stdin_once off a detach does not close it: the wrapper runs on, under its lease.)
- ``write(stream, data)``: the container's output, ``stream`` 1 (stdout: frames) or 2 (stderr:
  ``[wrapper] ...`` and ``[agent] ...`` log lines). Called synchronously; it must not block.
- ``controls``: engine faults that no prompt directive makes (see FakeControls).
- Returns the exit code: 0 after shutdown, stdin's end or its lease running out (orphaned:
  CORRAL_ORPHAN_TIMEOUT_S), 78 on a startup error, 137 after
  ``!crash-wrapper`` or an OOM kill, 70 if a task's processes could not be cleaned up (never
  here), or the code given to ``controls.crash()``. Cancel it to kill the container.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

import trio

from runtime.wrapper import core
from runtime.wrapper.agents import BY_CLI
from runtime.wrapper.stub_agent import THEN_KILL_WRAPPER, THEN_OOM, stub_plan

STDOUT, STDERR = 1, 2
EX_KILLED = 137
"""the wrapper SIGKILLed (by !crash-wrapper): docker-init exits 128 + 9"""

__all__ = ["FakeControls", "FakeHttpResponse", "run_fake_wrapper"]


@dataclass
class FakeHttpResponse:
    """What an HTTP client of the fake wrapper's endpoint got."""
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    error: str = ""
    """not empty: the response was cut short (the connection aborted)"""


@dataclass
class FakeControls:
    """Engine faults of one container's wrapper, set by FakeEngine (not prompt directives).

    - ``hang()``: the wrapper process freezes (like SIGSTOP): no heartbeat, no frame, it reads
      nothing and answers nothing, until it is killed (cancelled) or crashed.
    - ``wedge()``: heartbeats go on, but its tasks never end: the agent never exits and cannot be
      killed, so timeout and cancel have no effect (an unkillable agent, a fork bomb holding
      every pid). Frames are still read: a second task is answered "busy".
    - ``crash(exit_code)``: the wrapper exits at once with ``exit_code``.
    - ``ready_delay``: seconds between a successful version probe and the ready frame.
    - ``on_oom``: called when the kernel OOM-kills the agent (``!oom``), before the wrapper
      reports it and exits 137; ``oom_kills`` is the memory cgroup's OOM-kill counter.
    """

    ready_delay: float = 0.0
    on_oom: Callable[[], None] | None = None
    hung: bool = False
    wedged: bool = False
    oom_kills: int = 0
    crashed: int | None = None
    _on_crash: Callable[[int], None] | None = field(default=None, repr=False)
    _wrapper: "_FakeWrapper | None" = field(default=None, repr=False)


    def hang(self) -> None:
        self.hung = True

    def wedge(self) -> None:
        self.wedged = True

    def crash(self, exit_code: int = 1) -> None:
        self.crashed = exit_code
        if self._on_crash is not None:
            self._on_crash(exit_code)

    async def http(self, method: str, target: str, headers: list[tuple[str, str]] | None = None,
                   body: bytes = b"") -> "FakeHttpResponse":
        """An HTTP request to the wrapper's model gateway endpoint (CORRAL_GATEWAY=1), as the
        agent in the container would make it: through the wrapper's real core, as frames to the
        actor, and back. Raises RuntimeError when the wrapper is not running."""
        if self._wrapper is None:
            raise RuntimeError("the fake wrapper is not running")
        return await self._wrapper.http(method, target, list(headers or []), body)


async def run_fake_wrapper(*, env: Mapping[str, str], stdin: trio.MemoryReceiveChannel[bytes],
                           write: Callable[[int, bytes], None],
                           controls: FakeControls | None = None) -> int:
    """Run one fake worker-wrapper until it exits; -> its exit code. See the module's docstring."""
    return await _FakeWrapper(env, stdin, write, controls or FakeControls()).run()


class _Agent:
    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.scope = trio.CancelScope()


class _FakeWrapper:
    def __init__(self, env: Mapping[str, str], stdin: trio.MemoryReceiveChannel[bytes],
                 write: Callable[[int, bytes], None], controls: FakeControls) -> None:
        self.env = dict(env)
        self.stdin = stdin
        self._write = write
        self.controls = controls
        self.core = core.WrapperCore(self.env, clock=trio.current_time, pid=1, note=" (fake)")
        self.exit_code: int | None = None
        self.nursery: trio.Nursery | None = None
        self.timers: dict[str, trio.CancelScope] = {}
        self.files: dict[str, bytes] = {}
        self.agent: _Agent | None = None
        self.reading = False
        self._ids = itertools.count(2)
        self._req_ids = itertools.count(1)
        self.clients: dict[int, trio.MemorySendChannel[object]] = {}

    async def run(self) -> int:
        self.controls._on_crash = self._end
        self.controls._wrapper = self
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                if self.controls.crashed is not None:
                    self._end(self.controls.crashed)
                else:
                    self.feed(core.Boot())
                if self.exit_code is None:
                    await trio.sleep_forever()     # until _end() cancels the nursery
        finally:
            self.controls._on_crash = None
            self.controls._wrapper = None
            for send in self.clients.values():
                send.close()
        assert self.exit_code is not None
        return self.exit_code

    def _end(self, code: int) -> None:
        if self.exit_code is None:
            self.exit_code = code
            if self.nursery is not None:
                self.nursery.cancel_scope.cancel()

    def write(self, stream: int, data: bytes) -> None:
        if self.exit_code is None:
            self._write(stream, data)

    # -- events in, actions out ---------------------------------------------------------------
    def feed(self, event: object) -> None:
        pending = [event]
        while pending:
            if self.controls.hung or self.exit_code is not None:
                return                      # a frozen or dead process does nothing
            for action in self.core.handle(pending.pop(0)):
                follow = self.do(action)
                if follow is not None:
                    pending.append(follow)
        if not self.reading and self.core.state == "serving":
            self.reading = True
            assert self.nursery is not None
            self.nursery.start_soon(self._read_stdin)

    def do(self, a: object) -> object | None:
        assert self.nursery is not None
        if isinstance(a, core.Send):
            self.write(STDOUT, a.data)
        elif isinstance(a, core.Log):
            self.write(STDERR, f"[wrapper] {a.text}\n".encode("utf-8", "replace"))
        elif isinstance(a, core.AgentLog):
            self.write(STDERR, b"[agent] " + a.data)
        elif isinstance(a, core.StartTimer):
            self._cancel_timer(a.name)
            scope = self.timers[a.name] = trio.CancelScope()
            self.nursery.start_soon(self._timer, a.name, a.delay, scope)
        elif isinstance(a, core.CancelTimer):
            self._cancel_timer(a.name)
        elif isinstance(a, core.CheckWorkspace):
            return core.WorkspaceChecked(None)
        elif isinstance(a, core.RunProbe):
            return self._probe(a)
        elif isinstance(a, core.WritePromptFile):
            path = f"/tmp/corral-prompt-{next(self._ids)}{a.suffix}"
            self.files[path] = a.data
            return core.PromptFileWritten(a.task_id, path)
        elif isinstance(a, core.RemoveFile):
            self.files.pop(a.path, None)
        elif isinstance(a, core.StartAgent):
            agent = self.agent = _Agent(a.task_id)
            self.nursery.start_soon(self._run_agent, a, agent)
        elif isinstance(a, core.KillAgent):
            if self.agent is not None and self.agent.task_id == a.task_id and not self.controls.wedged:
                self.agent.scope.cancel()
        elif isinstance(a, core.Cleanup):
            if not self.controls.wedged:    # a wedged task's processes never go away
                return core.CleanupDone(a.task_id, (), self.controls.oom_kills)
        elif isinstance(a, core.StartGateway):
            return core.GatewayStarted(a.port or 8787)
        elif isinstance(a, core.PrepareAgent):
            home = a.home or "/home/worker"
            for rel, data in a.files:
                self.files[f"{home.rstrip('/')}/{rel}"] = data
            return core.AgentPrepared(home, ())
        elif isinstance(a, (core.HttpRespond, core.HttpBody, core.HttpFinish)):
            self._to_client(a)
        elif isinstance(a, core.Exit):
            self._end(a.code)
        else:
            raise TypeError(f"not a wrapper action: {a!r}")
        return None

    # -- the model gateway's endpoint, in process ---------------------------------------------
    def _to_client(self, a: object) -> None:
        send = self.clients.get(a.req_id)  # type: ignore[attr-defined]
        if send is not None:
            send.send_nowait(a)

    async def http(self, method: str, target: str, headers: list[tuple[str, str]],
                   body: bytes) -> FakeHttpResponse:
        if self.exit_code is not None or self.controls.hung:
            raise RuntimeError("the fake wrapper is not serving")
        rid = next(self._req_ids)
        send, receive = trio.open_memory_channel[object](math.inf)
        self.clients[rid] = send
        status, rheaders, data, error = 0, [], bytearray(), ""
        try:
            self.feed(core.HttpRequestStarted(rid, method, target, tuple(headers), "HTTP/1.1"))
            for i in range(0, len(body), 65536):
                self.feed(core.HttpRequestBody(rid, body[i:i + 65536]))
            self.feed(core.HttpRequestEnd(rid))
            async with receive:
                async for a in receive:
                    if isinstance(a, core.HttpRespond):
                        status, rheaders = a.status, list(a.headers)
                    elif isinstance(a, core.HttpBody):
                        data += a.data
                    elif isinstance(a, core.HttpFinish):
                        error = a.error
                        break
                else:
                    error = "the wrapper exited"
        except BaseException:
            self.feed(core.HttpClientGone(rid, "the client went away"))
            raise
        finally:
            self.clients.pop(rid, None)
        return FakeHttpResponse(status, rheaders, bytes(data), error)

    # -- timers -------------------------------------------------------------------------------
    def _cancel_timer(self, name: str) -> None:
        scope = self.timers.pop(name, None)
        if scope is not None:
            scope.cancel()

    async def _timer(self, name: str, delay: float, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep(delay)
        if self.timers.get(name) is scope:  # not cancelled or replaced meanwhile
            del self.timers[name]
            self.feed(core.TimerFired(name))

    # -- stdin --------------------------------------------------------------------------------
    async def _read_stdin(self) -> None:
        while self.core.wants_stdin:
            if self.controls.hung:
                await trio.sleep_forever()
            try:
                data = await self.stdin.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError):
                self.feed(core.StdinClosed())
                return
            self.feed(core.StdinData(data))

    # -- the agent, as the stub agent's plan --------------------------------------------------
    def _probe(self, a: core.RunProbe) -> object | None:
        cli = os.path.basename(a.argv[0])
        if cli not in BY_CLI:
            return core.ProbeFailed("not_found")
        plan = stub_plan(cli, list(a.argv[1:]), self.env)
        done = core.ProbeDone(plan.exit_code, plan.stdout, plan.stderr)
        if plan.exit_code != 0 or not self.controls.ready_delay:
            return done

        async def slow_probe() -> None:
            await trio.sleep(self.controls.ready_delay)
            self.feed(done)
        assert self.nursery is not None
        self.nursery.start_soon(slow_probe)
        return None

    async def _run_agent(self, start: core.StartAgent, agent: _Agent) -> None:
        tid = start.task_id
        cli = os.path.basename(start.argv[0])
        if cli not in BY_CLI:
            self.feed(core.AgentNotStarted(tid, "spawn", f"[Errno 2] No such file or directory: {start.argv[0]!r}"))
            return
        try:
            plan = stub_plan(cli, list(start.argv[1:]), self.env,
                             read_stdin=lambda: (start.stdin or b"").decode("utf-8", "replace"),
                             read_file=lambda path: self.files[path].decode("utf-8", "replace"))
        except Exception as exc:   # a command line the stub cannot read: a bug, answered as such
            self.feed(core.TaskCrashed(tid, repr(exc)))
            return
        self.feed(core.AgentStarted(tid, next(self._ids), self.controls.oom_kills))
        code = plan.exit_code
        with agent.scope:
            if plan.stderr:
                self.feed(core.AgentOutput(tid, "stderr", plan.stderr))
            await trio.sleep(plan.sleep_s)
            while self.controls.wedged:     # it never ends, and nothing can kill it
                await trio.sleep_forever()
            if plan.then == THEN_KILL_WRAPPER:
                self._end(EX_KILLED)
                return
            if plan.then == THEN_OOM:
                self.controls.oom_kills += 1
                if self.controls.on_oom is not None:
                    self.controls.on_oom()
            elif plan.stdout:
                self.feed(core.AgentOutput(tid, "stdout", plan.stdout))
        if agent.scope.cancelled_caught or plan.then == THEN_OOM:
            # killed: it is gone before its output ends
            self.feed(core.AgentExited(tid, -core.SIGKILL))
            self.feed(core.AgentOutput(tid, "stdout", b""))
            self.feed(core.AgentOutput(tid, "stderr", b""))
        else:
            # its output ends, and it exits
            self.feed(core.AgentOutput(tid, "stdout", b""))
            self.feed(core.AgentOutput(tid, "stderr", b""))
            self.feed(core.AgentExited(tid, code))
