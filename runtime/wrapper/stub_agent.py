#!/usr/bin/env python3
"""corral stub agent: stands in for claude / droid / codex and speaks their real output formats.

Installed under the real CLI name; the flavour comes from the name it is called by (the agent
table, ``agents.py``). It takes the prompt the ways the real CLIs do: on the command line; claude
``-p`` without a prompt argument reads it from stdin; codex ``exec ... -`` reads it from stdin;
droid ``exec ... -f FILE`` reads it from FILE. Prompt directives (part of corral's contract):

- ``!exit N``: exits with code N (the result is an error);
- ``!sleep S [TEXT]``: sleeps S seconds, then answers ``stub-<agent>: TEXT`` (or ``slept``);
- ``!crash-wrapper``: kills the worker-wrapper (its parent);
- ``!oom``: allocates memory until the kernel kills it;
- ``!deny [TOOL]`` (claude): answers, exit 0, is_error false, with ``permission_denials`` naming
  TOOL (default Bash), as real claude does when it was refused the tools it asked for (the task
  fails ``permission_denied``); the other agents print no denials and answer it as a prompt;
- anything else: answers ``stub-<agent>: <prompt>``.

Outputs take the real CLIs' shapes (claude 2.1, codex 0.171, droid 0.225: docs/real-agents.md;
tests/integration/test_stub_vs_real.py compares them with the real ones).

``CORRAL_STUB_FAIL_PROBE=1`` makes ``--version`` fail. Standard library only.

The logic is sans-IO: ``stub_plan()`` says what to do (write this to stderr, sleep S, write this
to stdout, then exit N / kill the wrapper / allocate until OOM) and ``main()`` does it. FakeEngine
runs the same plan without processes (runtime/engines/fake_wrapper.py). For FakeEngine only, the
plan also stands in for ``/bin/sh`` (the shell agent): it answers the shell's version probe, and any
script with ``stub-shell: <script>``.
"""

import json
import math
import os
import sys
import time
import uuid

try:                    # imported as runtime.wrapper.stub_agent
    from . import agents as _agents
except ImportError:     # run as a script: /opt/corral/stub_agent.py, maybe through a symlink
    def _wrapper_dir():
        here = os.path.dirname(os.path.realpath(__file__))
        if os.path.isfile(os.path.join(here, "agents.py")):
            return here
        # a copy of the stub elsewhere: the wrapper that runs it says where it lives
        return os.environ.get("CORRAL_WRAPPER_DIR", here)
    sys.path.insert(0, _wrapper_dir())
    import agents as _agents

THEN_EXIT, THEN_KILL_WRAPPER, THEN_OOM = "exit", "kill_wrapper", "oom"
CRASH_DELAY_S = 0.2     # lets the wrapper forward the stub's last words to the container's log


class StubPlan(object):
    """What the stub does: write ``stderr``, sleep ``sleep_s``, write ``stdout``, then ``then``:
    "exit" with ``exit_code``, "kill_wrapper" (SIGKILL its parent), or "oom" (allocate memory
    until the kernel kills it)."""

    __slots__ = ("stdout", "stderr", "sleep_s", "exit_code", "then")

    def __init__(self, stdout=b"", stderr=b"", sleep_s=0.0, exit_code=0, then=THEN_EXIT):
        self.stdout = stdout
        self.stderr = stderr
        self.sleep_s = sleep_s
        self.exit_code = exit_code
        self.then = then

    def __eq__(self, other):
        return isinstance(other, StubPlan) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self):
        return "StubPlan(%s)" % ", ".join("%s=%r" % (k, getattr(self, k)) for k in self.__slots__)


def stub_cli(argv0, env):
    """The CLI the stub plays: the name it was called by, else CORRAL_STUB_CLI, else claude."""
    cli = os.path.basename(argv0)
    if cli in _agents.BY_CLI:
        return cli
    cli = env.get("CORRAL_STUB_CLI", "claude")
    return cli if cli in _agents.BY_CLI else "claude"


def parse_prompt(cli, argv, read_stdin, read_file):
    """The prompt, taken exactly the ways the real CLI takes it (and the wrapper passes it: the
    agent table's ``prompt_in``). ``read_stdin()`` and ``read_file(path)`` are called only when
    the prompt is there."""
    where, value = _agents.BY_CLI[cli].prompt_in(argv)
    if where == "stdin":
        return read_stdin()
    if where == "file":
        return read_file(value)
    return value


def _claude_result(text, is_error, duration_ms, denied=None):
    """As real claude prints it (2.1): errors keep subtype "success" and say is_error."""
    denials = [] if denied is None else [{"tool_name": denied, "tool_use_id": "toolu_stub",
                                          "tool_input": {"command": "true"}}]
    return {"type": "result", "subtype": "success", "is_error": is_error,
            "api_error_status": None, "duration_ms": duration_ms, "duration_api_ms": 0,
            "num_turns": 1, "result": text, "stop_reason": "stop_sequence" if is_error else "end_turn",
            "session_id": str(uuid.uuid4()), "total_cost_usd": 0,
            "usage": {"input_tokens": 0, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0, "output_tokens": 0,
                      "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
                      "service_tier": "standard"},
            "modelUsage": {}, "permission_denials": denials,
            "terminal_reason": "api_error" if is_error else "completed", "uuid": str(uuid.uuid4())}


def _droid_result(text, is_error, duration_ms):
    """As real droid prints it (0.225): an error says only "Exec failed" (the cause is elsewhere:
    here on stderr)."""
    return {"type": "result", "subtype": "failure" if is_error else "success", "is_error": is_error,
            "duration_ms": duration_ms, "num_turns": 0 if is_error else 1,
            "result": "Exec failed" if is_error else text, "session_id": str(uuid.uuid4()),
            "usage": {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0,
                      "cache_creation_input_tokens": 0, "factory_credits": 0}}


def _codex_events(text, is_error):
    """As real codex exec --json prints them (0.171)."""
    events = [{"type": "thread.started", "thread_id": str(uuid.uuid4())}, {"type": "turn.started"}]
    if is_error:
        events.append({"type": "error", "message": text})
        events.append({"type": "turn.failed", "error": {"message": text}})
    else:
        events.append({"type": "item.completed",
                       "item": {"id": "item_0", "type": "agent_message", "text": text}})
        events.append({"type": "turn.completed",
                       "usage": {"input_tokens": 0, "cached_input_tokens": 0,
                                 "cache_write_input_tokens": 0, "output_tokens": 0,
                                 "reasoning_output_tokens": 0}})
    return events


def render(output_format, text, is_error, duration_s=0.0, denied=None):
    """``text`` as the real CLI prints it: (stdout bytes, stderr bytes). ``result_json`` is
    claude's shape; ``denied`` (claude): the tool it was refused."""
    ms = int(duration_s * 1000)
    if output_format == "codex_jsonl":
        events = _codex_events(text, is_error)
        return "".join(json.dumps(ev) + "\n" for ev in events).encode("utf-8", "replace"), b""
    if output_format in ("claude_json", "result_json"):
        return (json.dumps(_claude_result(text, is_error, ms, denied)) + "\n").encode("utf-8", "replace"), b""
    if output_format == "droid_json":
        err = (text + "\n").encode("utf-8", "replace") if is_error else b""
        return (json.dumps(_droid_result(text, is_error, ms)) + "\n").encode("utf-8", "replace"), err
    # text (the shell): the answer on stdout, an error on stderr
    data = text.encode("utf-8", "replace")
    return (b"", data + b"\n") if is_error else (data, b"")


def _number(words, default, kind):
    if len(words) < 2:
        return default
    try:
        v = kind(words[1])
    except (ValueError, OverflowError):
        return None
    if kind is float and not (math.isfinite(v) and v >= 0):
        return None
    return v


def stub_plan(cli, argv, env, read_stdin=lambda: "", read_file=None):
    """What the stub playing ``cli`` does when called with ``argv`` (without argv[0]) in ``env``.
    Pure but for ``read_stdin()`` / ``read_file(path)``, called only when the prompt is there."""
    agent = _agents.BY_CLI[cli]
    if argv[:1] == ["--version"] or argv == agent.probe[1:]:
        if env.get("CORRAL_STUB_FAIL_PROBE") == "1":
            return StubPlan(stderr=("%s: version probe failed (CORRAL_STUB_FAIL_PROBE=1)\n" % cli).encode(),
                            exit_code=1)
        return StubPlan(stdout=((agent.stub_version or agent.cli) + "\n").encode())
    if read_file is None:
        def read_file(path):
            with open(path, "rb") as f:
                return f.read().decode("utf-8", "replace")
    name, fmt = agent.name, agent.output_format
    try:
        prompt = parse_prompt(cli, argv, read_stdin, read_file)
    except (OSError, KeyError) as exc:    # as the real CLI: no such prompt file
        out, err = render(fmt, "%s: cannot read the prompt: %s" % (cli, exc), True)
        return StubPlan(stdout=out, stderr=err, exit_code=2)
    words = prompt.strip().split()
    head = words[0] if words else ""
    if head == "!exit":
        code = _number(words, 1, int)
        if code is None:
            out, err = render(fmt, "stub-%s: !exit needs an integer exit code" % name, True)
            return StubPlan(stdout=out, stderr=err, exit_code=2)
        out, err = render(fmt, "stub-%s: exiting with %d" % (name, code), True)
        return StubPlan(stdout=out, stderr=err, exit_code=code & 0xFF)
    if head == "!sleep":
        seconds = _number(words, 1.0, float)
        if seconds is None:
            out, err = render(fmt, "stub-%s: !sleep needs a number of seconds" % name, True)
            return StubPlan(stdout=out, stderr=err, exit_code=2)
        out, err = render(fmt, "stub-%s: %s" % (name, " ".join(words[2:]) or "slept"), False, seconds)
        return StubPlan(stdout=out, stderr=err, sleep_s=seconds)
    if head == "!crash-wrapper":
        return StubPlan(stderr=b"stub: killing the worker-wrapper (its parent process)\n",
                        sleep_s=CRASH_DELAY_S, exit_code=1, then=THEN_KILL_WRAPPER)
    if head == "!oom":
        return StubPlan(exit_code=-9, then=THEN_OOM)
    if head == "!deny" and fmt in ("claude_json", "result_json"):
        tool = words[1] if len(words) > 1 else "Bash"
        out, err = render(fmt, "stub-%s: I was not allowed to use %s" % (name, tool), False,
                          denied=tool)
        return StubPlan(stdout=out, stderr=err)
    out, err = render(fmt, "stub-%s: %s" % (name, prompt), False)
    return StubPlan(stdout=out, stderr=err)


# --- the process ---------------------------------------------------------------------------------

def _write(stream, data):
    if data:
        stream.buffer.write(data)
        stream.flush()


def main():
    cli = stub_cli(sys.argv[0], os.environ)
    plan = stub_plan(cli, sys.argv[1:], os.environ,
                     read_stdin=lambda: sys.stdin.buffer.read().decode("utf-8", "replace"))
    _write(sys.stderr, plan.stderr)
    if plan.sleep_s:
        time.sleep(plan.sleep_s)
    _write(sys.stdout, plan.stdout)
    if plan.then == THEN_KILL_WRAPPER:
        import signal
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(5)
    elif plan.then == THEN_OOM:
        hog = []
        while True:
            hog.append(b"x" * (8 << 20))
    return plan.exit_code


if __name__ == "__main__":
    sys.exit(main())
