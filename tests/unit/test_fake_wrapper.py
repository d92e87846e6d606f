"""FakeEngine's worker-wrapper (runtime/engines/fake_wrapper.py): the real wrapper core driven by
trio, with the stub agent's plan for the agent. Driven here through memory channels, on the
autojump clock: every time is exact."""

import json

import pytest
import trio

from runtime.engines.fake_wrapper import FakeControls, run_fake_wrapper
from runtime.protocol import MAX_LINE, Fatal, Heartbeat, Ready, TaskDone, TaskOutput, TaskStarted, decode_wrapper_frame
from runtime.wrapper import agents as table
from runtime.wrapper.core import OOM_REASON, PROMPT_ARGV_MAX


class Container:
    """One fake wrapper, as a container: its stdin, its frames (decoded as the actor decodes
    them, with the virtual time they came at) and its stderr."""

    def __init__(self, nursery, agent="shell", controls=None, **env):
        self.stdin, recv = trio.open_memory_channel(1000)
        self.frames = []
        self.stderr = b""
        self.exit_code = None
        self.exited = trio.Event()
        self.changed = trio.Event()
        self.controls = controls or FakeControls()
        self.env = {"CORRAL_WORKER_ID": "w-1", "CORRAL_AGENT": agent, "CORRAL_HEARTBEAT_S": "1", **env}
        nursery.start_soon(self._run, recv)

    def write(self, stream, data):
        assert stream in (1, 2)
        if stream == 2:
            self.stderr += data
            return
        assert data.endswith(b"\n") and len(data) < MAX_LINE
        self.frames.append((trio.current_time(), decode_wrapper_frame(data.rstrip(b"\n"))))
        self.changed.set()
        self.changed = trio.Event()

    async def _run(self, recv):
        self.exit_code = await run_fake_wrapper(env=self.env, stdin=recv, write=self.write,
                                                controls=self.controls)
        self.exited.set()

    async def send(self, **frame):
        await self.stdin.send(json.dumps(frame).encode() + b"\n")

    async def wait_for(self, pred):
        while True:
            for t, f in self.frames:
                if pred(f):
                    return t, f
            await self.changed.wait()

    async def done(self, task_id):
        return await self.wait_for(lambda f: isinstance(f, TaskDone) and f.task_id == task_id)

    async def run(self, task_id, prompt, **fields):
        await self.send(kind="run_task", task_id=task_id, prompt=prompt, **fields)
        return await self.done(task_id)

    def of(self, cls, task_id=None):
        return [f for _, f in self.frames if isinstance(f, cls) and (task_id is None or f.task_id == task_id)]


@pytest.fixture
async def box(nursery):
    def make(agent="shell", **kw):
        return Container(nursery, agent, **kw)
    return make


async def test_ready_then_heartbeats_on_trio_s_clock(box, autojump_clock):
    w = box("claude", CORRAL_HEARTBEAT_S="2")
    await trio.sleep(7)
    (t, ready), *beats = w.frames
    assert t == 0 and ready == Ready(worker_id="w-1", agent="claude", agent_version=table.AGENTS["claude"].stub_version,
                                     wrapper_version=ready.wrapper_version, pid=1)
    assert beats == [(2, Heartbeat(seq=1)), (4, Heartbeat(seq=2)), (6, Heartbeat(seq=3))]


@pytest.mark.parametrize("agent", ["claude", "factory", "codex", "shell"])
async def test_stub_answers_in_each_agent_s_format(box, autojump_clock, agent):
    w = box(agent)
    t, d = await w.run("t1", "hello")
    assert (t, d.status, d.exit_code, d.output, d.error) == (0, "ok", 0, f"stub-{agent}: hello", "")
    assert len(w.of(TaskStarted, "t1")) == 1 and w.of(TaskOutput, "t1")      # the real stream
    t, d = await w.run("t2", "!exit 3")
    assert (d.status, d.exit_code) == ("error", 3)
    long_prompt = "-" + "p" * PROMPT_ARGV_MAX            # via stdin or a file, as the real CLI takes it
    t, d = await w.run("t3", long_prompt, max_output_bytes=1 << 20)
    assert (d.status, d.output) == ("ok", f"stub-{agent}: {long_prompt}")


async def test_sleep_timeout_and_output_cap(box, autojump_clock):
    w = box("claude")
    t, d = await w.run("s", "!sleep 5 zzz")
    assert (t, d.status, d.output, d.duration_s) == (5, "ok", "stub-claude: zzz", 5.0)
    t, d = await w.run("to", "!sleep 5", timeout_s=1.5)
    assert (t, d.status, d.exit_code, d.error) == (6.5, "timeout", -9, "timed out after 1.5s")
    t, d = await w.run("cap", "x" * 1000, max_output_bytes=100)
    assert (d.status, d.truncated, d.output) == ("ok", True, ("x" * 1000)[-100:])


async def test_busy_cancel_and_bad_frames(box, autojump_clock):
    w = box()
    await w.send(kind="run_task", task_id="long", prompt="!sleep 100")
    t, d = await w.run("second", "x")
    assert (d.status, d.error) == ("error", "worker is busy with task long")
    await trio.sleep(1)
    await w.send(kind="cancel_task", task_id="long")
    t, d = await w.done("long")
    assert (t, d.status, d.exit_code) == (1, "cancelled", -9)
    t, d = await w.run("bad", ["not", "a", "string"])
    assert (d.status, d.error) == ("error", "invalid run_task: prompt must be a string, not an array")
    await w.stdin.send(b'{"kind":"run_task","task_id":"cut","prompt":"x\n')
    t, d = await w.done("cut")
    assert d.error.startswith("invalid run_task: a frame that is not JSON")


async def test_shutdown_waits_for_the_task_then_cancels_it_and_answers_it(box, autojump_clock):
    w = box()
    await w.send(kind="run_task", task_id="quick", prompt="!sleep 1")
    await w.send(kind="shutdown", grace_s=3)
    await w.exited.wait()
    assert w.exit_code == 0 and trio.current_time() == 1
    assert (await w.done("quick"))[1].status == "ok"
    w = box()
    await w.send(kind="run_task", task_id="slow", prompt="!sleep 100")
    await w.send(kind="shutdown", grace_s=2)
    await w.exited.wait()
    t, d = await w.done("slow")
    assert (t, d.status, w.exit_code) == (trio.current_time(), "cancelled", 0) and t == 1 + 2


async def test_stdin_end_cancels_the_task_and_exits_0(box, autojump_clock):
    w = box()
    await w.send(kind="run_task", task_id="t", prompt="!sleep 100")
    await trio.sleep(0.5)
    await w.stdin.aclose()
    await w.exited.wait()
    assert (w.exit_code, (await w.done("t"))[1].status, trio.current_time()) == (0, "cancelled", 0.5)
    assert b"[wrapper] stdin closed: shutting down" in w.stderr


@pytest.mark.parametrize("env,reason", [
    ({"CORRAL_STUB_FAIL_PROBE": "1"}, "agent CLI version probe 'claude --version' failed with exit 1: "
                                      "claude: version probe failed (CORRAL_STUB_FAIL_PROBE=1)"),
    ({"CORRAL_REQUIRED_ENV": "API_KEY"}, "required environment variable(s) not set: API_KEY"),
    ({"CORRAL_AGENT": "nope"}, "unknown agent 'nope' (known: claude, codex, factory, shell)"),
])
async def test_startup_errors_are_fatal_78(box, autojump_clock, env, reason):
    w = box("claude", **env)
    await w.exited.wait()
    assert (w.exit_code, trio.current_time()) == (78, 0)
    assert [f for _, f in w.frames] == [Fatal(reason=reason)]
    assert f"[wrapper] fatal: {reason}".encode() in w.stderr


async def test_ready_delay(box, autojump_clock):
    w = box(controls=FakeControls(ready_delay=3))
    t, ready = await w.wait_for(lambda f: isinstance(f, Ready))
    assert t == 3


async def test_crash_wrapper_kills_the_wrapper_137(box, autojump_clock):
    w = box("codex")
    await w.send(kind="run_task", task_id="t", prompt="!crash-wrapper")
    await w.exited.wait()
    assert (w.exit_code, trio.current_time()) == (137, 0.2)
    assert not w.of(TaskDone)                                   # it never answered
    assert b"[agent] stub: killing the worker-wrapper" in w.stderr


async def test_oom_is_the_kernel_killing_the_agent(box, autojump_clock):
    seen = []
    controls = FakeControls(on_oom=lambda: seen.append(trio.current_time()))
    w = box("claude", controls=controls)
    await trio.sleep(1)
    await w.send(kind="run_task", task_id="t", prompt="!oom")
    await w.exited.wait()
    assert (w.exit_code, seen, controls.oom_kills) == (137, [1], 1)
    assert w.frames[-1] == (1, Fatal(reason=OOM_REASON)) and not w.of(TaskDone)


async def test_hang_stops_heartbeats_and_answers(box, autojump_clock):
    w = box()
    await trio.sleep(2.5)
    w.controls.hang()
    await w.send(kind="run_task", task_id="t", prompt="x")
    await w.stdin.aclose()
    await trio.sleep(100)
    assert [f for _, f in w.frames][1:] == [Heartbeat(seq=1), Heartbeat(seq=2)]
    assert not w.exited.is_set()                               # only a kill ends it
    w.controls.crash(137)
    await w.exited.wait()
    assert w.exit_code == 137


async def test_wedge_heartbeats_go_on_but_tasks_never_end(box, autojump_clock):
    w = box()
    w.controls.wedge()
    await w.send(kind="run_task", task_id="stuck", prompt="x", timeout_s=1)
    t, d = await w.run("next", "y")
    assert (d.status, d.error) == ("error", "worker is busy with task stuck")
    await w.send(kind="cancel_task", task_id="stuck")
    await trio.sleep(30.5)
    assert w.of(TaskStarted, "stuck") and not w.of(TaskDone, "stuck")
    assert len(w.of(Heartbeat)) == 30


async def test_crash_with_a_code_and_cancel_from_outside(box, autojump_clock, nursery):
    w = box()
    await trio.sleep(1)
    w.controls.crash(3)
    await w.exited.wait()
    assert (w.exit_code, trio.current_time()) == (3, 1)
    controls = FakeControls()
    controls.crash(5)                                          # before it even runs
    w = box(controls=controls)
    await w.exited.wait()
    assert (w.exit_code, w.frames) == (5, [])
    # killing the container is cancelling the driver
    send, recv = trio.open_memory_channel(10)
    with trio.move_on_after(4) as scope:
        await run_fake_wrapper(env={"CORRAL_WORKER_ID": "w"}, stdin=recv, write=lambda s, d: None)
    assert scope.cancelled_caught
