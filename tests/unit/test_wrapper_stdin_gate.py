"""CORRAL_STDIN_GATE=1 (a Swarm service's container runs before anyone can attach to it): the real
wrapper process writes nothing until a first line opens its gate, then serves as usual; with no
line it exits quietly (stdin ends, or its lease runs out)."""

import json
import os
import select
import subprocess
import sys
import time

from runtime.protocol import Ready, TaskDone, decode_wrapper_frame

from .test_wrapper_process import WRAPPER


def start(tmp_path, **env):
    ws = tmp_path / "workspace"
    ws.mkdir()
    full = {**os.environ, "CORRAL_WORKER_ID": "w-gate", "CORRAL_AGENT": "shell",
            "CORRAL_WORKSPACE": str(ws), "CORRAL_HEARTBEAT_S": "30", "CORRAL_STDIN_GATE": "1", **env}
    return subprocess.Popen([sys.executable, str(WRAPPER)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full)


def readable(proc, timeout):
    return bool(select.select([proc.stdout], [], [], timeout)[0])


def test_nothing_is_written_before_the_gate_opens_then_it_serves(tmp_path):
    proc = start(tmp_path)
    try:
        assert not readable(proc, 1.5)           # a wrapper without the gate is READY by now
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        assert readable(proc, 20)
        assert isinstance(decode_wrapper_frame(proc.stdout.readline().rstrip()), Ready)
        proc.stdin.write(json.dumps({"kind": "run_task", "task_id": "t1", "prompt": "echo hi"}).encode() + b"\n")
        proc.stdin.flush()
        while True:
            frame = decode_wrapper_frame(proc.stdout.readline().rstrip())
            if isinstance(frame, TaskDone):
                break
        assert (frame.status, frame.output) == ("ok", "hi\n")
    finally:
        proc.stdin.close()
        assert proc.wait(20) == 0


def test_stdin_ending_before_the_gate_ends_the_wrapper_silently(tmp_path):
    proc = start(tmp_path)
    proc.stdin.close()
    assert proc.wait(20) == 0
    assert proc.stdout.read() == b""
    assert b"stdin ended before the gate opened" in proc.stderr.read()


def test_a_gate_nobody_opens_ends_with_the_lease(tmp_path):
    proc = start(tmp_path, CORRAL_ORPHAN_TIMEOUT_S="1")
    t0 = time.monotonic()
    try:
        assert proc.wait(20) == 0               # stdin is still open
        assert 1.0 <= time.monotonic() - t0 < 10
        assert proc.stdout.read() == b""
        assert b"no supervisor opened the stdin gate within 1.0 s" in proc.stderr.read()
    finally:
        proc.stdin.close()
