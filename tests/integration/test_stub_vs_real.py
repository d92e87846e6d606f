"""The real agent CLIs and their stubs, each run by the real worker-wrapper on the host with the
model gateway on, the test playing the actor: the wrapper's http_* frames go to the supervisor's
real gateway (runtime.gateway), which forwards them to the mock model API with the real key;
its answers go back to the wrapper as frames. The CLIs hold only the placeholder key, and a
proxy that refuses everything stands in for the rest of the world.

- Each real CLI (fetched by runtime.agentpkgs) completes a task through the wrapper's endpoint.
- The stub and the real CLI run the same mocked task (success and a rejected key); the shapes the
  adapters read (keys, JSON types, claude's and droid's subtype/is_error) are the same.
- Long prompts travel the ways the adapters send them (stdin for claude and codex, a file for
  droid); claude's permission levels; an upstream failure ends the task at once when the actor
  cancels it with that failure (droid would retry a 500 for minutes).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from runtime.agentpkgs import AgentFiles, ensure_agent_files
from runtime.gateway import ExchangeDone, UpstreamFailed, open_gateway
from runtime.gateway_frames import decode_from_wrapper
from runtime.protocol import MAX_LINE, encode_frame
from runtime.wrapper import agents as table
from tests.mock_model_api import open_mock_model_api, open_refusing_proxy

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
WRAPPER = ROOT / "runtime" / "wrapper" / "wrapper.py"
STUB = ROOT / "runtime" / "wrapper" / "stub_agent.py"
KEY = "sk-corral-real-key-3b9f1c"
DEADLINE = 120
AGENTS = ["claude", "codex", "factory"]


@pytest.fixture(scope="session")
def clis() -> dict[str, AgentFiles]:
    """The three pinned CLIs, from the cache (fetched on first use: ~470 MB)."""
    async def fetch() -> dict[str, AgentFiles]:
        return {a: await ensure_agent_files(a) for a in AGENTS}
    return trio.run(fetch)


def secrets_for(agent: str, key: str = KEY) -> dict[str, str]:
    return {"ANTHROPIC_API_KEY": key} if agent == "claude" else {"OPENAI_API_KEY": key}


# --- the test as the actor ---------------------------------------------------------------------------

class Worker:
    """One wrapper process; its frames read, its gateway frames bridged to a real Gateway."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.out_send, self.out_recv = trio.open_memory_channel[bytes](math.inf)
        self.ready = trio.Event()
        self.ready_frame: dict = {}
        self.outputs: dict[str, str] = {}
        self.done: dict[str, dict] = {}
        self.done_events: dict[str, trio.Event] = {}
        self.frames_seen: list[bytes] = []
        self.stderr = bytearray()
        self.cancel_on_failure = False
        self.current: str | None = None

    def send_nowait(self, obj) -> None:
        data = obj if isinstance(obj, bytes) else (
            json.dumps(obj).encode() + b"\n" if isinstance(obj, dict) else encode_frame(obj))
        self.out_send.send_nowait(data)

    async def to_wrapper(self, frame) -> None:     # the gateway's send: whole frames, in order
        self.send_nowait(frame)

    async def write_loop(self) -> None:
        async for data in self.out_recv:
            await self.proc.stdin.send_all(data)

    async def read_loop(self, gw) -> None:
        buf = b""
        while True:
            data = await self.proc.stdout.receive_some(1 << 20)
            if not data:
                return
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                assert len(line) < MAX_LINE
                self.frames_seen.append(line)
                frame = json.loads(line)
                kind = frame["kind"]
                if kind.startswith("http_"):
                    await gw.feed(decode_from_wrapper(line))
                elif kind in ("ready", "fatal"):
                    self.ready_frame = frame
                    self.ready.set()
                elif kind == "task_output":
                    self.outputs[frame["task_id"]] = self.outputs.get(frame["task_id"], "") + frame["data"]
                elif kind == "task_done":
                    self.done[frame["task_id"]] = frame
                    self.done_events.setdefault(frame["task_id"], trio.Event()).set()

    async def drain_stderr(self) -> None:
        while data := await self.proc.stderr.receive_some(65536):
            self.stderr += data

    def on_event(self, event) -> None:
        if isinstance(event, UpstreamFailed) and self.cancel_on_failure and self.current:
            # what the worker actor does: the agent is killed, the task fails with the reason
            self.send_nowait({"kind": "cancel_task", "task_id": self.current, "reason": event.failure})

    async def run(self, task_id: str, prompt: str, **fields) -> tuple[dict, str]:
        """run_task -> (its task_done, everything the agent printed on stdout)."""
        self.current = task_id
        event = self.done_events.setdefault(task_id, trio.Event())
        self.send_nowait({"kind": "run_task", "task_id": task_id, "prompt": prompt, **fields})
        await event.wait()
        return self.done[task_id], self.outputs.get(task_id, "")


@asynccontextmanager
async def open_worker(tmp: Path, agent: str, cli: Path | None, *, upstream: str,
                      secrets: dict[str, str], proxy: str, events: list | None = None,
                      env: dict[str, str] | None = None):
    """The real wrapper running ``cli`` (None: the stub) as ``agent``'s CLI, gateway on."""
    name = table.AGENTS[agent].cli
    bin_dir, ws, home, tmpdir = (tmp / d for d in ("bin", "ws", "home", "tmp"))
    for d in (bin_dir, ws, home, tmpdir):
        d.mkdir(parents=True, exist_ok=True)
    if cli is None:                 # as the images install the stub: executable, under the CLI's name
        cli = bin_dir / "stub_agent.py"
        shutil.copy(STUB, cli)
        cli.chmod(0o755)
    (bin_dir / name).symlink_to(cli)
    full_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(tmpdir),
                "LANG": "C.UTF-8", "TERM": "dumb", "CORRAL_WORKER_ID": "w-real",
                "CORRAL_AGENT": agent, "CORRAL_WORKSPACE": str(ws), "CORRAL_HEARTBEAT_S": "30",
                "CORRAL_GATEWAY": "1", "CORRAL_GATEWAY_PORT": "0", "CORRAL_MODEL": "mock-model",
                "CORRAL_SWEEP": "descendants",
                "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "https_proxy": proxy, "http_proxy": proxy,
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", **(env or {})}
    proc = await trio.lowlevel.open_process([sys.executable, str(WRAPPER)], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            env=full_env)
    w = Worker(proc)

    def on_event(event) -> None:
        if events is not None:
            events.append(event)
        w.on_event(event)

    try:
        async with open_gateway(upstream=upstream, agent=agent, secrets=secrets,
                                send=w.to_wrapper, on_event=on_event) as gw:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(w.write_loop)
                nursery.start_soon(w.read_loop, gw)
                nursery.start_soon(w.drain_stderr)
                with trio.fail_after(30):
                    await w.ready.wait()
                assert w.ready_frame["kind"] == "ready", (w.ready_frame, bytes(w.stderr))
                w.env = full_env
                yield w
                nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.move_on_after(5):
            await proc.wait()


# --- what the adapters read, as shapes ------------------------------------------------------------

def jtype(v) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if v is None:
        return "null"
    return type(v).__name__


def adapter_shape(agent: str, stdout: str):
    """What the agent's parser reads from its stdout, as keys and JSON types (and the values
    that decide success: subtype, is_error)."""
    if agent == "codex":
        shape = []
        for line in stdout.splitlines():
            if not line.startswith("{"):
                continue
            ev = json.loads(line)
            item = ev.get("item") or {}
            if ev["type"] == "item.completed" and item.get("type") == "error":
                continue      # codex's note on an unknown model's metadata (an item, not a failure)
            shape.append((ev["type"], item.get("type"), jtype(item.get("text")) if item else None,
                          sorted(ev.get("usage") or {}), jtype(ev.get("message")),
                          {k: jtype(v) for k, v in (ev.get("error") or {}).items()}))
        return shape
    obj = json.loads(stdout.strip().splitlines()[-1])
    keys = ["type", "subtype", "is_error", "result", "usage"]
    if agent == "claude":
        keys += ["total_cost_usd", "permission_denials"]
    shape = {k: jtype(obj[k]) for k in keys}
    shape["usage"] = {k: jtype(obj["usage"][k]) for k in ("input_tokens", "output_tokens")}
    shape["subtype="] = obj["subtype"]
    shape["is_error="] = obj["is_error"]
    return shape


def done_shape(done: dict):
    return ({k: jtype(v) for k, v in done.items() if k not in ("usage", "exit_code")},
            None if done["usage"] is None else {k: jtype(v) for k, v in done["usage"].items()
                                                 if k != "cost_usd"})


# --- tests ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("agent", AGENTS)
async def test_the_real_cli_completes_a_task_through_the_wrapper_s_endpoint(clis, agent, tmp_path):
    events: list = []
    with trio.fail_after(DEADLINE):
        async with open_mock_model_api(expect_key=KEY) as mock, open_refusing_proxy() as proxy:
            async with open_worker(tmp_path, agent, clis[agent].binary, upstream=mock.url,
                                   secrets=secrets_for(agent), proxy=proxy.url, events=events) as w:
                t0 = time.monotonic()
                done, stdout = await w.run("t1", "Say hello")
                took = time.monotonic() - t0
                done2, _ = await w.run("t2", "Say hello again")     # the next task, same wrapper
    assert (done["status"], done["output"], done["failure"]) == ("ok", mock.answer, ""), \
        (done, stdout, bytes(w.stderr)[-3000:])
    assert done2["status"] == "ok"
    assert done["usage"]["input_tokens"] == 11 and done["usage"]["output_tokens"] == 7
    if agent == "claude":
        assert done["usage"]["cost_usd"] > 0
    assert took < 30
    # the model was asked through the gateway with the real key; the CLI never held it
    assert mock.model_requests() and all(r.credential == KEY for r in mock.requests)
    assert proxy.asked == []
    exchanges = [e for e in events if isinstance(e, ExchangeDone)]
    assert exchanges and all(e.status == 200 and not e.aborted for e in exchanges)
    assert KEY not in json.dumps(w.env) and KEY.encode() not in b"\n".join(w.frames_seen)
    assert KEY.encode() not in bytes(w.stderr)


@pytest.mark.parametrize("agent", AGENTS)
async def test_stub_and_real_cli_print_the_same_shapes(clis, agent, tmp_path):
    """The same mocked task, answered and refused (the upstream rejects the key), by the real CLI
    and by the stub (whose refusal is ``!exit 1``): the adapters read the same shapes."""
    runs = {}
    with trio.fail_after(DEADLINE * 2):
        for which in ("real", "stub"):
            for case, key in (("ok", KEY), ("refused", "revoked")):
                async with open_mock_model_api(expect_key=KEY) as mock, \
                        open_refusing_proxy() as proxy:
                    cli = clis[agent].binary if which == "real" else None
                    async with open_worker(tmp_path / which / case, agent, cli, upstream=mock.url,
                                           secrets=secrets_for(agent, key), proxy=proxy.url) as w:
                        prompt = "Say hello" if which == "real" or case == "ok" else "!exit 1"
                        runs[which, case] = await w.run("t", prompt)
    for case in ("ok", "refused"):
        (real_done, real_out), (stub_done, stub_out) = runs["real", case], runs["stub", case]
        assert adapter_shape(agent, stub_out) == adapter_shape(agent, real_out), (case, real_out, stub_out)
        assert done_shape(stub_done) == done_shape(real_done), (case, real_done, stub_done)
        expected = ("ok", "") if case == "ok" else ("error", "agent_error")
        assert (real_done["status"], real_done["failure"]) == expected, real_done
        assert (stub_done["status"], stub_done["failure"]) == expected, stub_done


LONG = "Say hello. " + "corral-long-prompt " * 4000     # ~76 KB: over the 64 KiB for argv


@pytest.mark.parametrize("agent", AGENTS)
async def test_a_long_prompt_reaches_the_real_cli(clis, agent, tmp_path):
    """claude and codex take it on stdin (a pipe, closed after it), droid from a file."""
    with trio.fail_after(DEADLINE):
        async with open_mock_model_api(expect_key=KEY) as mock, open_refusing_proxy() as proxy:
            async with open_worker(tmp_path, agent, clis[agent].binary, upstream=mock.url,
                                   secrets=secrets_for(agent), proxy=proxy.url) as w:
                done, _ = await w.run("t", LONG)
    assert (done["status"], done["output"]) == ("ok", mock.answer), (done, bytes(w.stderr)[-2000:])
    assert any(b"corral-long-prompt " * 3000 in r.body for r in mock.model_requests())
    assert not list((tmp_path / "tmp").glob("corral-prompt-*"))      # the prompt file is gone


@pytest.mark.parametrize("permissions,status,failure,created", [
    ("read-only", "error", "permission_denied", False),
    ("workspace-write", "ok", "", True),
    ("full", "ok", "", True),
])
async def test_claude_s_permission_levels(clis, tmp_path, permissions, status, failure, created):
    tool = {"name": "Bash", "input": {"command": "touch corral-probe.txt",
                                      "description": "create a file"}}
    with trio.fail_after(DEADLINE):
        async with open_mock_model_api(expect_key=KEY, tool_use=tool) as mock, \
                open_refusing_proxy() as proxy:
            async with open_worker(tmp_path, "claude", clis["claude"].binary, upstream=mock.url,
                                   secrets=secrets_for("claude"), proxy=proxy.url,
                                   env={"CORRAL_PERMISSIONS": permissions}) as w:
                done, _ = await w.run("t", "Create corral-probe.txt")
    assert (done["status"], done["failure"]) == (status, failure), (done, bytes(w.stderr)[-2000:])
    assert (tmp_path / "ws" / "corral-probe.txt").exists() == created
    if failure:
        assert done["error"].startswith("permission denied: Bash(touch corral-probe.txt)")
        assert done["output"] == mock.answer and done["exit_code"] == 0


@pytest.mark.parametrize("agent,status", [("factory", 500), ("claude", 401), ("codex", 429)])
async def test_an_upstream_failure_ends_the_task_at_once(clis, tmp_path, agent, status):
    """The actor sees the failure in its gateway and cancels the task with it: the agent is
    killed (droid would retry a 500 for minutes) and the task fails with that reason."""
    failure = {500: "upstream_error", 401: "auth_failed", 429: "rate_limited"}[status]
    with trio.fail_after(DEADLINE):
        async with open_mock_model_api(expect_key=KEY) as mock, open_refusing_proxy() as proxy:
            mock.fail_with(status)
            async with open_worker(tmp_path, agent, clis[agent].binary, upstream=mock.url,
                                   secrets=secrets_for(agent), proxy=proxy.url) as w:
                w.cancel_on_failure = True
                t0 = time.monotonic()
                done, _ = await w.run("t", "Say hello")
                took = time.monotonic() - t0
                after, _ = await w.run("t2", "Say hello")      # the worker goes on serving
    assert done["status"] == "error" and took < 15, (done, took)
    # the agent may exit by itself first (claude, codex: no retries of their own)
    assert done["failure"] in (failure, "agent_error"), done
    if agent == "factory":
        assert done["failure"] == failure and done["error"] == f"stopped by the supervisor: {failure}"
    assert after["status"] == "error"
