"""The worker-wrapper's sans-IO core (runtime/wrapper/core.py) and the stub agent's plan: events in,
frames and actions out. No process, no thread, no clock but a number."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.protocol import MAX_LINE, decode_wrapper_frame
from runtime.wrapper import agents as table
from runtime.wrapper import core as c
from runtime.wrapper.stub_agent import StubPlan, render, stub_plan

CAP = c.DEFAULT_OUTPUT_BYTES
ENV = {"CORRAL_WORKER_ID": "w-1", "CORRAL_AGENT": "shell", "CORRAL_HEARTBEAT_S": "1",
       "CORRAL_WORKSPACE": "/ws"}


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def frames(actions):
    """The frames among ``actions``, each checked as the actor checks it."""
    out = []
    for a in actions:
        if isinstance(a, c.Send):
            assert a.data.endswith(b"\n") and len(a.data) < MAX_LINE
            decode_wrapper_frame(a.data.rstrip(b"\n"))
            out.append(json.loads(a.data))
    return out


def kinds(actions):
    return [type(a).__name__ if not isinstance(a, c.Send) else a.kind for a in actions]


def of(actions, cls):
    return [a for a in actions if isinstance(a, cls)]


def done_of(actions):
    (d,) = [f for f in frames(actions) if f["kind"] == "task_done"]
    return d


class W:
    """A core made ready, and a few helpers to drive it."""

    def __init__(self, agent="shell", **env):
        self.clock = Clock()
        self.core = c.WrapperCore({**ENV, "CORRAL_AGENT": agent, **env}, clock=self.clock, pid=7)
        assert kinds(self.core.handle(c.Boot())) == ["CheckWorkspace"]
        (probe,) = self.core.handle(c.WorkspaceChecked(None))
        assert probe == c.RunProbe(table.AGENTS[agent].probe, "/ws", 20.0)
        self.ready = self.core.handle(c.ProbeDone(0, b"v1.2\nmore\n"))

    def __call__(self, event):
        return self.core.handle(event)

    def send(self, *objs):
        data = b"".join((o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n" for o in objs)
        return self.core.handle(c.StdinData(data))

    def run(self, task_id="t", prompt="echo hi", **fields):
        return self.send({"kind": "run_task", "task_id": task_id, "prompt": prompt, **fields})

    def start(self, task_id="t", prompt="echo hi", **fields):
        """run_task, the agent started: -> its StartAgent"""
        (start,) = of(self.run(task_id, prompt, **fields), c.StartAgent)
        (started,) = frames(self(c.AgentStarted(task_id, 4242, 0)))
        assert started == {"kind": "task_started", "task_id": task_id, "seq": self.core.sent_seq}
        return start

    def finish(self, task_id="t", code=0, stdout=b"", stderr=b"", remaining=(), oom_kills=0):
        """The agent prints, its output ends, it exits, the sweep is done: -> every action"""
        acts = []
        if stdout:
            acts += self(c.AgentOutput(task_id, "stdout", stdout))
        if stderr:
            acts += self(c.AgentOutput(task_id, "stderr", stderr))
        acts += self(c.AgentOutput(task_id, "stdout", b""))
        acts += self(c.AgentOutput(task_id, "stderr", b""))
        acts += self(c.AgentExited(task_id, code))
        assert c.Cleanup(task_id) in acts
        return acts + self(c.CleanupDone(task_id, tuple(remaining), oom_kills))


# --- startup -------------------------------------------------------------------------------------

def test_ready_frame_log_and_first_heartbeat_timer():
    w = W()
    assert frames(w.ready) == [{"kind": "ready", "worker_id": "w-1", "agent": "shell", "agent_version": "v1.2",
                                "wrapper_version": c.WRAPPER_VERSION, "pid": 7}]
    assert w.ready[1:] == [c.Log("ready: worker w-1 agent shell (v1.2)"), c.StartTimer("heartbeat", 1.0)]


STARTUP_FAILURES = [
    # (env changes, events after Boot, the fatal reason, exit code)
    ({"CORRAL_WORKER_ID": ""}, [], "required environment variable(s) not set: CORRAL_WORKER_ID", 78),
    ({"CORRAL_HEARTBEAT_S": "0"}, [], "CORRAL_HEARTBEAT_S must be a positive number of seconds, not '0'", 78),
    ({"CORRAL_HEARTBEAT_S": "abc"}, [], "CORRAL_HEARTBEAT_S must be a positive number of seconds, not 'abc'", 78),
    ({"CORRAL_HEARTBEAT_S": "inf"}, [], "CORRAL_HEARTBEAT_S must be a positive number of seconds, not 'inf'", 78),
    ({"CORRAL_HEARTBEAT_S": "nan"}, [], "CORRAL_HEARTBEAT_S must be a positive number of seconds, not 'nan'", 78),
    ({"CORRAL_REQUIRED_ENV": "A,,B", "A": "1"}, [], "required environment variable(s) not set: B", 78),
    ({"CORRAL_AGENT": "gpt"}, [], "unknown agent 'gpt' (known: claude, codex, factory, shell)", 78),
    ({}, [c.WorkspaceChecked("Read-only file system")], "workspace /ws is not writable: Read-only file system", 78),
    ({"CORRAL_AGENT": "claude"}, [c.WorkspaceChecked(None), c.ProbeFailed("not_found")],
     "agent CLI 'claude' not found on PATH", 78),
    ({"CORRAL_AGENT": "claude"}, [c.WorkspaceChecked(None), c.ProbeFailed("timeout")],
     "agent CLI version probe 'claude --version' timed out after 20 s", 78),
    ({"CORRAL_AGENT": "codex"}, [c.WorkspaceChecked(None), c.ProbeFailed("error", "Permission denied")],
     "agent CLI version probe 'codex --version' cannot run: Permission denied", 78),
    ({"CORRAL_AGENT": "claude"},
     [c.WorkspaceChecked(None), c.ProbeDone(1, b"", b"claude: version probe failed (CORRAL_STUB_FAIL_PROBE=1)\n")],
     "agent CLI version probe 'claude --version' failed with exit 1: claude: version probe failed "
     "(CORRAL_STUB_FAIL_PROBE=1)", 78),
    ({}, [c.WrapperFailed("cannot start the wrapper's threads: can't start new thread")],
     "cannot start the wrapper's threads: can't start new thread", 70),
]


@pytest.mark.parametrize("env,events,reason,code", STARTUP_FAILURES)
def test_startup_failures_are_fatal(env, events, reason, code):
    core = c.WrapperCore({**ENV, **env}, clock=Clock())
    acts = core.handle(c.Boot())
    for ev in events:
        acts = core.handle(ev)
    assert acts[0] == c.Log("fatal: " + reason)
    assert frames(acts) == [{"kind": "fatal", "reason": reason}]
    assert acts[-1] == c.Exit(code) and core.exit_code == code
    assert core.handle(c.StdinData(b'{"kind":"shutdown"}\n')) == []     # an exited core does nothing


# --- frames in -----------------------------------------------------------------------------------

def run_task(task_id, **fields):
    return {"kind": "run_task", "task_id": task_id, **fields}


def answered(task_id, why, frame=None, **fields):
    return task_id, frame if frame is not None else json.dumps(run_task(task_id, **fields)).encode(), why


ANSWERED = [   # each gets one task_done with status "error" that says what is wrong
    answered("p-int", "prompt must be a string, not a number", prompt=123),
    answered("p-list", "prompt must be a string, not an array", prompt=["a"]),
    answered("p-missing", "prompt must be a string, not null"),
    answered("p-nul", "prompt contains a NUL byte", prompt="echo a\u0000b"),
    answered("p-surrogate", "lone surrogate", prompt="echo \ud800"),
    answered("a-nul", "args[0] contains a NUL byte", prompt="echo", args=["a\u0000"]),
    answered("a-str", "args must be an array of strings, not a string", prompt="echo", args="abc"),
    answered("a-int", "args[0] must be a string, not a number", prompt="echo", args=[1]),
    answered("to-str", "timeout_s must be a positive number", prompt="echo", timeout_s="abc"),
    answered("to-neg", "timeout_s", prompt="echo", timeout_s=-1),
    answered("to-zero", "timeout_s", prompt="echo", timeout_s=0),
    answered("to-bool", "timeout_s", prompt="echo", timeout_s=True),
    answered("to-huge", "timeout_s", prompt="echo", timeout_s=10 ** 400),
    answered("to-nan", "timeout_s", b'{"kind":"run_task","task_id":"to-nan","prompt":"echo","timeout_s":NaN}'),
    answered("mo-neg", "max_output_bytes must be an integer from 0 to 1048576", prompt="echo", max_output_bytes=-5),
    answered("mo-float", "max_output_bytes", prompt="echo", max_output_bytes=1.5),
    answered("mo-bool", "max_output_bytes", prompt="echo", max_output_bytes=True),
    answered("mo-huge", "max_output_bytes", prompt="echo", max_output_bytes=1 << 40),
    answered("bad-utf8", "a frame that is not valid UTF-8",
             b'{"kind":"run_task","task_id":"bad-utf8","prompt":"echo \xff\xfe"}'),
    answered("cut-json", "a frame that is not JSON", b'{"kind":"run_task","task_id":"cut-json","prompt":"echo'),
    answered("huge", "a frame longer than 16777216 bytes",
             b'{"kind":"run_task","task_id":"huge","prompt":"' + b"x" * (17 << 20) + b'"}'),
]
IGNORED = [    # logged and ignored: no task can be named
    b"{not json", b"\xff\xfe\xfd", b"[1,2]", b'"str"', b"42", b"null", b"true", b"{}",
    b'{"kind":"launch"}', b'{"kind":[1]}', b'{"kind":{"a":1}}', b"[" * 100_000,
    b'{"kind":"run_task","task_id":123,"prompt":"echo"}', b'{"kind":"run_task","prompt":"echo"}',
    json.dumps(run_task("x" * 257, prompt="echo")).encode(),
    b'{"kind":"cancel_task","task_id":[1]}', b'{"kind":"cancel_task"}',
    b'{"kind":"cancel_task","task_id":"nope"}', b"   ", b"\x00" * 10,
    b" " * (17 << 20),
]


@pytest.mark.parametrize("task_id,frame,why", ANSWERED, ids=[a[0] for a in ANSWERED])
def test_a_bad_run_task_that_names_its_task_is_answered(task_id, frame, why):
    w = W()
    acts = w.send(frame)
    (d,) = frames(acts)
    assert (d["kind"], d["task_id"], d["status"], d["exit_code"], d["output"]) == \
        ("task_done", task_id, "error", None, "")
    assert d["error"].startswith("invalid run_task: ") and why in d["error"], d["error"]
    assert not of(acts, c.StartAgent) and not w.core.busy
    assert kinds(w.run("next"))[-1] == "StartAgent"        # and the next task runs


@pytest.mark.parametrize("frame", IGNORED, ids=range(len(IGNORED)))
def test_other_bad_frames_are_logged_and_ignored(frame):
    w = W()
    acts = w.send(frame)
    assert frames(acts) == [] and all(isinstance(a, c.Log) for a in acts)
    assert (acts == []) == (frame.strip() == b"" and len(frame) < 100)   # only blank lines go unsaid
    assert kinds(w.run("next"))[-1] == "StartAgent"


def test_a_frame_split_anywhere_is_one_frame_and_stdin_end_reads_the_last_line():
    w = W()
    data = json.dumps(run_task("t", prompt="echo hi")).encode()
    acts = []
    for i in range(len(data)):
        acts += w(c.StdinData(data[i:i + 1]))
    assert acts == []
    acts = w(c.StdinClosed())     # the last line, without its newline
    assert acts == [c.StartAgent("t", ["/bin/sh", "-c", "echo hi"], "/ws", None),
                    c.Log("stdin closed: shutting down"), c.StartTimer("stop", c.STOP_S)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=30), max_size=20))
def test_line_buffer_loses_nothing_whatever_the_chunking(chunks):
    buf = c.LineBuffer(limit=1000)
    lines = [line for chunk in chunks for line, over in buf.feed(chunk)] + [l for l, _ in buf.close()]
    data = b"".join(chunks)
    expected = data.split(b"\n")
    if expected[-1] == b"":
        expected.pop()
    assert lines == expected


def test_line_buffer_keeps_head_and_tail_of_an_oversized_line():
    buf = c.LineBuffer(limit=100)
    out = buf.feed(b"A" * 70) + buf.feed(b"B" * (1 << 20)) + buf.feed(b"C" * 10 + b"\nok\n")
    assert out == [(b"A" * 70 + b"B" * (c.FRAME_KEEP - 70) + (b"B" * (1 << 20) + b"C" * 10 + b"\n")[-c.FRAME_KEEP:], True),
                   (b"ok", False)]
    assert c.LineBuffer(limit=5).feed(b"123456\n12345\n") == [(b"123456" + b"123456\n", True), (b"12345", False)]


# --- tasks ---------------------------------------------------------------------------------------

def test_a_task_from_run_task_to_task_done():
    w = W()
    w.clock.t = 200.0
    start = w.start("t", "echo hi")
    assert start == c.StartAgent("t", ["/bin/sh", "-c", "echo hi"], "/ws", None)
    acts = w(c.AgentOutput("t", "stdout", b"hi\n"))
    assert frames(acts) == [{"kind": "task_output", "task_id": "t", "data": "hi\n", "seq": 2}]
    w.clock.t = 201.5
    acts = w.finish("t", 0)
    assert done_of(acts) == {"kind": "task_done", "task_id": "t", "status": "ok", "exit_code": 0, "output": "hi\n",
                             "error": "", "duration_s": 1.5, "truncated": False, "failure": "", "usage": None,
                             "seq": 3}
    assert not w.core.busy


def test_one_task_at_a_time():
    w = W()
    w.start("a", "sleep 9")
    d = done_of(w.run("b", "echo"))
    assert (d["status"], d["error"]) == ("error", "worker is busy with task a")
    w.finish("a")
    assert kinds(w.run("b", "echo")) == ["StartAgent"]


def test_the_agent_not_starting_fails_the_task_alone():
    w = W()
    w.run("t", "echo")
    exc = OSError(11, "Resource temporarily unavailable")
    d = done_of(w(c.AgentNotStarted("t", "spawn", c.describe_spawn_error(exc))))
    assert d["status"] == "error" and d["error"] == (
        "cannot start the agent: fork failed (Resource temporarily unavailable): the container's process "
        "limit (pids_limit) is exhausted")
    assert c.describe_spawn_error(OSError(7, "Argument list too long")) == \
        "its command line is too long (Argument list too long)"
    w = W("factory")
    w.run("t", "x" * (c.PROMPT_ARGV_MAX + 1))
    d = done_of(w(c.AgentNotStarted("t", "prompt_file", "[Errno 28] No space left on device")))
    assert d["error"] == "cannot write the prompt to a temporary file: [Errno 28] No space left on device"
    assert not w.core.busy


def test_a_driver_error_is_the_task_s_error():
    w = W()
    w.start("t")
    d = done_of(w(c.TaskCrashed("t", "RuntimeError('boom')")))
    assert (d["status"], d["error"]) == ("error", "wrapper error while running the task: RuntimeError('boom')")
    assert w(c.TaskCrashed("t", "again")) == [] and not w.core.busy


LONG = "x" * (c.PROMPT_ARGV_MAX + 1)


CLAUDE = ["--permission-mode", "acceptEdits"]       # CORRAL_PERMISSIONS' default: workspace-write
CODEX = ["--skip-git-repo-check", "-c", "analytics.enabled=false", "-c", "features.plugins=false",
         "--sandbox", "workspace-write"]
DROID = ["--auto", "low"]


@pytest.mark.parametrize("agent,prompt,argv,stdin", [
    ("claude", "hi", ["claude", "-p", "hi", "--output-format", "json", *CLAUDE, "--model", "m"], None),
    ("claude", LONG, ["claude", "-p", "--output-format", "json", *CLAUDE, "--model", "m"], LONG),
    ("claude", "-v", ["claude", "-p", "--output-format", "json", *CLAUDE, "--model", "m"], "-v"),
    ("codex", "hi", ["codex", "exec", "--json", *CODEX, "--model", "m", "hi"], None),
    ("codex", LONG, ["codex", "exec", "--json", *CODEX, "--model", "m", "-"], LONG),
    ("factory", "hi", ["droid", "exec", "-o", "json", *DROID, "--model", "m", "hi"], None),
    ("shell", "hi", ["/bin/sh", "-c", "hi", "--model", "m"], None),
])
def test_command_lines_short_prompts_on_argv_long_ones_on_stdin(agent, prompt, argv, stdin):
    w = W(agent)
    (start,) = w.run("t", prompt, args=["--model", "m"])
    assert start == c.StartAgent("t", argv, "/ws", None if stdin is None else stdin.encode())


@pytest.mark.parametrize("agent,argv,suffix", [
    ("factory", ["droid", "exec", "-o", "json", *DROID, "a1", "-f", "/tmp/p 'x'"], ".txt"),
    ("shell", ["/bin/sh", "-c", ". '/tmp/p '\"'\"'x'\"'\"''", "a1"], ".sh"),
])
def test_long_prompts_in_a_file_that_is_gone_before_the_answer(agent, argv, suffix):
    w = W(agent)
    prompt = "# " + LONG
    assert w.run("t", prompt, args=["a1"]) == [c.WritePromptFile("t", prompt.encode(), suffix)]
    (start,) = w(c.PromptFileWritten("t", "/tmp/p 'x'"))
    assert start == c.StartAgent("t", argv, "/ws", None)
    w(c.AgentStarted("t"))
    acts = w.finish("t", 0, stdout=b"{}")
    i = acts.index(c.RemoveFile("/tmp/p 'x'"))
    assert kinds(acts)[i + 1:] == ["task_done"]


def test_cancel_before_the_prompt_file_is_written():
    w = W("factory")
    w.run("t", LONG)
    assert w.send({"kind": "cancel_task", "task_id": "t"}) == []
    acts = w(c.PromptFileWritten("t", "/tmp/p"))
    assert acts[0] == c.RemoveFile("/tmp/p") and done_of(acts)["status"] == "cancelled"
    assert not of(acts, c.StartAgent)


def test_cancel_before_the_agent_started_kills_it_once_started():
    w = W()
    w.run("t", "sleep 9")
    assert w.send({"kind": "cancel_task", "task_id": "t"}) == []
    acts = w(c.AgentStarted("t"))
    assert kinds(acts) == ["task_started", "KillAgent", "StartTimer"]


# --- output --------------------------------------------------------------------------------------

def test_2mb_of_output_is_chunked_and_its_tail_answered():
    w = W()
    w.start("t", "yes", max_output_bytes=None)
    data = (b"0123456789abcdef\n" * (2097152 // 17 + 1))[:2097152]
    acts = []
    for i in range(0, len(data), 65536):
        acts += w(c.AgentOutput("t", "stdout", data[i:i + 65536]))
    chunks = [f["data"] for f in frames(acts)]
    assert "".join(chunks) == data.decode() and max(len(x) for x in chunks) == c.OUTPUT_CHUNK
    d = done_of(w.finish("t", 0))
    assert (d["status"], d["truncated"], d["output"]) == ("ok", True, data.decode()[-CAP:])


@pytest.mark.parametrize("cap", [0, 1, 1024, 300_000])
def test_max_output_bytes_is_the_tail_cut_on_a_character(cap):
    w = W()
    w.start("t", "x", max_output_bytes=cap)
    text = "é€😀a" * 100_000
    d = done_of(w.finish("t", 0, stdout=text.encode()))
    out = d["output"]
    assert text.endswith(out) and len(out.encode()) <= cap and len(out.encode()) > cap - 4
    assert d["truncated"] is True


def test_output_that_escapes_to_six_bytes_a_character_still_fits_one_frame():
    w = W()
    w.start("t", "x", max_output_bytes=c.MAX_OUTPUT_BYTES)
    data = bytes(range(32)) * 40000
    acts = w.finish("t", 0, stdout=data)
    d = done_of(acts)          # frames() checked each line is under 1 MiB
    assert d["truncated"] and data.decode().endswith(d["output"]) and len(d["output"]) > 100_000


def test_invalid_utf8_split_across_reads_is_decoded_whole():
    w = W()
    w.start("t")
    acts = w(c.AgentOutput("t", "stdout", "é".encode()[:1])) + w(c.AgentOutput("t", "stdout", "é".encode()[1:] + b"\xff"))
    assert [f["data"] for f in frames(acts)] == ["é\ufffd"]
    assert done_of(w.finish("t", 0))["output"] == "é\ufffd"


def test_stderr_goes_to_the_log_by_lines_and_its_tail_is_the_error():
    w = W()
    w.start("t")
    acts = w(c.AgentOutput("t", "stderr", b"one\ntw")) + w(c.AgentOutput("t", "stderr", b"o\n" + b"z" * 5000))
    assert of(acts, c.AgentLog) == [c.AgentLog(b"one\n"), c.AgentLog(b"two\n"), c.AgentLog(b"z" * 5000 + b"\n")]
    acts = w.finish("t", 3, stderr=b"last words")
    assert of(acts, c.AgentLog) == [c.AgentLog(b"last words\n")]
    d = done_of(acts)
    assert (d["status"], d["exit_code"], d["error"]) == ("error", 3, ("one\ntwo\n" + "z" * 5000 + "last words")[-2000:])


# --- time: timeouts, linger, heartbeats ------------------------------------------------------------

def test_timeout_then_kill_then_answer():
    w = W()
    w.clock.t = 10.0
    (start,) = w.run("t", "sleep 30", timeout_s=2)
    w.clock.t = 10.5
    acts = w(c.AgentStarted("t"))
    assert acts[-1] == c.StartTimer("timeout", 1.5)         # the deadline counts from run_task
    w(c.AgentOutput("t", "stdout", b"partial"))
    w.clock.t = 12.0
    assert w(c.TimerFired("timeout")) == [c.KillAgent("t"), c.StartTimer("drain", c.CLEANUP_S)]
    acts = w(c.AgentExited("t", -9)) + w(c.AgentOutput("t", "stdout", b"")) + w(c.AgentOutput("t", "stderr", b""))
    assert acts == [c.CancelTimer("drain"), c.Cleanup("t")]
    d = done_of(w(c.CleanupDone("t", (), 0)))
    assert (d["status"], d["exit_code"], d["output"], d["error"], d["duration_s"]) == \
        ("timeout", -9, "partial", "timed out after 2s", 2.0)
    assert w(c.TimerFired("timeout")) == []                  # a stale timer is ignored


def test_after_a_kill_output_held_open_is_waited_for_only_cleanup_s():
    w = W()
    w.start("t", "sleep 30", timeout_s=1)
    w(c.TimerFired("timeout"))
    assert w(c.AgentExited("t", -9)) == []                    # a grandchild holds its stdout
    assert w(c.TimerFired("drain")) == [c.Cleanup("t")]
    assert done_of(w(c.CleanupDone("t")))["status"] == "timeout"


def test_children_holding_the_output_after_the_agent_exits_are_killed_after_linger():
    w = W()
    w.start("t", "sleep 1000 & echo started")
    w(c.AgentOutput("t", "stdout", b"started\n"))
    assert w(c.AgentExited("t", 0)) == [c.StartTimer("linger", c.LINGER_S)]
    assert w(c.TimerFired("linger")) == [c.KillAgent("t"), c.StartTimer("drain", c.CLEANUP_S)]
    acts = w(c.AgentOutput("t", "stdout", b"")) + w(c.AgentOutput("t", "stderr", b""))
    assert acts == [c.CancelTimer("drain"), c.Cleanup("t")]
    d = done_of(w(c.CleanupDone("t")))
    assert (d["status"], d["exit_code"], d["output"]) == ("ok", 0, "started\n")    # linger is no failure


def test_heartbeats_are_timer_driven_frames():
    w = W(CORRAL_HEARTBEAT_S="2.5")
    assert w.ready[-1] == c.StartTimer("heartbeat", 2.5)
    for seq in (1, 2, 3):
        acts = w(c.TimerFired("heartbeat"))
        assert frames(acts) == [{"kind": "heartbeat", "seq": seq, "sent": 0}] and acts[-1] == c.StartTimer("heartbeat", 2.5)
    assert w(c.TimerFired("grace")) == []                     # not running: ignored


# --- cancel and shutdown ---------------------------------------------------------------------------

def test_cancel_kills_and_answers_cancelled():
    w = W()
    w.start("t", "sleep 30", timeout_s=60)
    assert w.send({"kind": "cancel_task", "task_id": "other"}) == [
        c.Log('ignoring cancel_task for task "other": it is not running')]
    acts = w.send({"kind": "cancel_task", "task_id": "t"})
    assert acts == [c.CancelTimer("timeout"), c.KillAgent("t"), c.StartTimer("drain", c.CLEANUP_S)]
    d = done_of(w.finish("t", -9, stdout=b"so far"))
    assert (d["status"], d["exit_code"], d["output"], d["error"]) == ("cancelled", -9, "so far", "cancelled")


def test_shutdown_when_idle_exits_at_once():
    w = W()
    acts = w.send({"kind": "shutdown", "grace_s": 5}, {"kind": "run_task", "task_id": "late", "prompt": "x"})
    assert acts == [c.Log("shutdown requested"), c.Exit(0)]


def test_shutdown_waits_for_the_task_within_its_grace():
    w = W()
    w.start("t", "sleep 1")
    acts = w.send({"kind": "shutdown", "grace_s": 3}, {"kind": "run_task", "task_id": "late", "prompt": "x"})
    assert acts == [c.Log("shutdown requested"), c.StartTimer("grace", 3.0)]   # nothing read after it
    assert w(c.TimerFired("heartbeat"))                        # heartbeats go on meanwhile
    acts = w.finish("t", 0, stdout=b"done")
    assert done_of(acts)["status"] == "ok" and acts[-1] == c.Exit(0)


def test_shutdown_cancels_the_task_after_its_grace_and_still_answers_it():
    w = W()
    w.start("t", "sleep 30")
    w.send({"kind": "shutdown", "grace_s": 2})
    assert w(c.TimerFired("grace")) == [c.KillAgent("t"), c.StartTimer("drain", c.CLEANUP_S),
                                        c.StartTimer("stop", c.STOP_S)]
    acts = w.finish("t", -9)
    assert done_of(acts)["status"] == "cancelled" and acts[-1] == c.Exit(0)


def test_a_task_that_will_not_end_does_not_hold_the_shutdown():
    w = W()
    w.start("t", "sleep 30")
    w.send({"kind": "shutdown", "grace_s": 0})
    assert w(c.TimerFired("drain")) == [c.Cleanup("t")]
    assert w(c.TimerFired("stop")) == [c.Exit(0)]            # the sweep never reported


@pytest.mark.parametrize("grace", ["abc", -1, None, [1]])
def test_a_bad_grace_is_five_seconds(grace):
    w = W()
    w.start("t", "sleep 30")
    acts = w.send({"kind": "shutdown", "grace_s": grace})
    assert acts[-1] == c.StartTimer("grace", 5.0) and "bad grace_s" in acts[0].text


def test_stdin_closing_is_a_shutdown_without_grace():
    w = W()
    w.start("t", "sleep 30")
    acts = w(c.StdinClosed())
    assert acts == [c.Log("stdin closed: shutting down"), c.KillAgent("t"), c.StartTimer("drain", c.CLEANUP_S),
                    c.StartTimer("stop", c.STOP_S)]
    acts = w.finish("t", -9)
    assert done_of(acts)["status"] == "cancelled" and acts[-1] == c.Exit(0)


# --- the end of a task: OOM, processes that survive it ---------------------------------------------

def test_an_agent_killed_by_the_oom_killer_ends_the_wrapper_137():
    w = W("claude")
    w.start("t", "!oom")
    w(c.AgentStarted("t", 1, oom_kills=3))
    acts = w(c.AgentExited("t", -9)) + w(c.AgentOutput("t", "stdout", b"")) + w(c.AgentOutput("t", "stderr", b""))
    acts = w(c.CleanupDone("t", (), oom_kills=4))
    assert frames(acts) == [{"kind": "fatal", "reason": c.OOM_REASON}] and acts[-1] == c.Exit(137)


def test_a_sigkill_without_an_oom_kill_is_the_task_s_error():
    w = W("claude")
    w.start("t")
    d = done_of(w.finish("t", -9, oom_kills=0))
    assert (d["status"], d["exit_code"]) == ("error", -9) and "no JSON result" in d["error"]


def test_processes_that_cannot_be_killed_end_the_wrapper_70_after_the_answer():
    w = W()
    w.start("t")
    acts = w.finish("t", 0, stdout=b"ok", remaining=(31, 12))
    assert [f["kind"] for f in frames(acts)] == ["task_output", "task_done", "fatal"]
    assert frames(acts)[2]["reason"] == "cannot clean up after task t: 2 processes remain (pids 12 31)"
    assert acts[-1] == c.Exit(70)


# --- result parsers (the agent table) --------------------------------------------------------------

def result(text, is_error=False):
    return render("result_json", text, is_error)[0]


def codex(text, is_error=False):
    return render("codex_jsonl", text, is_error)[0]


@pytest.mark.parametrize("agent,code,stdout,stderr,expected", [
    ("claude", 0, result("hi"), b"", ("ok", "hi", "")),
    ("claude", 0, result("bad", True), b"", ("error", "bad", "bad")),
    ("claude", 1, result("hi"), b"", ("error", "hi", "hi")),
    ("claude", 0, b"progress\n" + result("hi"), b"", ("ok", "hi", "")),
    ("claude", 2, b"", b"auth failed\n", ("error", "", "agent printed no JSON result (exit 2): auth failed")),
    ("factory", 0, b'{"message": {"a": 1}}', b"", ("ok", '{"a": 1}', "")),
    ("codex", 0, codex("hi"), b"", ("ok", "hi", "")),
    ("codex", 1, codex("rate limited", True), b"", ("error", "", "rate limited")),
    ("codex", 0, b'{"type":"error","message":"Reconnecting... 1/5"}\nnot json\n', b"", ("ok", "", "")),  # transient
    ("codex", 1, b'{"type":"error","message":"boom"}\nnot json\n', b"", ("error", "", "boom")),
    ("shell", 0, b"out", b"", ("ok", "out", "")),
    ("shell", 3, b"out", b"", ("error", "out", "exit 3")),
])
def test_result_parsers(agent, code, stdout, stderr, expected):
    w = W(agent)
    w.start("t")
    d = done_of(w.finish("t", code, stdout=stdout, stderr=stderr))
    assert (d["status"], d["output"], d["error"]) == expected


# --- the stub agent's plan --------------------------------------------------------------------------

def answer(cli, argv, env=None, stdin="", files=None):
    return stub_plan(cli, argv, env or {}, read_stdin=lambda: stdin, read_file=(files or {}).__getitem__)


@pytest.mark.parametrize("agent", ["claude", "factory", "codex"])
def test_stub_answers_in_the_real_format_and_the_real_parser_reads_it(agent):
    a = table.AGENTS[agent]
    plan = answer(a.cli, a.command("hello", [], None)[1:])
    assert (plan.exit_code, plan.then, plan.sleep_s, plan.stderr) == (0, "exit", 0.0, b"")
    assert a.parse(0, plan.stdout.decode(), "")[:3] == ("ok", f"stub-{agent}: hello", "")
    plan = answer(a.cli, a.command("!exit 3", [], None)[1:])
    assert plan.exit_code == 3 and a.parse(3, plan.stdout.decode(), "")[0] == "error"
    assert answer(a.cli, ["--version"]) == StubPlan(stdout=(a.stub_version + "\n").encode())
    failing = answer(a.cli, ["--version"], {"CORRAL_STUB_FAIL_PROBE": "1"})
    assert failing.exit_code == 1 and b"version probe failed (CORRAL_STUB_FAIL_PROBE=1)" in failing.stderr


@pytest.mark.parametrize("agent,argv,stdin,files", [
    ("claude", ["-p", "--output-format", "json"], "-p long", None),
    ("codex", ["exec", "--json", "-"], "-p long", None),
    ("factory", ["exec", "-o", "json", "-f", "/f"], None, {"/f": "-p long"}),
    ("shell", ["-c", ". '/f'", "a"], None, {"/f": "-p long"}),
])
def test_stub_takes_long_prompts_where_the_wrapper_puts_them(agent, argv, stdin, files):
    a = table.AGENTS[agent]
    plan = answer(a.cli, argv, stdin=stdin, files=files)
    assert a.parse(0, plan.stdout.decode(), plan.stderr.decode())[1] == f"stub-{agent}: -p long"


@pytest.mark.parametrize("prompt,expected", [
    ("!sleep 2.5 done", dict(sleep_s=2.5, exit_code=0, then="exit", text="stub-claude: done")),
    ("!sleep", dict(sleep_s=1.0, exit_code=0, then="exit", text="stub-claude: slept")),
    ("!exit", dict(sleep_s=0.0, exit_code=1, then="exit", text="stub-claude: exiting with 1")),
    ("!exit 300", dict(sleep_s=0.0, exit_code=44, then="exit", text="stub-claude: exiting with 300")),
    ("!exit x", dict(sleep_s=0.0, exit_code=2, then="exit", text="stub-claude: !exit needs an integer exit code")),
    ("!sleep -1", dict(sleep_s=0.0, exit_code=2, then="exit", text="stub-claude: !sleep needs a number of seconds")),
    ("!sleep nan", dict(sleep_s=0.0, exit_code=2, then="exit", text="stub-claude: !sleep needs a number of seconds")),
    ("!crash-wrapper", dict(sleep_s=0.2, exit_code=1, then="kill_wrapper", text=None)),
    ("!oom", dict(sleep_s=0.0, exit_code=-9, then="oom", text=None)),
    ("  hello  world ", dict(sleep_s=0.0, exit_code=0, then="exit", text="stub-claude:   hello  world ")),
])
def test_stub_directives(prompt, expected):
    plan = answer("claude", ["-p", prompt, "--output-format", "json"])
    assert (plan.sleep_s, plan.exit_code, plan.then) == (expected["sleep_s"], expected["exit_code"], expected["then"])
    if expected["text"] is None:
        assert plan.stdout == b""
    else:
        assert json.loads(plan.stdout)["result"] == expected["text"]
    if plan.then == "kill_wrapper":
        assert b"killing the worker-wrapper" in plan.stderr


def test_the_shell_stand_in_answers_the_probe_and_scripts():
    probe = table.AGENTS["shell"].probe
    assert answer("sh", probe[1:]) == StubPlan(stdout=b"sh\n")
    assert answer("sh", ["-c", "echo hi", "a"]).stdout == b"stub-shell: echo hi"
    plan = answer("sh", ["-c", "!exit 4"])
    assert (plan.exit_code, plan.stdout, plan.stderr) == (4, b"", b"stub-shell: exiting with 4\n")


@pytest.mark.parametrize("agent", sorted(table.AGENTS))
@pytest.mark.parametrize("args", [[], ["--model", "m", "two words"]])
def test_the_stub_reads_the_prompt_where_the_command_line_puts_it(agent, args):
    """The agent table's prompt_in is the inverse of its command line, both ways a prompt goes."""
    a = table.AGENTS[agent]
    assert a.prompt_in(a.command("hello there", list(args), None)[1:]) == ("argv", "hello there")
    indirect = "-" if a.indirect == "stdin" else "/tmp/corral-prompt-1" + a.prompt_suffix
    where = a.prompt_in(a.command("-long", list(args), indirect)[1:])
    assert where == (("stdin", None) if a.indirect == "stdin" else ("file", indirect))


def test_a_prompt_file_that_cannot_be_read_is_the_agent_s_error():
    plan = answer("droid", ["exec", "-o", "json", "-f", "/nope"])
    result = table.AGENTS["factory"].parse(plan.exit_code, plan.stdout.decode(), plan.stderr.decode())
    assert plan.exit_code == 2 and "cannot read the prompt" in result.error    # as droid: on stderr
