#!/usr/bin/env python3
"""corral worker-wrapper: the entrypoint inside every worker container.

Standard library only; runs on any python3 >= 3.9. Speaks one JSON object per line on stdout to
its Worker actor, reads frames on stdin, and writes human-readable logs to stderr.

Environment: CORRAL_WORKER_ID, CORRAL_AGENT (claude|factory|codex|shell), CORRAL_REQUIRED_ENV
(comma-separated names), CORRAL_HEARTBEAT_S, CORRAL_WORKSPACE (default /workspace).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

WRAPPER_VERSION = "1"
EX_CONFIG = 78
OUTPUT_CHUNK = 16 * 1024

_out_lock = threading.Lock()
_stdout = sys.stdout.buffer


def send(kind, **fields):
    fields["kind"] = kind
    data = json.dumps(fields, separators=(",", ":")).encode() + b"\n"
    with _out_lock:
        _stdout.write(data)
        _stdout.flush()


def log(msg):
    sys.stderr.write("[wrapper] %s\n" % msg)
    sys.stderr.flush()


# --- agent adapters: real command lines, real output formats ---------------------------------

def _last_json_object(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    try:
        return json.loads(text)
    except ValueError:
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
        except ValueError:
            continue
        t = ev.get("type")
        if t == "item.completed" and (ev.get("item") or {}).get("type") == "agent_message":
            answer = ev["item"].get("text", "")
        elif t == "turn.failed":
            error = ((ev.get("error") or {}).get("message")) or "turn failed"
        elif t == "error":
            error = ev.get("message") or "error"
    if exit_code == 0 and not error:
        return "ok", answer, ""
    return "error", answer, error or stderr.strip()[-2000:] or "exit %s" % exit_code


def _shell(exit_code, stdout, stderr):
    if exit_code == 0:
        return "ok", stdout, ""
    return "error", stdout, stderr.strip()[-2000:] or "exit %s" % exit_code


AGENTS = {
    "claude": {"probe": ["claude", "--version"],
               "cmd": lambda p, a: ["claude", "-p", p, "--output-format", "json"] + a,
               "parse": _result_json},
    "factory": {"probe": ["droid", "--version"],
                "cmd": lambda p, a: ["droid", "exec", "-o", "json"] + a + [p],
                "parse": _result_json},
    "codex": {"probe": ["codex", "--version"],
              "cmd": lambda p, a: ["codex", "exec", "--json"] + a + [p],
              "parse": _codex_jsonl},
    "shell": {"probe": ["/bin/sh", "-c", "echo sh"],
              "cmd": lambda p, a: ["/bin/sh", "-c", p] + a,
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


# --- tasks -----------------------------------------------------------------------------------

class Runner(object):
    def __init__(self, agent_name, workspace):
        self.agent = AGENTS[agent_name]
        self.workspace = workspace
        self.lock = threading.Lock()
        self.current = None  # (task_id, Popen, thread, flags dict)

    def busy(self):
        with self.lock:
            return self.current is not None

    def start(self, frame):
        task_id = frame.get("task_id", "")
        with self.lock:
            if self.current is not None:
                send("task_done", task_id=task_id, status="error", exit_code=None, output="",
                     error="worker is busy with task %s" % self.current[0], duration_s=0.0)
                return
            cmd = self.agent["cmd"](frame.get("prompt", ""), list(frame.get("args") or []))
            flags = {"cancelled": False, "timed_out": False}
            t0 = time.monotonic()
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, cwd=self.workspace, start_new_session=True)
            except OSError as exc:
                send("task_done", task_id=task_id, status="error", exit_code=None, output="",
                     error="cannot start agent: %s" % exc, duration_s=0.0)
                return
            th = threading.Thread(target=self._wait, args=(task_id, proc, flags, t0, frame.get("timeout_s")),
                                  daemon=True)
            self.current = (task_id, proc, th, flags)
        send("task_started", task_id=task_id)
        th.start()

    def _wait(self, task_id, proc, flags, t0, timeout_s):
        err_chunks = []

        def pump_stderr():
            # the agent's stderr goes to the container's log as it comes (so it survives a crash),
            # and is kept for the task's error text
            for line in iter(proc.stderr.readline, b""):
                err_chunks.append(line)
                sys.stderr.write("[agent] " + line.decode(errors="replace"))
                sys.stderr.flush()
        err_thread = threading.Thread(target=pump_stderr, daemon=True)
        err_thread.start()
        timer = None
        if timeout_s:
            def on_timeout():
                flags["timed_out"] = True
                kill_group(proc)
            timer = threading.Timer(float(timeout_s), on_timeout)
            timer.daemon = True
            timer.start()
        out = []
        oom_before = oom_kill_count()
        while True:
            chunk = proc.stdout.read1(OUTPUT_CHUNK) if hasattr(proc.stdout, "read1") else proc.stdout.read(OUTPUT_CHUNK)
            if not chunk:
                break
            out.append(chunk)
            send("task_output", task_id=task_id, data=chunk.decode(errors="replace"))
        code = proc.wait()
        err_thread.join(5)
        if timer:
            timer.cancel()
        stdout = b"".join(out).decode(errors="replace")
        stderr = b"".join(c for c in err_chunks if c).decode(errors="replace")
        duration = time.monotonic() - t0
        with self.lock:
            self.current = None
        if code == -signal.SIGKILL and not flags["cancelled"] and not flags["timed_out"] \
                and oom_kill_count() > oom_before:
            # The kernel killed the agent for memory: this container is out of memory. Say so and
            # end, so that the actor records oom_killed and starts a fresh container.
            log("agent was killed by the kernel OOM killer")
            send("fatal", reason="oom_killed: the agent was killed by the kernel OOM killer (memory limit)")
            os._exit(137)
        if flags["cancelled"]:
            status, output, error = "cancelled", stdout, "cancelled"
        elif flags["timed_out"]:
            status, output, error = "timeout", stdout, "timed out after %ss" % timeout_s
        else:
            status, output, error = self.agent["parse"](code, stdout, stderr)
        send("task_done", task_id=task_id, status=status, exit_code=code, output=output, error=error,
             duration_s=round(duration, 6))

    def cancel(self, task_id):
        with self.lock:
            cur = self.current
        if cur and cur[0] == task_id:
            cur[3]["cancelled"] = True
            kill_group(cur[1])

    def wait_idle(self, grace_s):
        deadline = time.monotonic() + grace_s
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.02)
        with self.lock:
            cur = self.current
        if cur:
            cur[3]["cancelled"] = True
            kill_group(cur[1])
            cur[2].join(2)


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def heartbeat(interval):
    seq = 0
    while True:
        time.sleep(interval)
        seq += 1
        send("heartbeat", seq=seq)


def main():
    worker_id = os.environ.get("CORRAL_WORKER_ID", "")
    agent_name = os.environ.get("CORRAL_AGENT", "shell")
    workspace = os.environ.get("CORRAL_WORKSPACE", "/workspace")
    interval = float(os.environ.get("CORRAL_HEARTBEAT_S", "1"))
    if not worker_id:
        fatal("required environment variable(s) not set: CORRAL_WORKER_ID")
    version = startup_checks(agent_name, workspace)
    runner = Runner(agent_name, workspace)
    send("ready", worker_id=worker_id, agent=agent_name, agent_version=version,
         wrapper_version=WRAPPER_VERSION, pid=os.getpid())
    log("ready: worker %s agent %s (%s)" % (worker_id, agent_name, version))
    threading.Thread(target=heartbeat, args=(interval,), daemon=True).start()
    stdin = sys.stdin.buffer
    while True:
        line = stdin.readline()
        if not line:
            log("stdin closed: shutting down")
            runner.wait_idle(0)
            return 0
        line = line.strip()
        if not line:
            continue
        try:
            frame = json.loads(line)
        except ValueError:
            log("ignoring undecodable frame: %r" % line[:200])
            continue
        kind = frame.get("kind")
        if kind == "run_task":
            runner.start(frame)
        elif kind == "cancel_task":
            runner.cancel(frame.get("task_id"))
        elif kind == "shutdown":
            log("shutdown requested")
            runner.wait_idle(float(frame.get("grace_s", 5)))
            return 0
        else:
            log("ignoring unknown frame kind %r" % kind)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
