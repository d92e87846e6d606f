#!/usr/bin/env python3
"""corral worker-wrapper: the entrypoint inside every worker container.

Standard library only; runs on any python3 >= 3.9. Speaks one JSON object per line on stdout to
its Worker actor, reads frames on stdin, and writes human-readable logs to stderr.

Environment: CORRAL_WORKER_ID, CORRAL_AGENT (claude|factory|codex|shell), CORRAL_REQUIRED_ENV
(comma-separated names), CORRAL_HEARTBEAT_S, CORRAL_WORKSPACE (default /workspace),
CORRAL_ORPHAN_TIMEOUT_S and CORRAL_ORPHAN_POLICY (cancel|finish): with no frame from a supervisor
for that long the wrapper ends its task as the policy says and exits 0 (see core.py: the lease,
sequence numbers and the replay that ``hello`` asks for). CORRAL_STDIN_GATE=1: nothing happens
before a first line on stdin (see `stdin_gate`: a Swarm service's container).

This file is the process driver of the wrapper's logic, which lives in core.py (sans-IO: every
decision, frame and limit is there, and FakeEngine drives the same core). Here are only the
process's own means: three long-lived threads (main: reads stdin; task: runs the agent, its
I/O and its cleanup; timers: heartbeats, timeouts, grace), subprocesses, the /proc sweep, the
subreaper and the cgroup's OOM-kill counter. Every event goes into the core under one lock, and
its actions are done in order under that lock (frames keep their order; a task's answer and
"idle" are one step).

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
  temporary file, removed when the task ends. (The command lines: agents.py.)
- No process of a task survives it: when a task ends (done, timeout, cancel, or the agent exiting
  while its children linger on), the agent's process group is killed, then /proc is swept and
  every remaining process is SIGKILLed until none remain (at most ~2 s). The wrapper is a child
  subreaper, so orphans of the task stay its descendants. What is swept: when the wrapper is the
  container's main process (pid 1, or the child of an init whose command line ends with the
  wrapper's own), every process of the pid namespace but pid 1, the wrapper and its ancestors;
  anywhere else (e.g. on a host) only the wrapper's descendants. If processes cannot be killed,
  the wrapper writes ``fatal`` and exits 70, so that the actor replaces the container. No thread
  is started per task (a fork bomb may exhaust the pids limit): one long-lived task thread runs
  the agent, its I/O and its cleanup.
- Frames from the actor are never trusted: undecodable frames, non-objects, unknown kinds and bad
  fields are logged and ignored; a run_task whose task_id is usable (a string of at most 256
  characters) but which is otherwise invalid gets a task_done with status "error" saying why.

The agents it starts get CORRAL_WRAPPER_DIR (this file's directory) in their environment: a stub
agent copied elsewhere finds the agent table there.

The model gateway's endpoint (CORRAL_GATEWAY=1; CORRAL_GATEWAY_PORT, default 8787): an HTTP/1.1
server on 127.0.0.1 (``http.server``, one thread per connection, at most MAX_CONNECTIONS; more
are answered 503 at once). Each request's head, body (Content-Length or chunked) and end go to the
core, which makes frames of them; what the core says for that request (HttpRespond, HttpBody,
HttpFinish) is queued for its connection's thread, which writes it as it comes (chunked, so that
an SSE stream flows event by event; an abort closes the connection without the last chunk). A
client that does not read its response is cut off past MAX_QUEUED bytes or CLIENT_TIMEOUT_S. With
the gateway on, the agent also gets a writable home (HOME, else a private temporary directory),
its files (droid's settings) and PATH additions (codex's codex-path), see PrepareAgent.
"""

import errno
import itertools
import os
import queue
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.realpath(__file__))
try:                    # imported as runtime.wrapper.wrapper
    from . import core
except ImportError:     # run as a script (python3 /opt/corral/wrapper.py, or through runpy)
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import core

PR_SET_CHILD_SUBREAPER = 36
READ_CHUNK = 65536
MAX_CONNECTIONS = 96        # HTTP connections to the gateway's endpoint at once (threads)
CLIENT_TIMEOUT_S = 600.0    # a connection idle this long, or a client not reading this long, is closed
MAX_QUEUED = 16 << 20       # response bytes waiting for a client that does not read them
BODY_READ = 65536


def log(msg):
    try:
        sys.stderr.write("[wrapper] %s\n" % msg)
        sys.stderr.flush()
    except Exception:
        pass


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _exit(code):
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


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


class Driver(object):
    """Feeds the core its events and does its actions, with threads and subprocesses."""

    def __init__(self, wrapper_core, scope="descendants", subreaper=False):
        self.core = wrapper_core
        self.scope = scope
        self.subreaper = subreaper
        self.lock = threading.RLock()
        self.timer_cond = threading.Condition(self.lock)
        self.timers = {}             # name -> monotonic deadline
        self.starts = queue.Queue()  # StartAgent actions for the task thread
        self.kill_requested = False  # KillAgent: the task thread kills the agent's tree
        self.io_over = False         # Cleanup: the task thread stops pumping and sweeps
        self.proc = None             # the agent process (only the task thread creates children)
        self.stdout = sys.stdout.buffer
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.gateway = None          # the GatewayServer, once StartGateway
        self.exchanges = {}          # req_id -> ClientExchange (its connection's thread writes it)
        self.req_ids = itertools.count(1)

    # -- events in, actions out -----------------------------------------------------------------
    def feed(self, event):
        with self.lock:
            pending = [event]
            while pending:
                for action in self.core.handle(pending.pop(0)):
                    follow = self.do(action)
                    if follow is not None:
                        pending.append(follow)

    def do(self, a):
        """Do one action (under the lock); -> the event that answers it at once, or None."""
        if isinstance(a, core.Send):
            try:
                self.stdout.write(a.data)
                self.stdout.flush()
            except (OSError, ValueError) as exc:
                log("cannot write a %s frame: %s" % (a.kind, exc))
        elif isinstance(a, core.Log):
            log(a.text)
        elif isinstance(a, core.AgentLog):
            try:
                sys.stderr.write("[agent] " + a.data.decode("utf-8", "replace"))
                sys.stderr.flush()
            except Exception:
                pass
        elif isinstance(a, core.StartTimer):
            self.timers[a.name] = time.monotonic() + a.delay
            self.timer_cond.notify_all()
        elif isinstance(a, core.CancelTimer):
            self.timers.pop(a.name, None)
            self.timer_cond.notify_all()
        elif isinstance(a, core.StartAgent):
            self.starts.put(a)
        elif isinstance(a, core.KillAgent):
            self.kill_requested = True
            self._wake()
        elif isinstance(a, core.Cleanup):
            self.io_over = True
            self._wake()
        elif isinstance(a, core.RemoveFile):
            _unlink(a.path)
        elif isinstance(a, core.WritePromptFile):
            try:
                return core.PromptFileWritten(a.task_id, self._prompt_file(a.data, a.suffix))
            except OSError as exc:
                return core.AgentNotStarted(a.task_id, "prompt_file", str(exc))
        elif isinstance(a, core.CheckWorkspace):
            return core.WorkspaceChecked(check_workspace(a.path))
        elif isinstance(a, core.RunProbe):
            return run_probe(a)
        elif isinstance(a, (core.HttpRespond, core.HttpBody, core.HttpFinish)):
            return self._to_client(a)
        elif isinstance(a, core.StartGateway):
            return self._start_gateway(a.port)
        elif isinstance(a, core.PrepareAgent):
            return prepare_agent(a)
        elif isinstance(a, core.Exit):
            _exit(a.code)
        else:
            raise TypeError("not a wrapper action: %r" % (a,))
        return None

    # -- the model gateway's endpoint -----------------------------------------------------------
    def _start_gateway(self, port):
        try:
            import gateway_server     # only a real agent's wrapper pays for http.server
            server = gateway_server.GatewayServer(self, port, timeout_s=CLIENT_TIMEOUT_S,
                                                  max_connections=MAX_CONNECTIONS, log=log)
        except (OSError, OverflowError) as exc:
            return core.GatewayStarted(0, exc.strerror if isinstance(exc, OSError) and exc.strerror
                                       else str(exc))
        try:
            threading.Thread(target=server.serve_forever, name="gateway", daemon=True).start()
        except RuntimeError as exc:
            server.server_close()
            return core.GatewayStarted(0, "cannot start its thread: %s" % exc)
        self.gateway = server
        return core.GatewayStarted(server.server_address[1])

    def _to_client(self, a):
        """Queue what the core says for one HTTP client (under the lock). -> HttpClientGone when
        the client has fallen too far behind."""
        ex = self.exchanges.get(a.req_id)
        if ex is None or ex.dropped:
            return None
        if isinstance(a, core.HttpBody):
            if ex.queued + len(a.data) > MAX_QUEUED:
                ex.dropped = True
                ex.queue.put(("finish", "the client does not read its response"))
                return core.HttpClientGone(a.req_id, "it did not read %d bytes of its response"
                                           % MAX_QUEUED)
            ex.queued += len(a.data)
            ex.queue.put(("body", a.data))
        elif isinstance(a, core.HttpRespond):
            ex.queue.put(("respond", a.status, a.headers, a.framing))
        else:
            ex.queue.put(("finish", a.error))
        return None

    def serve_exchange(self, handler):
        """One HTTP request on its connection's thread: to the core, and its response back."""
        rid = next(self.req_ids)
        ex = ClientExchange(rid)
        with self.lock:
            self.exchanges[rid] = ex
        gone = "connection closed"
        try:
            headers = tuple((k, v) for k, v in handler.headers.items())
            self.feed(core.HttpRequestStarted(rid, handler.command, handler.path, headers,
                                              handler.request_version))
            try:
                problem = self._read_body(handler, rid)
            except (OSError, ValueError) as exc:
                problem = "cannot read the request body: %s" % (exc,)
            if problem is not None:
                gone = problem
                handler.close_connection = True
                return
            self.feed(core.HttpRequestEnd(rid))
            try:
                if self._write_response(handler, ex):
                    gone = None
            except (OSError, ValueError, UnicodeError) as exc:
                gone = "cannot write the response: %s" % (exc,)
                handler.close_connection = True
        finally:
            with self.lock:
                self.exchanges.pop(rid, None)
            if gone is not None:
                self.feed(core.HttpClientGone(rid, gone))    # ignored if the exchange is over

    def _read_body(self, handler, rid):
        """Feed the request body to the core. -> None, or why it cannot be read."""
        rfile = handler.rfile
        te = handler.headers.get("Transfer-Encoding")
        if te is not None:
            if te.strip().lower() != "chunked":
                return "unsupported Transfer-Encoding %r" % te
            while True:
                line = rfile.readline(1026)
                if not line.endswith(b"\n"):
                    return "a chunked body cut short"
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    return "a bad chunk size %r" % line[:40]
                if size < 0:
                    return "a bad chunk size %r" % line[:40]
                if size == 0:
                    while True:                       # trailers, then the empty line
                        line = rfile.readline(65537)
                        if not line.endswith(b"\n"):
                            return "a chunked body cut short"
                        if line in (b"\r\n", b"\n"):
                            return None
                problem = self._read_exactly(rfile, rid, size)
                if problem:
                    return problem
                if rfile.readline(3) not in (b"\r\n", b"\n"):
                    return "a chunk without its line end"
        length = handler.headers.get("Content-Length")
        if length is None:
            return None
        try:
            size = int(length)
            if size < 0:
                raise ValueError
        except ValueError:
            return "a bad Content-Length %r" % length[:40]
        return self._read_exactly(rfile, rid, size)

    def _read_exactly(self, rfile, rid, size):
        while size:
            data = rfile.read(min(size, BODY_READ))
            if not data:
                return "the request body ended early"
            size -= len(data)
            self.feed(core.HttpRequestBody(rid, data))
        return None

    def _write_response(self, handler, ex):
        """Write what the core queues for this request. -> True when the response is complete."""
        framing = None
        while True:
            item = ex.queue.get()
            kind = item[0]
            if kind == "respond":
                _, status, headers, framing = item
                handler.send_response_only(status)
                for name, value in headers:
                    handler.send_header(name, value)
                handler.end_headers()
                if framing == "close":
                    handler.close_connection = True
            elif kind == "body":
                data = item[1]
                with self.lock:
                    ex.queued -= len(data)
                if framing == "chunked":
                    handler.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n")
                elif framing in ("close", "length"):
                    handler.wfile.write(data)
            else:
                if item[1]:
                    # cut short: the client must see an error, not an end
                    handler.close_connection = True
                    _abort_connection(handler.connection)
                    return True     # the core already knows
                if framing == "chunked":
                    handler.wfile.write(b"0\r\n\r\n")
                return True

    def _wake(self):
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    def _prompt_file(self, data, suffix):
        dirs = [os.environ.get("TMPDIR"), "/tmp", "/var/tmp", "/dev/shm", self.core.workspace]
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
                    f.write(data)
            except OSError as exc:
                last = exc
                _unlink(path)
                continue
            return path
        raise OSError(getattr(last, "errno", errno.EIO),
                      "no writable temporary directory for the prompt (%s)" % (last,))

    # -- threads ------------------------------------------------------------------------------
    def start_threads(self):
        threading.Thread(target=self._timer_loop, name="timers", daemon=True).start()
        threading.Thread(target=self._task_loop, name="task", daemon=True).start()

    def _timer_loop(self):
        with self.timer_cond:
            while True:
                if not self.timers:
                    self.timer_cond.wait()
                    continue
                name = min(self.timers, key=self.timers.get)
                left = self.timers[name] - time.monotonic()
                if left > 0:
                    self.timer_cond.wait(left)
                    continue
                del self.timers[name]
                try:
                    self.feed(core.TimerFired(name))
                except Exception as exc:   # the timers must live on
                    log("error handling timer %s: %r" % (name, exc))

    def _task_loop(self):
        while True:
            start = self.starts.get()
            try:
                self._run(start)
            except BaseException as exc:   # the thread must live on, and the task get an answer
                log("wrapper error in task %s: %s" % (start.task_id, "".join(
                    traceback.format_exception(type(exc), exc, exc.__traceback__)).strip()))
                self.feed(core.TaskCrashed(start.task_id, repr(exc)))
            finally:
                self.proc = None

    # -- task thread ----------------------------------------------------------------------------
    def _spawn(self, start):
        return subprocess.Popen(start.argv, stdin=subprocess.PIPE if start.stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=start.cwd,
                                env=start.env, start_new_session=True)

    def _run(self, start):
        tid = start.task_id
        with self.lock:
            self.kill_requested = self.io_over = False
        oom_before = oom_kill_count()
        proc = None
        for attempt in (1, 2):
            try:
                proc = self._spawn(start)
                break
            except OSError as exc:
                if exc.errno == errno.EAGAIN and attempt == 1:
                    # the pids limit is exhausted: clean up whatever is left, then try once more
                    log("cannot fork for task %s (%s): sweeping processes and retrying" % (tid, exc))
                    self._cleanup(None)
                    continue
                self.feed(core.AgentNotStarted(tid, "spawn", core.describe_spawn_error(exc)))
                return
            except (ValueError, subprocess.SubprocessError) as exc:
                self.feed(core.AgentNotStarted(tid, "spawn", str(exc)))
                return
        self.proc = proc
        self.feed(core.AgentStarted(tid, proc.pid, oom_before))
        exited = self._pump(tid, proc, start.stdin)
        # the task's I/O is over, however it ended: nothing of it may survive it
        remaining = self._cleanup(proc)
        if not exited and proc.returncode is not None:
            self.feed(core.AgentExited(tid, proc.returncode))
        self.feed(core.CleanupDone(tid, tuple(remaining), oom_kill_count()))

    def _pump(self, tid, proc, stdin_data):
        """Feed the agent's output and exit to the core, and its stdin from ``stdin_data``, until
        the core says the task's I/O is over (Cleanup); kill the agent's tree when it says so
        (KillAgent). -> whether the agent's exit was fed."""
        poller = select.poll()
        readers = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
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

        exited = False
        try:
            while True:
                self._reap()
                if proc.returncode is not None and not exited:
                    exited = True
                    self.feed(core.AgentExited(tid, proc.returncode))
                with self.lock:
                    kill, self.kill_requested = self.kill_requested, False
                    over = self.io_over
                if over:
                    break
                if kill:
                    if in_fd is not None:
                        close_stdin()
                        in_fd = None
                    self._cleanup(proc)
                    continue
                wait = 0.05 if readers or in_fd is not None else 0.01
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
                            n = os.write(in_fd, pending[:READ_CHUNK])
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
                            data = os.read(fd, READ_CHUNK)
                        except OSError:
                            data = b""
                        if not data:
                            poller.unregister(fd)
                        self.feed(core.AgentOutput(tid, readers[fd], data))
                        if not data:
                            del readers[fd]
        finally:
            if in_fd is not None:
                close_stdin()
            for f in (proc.stdout, proc.stderr):
                try:
                    f.close()
                except OSError:
                    pass
        return exited

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
        deadline = time.monotonic() + core.CLEANUP_S
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


# --- the model gateway's endpoint: HTTP on 127.0.0.1 -------------------------------------------

class ClientExchange(object):
    """What the core says for one HTTP request, queued for its connection's thread."""

    def __init__(self, req_id):
        self.req_id = req_id
        self.queue = queue.Queue()
        self.queued = 0           # body bytes in the queue (under the driver's lock)
        self.dropped = False      # cut off: nothing more is queued


def _abort_connection(sock):
    """Close with a reset, so that the client sees its response cut short."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def _writable_dir(path):
    if not path:
        return False
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".corral-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
        return True
    except OSError:
        return False


def prepare_agent(a):
    """PrepareAgent: a writable home, the agent's files in it, its PATH additions."""
    home = a.home if _writable_dir(a.home) else None
    if home is None:
        tried = []
        for d in (os.environ.get("TMPDIR"), "/tmp", "/var/tmp", "/dev/shm"):
            if not d:
                continue
            tried.append(d)
            try:
                home = tempfile.mkdtemp(prefix="corral-home-", dir=d)
                break
            except OSError:
                continue
        if home is None:
            return core.AgentPrepared(error="HOME %r is not writable, and no temporary directory "
                                            "is (%s)" % (a.home, ", ".join(tried)))
        log("HOME %r is not writable: the agent's home is %s" % (a.home, home))
    for rel, data in a.files:
        path = os.path.join(home, rel)
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError as exc:
            return core.AgentPrepared(error="cannot write %s: %s" % (path, exc.strerror or exc))
    dirs = []
    exe = shutil.which(a.cli, path=a.path or None)
    if exe:
        base = os.path.dirname(os.path.realpath(exe))
        for hint in a.path_hints:
            d = os.path.normpath(os.path.join(base, hint))
            if os.path.isdir(d):
                dirs.append(d)
    return core.AgentPrepared(home, tuple(dirs))


# --- startup --------------------------------------------------------------------------------

def check_workspace(workspace):
    """None if a file can be written in ``workspace``, else why not."""
    probe_path = os.path.join(workspace, ".corral-probe-%d" % os.getpid())
    try:
        with open(probe_path, "w") as f:
            f.write("ok")
        os.unlink(probe_path)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def run_probe(action):
    try:
        p = subprocess.run(action.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=action.timeout_s, cwd=action.cwd,
                           env=action.env)
    except FileNotFoundError:
        return core.ProbeFailed("not_found")
    except subprocess.TimeoutExpired:
        return core.ProbeFailed("timeout")
    except OSError as exc:
        return core.ProbeFailed("error", str(exc))
    return core.ProbeDone(p.returncode, p.stdout, p.stderr)


def stdin_gate(env):
    """CORRAL_STDIN_GATE=1: wait for a first line on stdin before anything else (the startup
    checks, ``ready``). A cluster engine starts a container before anyone can attach to it (a
    Swarm service's task); the gate keeps the wrapper silent until its supervisor is attached and
    opens it with a line, so that nothing it writes is lost. Returns what came after that line
    (it is read as frames once the wrapper serves), or None: stdin ended first, or no line came
    within the lease (CORRAL_ORPHAN_TIMEOUT_S), and the wrapper exits 0 without a word on stdout."""
    if env.get("CORRAL_STDIN_GATE", "") != "1":
        return b""
    try:
        lease = float(env.get("CORRAL_ORPHAN_TIMEOUT_S") or 0)
    except ValueError:
        lease = 0.0
    deadline = time.monotonic() + lease if lease > 0 else None
    buf = b""
    while b"\n" not in buf:
        if deadline is not None:
            ready, _, _ = select.select([0], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                log("no supervisor opened the stdin gate within %s s: exiting" % lease)
                return None
        try:
            data = os.read(0, READ_CHUNK)
        except InterruptedError:
            continue
        except OSError:
            data = b""
        if not data:
            log("stdin ended before the gate opened: exiting")
            return None
        buf += data
    return buf[buf.index(b"\n") + 1:]


def main():
    os.environ["CORRAL_WRAPPER_DIR"] = HERE     # for the agents it starts (see above)
    held = stdin_gate(os.environ)
    if held is None:
        _exit(0)
    scope = sweep_scope()
    subreaper = become_subreaper()
    wrapper_core = core.WrapperCore(os.environ, clock=time.monotonic, pid=os.getpid(),
                                    note="; cleanup sweeps %s%s" % (scope, "" if subreaper else " (not a subreaper)"))
    driver = Driver(wrapper_core, scope=scope, subreaper=subreaper)
    try:
        driver.start_threads()
    except RuntimeError as exc:
        driver.feed(core.WrapperFailed("cannot start the wrapper's threads: %s" % exc))
    driver.feed(core.Boot())      # the startup checks and the version probe; then ready
    if held:
        driver.feed(core.StdinData(held))
    while wrapper_core.wants_stdin:
        try:
            data = os.read(0, 1 << 20)
        except InterruptedError:
            continue
        except OSError as exc:
            log("cannot read stdin (%s): shutting down" % exc)
            data = b""
        driver.feed(core.StdinData(data) if data else core.StdinClosed())
        if not data:
            break
    # shutting down: the core ends the process (Exit) when its task is answered or its time is up
    threading.Event().wait()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
