"""The real worker-wrapper as a process on the host: one bad task, request or output can only ever
fail itself.

Every line the wrapper writes is decoded with the actor's own decode_wrapper_frame (which enforces
the 1 MiB frame limit); any line that does not decode fails the test. On the host the wrapper
sweeps only its own descendants, so these tests also check that it leaves other processes alone.
"""

import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from runtime.protocol import MAX_LINE, TaskDone, decode_wrapper_frame

ROOT = Path(__file__).resolve().parents[2]
WRAPPER = ROOT / "runtime" / "wrapper" / "wrapper.py"
STUB = ROOT / "runtime" / "wrapper" / "stub_agent.py"
CAP = 256 * 1024          # the default max_output_bytes
STUB_CLI = {"claude": "claude", "factory": "droid", "codex": "codex"}


def expected_tail(text: str, cap: int) -> tuple[str, bool]:
    """What task_done.output must be: the tail of ``text`` in at most ``cap`` UTF-8 bytes, cut on
    a character boundary."""
    data = text.encode()
    if len(data) <= cap:
        return text, False
    data = data[len(data) - cap:]
    while data and data[0] & 0xC0 == 0x80:
        data = data[1:]
    return data.decode(), True


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:].split()[0] != b"Z"


class Wrapper:
    """One wrapper process: frames in on stdin, every stdout line decoded as a frame."""

    def __init__(self, tmp: Path, agent: str = "shell", env: dict | None = None,
                 argv: list[str] | None = None):
        self.tmp = tmp
        self.bin = tmp / "bin"
        self.workspace = tmp / "workspace"
        self.tmpdir = tmp / "tmp"
        for d in (self.bin, self.workspace, self.tmpdir):
            d.mkdir(parents=True, exist_ok=True)
        stub = self.bin / "stub_agent.py"      # as the images install it: executable, symlinked
        shutil.copy(STUB, stub)
        stub.chmod(0o755)
        for cli in STUB_CLI.values():
            if not (self.bin / cli).exists():
                (self.bin / cli).symlink_to(stub)
        full_env = {**os.environ, "CORRAL_WORKER_ID": "w-test", "CORRAL_AGENT": agent,
                    "CORRAL_WORKSPACE": str(self.workspace), "CORRAL_HEARTBEAT_S": "30",
                    "TMPDIR": str(self.tmpdir), "PATH": f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        full_env.pop("CORRAL_SWEEP", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(argv or [sys.executable, str(WRAPPER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env)
        self.frames: queue.Queue = queue.Queue()
        self.done: dict[str, list[TaskDone]] = {}
        self.bad_lines: list[str] = []
        self.longest = 0
        self.stderr = bytearray()
        self._cond = threading.Condition()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        ready = self.frames.get(timeout=20)
        assert type(ready).__name__ == "Ready", ready

    def _read_stdout(self):
        for line in self.proc.stdout:
            body = line.rstrip(b"\n")
            self.longest = max(self.longest, len(line))
            try:
                frame = decode_wrapper_frame(body)
                if len(line) >= MAX_LINE:
                    raise ValueError(f"line of {len(line)} bytes")
            except Exception as exc:   # noqa: BLE001 - recorded, and fails the test
                self.bad_lines.append(f"{exc}: {body[:200]!r}")
                continue
            with self._cond:
                if isinstance(frame, TaskDone):
                    self.done.setdefault(frame.task_id, []).append(frame)
                self._cond.notify_all()
            self.frames.put(frame)

    def _read_stderr(self):
        for line in self.proc.stderr:
            self.stderr += line

    def send(self, frame) -> None:
        data = frame if isinstance(frame, bytes) else json.dumps(frame).encode()
        self.proc.stdin.write(data + b"\n")
        self.proc.stdin.flush()

    def wait_done(self, task_id: str, timeout: float = 30) -> TaskDone:
        deadline = time.monotonic() + timeout
        with self._cond:
            while task_id not in self.done:
                left = deadline - time.monotonic()
                assert left > 0, f"no task_done for {task_id!r}; stderr: {self.stderr[-2000:]!r}"
                assert self.proc.poll() is None, f"wrapper died; stderr: {self.stderr[-2000:]!r}"
                self._cond.wait(min(left, 0.2))
        assert not self.bad_lines, self.bad_lines
        return self.done[task_id][0]

    def run(self, task_id: str, prompt: str, timeout: float = 60, **fields) -> TaskDone:
        self.send({"kind": "run_task", "task_id": task_id, "prompt": prompt, **fields})
        return self.wait_done(task_id, timeout)

    def close(self) -> int:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            code = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        assert not self.bad_lines, self.bad_lines
        return code


@pytest.fixture
def wrapper_factory(tmp_path):
    made = []

    def make(agent="shell", **kw):
        w = Wrapper(tmp_path / f"{agent}-{len(made)}", agent, **kw)
        made.append(w)
        return w
    yield make
    for w in made:
        if w.proc.poll() is None:
            w.close()


@pytest.fixture
def shell(wrapper_factory):
    return wrapper_factory("shell")


# --- output ------------------------------------------------------------------------------------

def test_2mb_output_is_cut_to_its_tail(shell):
    d = shell.run("t-big", "yes 0123456789abcdef | head -c 2097152")
    full = (b"0123456789abcdef\n" * (2097152 // 17 + 1))[:2097152].decode()
    assert (d.status, d.exit_code, d.truncated) == ("ok", 0, True)
    assert len(d.output.encode()) == CAP and d.output == full[-CAP:]
    d = shell.run("t-small-cap", "yes 0123456789abcdef | head -c 2097152", max_output_bytes=1024)
    assert d.truncated and d.output == full[-1024:]
    d = shell.run("t-fits", "echo hello", max_output_bytes=1024)
    assert (d.status, d.output, d.truncated) == ("ok", "hello\n", False)
    assert shell.longest < MAX_LINE


def test_a_2mb_line_without_newline(shell):
    d = shell.run("t-line", "head -c 2097152 /dev/zero | tr '\\0' y")
    assert (d.status, d.truncated, d.output) == ("ok", True, "y" * CAP)
    assert shell.run("t-next", "echo next").output == "next\n"


def test_arbitrary_binary_bytes(shell):
    data = random.Random(7).randbytes(3 << 20)
    (shell.workspace / "data.bin").write_bytes(data)
    d = shell.run("t-bin", "cat data.bin")
    assert d.status == "ok"
    assert (d.output, d.truncated) == expected_tail(data.decode(errors="replace"), CAP)
    assert len(d.output.encode()) <= CAP


def test_control_characters_that_escape_to_six_bytes(shell):
    data = bytes(range(32)) * 40000 + b"\x7fEND"
    (shell.workspace / "ctl.bin").write_bytes(data)
    d = shell.run("t-ctl", "cat ctl.bin")
    text = data.decode()
    assert d.status == "ok" and d.truncated
    # cut to the cap, then further so that its JSON escaping fits in one frame
    assert text.endswith(d.output) and len(d.output) > 100_000
    assert len(json.dumps(d.output).encode()) < MAX_LINE


def test_output_of_a_timed_out_task_is_capped_too(shell):
    d = shell.run("t-to", "yes abcdefgh | head -c 2999997; sleep 30", timeout_s=2)
    assert (d.status, d.truncated) == ("timeout", True)
    assert len(d.output.encode()) <= CAP and d.output.endswith("abcdefgh\n")


# --- long prompts ------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [300 * 1024, 1 << 20])
def test_long_shell_prompt_keeps_args_as_positional_parameters(shell, size):
    script = "printf '%s|' \"$0\" \"$@\"; echo"
    args = ["zero", "one", "two words"]
    short = shell.run("t-short", script, args=args)
    assert (short.status, short.output) == ("ok", "zero|one|two words|\n")
    long_prompt = "# " + "x" * size + "\n" + script
    d = shell.run("t-long", long_prompt, args=args)
    assert (d.status, d.output) == ("ok", short.output), d.error
    assert os.listdir(shell.tmpdir) == []        # the script file is gone


@pytest.mark.parametrize("agent", ["claude", "codex", "factory"])
@pytest.mark.parametrize("size", [300 * 1024, 1 << 20])
def test_long_prompt_on_stub_agents(wrapper_factory, agent, size):
    w = wrapper_factory(agent)
    rng = random.Random(size)
    prompt = "p" + "".join(rng.choice("abcdé€ \n\t\"\\") for _ in range(size // 2))
    prompt = prompt.encode()[:size].decode(errors="ignore")
    d = w.run("t-long", prompt, max_output_bytes=512 * 1024)
    expected, cut = expected_tail(f"stub-{agent}: {prompt}", 512 * 1024)
    assert (d.status, d.exit_code) == ("ok", 0), d.error
    assert (d.output, d.truncated) == (expected, cut)
    d = w.run("t-default-cap", prompt)
    assert (d.output, d.truncated) == expected_tail(f"stub-{agent}: {prompt}", CAP)
    # directives work on every path, and prompts that look like options are prompts
    d = w.run("t-exit", "!exit 3" + " " * (200 * 1024))
    assert (d.status, d.exit_code) == ("error", 3)
    d = w.run("t-dash", "-v is not an option")
    assert (d.status, d.output) == ("ok", f"stub-{agent}: -v is not an option")
    d = w.run("t-short", "hello")
    assert (d.status, d.output) == ("ok", f"stub-{agent}: hello")
    assert os.listdir(w.tmpdir) == []            # droid's prompt file is gone


# --- bad frames ----------------------------------------------------------------------------------

def run_task(task_id, **fields):
    return {"kind": "run_task", "task_id": task_id, **fields}


def answered(task_id, why, frame=None, **fields):
    return task_id, frame if frame is not None else json.dumps(run_task(task_id, **fields)).encode(), why


ANSWERED = [   # each gets one task_done with status "error" that says what is wrong
    answered("p-int", "prompt must be a string", prompt=123),
    answered("p-list", "prompt must be a string", prompt=["a"]),
    answered("p-missing", "prompt must be a string"),
    answered("p-nul", "NUL", prompt="echo a\u0000b"),
    answered("p-surrogate", "surrogate", prompt="echo \ud800"),
    answered("a-nul", "NUL", prompt="echo", args=["a\u0000"]),
    answered("a-str", "args must be an array", prompt="echo", args="abc"),
    answered("a-int", "args[0] must be a string", prompt="echo", args=[1]),
    answered("a-obj", "args must be an array", prompt="echo", args={"a": 1}),
    answered("to-str", "timeout_s", prompt="echo", timeout_s="abc"),
    answered("to-neg", "timeout_s", prompt="echo", timeout_s=-1),
    answered("to-zero", "timeout_s", prompt="echo", timeout_s=0),
    answered("to-bool", "timeout_s", prompt="echo", timeout_s=True),
    answered("to-huge", "timeout_s", prompt="echo", timeout_s=10 ** 400),
    answered("mo-str", "max_output_bytes", prompt="echo", max_output_bytes="x"),
    answered("mo-neg", "max_output_bytes", prompt="echo", max_output_bytes=-5),
    answered("mo-float", "max_output_bytes", prompt="echo", max_output_bytes=1.5),
    answered("mo-bool", "max_output_bytes", prompt="echo", max_output_bytes=True),
    answered("mo-huge", "max_output_bytes", prompt="echo", max_output_bytes=1 << 40),
    answered("to-nan", "timeout_s", b'{"kind":"run_task","task_id":"to-nan","prompt":"echo","timeout_s":NaN}'),
    answered("bad-utf8", "UTF-8", b'{"kind":"run_task","task_id":"bad-utf8","prompt":"echo \xff\xfe"}'),
    answered("cut-json", "not JSON", b'{"kind":"run_task","task_id":"cut-json","prompt":"echo'),
    answered("huge", "longer than",
             b'{"kind":"run_task","task_id":"huge","prompt":"' + b"x" * (17 << 20) + b'"}'),
]
IGNORED = [    # logged and ignored: no task can be named
    b"{not json", b"\xff\xfe\xfd", b"[1,2]", b'"str"', b"42", b"null", b"true", b"{}",
    b'{"kind":"launch"}', b'{"kind":[1]}', b'{"kind":{"a":1}}', b"[" * 100_000,
    b'{"kind":"run_task","task_id":123,"prompt":"echo"}', b'{"kind":"run_task","prompt":"echo"}',
    b'{"kind":"run_task","task_id":["x"],"prompt":"echo"}',
    json.dumps(run_task("x" * 300, prompt="echo")).encode(),
    b'{"kind":"cancel_task","task_id":[1]}', b'{"kind":"cancel_task"}',
    b'{"kind":"cancel_task","task_id":"nope"}', b"", b"   ",
]


def test_no_frame_can_crash_the_wrapper_or_go_unanswered(shell):
    for frame in IGNORED:
        shell.send(frame)
    for _, frame, _ in ANSWERED:
        shell.send(frame)
    d = shell.run("good", "echo fine")
    assert (d.status, d.output) == ("ok", "fine\n")
    for tid, _, why in ANSWERED:
        got = shell.wait_done(tid, timeout=5)
        assert got.status == "error" and why in got.error, (tid, got.error)
    assert {t: len(v) for t, v in shell.done.items()} == {t: 1 for t in ["good"] + [a[0] for a in ANSWERED]}
    assert shell.proc.poll() is None
    assert shell.close() == 0


def test_busy_and_cancel_and_shutdown_with_a_bad_grace(shell):
    shell.send(run_task("long", prompt="sleep 30"))
    d = shell.run("second", "echo no")
    assert d.status == "error" and "busy with task long" in d.error
    shell.send({"kind": "cancel_task", "task_id": "long"})
    d = shell.wait_done("long", timeout=10)
    assert d.status == "cancelled" and d.duration_s < 10
    shell.send({"kind": "shutdown", "grace_s": "abc"})
    assert shell.proc.wait(10) == 0


# --- no process of a task survives it ----------------------------------------------------------

LEAVE_BEHIND = """
sleep 1000 & echo $!
setsid sleep 1000 & echo $!
sleep 1000 >/dev/null 2>&1 & echo $!
setsid sh -c 'sleep 1000 & echo $!; sleep 1000' >/dev/null 2>&1 &
(setsid sleep 1000 >/dev/null 2>&1 & echo $!)
sh -c 'trap "" TERM HUP; exec sleep 1000' & echo $!
"""


@pytest.mark.parametrize("how", ["exits", "timeout", "cancel"])
def test_children_left_behind_are_gone_after_task_done(shell, how):
    bystander = subprocess.Popen(["sleep", "1000"])    # not the wrapper's: it must survive
    try:
        t0 = time.monotonic()
        if how == "exits":
            d = shell.run("t-leave", LEAVE_BEHIND)
            assert d.status == "ok"
        elif how == "timeout":
            d = shell.run("t-leave", LEAVE_BEHIND + "sleep 1000", timeout_s=1)
            assert d.status == "timeout"
        else:
            shell.send(run_task("t-leave", prompt=LEAVE_BEHIND + "sleep 1000"))
            time.sleep(1)
            shell.send({"kind": "cancel_task", "task_id": "t-leave"})
            d = shell.wait_done("t-leave")
            assert d.status == "cancelled"
        assert time.monotonic() - t0 < 10
        pids = [int(p) for p in d.output.split()]
        assert len(pids) == 5
        assert [p for p in pids if pid_alive(p)] == []
        assert descendants(shell.proc.pid) == []
        assert pid_alive(bystander.pid)
        assert shell.run("t-next", "echo next").output == "next\n"
    finally:
        bystander.kill()
        bystander.wait()


def descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2:].split()
            if fields[0] != b"Z":
                kids.setdefault(int(fields[1]), []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def test_a_task_that_forks_many_children_ends_and_leaves_nothing(shell):
    # a small, bounded fork storm (the unbounded fork bomb runs in Docker, under a pids limit)
    d = shell.run("t-storm", "for i in $(seq 200); do (sleep 1000 &) ; done; echo started",
                  timeout_s=20)
    assert (d.status, d.output) == ("ok", "started\n")
    assert descendants(shell.proc.pid) == []


# the wrapper as it runs, but unable to kill a process named "immortal"
IMMORTAL_WRAPPER = """
import os, runpy, sys
real_kill = os.kill
def kill(pid, sig):
    try:
        with open("/proc/%d/comm" % pid) as f:
            if f.read().strip() == "immortal":
                return
    except OSError:
        pass
    real_kill(pid, sig)
os.kill = kill
os.killpg = lambda pgid, sig: None
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_processes_that_cannot_be_killed_end_the_wrapper_with_fatal(wrapper_factory):
    w = wrapper_factory(argv=[sys.executable, "-c", IMMORTAL_WRAPPER, str(WRAPPER)])
    shutil.copy("/bin/sleep", w.workspace / "immortal")
    d = w.run("t-x", "./immortal 1000 >/dev/null 2>&1 & echo $!; sleep 1000 & echo $!")
    immortal, mortal = (int(p) for p in d.output.split())
    try:
        assert d.status == "ok"                      # the task's answer comes first
        assert w.proc.wait(20) == 70
        fatal = [f for f in list(w.frames.queue) if type(f).__name__ == "Fatal"]
        assert len(fatal) == 1 and fatal[0].reason.startswith(
            f"cannot clean up after task t-x: 1 processes remain (pids {immortal})"), fatal
        assert pid_alive(immortal) and not pid_alive(mortal)
    finally:
        os.kill(immortal, signal.SIGKILL)


# --- fuzzing -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_wrappers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    ws = {"shell": Wrapper(tmp / "shell", "shell"), "claude": Wrapper(tmp / "claude", "claude")}
    yield ws
    for w in ws.values():
        assert w.proc.poll() is None, "the wrapper died"
        assert w.close() == 0


counter = iter(range(10**9))
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=6)
texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=60)
prompts = texts | st.builds(lambda t, n: t * n, texts.filter(bool), st.integers(1, 3000))
run_tasks = st.fixed_dictionaries(
    {"kind": st.just("run_task"), "task_id": texts | json_values, "prompt": prompts | json_values},
    optional={"args": st.lists(texts, max_size=3) | json_values,
              "timeout_s": st.floats(0.001, 30) | json_values,
              "max_output_bytes": st.integers(0, 300_000) | json_values | st.none()})
frames = st.lists(json_values | run_tasks | st.fixed_dictionaries(
    {"kind": st.just("cancel_task"), "task_id": texts | json_values}), max_size=6)


def stub_safe(frame):
    """Unique task ids; no stub directive (!crash-wrapper would end the shared wrapper)."""
    if not isinstance(frame, dict) or frame.get("kind") not in ("run_task", "cancel_task"):
        if isinstance(frame, dict) and frame.get("kind") == "shutdown":
            frame = {**frame, "kind": "not-shutdown"}
        return frame
    frame = dict(frame)
    if isinstance(frame.get("task_id"), str):
        frame["task_id"] = f"fz{next(counter)}-{frame['task_id']}"
    p = frame.get("prompt")
    if isinstance(p, str) and p.strip().split()[:1] and p.strip().split()[0].startswith("!"):
        frame["prompt"] = "x" + p
    return frame


def answerable(frame) -> bool:
    return isinstance(frame, dict) and frame.get("kind") == "run_task" \
        and isinstance(frame.get("task_id"), str) and len(frame["task_id"]) <= 256


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=frames, data=st.binary(max_size=3000) | st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=40),
                                                                st.integers(1, 20000)),
       cap=st.none() | st.integers(0, 300_000))
def test_fuzz_frames_prompts_and_output(fuzz_wrappers, frames, data, cap):
    sh, cl = fuzz_wrappers["shell"], fuzz_wrappers["claude"]
    # arbitrary bytes printed by the agent
    (sh.workspace / "f.bin").write_bytes(data)
    tid = f"bin{next(counter)}"
    d = sh.run(tid, "cat f.bin", **({} if cap is None else {"max_output_bytes": cap}))
    want, cut = expected_tail(data.decode(errors="replace"), CAP if cap is None else cap)
    assert d.status == "ok"
    assert (d.output, d.truncated) == (want, cut) or (d.truncated and want.endswith(d.output))
    # arbitrary frames (and prompts) to an agent
    frames = [stub_safe(f) for f in frames]
    for f in frames:
        cl.send(json.dumps(f).encode())
    expected = [f["task_id"] for f in frames if answerable(f)]
    for t in expected:
        done = cl.wait_done(t, timeout=60)
        f = next(f for f in frames if answerable(f) and f["task_id"] == t)
        event(f"task_done {done.status}")
        if done.status == "ok":
            fcap = f.get("max_output_bytes")
            fcap = CAP if fcap is None else fcap
            assert (done.output, done.truncated) == expected_tail(f"stub-claude: {f['prompt']}", fcap)
    sentinel = f"ok{next(counter)}"
    assert cl.run(sentinel, "hello").output == "stub-claude: hello"
    for t in expected:
        assert len(cl.done[t]) == 1, t
    assert sh.proc.poll() is None and cl.proc.poll() is None
