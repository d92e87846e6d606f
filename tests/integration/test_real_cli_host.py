"""The real agent CLIs (fetched by runtime.agentpkgs) on the host, against the mock model API.

No containers here: each CLI runs as a host process, talking either straight to the mock or
through the model gateway (a test-only HTTP front that turns requests into gateway frames, as
the wrapper will, and the real ``runtime.gateway`` behind it). Every CLI gets only placeholder
keys, and a proxy that refuses everything: nothing but the mock on 127.0.0.1 is reachable, and
the test checks that nothing else was asked for.

The invocations here are the ones docs/real-agents.md records.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from runtime.agentpkgs import AgentFiles, ensure_agent_files
from runtime.gateway import ExchangeDone, UpstreamFailed, open_gateway
from runtime.gateway_frames import HttpChunk, HttpEnd, HttpRequest, HttpResponse, chunks
from runtime.gateway_frames import decode_from_actor, decode_from_wrapper
from runtime.protocol import encode_frame
from tests.mock_model_api import lifespan, open_mock_model_api, open_refusing_proxy

pytestmark = pytest.mark.integration

KEY = "sk-corral-real-key-7d1e0b"          # what the gateway injects; the mock demands it
PLACEHOLDER = "corral-gateway-placeholder"  # all an agent ever holds
DEADLINE = 120


@pytest.fixture(scope="session")
def agents() -> dict[str, AgentFiles]:
    """The three pinned CLIs, from the cache (fetched on first use: ~470 MB)."""
    async def fetch() -> dict[str, AgentFiles]:
        return {a: await ensure_agent_files(a) for a in ("claude", "codex", "factory")}
    return trio.run(fetch)


# --- a test-only wrapper endpoint: HTTP in, gateway frames out ---------------------------------

class FrameBridge:
    """What the wrapper will do in the container, in-process: each HTTP request becomes
    http_request/http_chunk/http_end frames (through the JSON wire codec) fed to the gateway;
    its response frames are routed back by req_id and streamed to the client."""

    def __init__(self) -> None:
        self.gateway = None
        self._ids = itertools.count(1)
        self._routes: dict[int, trio.MemorySendChannel] = {}
        self.url = ""

    async def to_wrapper(self, frame) -> None:
        frame = decode_from_actor(encode_frame(frame).rstrip(b"\n"))
        route = self._routes.get(frame.req_id)
        if route is not None:
            route.send_nowait(frame)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        if scope["type"] != "http":
            return
        rid = next(self._ids)
        tx, rx = trio.open_memory_channel(math.inf)
        self._routes[rid] = tx
        target = scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        for f in [HttpRequest(req_id=rid, method=scope["method"], target=target,
                              headers=headers), *chunks(rid, body), HttpEnd(req_id=rid)]:
            await self.gateway.feed(decode_from_wrapper(encode_frame(f).rstrip(b"\n")))
        try:
            async with rx:
                first = await rx.receive()
                assert isinstance(first, HttpResponse)
                await send({"type": "http.response.start", "status": first.status,
                            "headers": [(k.encode("latin-1"), v.encode("latin-1"))
                                        for k, v in first.headers
                                        if k.lower() != "content-length"]})
                async for frame in rx:
                    if isinstance(frame, HttpChunk):
                        await send({"type": "http.response.body", "body": frame.data,
                                    "more_body": True})
                    elif isinstance(frame, HttpEnd):
                        if frame.error:
                            raise RuntimeError(frame.error)   # abort the client's connection
                        await send({"type": "http.response.body", "body": b""})
                        return
        finally:
            self._routes.pop(rid, None)


@asynccontextmanager
async def open_bridge(upstream: str, agent: str, secrets: dict[str, str], on_event):
    bridge = FrameBridge()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = config.errorlog = None
    config.graceful_timeout = 0.1
    async with open_gateway(upstream=upstream, agent=agent, secrets=secrets,
                            send=bridge.to_wrapper, on_event=on_event) as gw:
        bridge.gateway = gw
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                lambda task_status: serve(bridge, config, mode="asgi", task_status=task_status))
            bridge.url = binds[0]
            yield bridge
            nursery.cancel_scope.cancel()


# --- the invocations -------------------------------------------------------------------------

def invocation(agent: str, files: AgentFiles, base_url: str, home: Path, prompt: str,
               key: str | None, proxy: str) -> tuple[list[str], dict[str, str]]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "TERM": "dumb", "LANG": "C.UTF-8",
           "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "https_proxy": proxy, "http_proxy": proxy,
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    if agent == "claude":
        env.update(ANTHROPIC_BASE_URL=base_url, CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
                   DISABLE_AUTOUPDATER="1", CLAUDE_CODE_MAX_RETRIES="0")
        if key:
            env["ANTHROPIC_API_KEY"] = key
        return [str(files.binary), "-p", prompt, "--output-format", "json",
                "--permission-mode", "dontAsk"], env
    if agent == "codex":
        if key:
            env["OPENAI_API_KEY"] = key
        provider = (f'{{name="corral",base_url="{base_url}/v1",env_key="OPENAI_API_KEY",'
                    f'wire_api="responses",request_max_retries=0,stream_max_retries=0}}')
        return [str(files.binary), "exec", "--json", "--skip-git-repo-check",
                "-c", "analytics.enabled=false", "-c", "features.plugins=false",
                "-c", "model_provider=corral", "-c", f"model_providers.corral={provider}",
                "-m", "mock-model", "--sandbox", "read-only", prompt], env
    settings = home / "corral-droid-settings.json"
    settings.write_text(json.dumps({"customModels": [{
        "model": "mock-model", "displayName": "corral", "baseUrl": base_url + "/v1",
        "apiKey": key or "", "provider": "generic-chat-completion-api",
        "maxOutputTokens": 1024}]}))
    env["FACTORY_AIRGAP_ENABLED"] = "1"
    return [str(files.binary), "exec", "-o", "json", "--settings", str(settings),
            "-m", "custom:corral-0", prompt], env


async def run_cli(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str, float]:
    t0 = time.monotonic()
    proc = await trio.run_process(cmd, env=env, cwd=str(cwd), stdin=subprocess.DEVNULL,
                                  capture_stdout=True, capture_stderr=True, check=False)
    return (proc.returncode, proc.stdout.decode(errors="replace"),
            proc.stderr.decode(errors="replace"), time.monotonic() - t0)


def answer_of(agent: str, stdout: str) -> str:
    """The final answer, read as the adapters will read it."""
    if agent == "codex":
        events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        assert events[-1]["type"] == "turn.completed", events
        return [e["item"]["text"] for e in events if e["type"] == "item.completed"
                and e["item"]["type"] == "agent_message"][-1]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["type"] == "result" and result["is_error"] is False, result
    assert result["subtype"] == "success"
    if agent == "claude":
        assert result["permission_denials"] == []
    return result["result"]


# --- tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("agent", ["claude", "codex", "factory"])
async def test_real_cli_answers_from_the_mock(agents, agent, tmp_path):
    with trio.fail_after(DEADLINE):
        async with open_mock_model_api(expect_key=KEY) as mock, open_refusing_proxy() as proxy:
            cmd, env = invocation(agent, agents[agent], mock.url, tmp_path, "Say hello", KEY,
                                  proxy.url)
            code, out, err, took = await run_cli(cmd, env, tmp_path)
    assert code == 0, (out, err)
    assert answer_of(agent, out) == mock.answer
    assert mock.model_requests() and all(r.credential == KEY for r in mock.requests)
    assert proxy.asked == []
    assert took < 30


@pytest.mark.parametrize("agent", ["claude", "codex", "factory"])
async def test_real_cli_through_the_gateway_holds_no_key(agents, agent, tmp_path):
    secrets = {"OPENAI_API_KEY": KEY} if agent != "claude" else {"ANTHROPIC_API_KEY": KEY}
    events: list = []
    with trio.fail_after(DEADLINE):
        async with open_mock_model_api(expect_key=KEY) as mock, open_refusing_proxy() as proxy:
            async with open_bridge(mock.url, agent, secrets, events.append) as bridge:
                cmd, env = invocation(agent, agents[agent], bridge.url, tmp_path, "Say hello",
                                      PLACEHOLDER, proxy.url)
                code, out, err, took = await run_cli(cmd, env, tmp_path)
    assert code == 0, (out, err)
    assert answer_of(agent, out) == mock.answer
    assert KEY not in json.dumps(env) and KEY not in out + err
    assert mock.model_requests() and all(r.credential == KEY for r in mock.requests)
    assert proxy.asked == []
    done = [e for e in events if isinstance(e, ExchangeDone)]
    assert done and all(e.status == 200 and e.failure is None for e in done)
    assert sum(e.usage.output_tokens for e in done if e.usage) >= 7


@pytest.mark.parametrize("agent,expect", [
    ("claude", '"api_error_status":401'),
    ("codex", '"type":"turn.failed"'),
    ("factory", '"is_error":true'),
])
async def test_a_rejected_key_is_seen_by_the_gateway_at_once(agents, agent, expect, tmp_path):
    secrets = {"OPENAI_API_KEY": "revoked"} if agent != "claude" else {
        "ANTHROPIC_API_KEY": "revoked"}
    events: list = []
    first_failure = trio.Event()
    seen_at: list[float] = []

    def on_event(e):
        events.append(e)
        if isinstance(e, UpstreamFailed) and not seen_at:
            seen_at.append(time.monotonic())
            first_failure.set()

    with trio.fail_after(DEADLINE):
        async with open_mock_model_api(expect_key=KEY) as mock, open_refusing_proxy() as proxy:
            async with open_bridge(mock.url, agent, secrets, on_event) as bridge:
                cmd, env = invocation(agent, agents[agent], bridge.url, tmp_path, "Say hello",
                                      PLACEHOLDER, proxy.url)
                t0 = time.monotonic()
                code, out, err, took = await run_cli(cmd, env, tmp_path)
    assert code != 0 and expect in out.replace(" ", ""), (out, err)
    failures = [e for e in events if isinstance(e, UpstreamFailed)]
    assert failures and {f.failure for f in failures} == {"auth_failed"}
    assert seen_at[0] - t0 < 10
    assert proxy.asked == [] and mock.model_requests()


async def test_a_real_fetch_of_the_smallest_agent_package(tmp_path):
    """droid's platform package (~115 MB) with the machine's own npm, into an empty cache."""
    seen = []
    with trio.fail_after(600):
        files = await ensure_agent_files("factory", cache_dir=tmp_path, progress=seen.append)
    assert files.binary.is_file() and os.access(files.binary, os.X_OK)
    assert {"fetching", "verifying", "unpacking", "ready"} <= {p.phase for p in seen}
    code, out, err, _ = await run_cli([str(files.binary), "--version"],
                                      {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, tmp_path)
    assert code == 0 and out.strip() == files.version
