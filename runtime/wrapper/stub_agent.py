#!/usr/bin/env python3
"""corral stub agent: stands in for claude / droid / codex and speaks their real output formats.

Installed under the real CLI name; the flavour comes from the name it is called by. It takes the
prompt the ways the real CLIs do: on the command line; claude ``-p`` without a prompt argument
reads it from stdin; codex ``exec ... -`` reads it from stdin; droid ``exec ... -f FILE`` reads it
from FILE. Prompt directives: ``!exit N``, ``!sleep S``, ``!crash-wrapper``, ``!oom``; anything
else answers ``stub-<agent>: <prompt>``. ``CORRAL_STUB_FAIL_PROBE=1`` makes ``--version`` fail.
Standard library only.
"""

import json
import os
import signal
import sys
import time
import uuid

FLAVOURS = {"claude": "claude", "droid": "factory", "codex": "codex"}
VERSIONS = {"claude": "2.0.0 (Claude Code) [corral stub]", "droid": "0.22.0 [corral stub]",
            "codex": "codex-cli 0.50.0 [corral stub]"}


def _stdin_text():
    return sys.stdin.buffer.read().decode("utf-8", "replace")


def parse_prompt(cli, argv):
    """The prompt, taken exactly the ways the real CLI takes it (and the wrapper passes it)."""
    if cli == "claude":
        # claude -p PROMPT --output-format json ; claude -p --output-format json < PROMPT
        if "-p" in argv:
            i = argv.index("-p")
            if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                return argv[i + 1]
            return _stdin_text()
        return ""
    if cli == "droid" and "-f" in argv[:-1]:
        # droid exec -o json ... -f FILE
        i = len(argv) - 1 - argv[::-1].index("-f")
        with open(argv[i + 1], "rb") as f:
            return f.read().decode("utf-8", "replace")
    # droid exec -o json ... PROMPT ; codex exec --json ... PROMPT ; codex exec --json ... - < PROMPT
    if cli == "codex" and len(argv) > 1 and argv[-1] == "-":
        return _stdin_text()
    return argv[-1] if len(argv) > 1 else ""


def result_object(agent, text, is_error, t0):
    return {"type": "result", "subtype": "error_during_execution" if is_error else "success",
            "is_error": is_error, "duration_ms": int((time.time() - t0) * 1000), "num_turns": 1,
            "result": text, "session_id": str(uuid.uuid4()), "total_cost_usd": 0.0}


def emit(cli, text, is_error, t0):
    agent = FLAVOURS[cli]
    if cli == "codex":
        tid = str(uuid.uuid4())
        events = [{"type": "thread.started", "thread_id": tid}, {"type": "turn.started"}]
        if is_error:
            events.append({"type": "turn.failed", "error": {"message": text}})
        else:
            events.append({"type": "item.completed",
                           "item": {"id": "item_0", "type": "agent_message", "text": text}})
            events.append({"type": "turn.completed",
                           "usage": {"input_tokens": 0, "cached_input_tokens": 0, "output_tokens": 0}})
        for ev in events:
            sys.stdout.write(json.dumps(ev) + "\n")
    else:
        sys.stdout.write(json.dumps(result_object(agent, text, is_error, t0)) + "\n")
    sys.stdout.flush()


def main():
    cli = os.path.basename(sys.argv[0])
    if cli not in FLAVOURS:
        cli = os.environ.get("CORRAL_STUB_CLI", "claude")
    argv = sys.argv[1:]
    if argv[:1] == ["--version"]:
        if os.environ.get("CORRAL_STUB_FAIL_PROBE") == "1":
            sys.stderr.write("%s: version probe failed (CORRAL_STUB_FAIL_PROBE=1)\n" % cli)
            return 1
        print(VERSIONS[cli])
        return 0
    t0 = time.time()
    prompt = parse_prompt(cli, argv)
    words = prompt.strip().split()
    head = words[0] if words else ""
    if head == "!exit":
        code = int(words[1]) if len(words) > 1 else 1
        emit(cli, "stub-%s: exiting with %d" % (FLAVOURS[cli], code), True, t0)
        return code
    if head == "!sleep":
        time.sleep(float(words[1]) if len(words) > 1 else 1.0)
        rest = " ".join(words[2:]) or "slept"
        emit(cli, "stub-%s: %s" % (FLAVOURS[cli], rest), False, t0)
        return 0
    if head == "!crash-wrapper":
        sys.stderr.write("stub: killing the worker-wrapper (pid %d)\n" % os.getppid())
        sys.stderr.flush()
        time.sleep(0.2)   # let the wrapper forward that line to the container's log first
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(5)
        return 1
    if head == "!oom":
        hog = []
        while True:
            hog.append(b"x" * (8 << 20))
    emit(cli, "stub-%s: %s" % (FLAVOURS[cli], prompt), False, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
