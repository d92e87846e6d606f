"""The worker-wrapper's logic, sans-IO: events in, actions out.

Standard library only, Python >= 3.9; shipped into every worker image beside wrapper.py. It
imports no threads, processes, files or clocks of its own (the clock is passed in): the container
process (wrapper.py, threads and subprocesses) and FakeEngine (runtime/engines/fake_wrapper.py,
trio tasks and the stub agent's plan) drive this same code, in the manner of hypercorn's
``protocol/h11.py``.

    core = WrapperCore(env, clock=time.monotonic, pid=os.getpid())
    for action in core.handle(Boot()):
        ...    # do it; some actions are answered by an event fed back in

Events in (what happened)            Actions out (what to do)
-----------------------------------  -----------------------------------------------------------
Boot()                               CheckWorkspace(path) -> WorkspaceChecked(error)
WorkspaceChecked(error)              RunProbe(argv, cwd, timeout_s) -> ProbeDone / ProbeFailed
ProbeDone(exit_code, stdout, stderr) Send(kind, data): write this frame line to stdout
ProbeFailed(why, detail)             Log(text): a wrapper log line for stderr
StdinData(data) / StdinClosed()      AgentLog(data): a line the agent wrote on its stderr
PromptFileWritten(task_id, path)     WritePromptFile(task_id, data, suffix) -> PromptFileWritten
AgentStarted(task_id, pid, oom_kills)     or AgentNotStarted(task_id, "prompt_file", detail)
AgentNotStarted(task_id, stage, detail)  StartAgent(task_id, argv, stdin, cwd) -> AgentStarted
AgentOutput(task_id, stream, data)        or AgentNotStarted(task_id, "spawn", detail)
AgentExited(task_id, exit_code)      KillAgent(task_id): kill its process tree (it goes on running
CleanupDone(task_id, remaining,          until its output ends, see Cleanup)
            oom_kills)               Cleanup(task_id): the task's I/O is over: kill and sweep
TimerFired(name)                         every process it left -> CleanupDone(remaining, ...)
TaskCrashed(task_id, error)          RemoveFile(path): the task's prompt file
WrapperFailed(reason)                StartTimer(name, delay) / CancelTimer(name) -> TimerFired
                                     Exit(code): end the wrapper process with this code

With the model gateway on (CORRAL_GATEWAY=1), startup also serves the endpoint and prepares the
agent, and the core carries the agent's HTTP exchanges as frames:

GatewayStarted(port, error)          StartGateway(port): serve HTTP on 127.0.0.1:port (0: any free
AgentPrepared(home, path_dirs,           port) -> GatewayStarted(the port bound, or error)
              error)                 PrepareAgent(cli, home, path, path_hints, files): a writable
HttpRequestStarted(req_id, method,       home (HOME, else a private temporary one), the files
    target, headers, version)            under it, the PATH additions -> AgentPrepared
HttpRequestBody(req_id, data)        HttpRespond(req_id, status, headers, framing): start the
HttpRequestEnd(req_id)                   response ("chunked"; "close": the body ends with the
HttpClientGone(req_id, error)            connection; "length": its Content-Length is among the
                                         headers; "none": no body)
                                     HttpBody(req_id, data) / HttpFinish(req_id, error): end it
                                         ("": cleanly; else abort the client's connection)

The driver numbers each HTTP request (``req_id``, unique within the wrapper's life), tells the core
its head, body and end (or that the client went away), and writes what HttpRespond/HttpBody/
HttpFinish say to that client. The core turns them into ``http_request``/``http_chunk``/``http_end``
frames (chunks of at most 256 KiB raw, base64; every frame < 1 MiB), routes the actor's
``http_response``/``http_chunk``/``http_end`` back by req_id, answers by itself what it must
refuse (no task running, limits of the frames, the supervisor gone: a JSON error like the
gateway's), and ends every exchange still in flight with an error on both sides when its task
ends; when the actor goes away (stdin's end), its clients' connections are aborted.

task_done carries ``failure`` (``""``, ``permission_denied`` or ``agent_error`` from the agent's
own result; the reason of a ``cancel_task`` that names one of the failures, e.g. ``stalled``:
the agent is killed and the task answered "error") and ``usage`` (tokens and cost from the
agent's own result, or null). A CLI that lingers after printing its final result (droid) is
stopped RESULT_LINGER_S after it, and the task answered from that result.

The core owns: the startup decisions (required environment, unknown agent, workspace, version
probe: ``fatal`` and exit 78), frame validation (a bad frame is logged and ignored, or answered
with an error when it names a task), busy/idle (one task at a time), command lines (a prompt of
more than 64 KiB, or starting with "-", goes on stdin or in a file, as the agent table says),
task_output chunking (16 KiB of agent output per frame), the output cap (``max_output_bytes``:
the tail, ``truncated``; every frame < 1 MiB), timeouts, linger after the agent exits (0.5 s),
cancel, shutdown with grace (the running task is cancelled at the end of the grace and still
answered), heartbeats, the result parsers, the OOM decision (the agent SIGKILLed and the cgroup's
OOM-kill counter grew: ``fatal`` and exit 137) and the cleanup decision (processes of a task
that cannot be killed: ``fatal`` and exit 70).

The control plane survives its supervisor (wrapper version 5; 6 adds heartbeat ``sent`` and
ready ``acked``):

- Sequence numbers. Every task_started, task_output and task_done frame carries ``seq`` (1, 2, 3,
  ... over the wrapper's life) and is kept, exactly as sent, until the actor's ``lease`` frame
  acknowledges it (``ack``: every kept frame with ``seq <= ack`` is forgotten). Kept task_output
  frames hold at most KEPT_OUTPUT_BYTES (1 MiB of frame bytes): past it the OLDEST kept
  task_output frames are dropped (logged once per supervisor); task_started and task_done are
  never dropped (task_done carries the output's tail anyway).
- ``hello`` {worker_id}: a supervisor attached to this running wrapper (adoption, or a re-attach
  after an engine outage). Its answer is ``ready`` with ``resumed: true``, ``running`` (the task
  running now, or null) and ``replay`` (the task ids of the kept task_done frames, in order),
  then every kept frame again, unchanged (same seq), in seq order; what the agent writes
  afterwards follows with higher numbers; ``acked`` says up to which seq everything was
  acknowledged already (the first kept seq - 1, or the last sent when nothing is kept), so a
  supervisor that adopts an idle wrapper knows it lost nothing. A hello naming another worker
  is logged and ignored.
- Every ``heartbeat`` carries ``sent``, the seq of the last kept frame sent before it: a
  supervisor that has processed less than that lost frames on the way (written while the engine
  was restarting) and says ``hello`` again to have them replayed.
- The lease (CORRAL_ORPHAN_TIMEOUT_S seconds; absent or 0: no lease, nothing is ever orphaned).
  It runs from Boot and is renewed by every frame from the actor that has a known kind (lease,
  hello, run_task, cancel_task, shutdown, http_*). Once it runs out the wrapper is orphaned:
  it logs "orphaned: no supervisor for N s" and, idle, exits at once; busy, with
  CORRAL_ORPHAN_POLICY ``cancel`` (the default) it cancels the task (answered "cancelled", kept
  like any frame) and exits once it is answered (STOP_S at most), with ``finish`` it exits once
  the task has ended by itself. Its exit code is EX_ORPHANED (0) and its last log line says
  "orphaned: ... exiting". A frame from the actor before that exit (a ``hello`` from a supervisor
  that adopts it) renews the lease and the wrapper stays (a cancelled task stays cancelled).
  Shutting down (``shutdown``, stdin's end) is not undone by it.
- Stdin's end keeps its meaning: the supervisor detached for good, the wrapper shuts down. (A
  supervisor that means to come back attaches with stdin_once off: its detach is no end.)

Timers: "heartbeat", "timeout", "linger", "drain" (CLEANUP_S after a kill the task's I/O is over
even if its output is still open), "grace", "stop" (STOP_S after the grace, or after an orphan's
cancel, the wrapper exits), "lease" (the supervisor's lease runs out; when frames came
meanwhile it is started again for what is left of it).
A driver fires a timer at most once per StartTimer and never after its CancelTimer; a TimerFired
for a timer that is not running is ignored.
"""

from __future__ import annotations

import base64
import codecs
import collections
import errno
import json
import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

try:                    # imported as runtime.wrapper.core
    from . import agents as agent_table
except ImportError:     # in the image: /opt/corral/core.py beside agents.py
    import agents as agent_table

WRAPPER_VERSION = "6"                # 5: seq/lease/hello (kept frames, replay, orphan timeout);
#                                      6: heartbeat.sent, ready.acked
#                                      4: model gateway (http_* frames), task_done failure and usage
EX_CONFIG = 78
EX_ORPHANED = 0                     # an orphan's exit: its log says so ("orphaned: ... exiting")
EX_SOFTWARE = 70
EX_OOM = 137                        # 128 + SIGKILL: as if the kernel had killed the wrapper
SIGKILL = 9

MAX_LINE = 1 << 20                  # the actor's frame limit (runtime/protocol.py MAX_LINE)
FRAME_BUDGET = MAX_LINE - (64 << 10)  # JSON-encoded bytes of the one big field of a frame
OUTPUT_CHUNK = 16 * 1024            # raw bytes of agent output per task_output frame
DEFAULT_OUTPUT_BYTES = 256 * 1024
MAX_OUTPUT_BYTES = MAX_LINE
STDOUT_TAIL = 4 << 20               # kept for the result parsers
STDERR_TAIL = 64 << 10
STDERR_LINE = 4096                  # a longer stderr line goes to the log in pieces
ERROR_CHARS = 4000
MAX_TASK_ID = 256
MAX_FRAME_IN = 16 << 20             # longest line accepted from the actor
FRAME_KEEP = 64 << 10               # of a longer one, its head and tail are looked at
PROMPT_ARGV_MAX = 64 * 1024         # longer prompts go on stdin or in a file
LINGER_S = 0.5                      # output still read after the agent exits, then its children die
RESULT_LINGER_S = 0.5               # after its final result the agent may exit by itself this long
CLEANUP_S = 2.0                     # after a kill, its output is waited for this long
STOP_S = 5.0                        # after the shutdown grace, the cancelled task this long
DEFAULT_GRACE_S = 5.0
PROBE_TIMEOUT_S = 20.0
KEPT_KINDS = ("task_started", "task_output", "task_done")   # numbered, kept until acknowledged
KEPT_OUTPUT_BYTES = 1 << 20         # of kept task_output frames; past it the oldest are dropped
ORPHAN_POLICIES = ("cancel", "finish")
ACTOR_KINDS = frozenset(("run_task", "cancel_task", "shutdown", "lease", "hello", "http_response",
                         "http_chunk", "http_end"))
OOM_REASON = "oom_killed: the agent was killed by the kernel OOM killer (memory limit)"

# the model gateway's endpoint (frames: runtime/gateway_frames.py)
GATEWAY_CHUNK = 256 * 1024          # raw body bytes per http_chunk frame
MAX_EXCHANGES = 64                  # HTTP requests in flight at once; more are answered 503
MAX_REQUEST_BODY = 32 << 20         # a larger request body is answered 413 (as the gateway does)
MAX_HEADERS = 128
MAX_HEADER_NAME = 256
MAX_HEADER_VALUE = 16 * 1024
MAX_TARGET = 16 * 1024
MAX_HEAD_CHARS = 128 * 1024         # target and headers together: the http_request frame < 1 MiB
MAX_HTTP_ERROR = 1024
HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
                        "trailer", "upgrade", "content-length"))


# --- events ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Boot:
    """The wrapper process began: check the environment the core was made with."""


@dataclass(frozen=True)
class WorkspaceChecked:
    error: Optional[str] = None
    """None: a file could be written in the workspace; else why not (strerror)"""


@dataclass(frozen=True)
class ProbeDone:
    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""


@dataclass(frozen=True)
class ProbeFailed:
    why: str          # "not_found" (no such CLI), "timeout" (no answer in time), "error"
    detail: str = ""


@dataclass(frozen=True)
class StdinData:
    data: bytes


@dataclass(frozen=True)
class StdinClosed:
    pass


@dataclass(frozen=True)
class PromptFileWritten:
    task_id: str
    path: str


@dataclass(frozen=True)
class AgentNotStarted:
    task_id: str
    stage: str        # "prompt_file" (cannot write it) or "spawn" (cannot start the process)
    detail: str


@dataclass(frozen=True)
class AgentStarted:
    task_id: str
    pid: int = 0
    oom_kills: int = 0
    """the memory cgroup's OOM-kill counter just before the agent started"""


@dataclass(frozen=True)
class AgentOutput:
    task_id: str
    stream: str       # "stdout" or "stderr"
    data: bytes       # b"": that stream ended (every process holding it closed it)


@dataclass(frozen=True)
class AgentExited:
    task_id: str
    exit_code: int
    """negative: killed by that signal (-9: SIGKILL)"""


@dataclass(frozen=True)
class CleanupDone:
    task_id: str
    remaining: Tuple[int, ...] = ()
    """pids of the task's processes that could not be killed"""
    oom_kills: int = 0
    """the memory cgroup's OOM-kill counter now"""


@dataclass(frozen=True)
class TimerFired:
    name: str


@dataclass(frozen=True)
class TaskCrashed:
    """The driver failed while running the task (a bug): the task is answered with an error."""
    task_id: str
    error: str


@dataclass(frozen=True)
class GatewayStarted:
    port: int = 0
    """the port bound on 127.0.0.1"""
    error: Optional[str] = None
    """None: serving; else why the endpoint cannot be served"""


@dataclass(frozen=True)
class AgentPrepared:
    home: str = ""
    """a writable home directory for the agent (its files are in it)"""
    path_dirs: Tuple[str, ...] = ()
    """directories to put before PATH (those of PrepareAgent.path_hints that exist)"""
    error: Optional[str] = None
    """None: done; else why not (no writable home, a file that cannot be written)"""


@dataclass(frozen=True)
class HttpRequestStarted:
    req_id: int
    method: str
    target: str
    headers: Tuple[Tuple[str, str], ...] = ()
    """as the client sent them (latin-1 strings), in order, repeats kept"""
    version: str = "HTTP/1.1"


@dataclass(frozen=True)
class HttpRequestBody:
    req_id: int
    data: bytes


@dataclass(frozen=True)
class HttpRequestEnd:
    req_id: int


@dataclass(frozen=True)
class HttpClientGone:
    """The client's connection broke (reading its request, or writing the response), or it sent a
    body the driver cannot read: the exchange is over for the client."""
    req_id: int
    error: str = ""


@dataclass(frozen=True)
class WrapperFailed:
    """The driver cannot go on (e.g. cannot start its threads): fatal, exit 70."""
    reason: str


# --- actions ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Send:
    kind: str
    data: bytes
    """one JSON object and a newline, shorter than MAX_LINE"""


@dataclass(frozen=True)
class Log:
    text: str


@dataclass(frozen=True)
class AgentLog:
    data: bytes
    """a line of the agent's stderr, newline included, for the container's log"""


@dataclass(frozen=True)
class CheckWorkspace:
    path: str


@dataclass(frozen=True)
class RunProbe:
    argv: List[str]
    cwd: str
    timeout_s: float = PROBE_TIMEOUT_S
    env: Optional[Dict[str, str]] = None
    """None: the wrapper's environment; else exactly this one"""


@dataclass(frozen=True)
class WritePromptFile:
    task_id: str
    data: bytes
    suffix: str
    """a private (0600) temporary file: its path comes back in PromptFileWritten"""


@dataclass(frozen=True)
class StartAgent:
    task_id: str
    argv: List[str]
    cwd: str
    stdin: Optional[bytes] = None
    """None: the agent's stdin is /dev/null; else these bytes, then end of file"""
    env: Optional[Dict[str, str]] = None
    """None: the wrapper's environment; else exactly this one"""


@dataclass(frozen=True)
class KillAgent:
    task_id: str


@dataclass(frozen=True)
class Cleanup:
    task_id: str


@dataclass(frozen=True)
class RemoveFile:
    path: str


@dataclass(frozen=True)
class StartTimer:
    name: str
    delay: float


@dataclass(frozen=True)
class CancelTimer:
    name: str


@dataclass(frozen=True)
class Exit:
    code: int


@dataclass(frozen=True)
class StartGateway:
    port: int
    """0: any free port"""


@dataclass(frozen=True)
class PrepareAgent:
    cli: str
    """the agent's CLI, resolved on ``path`` for its path_hints"""
    home: str
    """the HOME the agent should have (used if writable; else a private temporary directory)"""
    path: str
    path_hints: Tuple[str, ...] = ()
    files: Tuple[Tuple[str, bytes], ...] = ()
    """(path relative to the home, content): written private (0600), directories made"""


@dataclass(frozen=True)
class HttpRespond:
    req_id: int
    status: int
    headers: Tuple[Tuple[str, str], ...]
    """exactly these (the framing's own are among them)"""
    framing: str
    """"chunked", "close" (the body ends with the connection), "length" (a Content-Length is among
    the headers) or "none" (no body)"""


@dataclass(frozen=True)
class HttpBody:
    req_id: int
    data: bytes


@dataclass(frozen=True)
class HttpFinish:
    req_id: int
    error: str = ""
    """"": the response is complete; else abort the client's connection (the body is cut short)"""


# --- frames out --------------------------------------------------------------------------------

def _dumps(obj):
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:   # a lone surrogate somewhere: escape everything
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


def encode_frame(fields):
    """``fields`` (with "kind") as one line shorter than MAX_LINE."""
    fields = dict(fields)
    data = _dumps(fields)
    while len(data) >= MAX_LINE:
        # last resort (the fields are sized to fit already): halve the longest string, keep its tail
        name = max((k for k, v in fields.items() if isinstance(v, str)), key=lambda k: len(fields[k]))
        fields[name] = fields[name][len(fields[name]) // 2:]
        if fields.get("kind") == "task_done" and name == "output":
            fields["truncated"] = True
        data = _dumps(fields)
    return data + b"\n"


# --- output limits -----------------------------------------------------------------------------

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


def _num(x):
    return ("%g" % x) if isinstance(x, float) else str(x)


# --- frames in ---------------------------------------------------------------------------------

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


class Job(object):
    """One accepted task, from run_task to its task_done."""

    def __init__(self, task_id, prompt, args, timeout_s, max_output):
        self.task_id = task_id
        self.prompt = prompt
        self.args = args
        self.timeout_s = timeout_s
        self.max_output = max_output
        self.t0 = 0.0
        self.phase = "starting"       # starting | running | cleaning
        self.cancelled = False
        self.kill_reason = None       # timeout | linger | result | cancelled, once killed
        self.cancel_failure = ""      # a cancel_task's reason that is a failure (e.g. "stalled")
        self.final_seen = False       # the agent printed its final result
        self.line = bytearray()       # stdout's current line, scanned for the final result
        self.line_skip = False        # inside a line too long to be a result
        self.exit_code = None
        self.exited = False
        self.eof = set()
        self.prompt_file = None
        self.oom_before = 0
        self.out_tail = bytearray()
        self.err_tail = bytearray()
        self.err_line = bytearray()
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")


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


class LineBuffer(object):
    """Splits the actor's byte stream into lines. A line longer than ``limit`` bytes is not
    kept whole: it comes out as its head and tail, marked oversized."""

    def __init__(self, limit=MAX_FRAME_IN):
        self.limit = limit
        self.buf = bytearray()
        self.scan = 0               # no newline in buf before this
        self.over = False           # inside an oversized line
        self.head = b""
        self.tail = b""

    def feed(self, data):
        """-> [(line without its newline, oversized)]"""
        buf = self.buf
        buf += data
        out = []
        start = 0
        while True:
            i = buf.find(b"\n", max(start, self.scan))
            if i < 0:
                break
            line = bytes(buf[start:i])
            start = i + 1
            if self.over:
                out.append((self.head + (self.tail + line + b"\n")[-FRAME_KEEP:], True))
                self.over, self.head, self.tail = False, b"", b""
            elif len(line) > self.limit:
                out.append((line[:FRAME_KEEP] + (line + b"\n")[-FRAME_KEEP:], True))
            else:
                out.append((line, False))
        del buf[:start]
        self.scan = len(buf)
        if self.over:
            self.tail = (self.tail + bytes(buf))[-FRAME_KEEP:]
            del buf[:]
            self.scan = 0
        elif len(buf) > self.limit:
            self.over, self.head, self.tail = True, bytes(buf[:FRAME_KEEP]), bytes(buf[-FRAME_KEEP:])
            del buf[:]
            self.scan = 0
        return out

    def close(self):
        """End of the stream: the last line, if it had no newline."""
        if self.over:
            out = [(self.head + self.tail, True)]
        elif self.buf:
            out = [(bytes(self.buf), False)]
        else:
            out = []
        self.buf, self.scan, self.over, self.head, self.tail = bytearray(), 0, False, b"", b""
        return out


def describe_spawn_error(exc):
    """Why an agent process could not start (an OSError from fork/exec), in a task's error."""
    if isinstance(exc, OSError) and exc.errno == errno.EAGAIN:
        return ("fork failed (%s): the container's process limit (pids_limit) is exhausted"
                % exc.strerror)
    if isinstance(exc, OSError) and exc.errno == errno.E2BIG:
        return "its command line is too long (%s)" % exc.strerror
    return str(exc)


class Exchange(object):
    """One HTTP request of the agent to the model gateway's endpoint, carried as frames."""

    __slots__ = ("req_id", "method", "version", "phase", "bytes_up")

    def __init__(self, req_id, method, version):
        self.req_id = req_id
        self.method = method
        self.version = version
        self.phase = "request"        # request (its body goes to the actor) | waiting | response
        self.bytes_up = 0


_METHOD = re.compile(r"[A-Z]{1,16}")


def request_problem(method, target, headers):
    """Why a request cannot travel as an http_request frame: (status, reason), or None."""
    if not isinstance(method, str) or not _METHOD.fullmatch(method):
        return 400, "a method of 1 to 16 capital letters is needed, not %s" % _shown(method)
    if not isinstance(target, str) or not 0 < len(target) <= MAX_TARGET:
        return 414, "a request target of 1 to %d characters is needed" % MAX_TARGET
    if len(headers) > MAX_HEADERS:
        return 431, "more than %d header fields" % MAX_HEADERS
    total = len(target)
    for pair in headers:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                and isinstance(pair[0], str) and isinstance(pair[1], str)):
            return 400, "a header field that is not a pair of strings"
        name, value = pair
        if not 0 < len(name) <= MAX_HEADER_NAME or len(value) > MAX_HEADER_VALUE:
            return 431, "a header field over the limits (name 1 to %d, value up to %d characters)" % (
                MAX_HEADER_NAME, MAX_HEADER_VALUE)
        total += len(name) + len(value)
    if total > MAX_HEAD_CHARS:
        return 431, "request target and header fields over %d characters" % MAX_HEAD_CHARS
    return None


def response_headers(headers):
    """The actor's http_response headers for the client: [(name, value)], or None when they are
    not usable (not pairs of strings, characters HTTP/1.1 cannot carry, line breaks)."""
    if not isinstance(headers, list) or len(headers) > MAX_HEADERS:
        return None
    out = []
    for pair in headers:
        if not (isinstance(pair, list) and len(pair) == 2
                and isinstance(pair[0], str) and isinstance(pair[1], str)):
            return None
        name, value = pair
        if not name or any(ch in name for ch in "\r\n:\0 \t") or any(ch in value for ch in "\r\n\0"):
            return None
        try:
            name.encode("latin-1")
            value.encode("latin-1")
        except UnicodeEncodeError:
            return None
        out.append((name, value))
    return out


def gateway_error_body(message):
    """A JSON error as the supervisor's gateway answers its own refusals."""
    return _dumps({"type": "error", "error": {"type": "corral_gateway_error",
                                              "code": "corral_gateway_error",
                                              "message": "corral gateway: " + message}})


# --- the state machine -------------------------------------------------------------------------

class WrapperCore(object):
    """The wrapper as a state machine: ``handle(event) -> [action]``.

    ``env``: the wrapper's environment (CORRAL_WORKER_ID, CORRAL_AGENT, CORRAL_REQUIRED_ENV,
    CORRAL_HEARTBEAT_S, CORRAL_WORKSPACE, CORRAL_ORPHAN_TIMEOUT_S, CORRAL_ORPHAN_POLICY);
    ``clock()``: seconds, for durations and deadlines; ``pid``: for the ready frame; ``note``:
    appended to the ready log line."""

    def __init__(self, env, clock, pid=0, note=""):
        self.env = dict(env)
        self.clock = clock
        self.pid = pid
        self.note = note
        self.state = "new"          # new | checking | gateway | preparing | sandbox | probing |
        #                             serving | closing | exited
        self.exit_code = None
        self.worker_id = self.env.get("CORRAL_WORKER_ID", "")
        self.agent_name = self.env.get("CORRAL_AGENT", "shell")
        self.agent = None
        self.workspace = self.env.get("CORRAL_WORKSPACE", "/workspace")
        self.interval = 1.0
        self.version = ""
        self.seq = 0
        self.job = None
        self.timers = set()
        self.lines = LineBuffer()
        self._out = []
        self.setup = None             # agents.Setup, from the environment at Boot
        self.gateway_port = None      # the port asked for, when the gateway is on
        self.agent_env = None         # the agent's environment (None: the wrapper's own)
        self.exchanges = {}           # req_id -> Exchange: the agent's HTTP requests in flight
        self.actor_gone = False       # stdin ended: nothing more can come from the actor
        # kept frames (see the module's docstring): numbered, kept until a lease acknowledges them
        self.sent_seq = 0             # the number of the last kept frame sent
        self.kept = collections.OrderedDict()   # seq -> (kind, task_id, the frame's line)
        self.kept_output = collections.deque()   # seqs of the kept task_output frames, in order
        self.kept_output_bytes = 0
        self.output_dropped = 0       # kept task_output frames dropped over the cap, ever
        self.drop_logged = False      # (once per supervisor: reset by hello)
        # the lease
        self.lease_s = 0.0            # CORRAL_ORPHAN_TIMEOUT_S; 0: no lease
        self.orphan_policy = "cancel"
        self.lease_seen = 0.0         # clock() of the last frame from the actor (or of Boot)
        self.orphaned = False         # the lease ran out: the wrapper exits after its task

    @property
    def closing(self):
        """Shutting down, or exited."""
        return self.state in ("closing", "exited")

    @property
    def wants_stdin(self):
        """Whether the driver should go on reading frames: until it shuts down, and while shutting
        down until stdin ends (the running task's gateway responses and a cancel_task still come).
        Frames are handled once serving."""
        if self.state == "closing":
            return not self.actor_gone
        return self.state != "exited"

    @property
    def busy(self):
        return self.job is not None

    def handle(self, event):
        out = self._out = []
        if self.state == "exited":
            return out
        handler = self._handlers.get(type(event))
        if handler is None:
            raise TypeError("not a wrapper event: %r" % (event,))
        handler(self, event)
        self._out = []
        return out

    # -- helpers ---------------------------------------------------------------------------------
    def _log(self, text):
        self._out.append(Log(text))

    def _send(self, kind, **fields):
        fields["kind"] = kind
        kept = kind in KEPT_KINDS
        if kept:
            self.sent_seq += 1
            fields["seq"] = self.sent_seq
        try:
            data = encode_frame(fields)
        except Exception as exc:   # never let a frame take the wrapper down
            self._log("cannot encode a %s frame: %r" % (kind, exc))
            return
        self._out.append(Send(kind, data))
        if kept:
            self._keep(fields["seq"], kind, fields.get("task_id"), data)

    # -- kept frames and the lease -----------------------------------------------------------
    def _keep(self, seq, kind, task_id, data):
        self.kept[seq] = (kind, task_id, data)
        if kind != "task_output":
            return
        self.kept_output.append(seq)
        self.kept_output_bytes += len(data)
        while self.kept_output_bytes > KEPT_OUTPUT_BYTES and len(self.kept_output) > 1:
            old = self.kept_output.popleft()
            _, old_task, old_data = self.kept.pop(old)
            self.kept_output_bytes -= len(old_data)
            self.output_dropped += 1
            if not self.drop_logged:
                self.drop_logged = True
                self._log("unacknowledged task_output over %d bytes: dropping the oldest "
                          "(from seq %d of task %s on; task_done keeps the output's tail)"
                          % (KEPT_OUTPUT_BYTES, old, old_task))

    def _ack(self, ack):
        """Forget every kept frame numbered up to ``ack``."""
        kept = self.kept
        while kept and next(iter(kept)) <= ack:
            _, (kind, _, data) = kept.popitem(last=False)
            if kind == "task_output":
                self.kept_output_bytes -= len(data)
        out = self.kept_output
        while out and out[0] <= ack:
            out.popleft()

    def _on_lease(self, frame):
        ack = frame.get("ack", 0)
        if isinstance(ack, bool) or not isinstance(ack, int) or ack < 0:
            return self._log("ignoring a lease's ack %s: not a sequence number" % _shown(ack))
        if ack > self.sent_seq:
            self._log("a lease acknowledges seq %d, but the last frame sent is %d"
                      % (ack, self.sent_seq))
            ack = self.sent_seq
        self._ack(ack)

    def _on_hello(self, frame):
        wid = frame.get("worker_id")
        if wid != self.worker_id:
            return self._log("ignoring hello for worker %s: this is worker %s"
                             % (_shown(wid), self.worker_id))
        self._renew_lease()
        running = self.job.task_id if self.job is not None else None
        replay = [tid for kind, tid, _ in self.kept.values() if kind == "task_done"]
        first = next(iter(self.kept), 0)
        fields = dict(kind="ready", worker_id=self.worker_id, agent=self.agent_name,
                      agent_version=self.version, wrapper_version=WRAPPER_VERSION, pid=self.pid,
                      resumed=True, running=running, replay=replay,
                      acked=first - 1 if self.kept else self.sent_seq)
        data = _dumps(fields) + b"\n"
        while len(data) >= MAX_LINE and fields["replay"]:   # thousands of unacknowledged tasks:
            fields["replay"] = fields["replay"][:len(fields["replay"]) // 2]   # their frames follow
            data = _dumps(fields) + b"\n"
        self._out.append(Send("ready", data))
        self._log("hello: a supervisor attached; resuming (running %s; replaying %d kept frames%s, "
                  "%d task_done%s)" % (
                      running or "nothing", len(self.kept),
                      " seq %d to %d" % (first, self.sent_seq) if self.kept else "", len(replay),
                      "; %d task_output frames were dropped over the cap" % self.output_dropped
                      if self.output_dropped else ""))
        self.drop_logged = False
        for kind, _, line in self.kept.values():
            self._out.append(Send(kind, line))

    def _renew_lease(self):
        """A frame from the actor: the lease runs again from now (an orphan stays)."""
        if not self.lease_s or self.state != "serving":
            return
        self.lease_seen = self.clock()
        if self.orphaned:
            self.orphaned = False
            self._cancel_timer("stop")
            self._log("lease renewed: a supervisor is back, the wrapper stays")
        if "lease" not in self.timers:
            self._start_timer("lease", self.lease_s)

    def _lease_ran_out(self):
        if self.state == "closing":
            return      # shutting down already: it ends by itself
        left = self.lease_seen + self.lease_s - self.clock()
        if left > 0:    # renewed meanwhile
            return self._start_timer("lease", left)
        why = "orphaned: no supervisor for %s s" % _num(self.lease_s)
        job = self.job
        if self.state != "serving" or job is None:
            self._log(why + ": exiting")
            return self._exit(EX_ORPHANED)
        self.orphaned = True
        if self.orphan_policy == "finish":
            return self._log(why + ": task %s may finish, then the wrapper exits" % job.task_id)
        self._log(why + ": cancelling task %s, then exiting" % job.task_id)
        self._cancel_job(job)
        if self.job is not None and self.orphaned:
            self._start_timer("stop", STOP_S)

    def _exit(self, code):
        self.state = "exited"
        self.exit_code = code
        self._out.append(Exit(code))

    def _fatal(self, reason, code=EX_CONFIG):
        self._log("fatal: " + reason)
        self._send("fatal", reason=reason)
        self._exit(code)

    def _start_timer(self, name, delay):
        self.timers.add(name)
        self._out.append(StartTimer(name, max(0.0, delay)))

    def _cancel_timer(self, name):
        if name in self.timers:
            self.timers.discard(name)
            self._out.append(CancelTimer(name))

    def _job(self, event):
        job = self.job
        return job if job is not None and job.task_id == event.task_id else None

    # -- startup ---------------------------------------------------------------------------------
    def _on_boot(self, ev):
        if self.state != "new":
            return
        env = self.env
        if not self.worker_id:
            return self._fatal("required environment variable(s) not set: CORRAL_WORKER_ID")
        try:
            self.interval = float(env.get("CORRAL_HEARTBEAT_S", "1"))
            if not (math.isfinite(self.interval) and self.interval > 0):
                raise ValueError
        except ValueError:
            return self._fatal("CORRAL_HEARTBEAT_S must be a positive number of seconds, not %r"
                               % env.get("CORRAL_HEARTBEAT_S"))
        raw = env.get("CORRAL_ORPHAN_TIMEOUT_S", "")
        try:
            self.lease_s = float(raw) if raw.strip() else 0.0
            if not (math.isfinite(self.lease_s) and self.lease_s >= 0):
                raise ValueError
        except ValueError:
            return self._fatal("CORRAL_ORPHAN_TIMEOUT_S must be a number of seconds (0: no lease), "
                               "not %r" % raw)
        self.orphan_policy = env.get("CORRAL_ORPHAN_POLICY") or ORPHAN_POLICIES[0]
        if self.orphan_policy not in ORPHAN_POLICIES:
            return self._fatal("CORRAL_ORPHAN_POLICY must be one of %s, not %r"
                               % (", ".join(ORPHAN_POLICIES), self.orphan_policy))
        missing = [n for n in env.get("CORRAL_REQUIRED_ENV", "").split(",") if n and n not in env]
        if missing:
            return self._fatal("required environment variable(s) not set: %s" % ", ".join(missing))
        self.agent = agent_table.AGENTS.get(self.agent_name)
        if self.agent is None:
            return self._fatal("unknown agent %r (known: %s)"
                               % (self.agent_name, ", ".join(sorted(agent_table.AGENTS))))
        problem = self._read_setup(env)
        if problem:
            return self._fatal(problem)
        self.state = "checking"
        if self.lease_s:
            self.lease_seen = self.clock()
            self._start_timer("lease", self.lease_s)
        self._out.append(CheckWorkspace(self.workspace))

    def _read_setup(self, env):
        """How the agent is run, from CORRAL_PERMISSIONS, CORRAL_MODEL, CORRAL_GATEWAY(_PORT),
        CORRAL_DROID_PROVIDER. -> None, or what is wrong."""
        permissions = env.get("CORRAL_PERMISSIONS") or agent_table.DEFAULT_PERMISSIONS
        if permissions not in agent_table.PERMISSIONS:
            return "CORRAL_PERMISSIONS must be one of %s, not %r" % (
                ", ".join(agent_table.PERMISSIONS), permissions)
        provider = env.get("CORRAL_DROID_PROVIDER") or agent_table.DROID_PROVIDERS[0]
        if provider not in agent_table.DROID_PROVIDERS:
            return "CORRAL_DROID_PROVIDER must be one of %s, not %r" % (
                ", ".join(agent_table.DROID_PROVIDERS), provider)
        switch = env.get("CORRAL_GATEWAY", "").strip().lower()
        if switch in ("1", "true", "yes", "on"):
            raw = env.get("CORRAL_GATEWAY_PORT") or str(agent_table.DEFAULT_GATEWAY_PORT)
            try:
                port = int(raw)
                if not 0 <= port <= 65535:
                    raise ValueError
            except ValueError:
                return "CORRAL_GATEWAY_PORT must be a port number (0 to 65535), not %r" % raw
            self.gateway_port = port
        elif switch not in ("", "0", "false", "no", "off"):
            return "CORRAL_GATEWAY must be 1 or 0, not %r" % env.get("CORRAL_GATEWAY")
        self.setup = agent_table.Setup(permissions=permissions, model=env.get("CORRAL_MODEL", ""),
                                       droid_provider=provider)
        return None

    def _on_workspace_checked(self, ev):
        if self.state != "checking":
            return
        if ev.error is not None:
            return self._fatal("workspace %s is not writable: %s" % (self.workspace, ev.error))
        if self.gateway_port is None:
            return self._probe()
        self.state = "gateway"
        self._out.append(StartGateway(self.gateway_port))

    def _on_gateway_started(self, ev):
        if self.state != "gateway":
            return
        if ev.error is not None:
            return self._fatal("cannot serve the model gateway on 127.0.0.1:%d: %s"
                               % (self.gateway_port, ev.error))
        self.setup.gateway_port = ev.port
        self.state = "preparing"
        files = tuple(self.agent.files(self.setup))
        self._out.append(PrepareAgent(self.agent.probe[0], self.env.get("HOME", ""),
                                      self.env.get("PATH", ""), tuple(self.agent.path_hints), files))

    def _on_agent_prepared(self, ev):
        if self.state != "preparing":
            return
        if ev.error is not None:
            return self._fatal("cannot prepare the agent's home: %s" % ev.error)
        setup = self.setup
        setup.home = ev.home
        setup.path_dirs = tuple(ev.path_dirs)
        env = dict(self.env)
        env["HOME"] = ev.home
        path = [p for p in env.get("PATH", "").split(":") if p]
        extra = tuple(d for d in setup.path_dirs if d not in path)
        if extra:
            env["PATH"] = ":".join(extra + tuple(path))
        env.update(self.agent.env(setup))
        self.agent_env = env
        self._log("model gateway on http://127.0.0.1:%d (permissions %s%s); agent home %s"
                  % (setup.gateway_port, setup.permissions,
                     ", model " + setup.model if setup.model else "", ev.home))
        check = self.agent.sandbox_check(setup)
        if check is None:
            return self._probe()
        self.state = "sandbox"
        self._out.append(RunProbe(check, self.workspace, PROBE_TIMEOUT_S, self.agent_env))

    def _sandbox_checked(self, works, detail):
        """The agent's own sandbox works here, or not (see agents.py, sandbox_check)."""
        setup = self.setup
        setup.sandbox = works
        if not works:
            why = "%s's sandbox does not work here (%s)" % (self.agent.cli, detail or "no detail")
            if setup.permissions == "read-only":
                return self._fatal("CORRAL_PERMISSIONS=read-only cannot be enforced: " + why)
            self._log(why + ": it runs without it, the container is its sandbox")
        self._probe()

    def _probe(self):
        self.state = "probing"
        self._out.append(RunProbe(list(self.agent.probe), self.workspace, PROBE_TIMEOUT_S,
                                  self.agent_env))

    def _on_probe_failed(self, ev):
        if self.state == "sandbox":
            return self._sandbox_checked(False, ev.why + (": " + ev.detail if ev.detail else ""))
        if self.state != "probing":
            return
        probe = self.agent.probe
        if ev.why == "not_found":
            return self._fatal("agent CLI %r not found on PATH" % probe[0])
        if ev.why == "timeout":
            return self._fatal("agent CLI version probe %r timed out after %s s"
                               % (" ".join(probe), _num(PROBE_TIMEOUT_S)))
        return self._fatal("agent CLI version probe %r cannot run: %s" % (" ".join(probe), ev.detail))

    def _on_probe_done(self, ev):
        if self.state == "sandbox":
            err = (ev.stderr.decode("utf-8", "replace").strip().splitlines() or [""])[-1][-300:]
            return self._sandbox_checked(ev.exit_code == 0, "exit %d: %s" % (ev.exit_code, err))
        if self.state != "probing":
            return
        out = ev.stdout.decode("utf-8", "replace").strip()
        if ev.exit_code != 0:
            err = (ev.stderr.decode("utf-8", "replace").strip() or out)[-500:]
            return self._fatal("agent CLI version probe %r failed with exit %d: %s"
                               % (" ".join(self.agent.probe), ev.exit_code, err))
        self.version = out.splitlines()[0] if out else ""
        self.state = "serving"
        self._send("ready", worker_id=self.worker_id, agent=self.agent_name,
                   agent_version=self.version, wrapper_version=WRAPPER_VERSION, pid=self.pid)
        self._log("ready: worker %s agent %s (%s)%s" % (self.worker_id, self.agent_name, self.version,
                                                          self.note))
        self._start_timer("heartbeat", self.interval)

    def _on_wrapper_failed(self, ev):
        self._fatal(ev.reason, EX_SOFTWARE)

    # -- frames in -------------------------------------------------------------------------------
    def _on_stdin_data(self, ev):
        if self.state not in ("serving", "closing") or self.actor_gone:
            return
        for line, oversized in self.lines.feed(ev.data):
            if self.state not in ("serving", "closing"):
                break
            self._line(line, oversized)

    def _on_stdin_closed(self, ev):
        if self.state == "closing" and not self.actor_gone:
            for line, oversized in self.lines.close():
                self._line(line, oversized)
            self.actor_gone = True
            return self._end_exchanges("the supervisor went away", tell_actor=False)
        if self.state != "serving":
            return
        for line, oversized in self.lines.close():
            self._line(line, oversized)
        self.actor_gone = True
        self._end_exchanges("the supervisor went away", tell_actor=False)
        if self.state != "serving":
            return
        self._log("stdin closed: shutting down")
        self._shutdown(0.0)

    def _line(self, raw, oversized):
        if oversized:
            return self._reject_undecodable(raw, "a frame longer than %d bytes" % MAX_FRAME_IN)
        raw = raw.strip()
        if not raw:
            return
        try:
            self._frame(raw)
        except Exception as exc:   # never: but a bad frame must not end the wrapper
            self._log("error handling a frame: %r" % (exc,))

    def _reject_undecodable(self, raw, why):
        self._log("ignoring %s: %r" % (why, raw[:200]))
        tid = salvage_task_id(raw)
        if tid is not None:
            self._send("task_done", task_id=tid, status="error", exit_code=None, output="",
                       error="invalid run_task: %s" % why, duration_s=0.0, truncated=False,
                       failure="", usage=None)

    def _frame(self, raw):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return self._reject_undecodable(raw, "a frame that is not valid UTF-8 (%s)" % exc.reason)
        try:
            frame = json.loads(text)
        except (ValueError, RecursionError) as exc:
            return self._reject_undecodable(
                raw, "a frame that is not JSON (%s)" % (str(exc)[:100] or type(exc).__name__))
        if not isinstance(frame, dict):
            return self._log("ignoring a frame that is %s, not an object: %s"
                             % (_json_type(frame), _shown(frame)))
        kind = frame.get("kind")
        if kind == "hello":
            return self._on_hello(frame)      # (renews the lease if it names this worker)
        if kind in ACTOR_KINDS:
            self._renew_lease()
        if kind == "lease":
            return self._on_lease(frame)
        if self.state == "closing" and kind not in ("cancel_task", "http_response", "http_chunk",
                                                    "http_end"):
            return      # shutting down: only what the running task still needs is read
        if kind == "run_task":
            self._submit(frame)
        elif kind == "cancel_task":
            self._cancel(frame.get("task_id"), frame.get("reason"))
        elif kind == "http_response":
            self._on_http_response(frame)
        elif kind == "http_chunk":
            self._on_http_chunk(frame)
        elif kind == "http_end":
            self._on_http_end(frame)
        elif kind == "shutdown":
            grace = _finite(frame.get("grace_s", DEFAULT_GRACE_S))
            if grace is None or grace < 0:
                self._log("shutdown with a bad grace_s %s: using %s s"
                          % (_shown(frame.get("grace_s")), _num(DEFAULT_GRACE_S)))
                grace = DEFAULT_GRACE_S
            self._log("shutdown requested")
            self._shutdown(grace)
        else:
            self._log("ignoring unknown frame kind %s" % _shown(kind))

    # -- tasks -----------------------------------------------------------------------------------
    def _submit(self, frame):
        task_id = frame.get("task_id")
        if not usable_task_id(task_id):
            return self._log("ignoring run_task without a usable task_id: %s" % _shown(task_id))
        job, problem = parse_run_task(frame)
        if job is None:
            self._log("rejecting task %s: %s" % (task_id, problem))
            return self._send("task_done", task_id=task_id, status="error", exit_code=None, output="",
                              error="invalid run_task: " + problem, duration_s=0.0, truncated=False,
                              failure="", usage=None)
        if self.job is not None:
            return self._send("task_done", task_id=task_id, status="error", exit_code=None, output="",
                              error="worker is busy with task %s" % self.job.task_id, duration_s=0.0,
                              truncated=False, failure="", usage=None)
        job.t0 = self.clock()
        self.job = job
        prompt = job.prompt
        if len(prompt.encode("utf-8")) <= PROMPT_ARGV_MAX and not prompt.startswith("-"):
            self._start_agent(job, self._command(prompt, job.args, None), None)
        elif self.agent.indirect == "stdin":
            self._start_agent(job, self._command(prompt, job.args, "-"), prompt.encode("utf-8"))
        else:
            self._out.append(WritePromptFile(job.task_id, prompt.encode("utf-8"), self.agent.prompt_suffix))

    def _command(self, prompt, args, indirect):
        return self.agent.command(prompt, list(args), indirect, self.setup)

    def _start_agent(self, job, argv, stdin):
        self._out.append(StartAgent(job.task_id, argv, self.workspace, stdin, self.agent_env))

    def _on_prompt_file_written(self, ev):
        job = self._job(ev)
        if job is None or job.phase != "starting":
            return self._out.append(RemoveFile(ev.path))
        job.prompt_file = ev.path
        if job.cancelled:
            return self._answer_cancelled(job, None, "")
        self._start_agent(job, self._command(job.prompt, job.args, ev.path), None)

    def _on_agent_not_started(self, ev):
        job = self._job(ev)
        if job is None or job.phase != "starting":
            return
        if ev.stage == "prompt_file":
            why = "cannot write the prompt to a temporary file: %s" % ev.detail
        else:
            why = "cannot start the agent: %s" % ev.detail
        self._answer(job, "error", None, "", why, failure="agent_error")

    def _on_agent_started(self, ev):
        job = self._job(ev)
        if job is None or job.phase != "starting":
            return
        job.phase = "running"
        job.oom_before = ev.oom_kills
        self._send("task_started", task_id=job.task_id)
        if job.cancelled:
            return self._kill(job, "cancelled")
        if job.timeout_s is not None:
            self._start_timer("timeout", job.t0 + job.timeout_s - self.clock())

    def _on_agent_output(self, ev):
        job = self._job(ev)
        if job is None or job.phase != "running":
            return
        if not ev.data:
            job.eof.add(ev.stream)
            return self._check_io_end(job)
        if ev.stream == "stdout":
            buf = job.out_tail
            buf += ev.data
            if len(buf) > 2 * STDOUT_TAIL:
                del buf[:len(buf) - STDOUT_TAIL]
            for i in range(0, len(ev.data), OUTPUT_CHUNK):
                text = job.decoder.decode(ev.data[i:i + OUTPUT_CHUNK])
                if text:
                    self._send("task_output", task_id=job.task_id, data=text)
            if self.agent.final is not None and not job.final_seen:
                self._scan_final(job, ev.data)
        else:
            # the agent's stderr goes to the container's log as it comes (so it survives a crash),
            # and its tail is kept for the task's error text
            buf = job.err_tail
            buf += ev.data
            if len(buf) > 2 * STDERR_TAIL:
                del buf[:len(buf) - STDERR_TAIL]
            line = job.err_line
            line += ev.data
            start = 0
            while True:
                i = line.find(b"\n", start)
                if i < 0:
                    break
                self._out.append(AgentLog(bytes(line[start:i + 1])))
                start = i + 1
            del line[:start]
            if len(line) > STDERR_LINE:
                self._flush_stderr_line(job)

    def _scan_final(self, job, data):
        """Look for the agent's final result in its stdout's lines: once it is there, the agent
        has RESULT_LINGER_S to exit by itself, then it is stopped and the task answered."""
        line = job.line
        start = 0
        while not job.final_seen:
            i = data.find(b"\n", start)
            if i < 0:
                break
            if not job.line_skip:
                line += data[start:i]
                job.final_seen = self._is_final(bytes(line))
            job.line_skip = False
            del line[:]
            start = i + 1
        if job.final_seen:
            del line[:]
            if not job.exited and job.kill_reason is None:
                self._start_timer("linger", RESULT_LINGER_S)
            return
        if not job.line_skip:
            line += data[start:]
            if len(line) > STDOUT_TAIL:
                del line[:]
                job.line_skip = True

    def _is_final(self, line):
        line = line.strip()
        if not line.startswith(b"{"):
            return False
        try:
            obj = json.loads(line.decode("utf-8", "replace"))
        except (ValueError, RecursionError):
            return False
        return isinstance(obj, dict) and bool(self.agent.final(obj))

    def _flush_stderr_line(self, job):
        if job.err_line:
            self._out.append(AgentLog(bytes(job.err_line) + b"\n"))
            del job.err_line[:]

    def _on_agent_exited(self, ev):
        job = self._job(ev)
        if job is None or job.phase not in ("running", "cleaning"):
            return
        job.exit_code = ev.exit_code
        job.exited = True
        if job.phase != "running":
            return
        if job.kill_reason is None and len(job.eof) < 2:
            # the agent is gone, but its children hold its output: read it a little longer
            self._start_timer("linger", LINGER_S)
        self._check_io_end(job)

    def _on_timer_fired(self, ev):
        if ev.name not in self.timers:
            return
        self.timers.discard(ev.name)
        job = self.job
        running = job is not None and job.phase == "running"
        if ev.name == "heartbeat":
            self.seq += 1
            self._send("heartbeat", seq=self.seq, sent=self.sent_seq)
            self._start_timer("heartbeat", self.interval)
        elif ev.name == "timeout" and running:
            self._kill(job, "timeout")
        elif ev.name == "linger" and running:
            self._kill(job, "result" if job.final_seen and not job.exited else "linger")
        elif ev.name == "drain" and running:
            self._io_end(job)
        elif ev.name == "grace":
            if job is not None:
                self._cancel_job(job)
            self._start_timer("stop", STOP_S)
        elif ev.name == "stop":
            if self.orphaned:
                self._log("orphaned: task %s did not end in time, exiting"
                          % (job.task_id if job is not None else "?"))
            self._exit(EX_ORPHANED if self.orphaned else 0)
        elif ev.name == "lease":
            self._lease_ran_out()

    def _cancel(self, task_id, reason=None):
        job = self.job
        if job is not None and job.task_id == task_id:
            if reason in agent_table.FAILURES and not job.cancelled:
                job.cancel_failure = reason
                self._log("task %s stopped by the supervisor: %s" % (task_id, reason))
            return self._cancel_job(job)
        if not usable_task_id(task_id):
            return self._log("ignoring cancel_task without a usable task_id: %s" % _shown(task_id))
        self._log("ignoring cancel_task for task %s: it is not running" % _shown(task_id))

    def _cancel_job(self, job):
        job.cancelled = True
        if job.phase == "running":
            self._kill(job, "cancelled")

    def _kill(self, job, reason):
        if job.kill_reason is not None:
            return
        job.kill_reason = reason
        self._cancel_timer("timeout")
        self._cancel_timer("linger")
        self._out.append(KillAgent(job.task_id))
        self._start_timer("drain", CLEANUP_S)
        self._check_io_end(job)

    def _check_io_end(self, job):
        if job.phase == "running" and len(job.eof) == 2 and (job.exited or job.kill_reason is not None):
            self._io_end(job)

    def _io_end(self, job):
        job.phase = "cleaning"
        for name in ("timeout", "linger", "drain"):
            self._cancel_timer(name)
        tail = job.decoder.decode(b"", final=True)
        if tail:
            self._send("task_output", task_id=job.task_id, data=tail)
        self._flush_stderr_line(job)
        self._out.append(Cleanup(job.task_id))

    def _on_cleanup_done(self, ev):
        job = self._job(ev)
        if job is None or job.phase != "cleaning":
            return
        code = job.exit_code
        if job.kill_reason == "result":
            code = None         # it did not exit by itself: it was stopped after its result
        stdout = bytes(job.out_tail).decode("utf-8", "replace")
        stderr = bytes(job.err_tail).decode("utf-8", "replace")
        job.out_tail = job.err_tail = None
        result = self.agent.parse(code, stdout, stderr)
        if job.cancelled:
            return self._answer_cancelled(job, code, stdout, result.usage,
                                          exit_after=not ev.remaining, remaining=ev.remaining)
        elif job.kill_reason == "timeout":
            status, output, error = "timeout", stdout, "timed out after %ss" % _num(job.timeout_s)
            failure = ""
        elif code == -SIGKILL and ev.oom_kills > job.oom_before:
            # The kernel killed the agent for memory: this container is out of memory. Say so and
            # end, so that the actor records oom_killed and starts a fresh container.
            self._log("agent was killed by the kernel OOM killer")
            self._remove_prompt_file(job)
            return self._fatal(OOM_REASON, EX_OOM)
        else:
            status, output, error, failure = result[:4]
        self._answer(job, status, code, output, error, exit_after=not ev.remaining, failure=failure,
                     usage=result.usage)
        self._cleanup_failed(job, ev.remaining)

    def _cleanup_failed(self, job, remaining):
        if remaining:
            remaining = sorted(remaining)
            self._fatal("cannot clean up after task %s: %d processes remain (pids %s)"
                        % (job.task_id, len(remaining), " ".join(str(p) for p in remaining[:20])),
                        EX_SOFTWARE)

    def _answer_cancelled(self, job, code, output, usage=None, exit_after=True, remaining=()):
        """A cancelled task: "cancelled", or "error" with the failure its cancel_task named."""
        if job.cancel_failure:
            self._answer(job, "error", code, output, "stopped by the supervisor: %s" % job.cancel_failure,
                         exit_after=exit_after, failure=job.cancel_failure, usage=usage)
        else:
            self._answer(job, "cancelled", code, output, "cancelled", exit_after=exit_after, usage=usage)
        self._cleanup_failed(job, remaining)

    def _on_task_crashed(self, ev):
        job = self._job(ev)
        if job is None:
            return
        self._answer(job, "error", None, "", "wrapper error while running the task: %s" % ev.error)

    def _remove_prompt_file(self, job):
        if job.prompt_file is not None:
            self._out.append(RemoveFile(job.prompt_file))
            job.prompt_file = None

    def _answer(self, job, status, code, output, error, exit_after=True, failure="", usage=None):
        """task_done, and the worker is idle from that moment (the actor may send the next task
        at once). Its prompt file is gone before, and its HTTP exchanges are ended."""
        self._remove_prompt_file(job)
        for name in ("timeout", "linger", "drain"):
            self._cancel_timer(name)
        self._end_exchanges("the task ended", tell_actor=True)
        output, truncated = fit_output(_clean(output), job.max_output)
        self._send("task_done", task_id=job.task_id, status=status, exit_code=code, output=output,
                   error=clip_error(error), duration_s=round(self.clock() - job.t0, 6),
                   truncated=truncated, failure=failure, usage=usage)
        self.job = None
        if self.state == "closing" and exit_after:
            self._exit(0)
        elif self.orphaned and exit_after:
            self._log("orphaned: task %s ended, exiting" % job.task_id)
            self._exit(EX_ORPHANED)

    # -- the model gateway's endpoint ------------------------------------------------------------
    def _on_http_request_started(self, ev):
        rid = ev.req_id
        if rid in self.exchanges:
            return self._log("ignoring a second HTTP request numbered %s" % rid)
        job = self.job
        if self.gateway_port is None or self.state not in ("serving", "closing"):
            return self._http_local(rid, 503, "the endpoint is not serving")
        if self.actor_gone:
            return self._http_local(rid, 503, "the supervisor went away")
        if job is None or job.phase not in ("starting", "running"):
            return self._http_local(rid, 503, "no task is running")
        if len(self.exchanges) >= MAX_EXCHANGES:
            return self._http_local(rid, 503, "more than %d requests at once" % MAX_EXCHANGES)
        headers = [list(h) if isinstance(h, (tuple, list)) else h for h in ev.headers]
        problem = request_problem(ev.method, ev.target, headers)
        if problem:
            return self._http_local(rid, problem[0], problem[1])
        ex = Exchange(rid, ev.method, ev.version)
        if not self._send_exact("http_request", req_id=rid, method=ev.method, target=ev.target,
                                headers=headers):
            return self._http_local(rid, 431, "request target and header fields too long")
        self.exchanges[rid] = ex

    def _on_http_request_body(self, ev):
        ex = self.exchanges.get(ev.req_id)
        if ex is None or ex.phase != "request" or not ev.data:
            return
        ex.bytes_up += len(ev.data)
        if ex.bytes_up > MAX_REQUEST_BODY:
            return self._abort_exchange(ex, "request body over %d bytes" % MAX_REQUEST_BODY, status=413)
        data = ev.data
        for i in range(0, len(data), GATEWAY_CHUNK):
            self._send_exact("http_chunk", req_id=ex.req_id,
                             data=base64.b64encode(data[i:i + GATEWAY_CHUNK]).decode("ascii"))

    def _on_http_request_end(self, ev):
        ex = self.exchanges.get(ev.req_id)
        if ex is None or ex.phase != "request":
            return
        ex.phase = "waiting"
        self._send_exact("http_end", req_id=ex.req_id, error="")

    def _on_http_client_gone(self, ev):
        ex = self.exchanges.pop(ev.req_id, None)
        if ex is None:
            return
        self._send_exact("http_end", req_id=ex.req_id,
                         error=clip_error("the agent went away: " + (ev.error or "connection closed"),
                                          MAX_HTTP_ERROR))

    def _exchange_of(self, frame):
        rid = frame.get("req_id")
        if isinstance(rid, bool) or not isinstance(rid, int):
            self._log("ignoring a %s frame without a usable req_id: %s" % (frame.get("kind"), _shown(rid)))
            return None
        return self.exchanges.get(rid)    # None: over (late frames of an aborted exchange)

    def _on_http_response(self, frame):
        ex = self._exchange_of(frame)
        if ex is None:
            return
        if ex.phase == "response":
            return self._abort_exchange(ex, "a second http_response")
        status = frame.get("status")
        if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
            return self._abort_exchange(ex, "http_response with a bad status %s" % _shown(status))
        headers = response_headers(frame.get("headers", []))
        if headers is None:
            return self._abort_exchange(ex, "http_response with unusable headers")
        out = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
        if ex.method == "HEAD" or status in (204, 304):
            framing = "none"
            if ex.method == "HEAD":
                out += [(k, v) for k, v in headers if k.lower() == "content-length"][:1]
        elif ex.version == "HTTP/1.0":
            framing = "close"
            out.append(("Connection", "close"))
        else:
            framing = "chunked"
            out.append(("Transfer-Encoding", "chunked"))
        ex.phase = "response"
        self._out.append(HttpRespond(ex.req_id, status, tuple(out), framing))

    def _on_http_chunk(self, frame):
        ex = self._exchange_of(frame)
        if ex is None:
            return
        data = frame.get("data")
        try:
            if not isinstance(data, str):
                raise ValueError
            raw = base64.b64decode(data.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError):
            return self._abort_exchange(ex, "http_chunk whose data is not base64")
        if ex.phase == "response":
            if raw:
                self._out.append(HttpBody(ex.req_id, raw))
        elif raw:
            self._abort_exchange(ex, "http_chunk before http_response")

    def _on_http_end(self, frame):
        ex = self._exchange_of(frame)
        if ex is None:
            return
        error = frame.get("error") or ""
        error = error if isinstance(error, str) else _shown(error)
        del self.exchanges[ex.req_id]
        if ex.phase == "response":
            self._out.append(HttpFinish(ex.req_id, clip_error(error, MAX_HTTP_ERROR)))
        else:
            self._http_local(ex.req_id, 502, error or "the supervisor ended the request unanswered")

    def _abort_exchange(self, ex, why, status=502, tell_actor=True):
        """End an exchange with an error on both sides: ``http_end`` with the error to the actor;
        the client's response aborted, or answered ``status`` if it has not begun."""
        self.exchanges.pop(ex.req_id, None)
        why = clip_error(why, MAX_HTTP_ERROR)
        self._log("HTTP request %d ended: %s" % (ex.req_id, why))
        if tell_actor:
            self._send_exact("http_end", req_id=ex.req_id, error=why)
        if ex.phase == "response":
            self._out.append(HttpFinish(ex.req_id, why))
        else:
            self._http_local(ex.req_id, status, why)

    def _end_exchanges(self, why, tell_actor):
        for ex in list(self.exchanges.values()):
            self._abort_exchange(ex, why, status=503, tell_actor=tell_actor)

    def _http_local(self, rid, status, message):
        """Answer a request here, without the actor."""
        body = gateway_error_body(message)
        self._out.append(HttpRespond(rid, status, (("Content-Type", "application/json"),
                                                   ("Content-Length", str(len(body)))), "length"))
        self._out.append(HttpBody(rid, body))
        self._out.append(HttpFinish(rid, ""))

    def _send_exact(self, kind, **fields):
        """A gateway frame as it is (never cut to fit like task_done): False if it cannot be."""
        fields["kind"] = kind
        try:
            data = _dumps(fields) + b"\n"
        except Exception as exc:
            self._log("cannot encode a %s frame: %r" % (kind, exc))
            return False
        if len(data) >= MAX_LINE:
            self._log("not sending a %s frame of %d bytes" % (kind, len(data)))
            return False
        self._out.append(Send(kind, data))
        return True

    # -- shutdown --------------------------------------------------------------------------------
    def _shutdown(self, grace):
        """Wait for the running task up to ``grace`` s, then cancel it and wait for its answer
        up to STOP_S; then exit 0."""
        self.state = "closing"
        self.orphaned = False
        self._cancel_timer("lease")
        if self.job is None:
            return self._exit(0)
        if grace > 0:
            return self._start_timer("grace", grace)
        self._cancel_job(self.job)
        if self.state == "closing":
            self._start_timer("stop", STOP_S)

    _handlers = {
        Boot: _on_boot, WorkspaceChecked: _on_workspace_checked, ProbeDone: _on_probe_done,
        ProbeFailed: _on_probe_failed, WrapperFailed: _on_wrapper_failed,
        StdinData: _on_stdin_data, StdinClosed: _on_stdin_closed,
        PromptFileWritten: _on_prompt_file_written, AgentNotStarted: _on_agent_not_started,
        AgentStarted: _on_agent_started, AgentOutput: _on_agent_output,
        AgentExited: _on_agent_exited, TimerFired: _on_timer_fired, CleanupDone: _on_cleanup_done,
        TaskCrashed: _on_task_crashed, GatewayStarted: _on_gateway_started,
        AgentPrepared: _on_agent_prepared, HttpRequestStarted: _on_http_request_started,
        HttpRequestBody: _on_http_request_body, HttpRequestEnd: _on_http_request_end,
        HttpClientGone: _on_http_client_gone,
    }
