#!/usr/bin/env python3
"""corral worker-wrapper: the entrypoint inside every worker container.

Standard library only; runs on any python3 >= 3.9. Speaks one JSON object per line on stdout to
its Worker actor, reads frames on stdin, and writes human-readable logs to stderr.

Environment: CORRAL_WORKER_ID, CORRAL_AGENT (claude|factory|codex|shell), CORRAL_REQUIRED_ENV
(comma-separated names), CORRAL_HEARTBEAT_S, CORRAL_WORKSPACE (default /workspace).

One bad task, request or output can only ever fail itself:

- Every line written to stdout is shorter than the actor's 1 MiB frame limit, whatever the agent
  prints (huge lines, no newline, binary bytes, invalid UTF-8, control characters): task_output
  frames carry at most 16 KiB of output each, and ``task_done.output`` holds at most the task's
  ``max_output_bytes`` (default 256 KiB) UTF-8 bytes: the TAIL of the output, cut on a character
  boundary, with ``truncated`` true when cut (it is cut further when its JSON escaping would not
  fit in one frame). Memory stays bounded: only the last 4 MiB of the agent's stdout (for the
  claude/droid/codex result parsers) and the last 64 KiB of its stderr are kept.
- Prompts: up to 64 KiB (UTF-8) that do not start with "-" go on the documented command line.
  Longer ones (or ones starting with "-", which a CLI would take for an option) go the way each
  CLI accepts them: claude ``claude -p --output-format json ARGS`` with the prompt on stdin;
  codex ``codex exec --json ARGS -`` with the prompt on stdin; factory ``droid exec -o json ARGS
  -f FILE``; shell ``/bin/sh -c '. FILE' ARGS`` (the script in FILE, so the args are the
  positional parameters exactly as with ``sh -c PROMPT ARGS``). FILE is a private (0600)
  temporary file, removed when the task ends.
- No process of a task survives it: when a task ends (done, timeout, cancel, or the agent exiting
  while its children linger on), the agent's process group is killed, then /proc is swept and
  every remaining process is SIGKILLed until none remain (at most ~2 s). The wrapper is a child
  subreaper, so orphans of the task stay its descendants. What is swept: when the wrapper is the
  container's main process (pid 1, or the child of an init whose command line ends with the
  wrapper's own), every process of the pid namespace but pid 1, the wrapper and its ancestors;
  anywhere else (e.g. on a host) only the wrapper's descendants. If processes cannot be killed,
  the wrapper writes ``fatal`` and exits 70, so that the actor replaces the container. No thread
  is started per task (a fork bomb may exhaust the pids limit): one long-lived task thread runs
  the agent, its I/O, its timeout and its cleanup.
- Frames from the actor are never trusted: undecodable frames, non-objects, unknown kinds and bad
  fields are logged and ignored; a run_task whose task_id is usable (a string of at most 256
  characters) but which is otherwise invalid gets a task_done with status "error" saying why.
"""

import codecs
import errno
import json
import math
import os
import queue
import re
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

WRAPPER_VERSION = "2"
EX_CONFIG = 78
EX_SOFTWARE = 70

MAX_LINE = 1 << 20                  # the actor's frame limit (runtime/protocol.py MAX_LINE)
FRAME_BUDGET = MAX_LINE - (64 << 10)  # JSON-encoded bytes of the one big field of a frame
OUTPUT_CHUNK = 16 * 1024            # raw bytes of agent output per task_output frame
DEFAULT_OUTPUT_BYTES = 256 * 1024
MAX_OUTPUT_BYTES = MAX_LINE
STDOUT_TAIL = 4 << 20               # kept for the result parsers
STDERR_TAIL = 64 << 10
ERROR_CHARS = 4000
MAX_TASK_ID = 256
MAX_FRAME_IN = 16 << 20             # longest line accepted from the actor
PROMPT_ARGV_MAX = 64 * 1024         # longer prompts go on stdin or in a file
LINGER_S = 0.5                      # output still read after the agent exits, then its children die
CLEANUP_S = 2.0
PR_SET_CHILD_SUBREAPER = 36

_out_lock = threading.Lock()
_stdout = sys.stdout.buffer


# --- frames out ------------------------------------------------------------------------------

def _dumps(obj):
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:   # a lone surrogate somewhere: escape everything
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


def _encode_frame(fields):
    data = _dumps(fields)
    while len(data) >= MAX_LINE:
        # last resort (the fields are sized to fit already): halve the longest string, keep its tail
        name = max((k for k, v in fields.items() if isinstance(v, str)), key=lambda k: len(fields[k]))
        fields[name] = fields[name][len(fields[name]) // 2:]
        if fields.get("kind") == "task_done" and name == "output":
            fields["truncated"] = True
        data = _dumps(fields)
    return data + b"\n"


def send(kind, **fields):
    fields["kind"] = kind
    try:
        data = _encode_frame(fields)
    except Exception as exc:   # never let a frame take the wrapper down
        log("cannot encode a %s frame: %r" % (kind, exc))
        return
    with _out_lock:
        try:
            _stdout.write(data)
            _stdout.flush()
        except (OSError, ValueError) as exc:
            log("cannot write a %s frame: %s" % (kind, exc))


def log(msg):
    try:
        sys.stderr.write("[wrapper] %s\n" % msg)
        sys.stderr.flush()
    except Exception:
        pass


# --- output limits -------------------------------------------------------------------------

def _clean(text):
    """Any str -> one that encodes as UTF-8 (lone surrogates become '?')."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _json_len(text):
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8")) - 2


def fit_output(text, cap, budget=FRAME_BUDGET):
    """The tail of ``text`` in at most ``cap`` UTF-8 bytes, cut on a character boundary, and
    further cut if its JSON escaping would exceed ``budget`` bytes. Returns (text, truncated)."""
    data = text.encode("utf-8", "replace")
    truncated = False
    if len(data) > cap:
        data = data[len(data) - cap:]
        i = 0
        while i < len(data) and i < 4 and (data[i] & 0xC0) == 0x80:
            i += 1
        data = data[i:]
        truncated = True
    text = data.decode("utf-8", "replace")
    if _json_len(text) > budget:
        lo, hi = 0, len(text)   # the smallest start whose tail fits
        while lo < hi:
            mid = (lo + hi) // 2
            if _json_len(text[mid:]) <= budget:
                hi = mid
            else:
                lo = mid + 1
        text = text[lo:]
        truncated = True
    return text, truncated


def clip_error(text, limit=ERROR_CHARS):
    text = _clean(text if isinstance(text, str) else str(text))
    if len(text) > limit:
        head = limit // 4
        text = text[:head] + " [...] " + text[len(text) - (limit - head):]
    return text


# --- agent adapters: real command lines, real output formats ---------------------------------

def _last_json_object(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except (ValueError, RecursionError):
                continue
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _result_json(exit_code, stdout, stderr):
    """claude -p --output-format json and droid exec -o json: one result object."""
    obj = _last_json_object(stdout)
    if not isinstance(obj, dict):
        err = (stderr.strip() or stdout.strip() or "no JSON result")[-2000:]
        return "error", "", "agent printed no JSON result (exit %s): %s" % (exit_code, err)
    text = obj.get("result")
    if text is None:
        text = obj.get("message", "")
    text = text if isinstance(text, str) else json.dumps(text)
    if exit_code == 0 and not obj.get("is_error", False):
        return "ok", text, ""
    return "error", text, text or stderr.strip()[-2000:] or "exit %s" % exit_code


def _codex_jsonl(exit_code, stdout, stderr):
    """codex exec --json: JSON Lines events; the answer is the last agent_message."""
    answer, error = "", ""
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            ev = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(ev, dict):
            continue
        t = ev.get("type")
        item = ev.get("item")
        if t == "item.completed" and isinstance(item, dict) and item.get("type") == "agent_message":
            answer = item.get("text", "")
            answer = answer if isinstance(answer, str) else json.dumps(answer)
        elif t == "turn.failed":
            err = ev.get("error")
            error = (err.get("message") if isinstance(err, dict) else None) or "turn failed"
        elif t == "error":
            error = ev.get("message") or "error"
        error = error if isinstance(error, str) else json.dumps(error)
    if exit_code == 0 and not error:
        return "ok", answer, ""
    return "error", answer, error or stderr.strip()[-2000:] or "exit %s" % exit_code


def _shell(exit_code, stdout, stderr):
    if exit_code == 0:
        return "ok", stdout, ""
    return "error", stdout, stderr.strip()[-2000:] or "exit %s" % exit_code


def _claude_cmd(prompt, args, indirect):
    if indirect is None:
        return ["claude", "-p", prompt, "--output-format", "json"] + args
    return ["claude", "-p", "--output-format", "json"] + args      # the prompt on stdin


def _droid_cmd(prompt, args, indirect):
    if indirect is None:
        return ["droid", "exec", "-o", "json"] + args + [prompt]
    return ["droid", "exec", "-o", "json"] + args + ["-f", indirect]


def _codex_cmd(prompt, args, indirect):
    if indirect is None:
        return ["codex", "exec", "--json"] + args + [prompt]
    return ["codex", "exec", "--json"] + args + ["-"]            # the prompt on stdin


def _shell_cmd(prompt, args, indirect):
    if indirect is None:
        return ["/bin/sh", "-c", prompt] + args
    return ["/bin/sh", "-c", ". " + shlex.quote(indirect)] + args


# "indirect": how a long prompt travels, "stdin" or "file"
AGENTS = {
    "claude": {"probe": ["claude", "--version"], "cmd": _claude_cmd, "indirect": "stdin",
               "parse": _result_json},
    "factory": {"probe": ["droid", "--version"], "cmd": _droid_cmd, "indirect": "file",
                "parse": _result_json},
    "codex": {"probe": ["codex", "--version"], "cmd": _codex_cmd, "indirect": "stdin",
              "parse": _codex_jsonl},
    "shell": {"probe": ["/bin/sh", "-c", "echo sh"], "cmd": _shell_cmd, "indirect": "file",
              "parse": _shell},
}


# --- startup checks -------------------------------------------------------------------------

def fatal(reason, code=EX_CONFIG):
    log("fatal: " + reason)
    send("fatal", reason=reason)
    sys.exit(code)


def startup_checks(agent_name, workspace):
    missing = [n for n in os.environ.get("CORRAL_REQUIRED_ENV", "").split(",") if n and n not in os.environ]
    if missing:
        fatal("required environment variable(s) not set: %s" % ", ".join(missing))
    if agent_name not in AGENTS:
        fatal("unknown agent %r (known: %s)" % (agent_name, ", ".join(sorted(AGENTS))))
    probe_path = os.path.join(workspace, ".corral-probe-%d" % os.getpid())
    try:
        with open(probe_path, "w") as f:
            f.write("ok")
        os.unlink(probe_path)
    except OSError as exc:
        fatal("workspace %s is not writable: %s" % (workspace, exc.strerror))
    probe = AGENTS[agent_name]["probe"]
    try:
        p = subprocess.run(probe, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20, cwd=workspace)
    except FileNotFoundError:
        fatal("agent CLI %r not found on PATH" % probe[0])
    except subprocess.TimeoutExpired:
        fatal("agent CLI version probe %r timed out after 20 s" % " ".join(probe))
    except OSError as exc:
        fatal("agent CLI version probe %r cannot run: %s" % (" ".join(probe), exc))
    if p.returncode != 0:
        err = (p.stderr.decode(errors="replace").strip() or p.stdout.decode(errors="replace").strip())[-500:]
        fatal("agent CLI version probe %r failed with exit %d: %s" % (" ".join(probe), p.returncode, err))
    return p.stdout.decode(errors="replace").strip().splitlines()[0] if p.stdout.strip() else ""


# --- OOM detection ---------------------------------------------------------------------------

def oom_kill_count():
    """Kernel OOM kills in this container's memory cgroup (v2 memory.events, v1 oom_control)."""
    for path, key in (("/sys/fs/cgroup/memory.events", "oom_kill"),
                      ("/sys/fs/cgroup/memory/memory.oom_control", "oom_kill")):
        try:
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 2 and parts[0] == key:
                        return int(parts[1])
        except (OSError, ValueError):
            continue
    return 0


# --- processes ------------------------------------------------------------------------------

def _read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def become_subreaper():
    """Orphans of the task are re-parented to the wrapper (so they stay its descendants)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except Exception:
        return False


def sweep_scope():
    """What the cleanup sweeps: "namespace" when the wrapper is its container's main process,
    else (e.g. on a host) "descendants"."""
    if os.environ.get("CORRAL_SWEEP") == "descendants":
        return "descendants"
    if os.getpid() == 1:
        return "namespace"
    if os.getppid() == 1:
        try:
            init = _read_bytes("/proc/1/cmdline")
            me = _read_bytes("/proc/self/cmdline")
        except OSError:
            return "descendants"
        if me and init.endswith(b"\0" + me):   # e.g. docker-init -- python3 /opt/corral/wrapper.py
            return "namespace"
    return "descendants"


def process_table():
    """pid -> (state, ppid, pgid, sid) for every process in /proc."""
    table = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if not name.isdigit():
            continue
        try:
            data = _read_bytes("/proc/%s/stat" % name)
        except OSError:
            continue
        r = data.rfind(b")")
        fields = data[r + 2:].split()
        try:
            table[int(name)] = (fields[0].decode("ascii", "replace"), int(fields[1]), int(fields[2]),
                                int(fields[3]))
        except (IndexError, ValueError):
            continue
    return table


def _exit_code(status):
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return None


class Job(object):
    def __init__(self, task_id, prompt, args, timeout_s, max_output):
        self.task_id = task_id
        self.prompt = prompt
        self.args = args
        self.timeout_s = timeout_s
        self.max_output = max_output
        self.cancelled = False
        self.answered = False
        self.tmpfiles = []
        self.t0 = time.monotonic()


def _json_type(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _shown(v):
    try:
        s = json.dumps(v, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def usable_task_id(v):
    if not isinstance(v, str) or len(v) > MAX_TASK_ID:
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text_problem(name, v):
    if not isinstance(v, str):
        return "%s must be a string, not %s" % (name, _json_type(v))
    if "\0" in v:
        return "%s contains a NUL byte" % name
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return "%s is not valid Unicode (it contains a lone surrogate)" % name
    return None


def _finite(v):
    """A JSON number as a finite float, else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        v = float(v)
    except OverflowError:
        return None
    return v if math.isfinite(v) else None


def parse_run_task(frame):
    """-> (Job, None) or (None, why the frame is unusable)."""
    problem = _text_problem("prompt", frame.get("prompt"))
    if problem:
        return None, problem
    args = frame.get("args")
    if args is None:
        args = []
    if not isinstance(args, list):
        return None, "args must be an array of strings, not %s" % _json_type(args)
    for i, a in enumerate(args):
        problem = _text_problem("args[%d]" % i, a)
        if problem:
            return None, problem
    timeout_s = frame.get("timeout_s")
    if timeout_s is not None:
        timeout_s = _finite(timeout_s)
        if timeout_s is None or timeout_s <= 0:
            return None, ("timeout_s must be a positive number of seconds or null, not %s"
                          % _shown(frame.get("timeout_s")))
    cap = frame.get("max_output_bytes")
    if cap is None:
        cap = DEFAULT_OUTPUT_BYTES
    elif isinstance(cap, bool) or not isinstance(cap, int) or not 0 <= cap <= MAX_OUTPUT_BYTES:
        return None, ("max_output_bytes must be an integer from 0 to %d or null, not %s"
                      % (MAX_OUTPUT_BYTES, _shown(cap)))
    return Job(frame["task_id"], frame["prompt"], list(args), timeout_s, cap), None


# --- tasks -----------------------------------------------------------------------------------

class Runner(object):
    """Runs one task at a time on ONE long-lived thread: the agent, its I/O, its timeout and the
    cleanup after it. Nothing per task needs a new thread."""

    def __init__(self, agent_name, workspace, scope="descendants", subreaper=False):
        self.agent = AGENTS[agent_name]
        self.workspace = workspace
        self.scope = scope
        self.subreaper = subreaper
        self.lock = threading.Lock()
        self.current = None          # the Job accepted and not yet answered
        self.proc = None             # its agent process
        self.jobs = queue.Queue()
        self.idle = threading.Event()
        self.idle.set()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.thread = threading.Thread(target=self._serve, name="task", daemon=True)

    def start_thread(self):
        self.thread.start()

    # -- main thread --------------------------------------------------------------------------
    def busy(self):
        with self.lock:
            return self.current is not None

    def submit(self, frame):
        task_id = frame.get("task_id")
        if not usable_task_id(task_id):
            log("ignoring run_task without a usable task_id: %s" % _shown(task_id))
            return
        job, problem = parse_run_task(frame)
        if job is None:
            log("rejecting task %s: %s" % (task_id, problem))
            send("task_done", task_id=task_id, status="error", exit_code=None, output="",
                 error="invalid run_task: " + problem, duration_s=0.0, truncated=False)
            return
        with self.lock:
            if self.current is not None:
                busy_with = self.current.task_id
            else:
                busy_with = None
                self.current = job
                self.idle.clear()
        if busy_with is not None:
            send("task_done", task_id=task_id, status="error", exit_code=None, output="",
                 error="worker is busy with task %s" % busy_with, duration_s=0.0, truncated=False)
            return
        self.jobs.put(job)

    def cancel(self, task_id):
        with self.lock:
            job = self.current
        if job is not None and job.task_id == task_id:
            job.cancelled = True
            self._wake()

    def _wake(self):
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    def wait_idle(self, grace_s, stop_s=5.0):
        """Wait for the current task up to grace_s, then cancel it and wait for its cleanup."""
        if not self.idle.wait(max(0.0, grace_s)):
            with self.lock:
                job = self.current
            if job is not None:
                job.cancelled = True
                self._wake()
            self.idle.wait(stop_s)

    # -- task thread --------------------------------------------------------------------------
    def _serve(self):
        while True:
            job = self.jobs.get()
            try:
                self._run(job)
            except BaseException as exc:   # the thread must live on, and the task get an answer
                log("wrapper error in task %s: %s" % (job.task_id, "".join(
                    traceback.format_exception(type(exc), exc, exc.__traceback__)).strip()))
                if not job.answered:
                    self._answer(job, "error", None, "", "wrapper error while running the task: %r" % (exc,))
            finally:
                for path in job.tmpfiles:
                    _unlink(path)
                self.proc = None
                with self.lock:
                    if self.current is job:
                        self.current = None
                        self.idle.set()

    def _answer(self, job, status, code, output, error):
        output, truncated = fit_output(_clean(output), job.max_output)
        for path in job.tmpfiles:
            _unlink(path)
        job.answered = True
        with self.lock:
            # the worker is idle from the moment its answer is out (the actor may send the next
            # task at once): the answer and "idle" are one step for the main thread
            send("task_done", task_id=job.task_id, status=status, exit_code=code, output=output,
                 error=clip_error(error), duration_s=round(time.monotonic() - job.t0, 6),
                 truncated=truncated)
            if self.current is job:
                self.current = None
                self.idle.set()

    def _prompt_file(self, job, suffix):
        dirs = [os.environ.get("TMPDIR"), "/tmp", "/var/tmp", "/dev/shm", self.workspace]
        last = None
        for d in dirs:
            if not d:
                continue
            try:
                fd, path = tempfile.mkstemp(prefix="corral-prompt-", suffix=suffix, dir=d)
            except OSError as exc:
                last = exc
                continue
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(job.prompt.encode("utf-8"))
            except OSError as exc:
                last = exc
                _unlink(path)
                continue
            return path
        raise OSError(getattr(last, "errno", errno.EIO),
                      "no writable temporary directory for the prompt (%s)" % (last,))

    def _command(self, job, tmpfiles):
        """-> (argv, bytes for the agent's stdin or None)"""
        indirect = len(job.prompt.encode("utf-8")) > PROMPT_ARGV_MAX or job.prompt.startswith("-")
        if not indirect:
            return self.agent["cmd"](job.prompt, job.args, None), None
        if self.agent["indirect"] == "stdin":
            return self.agent["cmd"](job.prompt, job.args, "-"), job.prompt.encode("utf-8")
        path = self._prompt_file(job, ".sh" if self.agent["parse"] is _shell else ".txt")
        tmpfiles.append(path)
        return self.agent["cmd"](job.prompt, job.args, path), None

    def _spawn(self, cmd, stdin_data):
        return subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.workspace,
                                start_new_session=True)

    def _run(self, job):
        tmpfiles = job.tmpfiles
        if job.cancelled:
            self._answer(job, "cancelled", None, "", "cancelled")
            return
        try:
            cmd, stdin_data = self._command(job, tmpfiles)
        except OSError as exc:
            self._answer(job, "error", None, "", "cannot write the prompt to a temporary file: %s" % exc)
            return
        oom_before = oom_kill_count()
        proc = None
        for attempt in (1, 2):
            try:
                proc = self._spawn(cmd, stdin_data)
                break
            except OSError as exc:
                if exc.errno == errno.EAGAIN and attempt == 1:
                    # the pids limit is exhausted: clean up whatever is left, then try once more
                    log("cannot fork for task %s (%s): sweeping processes and retrying" % (job.task_id, exc))
                    self._cleanup(None)
                    continue
                if exc.errno == errno.EAGAIN:
                    why = ("fork failed (%s): the container's process limit (pids_limit) is exhausted"
                           % exc.strerror)
                elif exc.errno == errno.E2BIG:
                    why = "its command line is too long (%s)" % exc.strerror
                else:
                    why = str(exc)
                self._answer(job, "error", None, "", "cannot start the agent: %s" % why)
                return
            except (ValueError, subprocess.SubprocessError) as exc:
                self._answer(job, "error", None, "", "cannot start the agent: %s" % exc)
                return
        self.proc = proc
        send("task_started", task_id=job.task_id)
        kill_reason, remaining = self._supervise(job, proc, stdin_data)
        code = proc.returncode
        stdout = bytes(self._out_tail).decode("utf-8", "replace")
        stderr = bytes(self._err_tail).decode("utf-8", "replace")
        self._out_tail = self._err_tail = None
        if job.cancelled:
            status, output, error = "cancelled", stdout, "cancelled"
        elif kill_reason == "timeout":
            status, output, error = "timeout", stdout, "timed out after %ss" % _num(job.timeout_s)
        elif code == -signal.SIGKILL and oom_kill_count() > oom_before:
            # The kernel killed the agent for memory: this container is out of memory. Say so and
            # end, so that the actor records oom_killed and starts a fresh container.
            log("agent was killed by the kernel OOM killer")
            send("fatal", reason="oom_killed: the agent was killed by the kernel OOM killer (memory limit)")
            _exit(137)
            return
        else:
            status, output, error = self.agent["parse"](code, stdout, stderr)
        self._answer(job, status, code, output, error)
        if remaining:
            reason = ("cannot clean up after task %s: %d processes remain (pids %s)"
                      % (job.task_id, len(remaining), " ".join(str(p) for p in sorted(remaining)[:20])))
            log("fatal: " + reason)
            send("fatal", reason=reason)
            _exit(EX_SOFTWARE)

    def _supervise(self, job, proc, stdin_data):
        """Pump the agent's I/O until it and its output are done, or its time is up, or it is
        cancelled; then kill whatever is left of it. -> (kill reason or None, pids remaining)"""
        self._out_tail = bytearray()
        self._err_tail = bytearray()
        self._err_line = bytearray()
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        poller = select.poll()
        readers = {out_fd: "out", err_fd: "err"}
        for fd in readers:
            poller.register(fd, select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        pending = None
        in_fd = None
        if stdin_data is not None:
            in_fd = proc.stdin.fileno()
            os.set_blocking(in_fd, False)
            pending = memoryview(stdin_data)
            poller.register(in_fd, select.POLLOUT)

        def close_stdin():
            try:
                poller.unregister(in_fd)
            except (KeyError, ValueError):
                pass
            try:
                proc.stdin.close()
            except OSError:
                pass

        deadline = job.t0 + job.timeout_s if job.timeout_s is not None else None
        exited_at = None
        kill_reason = None
        killed_at = None
        try:
            while True:
                self._reap()
                now = time.monotonic()
                if proc.returncode is not None and exited_at is None:
                    exited_at = now
                if kill_reason is None:
                    if job.cancelled:
                        kill_reason = "cancelled"
                    elif deadline is not None and now >= deadline:
                        kill_reason = "timeout"
                    elif exited_at is not None and readers and now - exited_at >= LINGER_S:
                        kill_reason = "linger"    # the agent is gone, its children hold its output
                    if kill_reason is not None:
                        if in_fd is not None:
                            close_stdin()
                            in_fd = None
                        self._cleanup(proc)
                        killed_at = time.monotonic()
                        continue
                if proc.returncode is not None and not readers:
                    break
                if killed_at is not None and (now - killed_at > CLEANUP_S or not readers):
                    break
                wait = 0.05 if readers or in_fd is not None else 0.01
                if deadline is not None and kill_reason is None:
                    wait = min(wait, max(0.0, deadline - now))
                if exited_at is not None and kill_reason is None:
                    wait = min(wait, max(0.0, exited_at + LINGER_S - now))
                try:
                    events = poller.poll(int(wait * 1000) + 1)
                except InterruptedError:
                    continue
                for fd, ev in events:
                    if fd == self.wake_r:
                        try:
                            os.read(self.wake_r, 4096)
                        except OSError:
                            pass
                    elif fd == in_fd:
                        try:
                            n = os.write(in_fd, pending[:65536])
                            pending = pending[n:]
                            done = not len(pending)
                        except BlockingIOError:
                            done = False
                        except OSError:       # the agent does not read its stdin
                            done = True
                        if done:
                            close_stdin()
                            in_fd = None
                    elif fd in readers:
                        try:
                            data = os.read(fd, 65536)
                        except OSError:
                            data = b""
                        if not data:
                            poller.unregister(fd)
                            del readers[fd]
                        elif readers[fd] == "out":
                            self._on_stdout(job, data, decoder)
                        else:
                            self._on_stderr(data)
            tail = decoder.decode(b"", final=True)
            if tail:
                send("task_output", task_id=job.task_id, data=tail)
        finally:
            if in_fd is not None:
                close_stdin()
            for f in (proc.stdout, proc.stderr):
                try:
                    f.close()
                except OSError:
                    pass
            self._flush_stderr_line()
        # the task ended, however it did: nothing of it may survive it
        remaining = self._cleanup(proc)
        return kill_reason, remaining

    def _on_stdout(self, job, data, decoder):
        buf = self._out_tail
        buf += data
        if len(buf) > 2 * STDOUT_TAIL:
            del buf[:len(buf) - STDOUT_TAIL]
        for i in range(0, len(data), OUTPUT_CHUNK):
            text = decoder.decode(data[i:i + OUTPUT_CHUNK])
            if text:
                send("task_output", task_id=job.task_id, data=text)

    def _on_stderr(self, data):
        # the agent's stderr goes to the container's log as it comes (so it survives a crash),
        # and its tail is kept for the task's error text
        buf = self._err_tail
        buf += data
        if len(buf) > 2 * STDERR_TAIL:
            del buf[:len(buf) - STDERR_TAIL]
        line = self._err_line
        line += data
        while True:
            i = line.find(b"\n")
            if i < 0:
                break
            self._forward(line[:i + 1])
            del line[:i + 1]
        if len(line) > 4096:
            self._flush_stderr_line()

    def _flush_stderr_line(self):
        if self._err_line:
            self._forward(self._err_line + b"\n")
            del self._err_line[:]

    def _forward(self, line):
        try:
            sys.stderr.write("[agent] " + bytes(line).decode("utf-8", "replace"))
            sys.stderr.flush()
        except Exception:
            pass

    def _reap(self):
        """Collect every child that has ended: the agent, and orphans of the task (the wrapper is
        their subreaper). Only the task thread creates children, so this never steals one."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except OSError:
                return
            if pid == 0:
                return
            proc = self.proc
            if proc is not None and pid == proc.pid and proc.returncode is None:
                proc.returncode = _exit_code(status)

    def _targets(self, table, agent_pid):
        """(pids to kill, zombie children of ours waiting to be reaped)"""
        me = os.getpid()
        zombies = [p for p, st in table.items() if st[0] == "Z" and st[1] == me]
        if self.scope == "namespace":
            keep = {1, me}
            p = table.get(me, (None, os.getppid()))[1]
            while p and p not in keep:
                keep.add(p)
                p = table.get(p, (None, 0))[1]
            return [p for p in table if p not in keep], zombies
        children = {}
        for p, st in table.items():
            children.setdefault(st[1], []).append(p)
        found = set()
        todo = [me]
        while todo:
            for c in children.get(todo.pop(), ()):
                if c not in found and c != me:
                    found.add(c)
                    todo.append(c)
        if not self.subreaper and agent_pid:
            # without subreaping, orphans of the agent leave the tree: find them by group/session
            found |= {p for p, st in table.items() if agent_pid in (st[2], st[3]) and p != me}
        return list(found), zombies

    def _cleanup(self, proc):
        """Kill the agent's process group, then SIGKILL what the sweep finds until nothing is left
        or CLEANUP_S pass. -> the pids that remain."""
        agent_pid = proc.pid if proc is not None else None
        if proc is not None and proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
        deadline = time.monotonic() + CLEANUP_S
        denied = set()
        while True:
            self._reap()
            table = process_table()
            targets, zombies = self._targets(table, agent_pid)
            targets = [p for p in targets if p not in denied]
            live = [p for p in targets if table[p][0] != "Z"]
            if not live and not zombies:
                return []
            if time.monotonic() >= deadline:
                return live
            for pid in targets:   # zombies too: one may be a leader whose threads still run
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                except PermissionError:
                    # not the task's: the task cannot make a process it may not kill (no new
                    # privileges), so this came from outside, e.g. `docker exec -u root`
                    denied.add(pid)
                    log("not allowed to kill pid %d: leaving it" % pid)
                except OSError:
                    pass
            time.sleep(0.005)


def _num(x):
    return ("%g" % x) if isinstance(x, float) else str(x)


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _exit(code):
    try:
        sys.stderr.flush()
    except Exception:
        pass
    os._exit(code)


# --- frames in ------------------------------------------------------------------------------

_KIND_RUN = re.compile(r'(?<!\\)"kind"\s*:\s*"run_task"')
_TASK_ID = re.compile(r'(?<!\\)"task_id"\s*:\s*"((?:[^"\\]|\\.){0,%d})"' % (MAX_TASK_ID * 6))


def salvage_task_id(raw):
    """The task_id of a run_task frame that cannot be decoded, if one can be seen in it."""
    text = (raw[:65536] + b"\n" + raw[-65536:]).decode("utf-8", "replace")
    if not _KIND_RUN.search(text):
        return None
    m = _TASK_ID.search(text)
    if not m:
        return None
    try:
        tid = json.loads('"%s"' % m.group(1))
    except ValueError:
        return None
    return tid if usable_task_id(tid) else None


def read_line(stdin):
    """-> (line, oversized) or (None, False) at EOF. An oversized line is consumed and returned
    as its head and tail only."""
    line = stdin.readline(MAX_FRAME_IN + 1)
    if not line:
        return None, False
    if len(line) <= MAX_FRAME_IN or line.endswith(b"\n"):
        return line, False
    head, tail = line[:65536], line[-65536:]
    while True:
        more = stdin.readline(1 << 20)
        if not more:
            break
        tail = (tail + more)[-65536:]
        if more.endswith(b"\n"):
            break
    return head + tail, True


def reject_undecodable(raw, why):
    log("ignoring %s: %r" % (why, raw[:200]))
    tid = salvage_task_id(raw)
    if tid is not None:
        send("task_done", task_id=tid, status="error", exit_code=None, output="",
             error="invalid run_task: %s" % why, duration_s=0.0, truncated=False)


def handle_frame(runner, raw):
    """-> "shutdown" with the grace, or None"""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        reject_undecodable(raw, "a frame that is not valid UTF-8 (%s)" % exc.reason)
        return None
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError) as exc:
        reject_undecodable(raw, "a frame that is not JSON (%s)" % (str(exc)[:100] or type(exc).__name__))
        return None
    if not isinstance(frame, dict):
        log("ignoring a frame that is %s, not an object: %s" % (_json_type(frame), _shown(frame)))
        return None
    kind = frame.get("kind")
    if kind == "run_task":
        runner.submit(frame)
    elif kind == "cancel_task":
        runner.cancel(frame.get("task_id"))
    elif kind == "shutdown":
        grace = _finite(frame.get("grace_s", 5.0))
        if grace is None or grace < 0:
            log("shutdown with a bad grace_s %s: using 5 s" % _shown(frame.get("grace_s")))
            grace = 5.0
        return ("shutdown", grace)
    else:
        log("ignoring unknown frame kind %s" % _shown(kind))
    return None


def heartbeat(interval):
    seq = 0
    while True:
        time.sleep(interval)
        seq += 1
        try:
            send("heartbeat", seq=seq)
        except Exception:
            pass


def main():
    worker_id = os.environ.get("CORRAL_WORKER_ID", "")
    agent_name = os.environ.get("CORRAL_AGENT", "shell")
    workspace = os.environ.get("CORRAL_WORKSPACE", "/workspace")
    if not worker_id:
        fatal("required environment variable(s) not set: CORRAL_WORKER_ID")
    try:
        interval = float(os.environ.get("CORRAL_HEARTBEAT_S", "1"))
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError
    except ValueError:
        fatal("CORRAL_HEARTBEAT_S must be a positive number of seconds, not %r"
              % os.environ.get("CORRAL_HEARTBEAT_S"))
    scope = sweep_scope()
    subreaper = become_subreaper()
    version = startup_checks(agent_name, workspace)
    runner = Runner(agent_name, workspace, scope=scope, subreaper=subreaper)
    try:
        runner.start_thread()
        threading.Thread(target=heartbeat, args=(interval,), name="heartbeat", daemon=True).start()
    except RuntimeError as exc:
        fatal("cannot start the wrapper's threads: %s" % exc, code=EX_SOFTWARE)
    send("ready", worker_id=worker_id, agent=agent_name, agent_version=version,
         wrapper_version=WRAPPER_VERSION, pid=os.getpid())
    log("ready: worker %s agent %s (%s); cleanup sweeps %s%s"
        % (worker_id, agent_name, version, scope, "" if subreaper else " (not a subreaper)"))
    stdin = sys.stdin.buffer
    while True:
        try:
            line, oversized = read_line(stdin)
        except OSError as exc:
            log("cannot read stdin (%s): shutting down" % exc)
            line, oversized = None, False
        if line is None:
            log("stdin closed: shutting down")
            runner.wait_idle(0)
            return 0
        if oversized:
            reject_undecodable(line, "a frame longer than %d bytes" % MAX_FRAME_IN)
            continue
        line = line.strip()
        if not line:
            continue
        try:
            what = handle_frame(runner, line)
        except Exception as exc:   # never: but a bad frame must not end the wrapper
            log("error handling a frame: %r" % (exc,))
            continue
        if what is not None:
            log("shutdown requested")
            runner.wait_idle(what[1])
            return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
