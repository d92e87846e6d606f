"""A real agent's worker on FakeEngine: the model gateway routed through the worker's session,
upstream failures ending tasks at once, the stall watchdog, usage totals, credentials checked
before anything starts, and secrets never shown. Autojump clock: exact virtual times.

The fake container's wrapper is the real core driven by trio; the agent's HTTP traffic is what
the wrapper's endpoint would send, written here onto the container's stdout as frames. The
upstream is an in-memory httpx transport (no sockets, so the autojump clock stays exact).
"""

from __future__ import annotations

import json
import math
from contextlib import asynccontextmanager

import httpx
import msgspec
import pytest
import trio
from structlog.testing import capture_logs

from actors.builder import image_inputs, image_tag
from actors.worker.tasks import task_outcome
from runtime import ConfigError, SupervisorConfig, Task, WorkerSpec, WorkerStartupError
from runtime import gateway as gateway_mod
from runtime.agentpkgs import AGENT_PACKAGES, AgentPackage, AgentPackageError, cache_key
from runtime.engines.fake import _FakeAttachment
from runtime.gateway import UpstreamFailed
from runtime.protocol import (AgentUsage, CancelTask, HttpChunk, HttpEnd, HttpRequest,
                              HttpResponse, TaskDone, decode_actor_frame, encode_frame)
from runtime.specs import EnvSecret, load_config

from .helpers import fake_supervisor

KEY = "sk-unit-secret-9b2f61d0c4"
CLAUDE = {"ANTHROPIC_API_KEY": KEY}
UPSTREAM = "http://model.test:8080"


# --- fixtures: a fake agent cache, an in-memory upstream, the wire to the wrapper --------------

@pytest.fixture(autouse=True)
def agent_cache(tmp_path, monkeypatch):
    """Every pinned package 'in the cache' (a tiny executable stands in for each CLI): real-agent
    images build on FakeEngine without npm."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(cache))
    for pkg in AGENT_PACKAGES.values():
        d = cache / "agents" / cache_key(pkg)
        entry = d / "package" / pkg.entry
        entry.parent.mkdir(parents=True)
        entry.write_text("#!/bin/sh\necho fake\n")
        entry.chmod(0o755)
        (d / ".corral-package.json").write_bytes(msgspec.json.encode(pkg))
    return cache


class Upstream:
    """The model API, in memory: answers Anthropic-style SSE, or what a test scripts."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.status = 200
        self.unreachable = False
        self.event_gap_s = 0.0
        """seconds between SSE events (virtual time)"""
        self.events = 3
        self.stall = False
        self.broken = False
        """answer with a response the HTTP client cannot stream (an unforeseen error)"""

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.unreachable:
            raise httpx.ConnectError("[Errno 111] Connection refused")
        if self.broken:
            return httpx.Response(200, json={"already": "read"})
        if self.status != 200:
            body = json.dumps({"type": "error", "error": {
                "type": "x", "message": f"upstream {self.status}"}}).encode()
            return httpx.Response(self.status, headers={"content-type": "application/json"},
                                  content=_once(body))
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=self._sse())

    async def _sse(self):
        start = {"type": "message_start", "message": {"usage": {"input_tokens": 11,
                                                                "output_tokens": 1}}}
        yield f"event: message_start\ndata: {json.dumps(start)}\n\n".encode()
        if self.stall:
            await trio.sleep_forever()
        for _ in range(self.events - 2):
            await trio.sleep(self.event_gap_s)
            yield b'event: ping\ndata: {"type": "ping"}\n\n'
        await trio.sleep(self.event_gap_s)
        delta = {"type": "message_delta", "usage": {"output_tokens": 7}}
        yield f"event: message_delta\ndata: {json.dumps(delta)}\n\n".encode()


async def _once(data: bytes):
    yield data


@pytest.fixture
def upstream(monkeypatch) -> Upstream:
    up = Upstream()
    monkeypatch.setattr(gateway_mod, "default_client", lambda **kw: httpx.AsyncClient(
        transport=httpx.MockTransport(up.handler), follow_redirects=False))
    return up


class Wire:
    """What the actor wrote to the container's stdin, as frames."""

    def __init__(self) -> None:
        self.frames: list = []
        self._changed = trio.Event()

    def add(self, data: bytes) -> None:
        for line in data.splitlines():
            if line.strip():
                self.frames.append(decode_actor_frame(line))
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, pred):
        while True:
            found = [f for f in self.frames if pred(f)]
            if found:
                return found
            await self._changed.wait()

    def of(self, rid: int) -> list:
        return [f for f in self.frames if getattr(f, "req_id", None) == rid]


@pytest.fixture
def wire(monkeypatch) -> Wire:
    w = Wire()
    original = _FakeAttachment.send

    async def send(self, data: bytes) -> None:
        w.add(data)
        await original(self, data)
    monkeypatch.setattr(_FakeAttachment, "send", send)
    return w


def agent_request(engine, worker_id: str, rid: int, *, target: str = "/v1/messages?beta=true",
                  body: bytes = b'{"stream": true}', headers=None) -> None:
    """The agent in the container makes a request to the wrapper's endpoint: its frames."""
    c = engine.container_of(worker_id)
    hdrs = headers if headers is not None else [("content-type", "application/json"),
                                                ("x-api-key", "placeholder")]
    for f in (HttpRequest(req_id=rid, method="POST", target=target, headers=hdrs),
              HttpChunk(req_id=rid, data=body), HttpEnd(req_id=rid)):
        c.out_send.send_nowait((1, encode_frame(f)))


@asynccontextmanager
async def real_claude(**spec):
    async with fake_supervisor(SupervisorConfig(name="t")) as (sup, engine):
        w = await sup.spawn(WorkerSpec(agent="claude", secrets=spec.pop("secrets", CLAUDE),
                                       upstream=spec.pop("upstream", UPSTREAM), **spec))
        yield sup, engine, w


async def start(w, prompt: str, **kw):
    """Run a task in the background; -> (a channel for its result, when it started)."""
    send, recv = trio.open_memory_channel(1)

    async def go():
        send.send_nowait(await w.run(Task(prompt=prompt, **kw)))
    return go, recv


# --- routing ----------------------------------------------------------------------------------

async def test_agent_requests_reach_the_upstream_with_the_real_key_and_stream_back(
        autojump_clock, upstream, wire):
    upstream.event_gap_s = 1.0
    async with real_claude() as (sup, engine, w):
        go, results = await start(w, "!sleep 10")
        async with trio.open_nursery() as n:
            n.start_soon(go)
            await w.wait_until(lambda i: i.state == "busy")
            agent_request(engine, w.id, 1)
            await wire.wait_for(lambda f: isinstance(f, HttpEnd) and f.req_id == 1)
            r = await results.receive()
    [req] = upstream.requests
    assert str(req.url) == UPSTREAM + "/v1/messages?beta=true"
    assert req.headers["x-api-key"] == KEY                    # injected; the placeholder dropped
    frames = wire.of(1)
    assert isinstance(frames[0], HttpResponse) and frames[0].status == 200
    body = b"".join(f.data for f in frames if isinstance(f, HttpChunk))
    assert body.count(b"data:") == 3 and frames[-1] == HttpEnd(req_id=1)
    assert (r.status, r.failure) == ("ok", None)
    assert r.usage is not None and (r.usage.input_tokens, r.usage.output_tokens,
                                    r.usage.source) == (11, 7, "gateway")


async def test_a_request_through_the_wrapper_core_endpoint_round_trips(autojump_clock, upstream,
                                                                        wire):
    """End to end in memory: the agent's HTTP request to the wrapper's endpoint (the real core),
    frames to the actor, the gateway, the upstream, and back."""
    async with real_claude(model="claude-test", permissions="full") as (sup, engine, w):
        c = engine.container_of(w.id)
        env = c.spec.env
        assert (env["CORRAL_GATEWAY"], env["CORRAL_GATEWAY_PORT"], env["CORRAL_MODEL"],
                env["CORRAL_PERMISSIONS"]) == ("1", "8787", "claude-test", "full")
        go, results = await start(w, "!sleep 10")
        async with trio.open_nursery() as n:
            n.start_soon(go)
            await w.wait_until(lambda i: i.state == "busy")
            await trio.sleep(1)                 # the wrapper has the task (and its agent runs)
            resp = await c.controls.http("POST", "/v1/messages?beta=true",
                                         [("content-type", "application/json"),
                                          ("x-api-key", "corral-gateway")], b'{"stream": true}')
            r = await results.receive()
    assert resp.status == 200 and resp.error == "" and resp.body.count(b"data:") == 3
    assert upstream.requests[0].headers["x-api-key"] == KEY
    assert r.usage.output_tokens == 7 and (await w.info()).usage.output_tokens == 7


async def test_factory_gets_the_droid_provider_of_its_credential(autojump_clock, upstream):
    async with fake_supervisor() as (sup, engine):
        a = await sup.spawn(WorkerSpec(agent="factory", secrets=CLAUDE, upstream=UPSTREAM))
        o = await sup.spawn(WorkerSpec(agent="factory", secrets={"OPENAI_API_KEY": KEY}))
        assert engine.container_of(a.id).spec.env["CORRAL_DROID_PROVIDER"] == "anthropic"
        assert engine.container_of(o.id).spec.env["CORRAL_DROID_PROVIDER"] == \
            "generic-chat-completion-api"


async def test_gateway_frames_of_a_worker_without_a_gateway_are_refused(autojump_clock, wire):
    async with fake_supervisor() as (sup, engine):
        w = await sup.spawn(WorkerSpec(agent="claude", stub_agent=True))
        with capture_logs() as logs:
            agent_request(engine, w.id, 7)
            [resp] = await wire.wait_for(lambda f: isinstance(f, HttpResponse))
        assert resp.status == 403 and wire.of(7)[-1] == HttpEnd(req_id=7)
        assert any(e["event"] == "gateway_refused" for e in logs)
        assert (await w.info()).state == "ready"


# --- failures end the task at once -------------------------------------------------------------

@pytest.mark.parametrize("status,failure", [(401, "auth_failed"), (403, "auth_failed"),
                                            (429, "rate_limited"), (500, "upstream_error"),
                                            (503, "upstream_error"),
                                            (None, "upstream_unreachable")])
async def test_an_upstream_failure_ends_the_task_at_once_and_the_container_stays(
        autojump_clock, upstream, wire, status, failure):
    if status is None:
        upstream.unreachable = True
    else:
        upstream.status = status
    async with real_claude() as (sup, engine, w):
        before = await w.info()
        go, results = await start(w, "!sleep 600")
        async with trio.open_nursery() as n:
            n.start_soon(go)
            await w.wait_until(lambda i: i.state == "busy")
            t0 = trio.current_time()
            agent_request(engine, w.id, 1)
            r = await results.receive()
            assert trio.current_time() - t0 == 0           # not after the agent's own retries
        assert (r.status, r.failure) == ("error", failure)
        assert failure in r.error and (str(status) in r.error if status else True)
        [cancel] = await wire.wait_for(lambda f: isinstance(f, CancelTask))
        assert cancel.reason == failure and cancel.task_id == r.task_id
        # the wrapper stops the agent; the same container takes the next task
        await w.wait_until(lambda i: i.state == "ready")
        after = await w.run(Task(prompt="next"))
        assert after.status == "ok" and (await w.info()).generation == before.generation


async def test_an_unforeseen_gateway_error_fails_the_exchange_not_the_worker(
        autojump_clock, upstream, wire):
    upstream.broken = True
    async with real_claude() as (sup, engine, w):
        go, results = await start(w, "!sleep 600")
        async with trio.open_nursery() as n:
            n.start_soon(go)
            await w.wait_until(lambda i: i.state == "busy")
            agent_request(engine, w.id, 1)
            r = await results.receive()
        assert (r.status, r.failure) == ("error", "upstream_error")
        assert wire.of(1)[-1].error.startswith("gateway: StreamConsumed")
        await w.wait_until(lambda i: i.state == "ready")
        assert (await w.info()).generation == 1


async def test_a_refused_host_is_a_403_and_the_task_goes_on(autojump_clock, upstream, wire):
    async with real_claude() as (sup, engine, w):
        go, results = await start(w, "!sleep 5")
        async with trio.open_nursery() as n:
            n.start_soon(go)
            await w.wait_until(lambda i: i.state == "busy")
            with capture_logs() as logs:
                agent_request(engine, w.id, 3, target="http://evil.example/steal")
                [resp] = await wire.wait_for(lambda f: isinstance(f, HttpResponse))
            r = await results.receive()
    assert resp.status == 403 and upstream.requests == []
    assert any(e["event"] == "gateway_refused" and "evil.example" in e["target"] for e in logs)
    assert r.status == "ok"


# --- the stall watchdog --------------------------------------------------------------------------

async def test_no_output_and_no_model_traffic_for_stall_timeout_ends_the_task_stalled(
        autojump_clock, upstream, wire):
    async with real_claude(stall_timeout_s=10) as (sup, engine, w):
        gen = (await w.info()).generation
        t0 = trio.current_time()
        r = await w.run(Task(prompt="!sleep 1000"))
        assert trio.current_time() - t0 == 10
        assert (r.status, r.failure) == ("error", "stalled")
        [cancel] = await wire.wait_for(lambda f: isinstance(f, CancelTask))
        assert cancel.reason == "stalled"
        await w.wait_until(lambda i: i.state == "ready")
        assert (await w.run(Task(prompt="next"))).status == "ok"
        assert (await w.info()).generation == gen                  # the container stayed


async def test_model_traffic_is_progress_until_the_stream_stalls(autojump_clock, upstream, wire):
    upstream.event_gap_s, upstream.events = 4.0, 7                # events until t = 24
    async with real_claude(stall_timeout_s=10) as (sup, engine, w):
        go, results = await start(w, "!sleep 1000")
        async with trio.open_nursery() as n:
            n.start_soon(go)
            await w.wait_until(lambda i: i.state == "busy")
            t0 = trio.current_time()
            agent_request(engine, w.id, 1)
            r = await results.receive()
            assert trio.current_time() - t0 == 24 + 10
    assert r.failure == "stalled"


async def test_a_stalled_stream_is_ended_by_the_watchdog(autojump_clock, upstream, wire):
    upstream.stall = True
    async with real_claude(stall_timeout_s=30) as (sup, engine, w):
        go, results = await start(w, "!sleep 1000")
        async with trio.open_nursery() as n:
            n.start_soon(go)
            await w.wait_until(lambda i: i.state == "busy")
            t0 = trio.current_time()
            agent_request(engine, w.id, 1)
            r = await results.receive()
            assert trio.current_time() - t0 == 30
    assert (r.status, r.failure) == ("error", "stalled")


async def test_stub_and_shell_agents_have_no_stall_watchdog_unless_asked(autojump_clock):
    async with fake_supervisor() as (sup, engine):
        w = await sup.spawn(WorkerSpec(agent="claude", stub_agent=True))
        assert (await w.run(Task(prompt="!sleep 400"))).status == "ok"
        w2 = await sup.spawn(WorkerSpec(agent="claude", stub_agent=True, stall_timeout_s=5))
        r = await w2.run(Task(prompt="!sleep 400"))
        assert r.failure == "stalled"
    assert WorkerSpec(agent="claude").effective_stall_timeout_s == 300
    assert WorkerSpec(agent="claude", stall_timeout_s=0).effective_stall_timeout_s is None


# --- usage ---------------------------------------------------------------------------------------

async def test_usage_totals_survive_container_restarts(autojump_clock, upstream, wire):
    async with real_claude() as (sup, engine, w):
        for i in (1, 2):
            go, results = await start(w, "!sleep 5")
            async with trio.open_nursery() as n:
                n.start_soon(go)
                await w.wait_until(lambda info: info.state == "busy")
                agent_request(engine, w.id, i)
                r = await results.receive()
            assert (r.usage.input_tokens, r.usage.output_tokens) == (11, 7)
            if i == 1:
                await w.restart()
        info = await w.info()
        assert info.generation == 2
        assert (info.usage.input_tokens, info.usage.output_tokens) == (22, 14)
        # model calls between tasks count in the totals too
        agent_request(engine, w.id, 9)
        await wire.wait_for(lambda f: isinstance(f, HttpEnd) and f.req_id == 9)
        await trio.sleep(0)
        assert (await w.info()).usage.output_tokens == 21


def test_task_outcome_table():
    def done(status="ok", failure="", error="", code=0):
        return TaskDone(task_id="t", status=status, failure=failure, error=error, exit_code=code)
    up = UpstreamFailed(req_id=1, failure="auth_failed", status=401)
    assert task_outcome(done()) == ("ok", None, "")
    # claude: exit 0, is_error false, yet a tool was refused
    assert task_outcome(done(failure="permission_denied"))[:2] == ("error", "permission_denied")
    assert task_outcome(done("error", error="boom", code=1)) == ("error", "agent_error", "boom")
    # droid says only "Exec failed": the gateway knows it was the key
    status, failure, error = task_outcome(done("error", error="Exec failed", code=1), up)
    assert (status, failure) == ("error", "auth_failed") and "401" in error and "Exec failed" in error
    assert task_outcome(done("error", failure="made_up"))[1] == "agent_error"
    assert task_outcome(done("timeout"))[:2] == ("timeout", None)
    assert task_outcome(done("cancelled"))[:2] == ("cancelled", None)


def test_usage_prefers_the_gateway_and_takes_the_cost_from_the_agent():
    from actors.worker.tasks import TaskBook, _Pending
    p = _Pending(task=Task(prompt="x"), reply=None)
    agent = AgentUsage(input_tokens=100, output_tokens=50, cost_usd=0.25)
    u = TaskBook._task_usage(p, agent)
    assert (u.input_tokens, u.output_tokens, u.cost_usd, u.source) == (100, 50, 0.25, "agent")
    p.gw_input, p.gw_output, p.gw_seen = 11, 7, True
    u = TaskBook._task_usage(p, agent)
    assert (u.input_tokens, u.output_tokens, u.cost_usd, u.source) == (11, 7, 0.25, "gateway")
    assert TaskBook._task_usage(_Pending(task=Task(prompt="x"), reply=None), None) is None


# --- credentials ---------------------------------------------------------------------------------

async def test_missing_credentials_fail_the_spawn_at_once_before_any_build_or_container(
        autojump_clock):
    async with fake_supervisor() as (sup, engine):
        t0 = trio.current_time()
        with pytest.raises(WorkerStartupError) as ei:
            await sup.spawn(WorkerSpec(agent="claude"))
        assert trio.current_time() - t0 == 0
        cert = ei.value.certificate
        assert cert.cause == "config_error" and "ANTHROPIC_API_KEY" in cert.reason
        assert engine.stats["creates"] == 0 and sup.builder.statistics().builds == 0
        with pytest.raises(WorkerStartupError) as ei:
            await sup.spawn(WorkerSpec(agent="codex", secrets={
                "OPENAI_API_KEY": EnvSecret(env="CORRAL_TEST_UNSET_VAR")}))
        assert ei.value.certificate.cause == "config_error"
        assert "CORRAL_TEST_UNSET_VAR" in ei.value.certificate.reason


def test_credentials_an_agent_cannot_use_through_the_gateway_are_config_errors():
    with pytest.raises(ConfigError, match="subscription login.*cannot go through an upstream"):
        WorkerSpec(agent="claude", secrets={"CLAUDE_CODE_OAUTH_TOKEN": "x"})
    with pytest.raises(ConfigError, match="Factory account login.*ANTHROPIC_API_KEY or OPENAI"):
        WorkerSpec(agent="factory", secrets={"FACTORY_API_KEY": "x"})
    with pytest.raises(ConfigError, match="takes OPENAI_API_KEY"):
        WorkerSpec(agent="codex", secrets={"ANTHROPIC_API_KEY": "x"})
    with pytest.raises(ConfigError, match="calls no model"):
        WorkerSpec(agent="shell", upstream="http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="scheme, host, port and path only"):
        WorkerSpec(agent="claude", upstream="https://user:pw@api.example")
    with pytest.raises(ConfigError, match="not an http"):
        WorkerSpec(agent="claude", upstream="file:///etc/passwd")


def test_config_file_secrets_come_from_the_environment(monkeypatch):
    toml = ('[[workers]]\nagent = "claude"\nupstream = "http://127.0.0.1:9"\n'
            'secrets = {ANTHROPIC_API_KEY = {env = "CORRAL_TEST_KEY_VAR"}}\n')
    monkeypatch.delenv("CORRAL_TEST_KEY_VAR", raising=False)
    with pytest.raises(ConfigError, match=r"\$\.workers\[0\]\.secrets\.ANTHROPIC_API_KEY.*"
                                          r"CORRAL_TEST_KEY_VAR, which is not set"):
        load_config(toml)
    monkeypatch.setenv("CORRAL_TEST_KEY_VAR", KEY)
    spec = load_config(toml).workers[0]
    assert spec.secrets == {"ANTHROPIC_API_KEY": EnvSecret(env="CORRAL_TEST_KEY_VAR")}
    assert spec.resolve_secrets() == CLAUDE and KEY not in repr(spec)


# --- secrets are never shown -----------------------------------------------------------------------

async def test_the_key_is_nowhere_to_be_seen(autojump_clock, upstream, wire):
    upstream.status = 401
    spec = WorkerSpec(agent="claude", secrets=CLAUDE, upstream=UPSTREAM, model="claude-x",
                      permissions="read-only")
    assert KEY not in repr(spec) and KEY not in str(spec) and "<redacted>" in repr(spec)
    assert KEY not in repr(SupervisorConfig(workers=[spec]))
    assert KEY not in msgspec.json.encode(spec.redacted()).decode()
    other = msgspec.structs.replace(spec, secrets={"ANTHROPIC_API_KEY": KEY + "x"})
    assert spec.fingerprint() != other.fingerprint()       # a changed key is a changed spec
    with capture_logs() as logs:
        async with fake_supervisor(SupervisorConfig(name="t")) as (sup, engine):
            w = await sup.spawn(spec)
            c = engine.container_of(w.id)
            assert c.spec.env["CORRAL_GATEWAY"] == "1" and c.spec.env["CORRAL_GATEWAY_PORT"] == "8787"
            assert c.spec.env["CORRAL_MODEL"] == "claude-x"
            assert c.spec.env["CORRAL_PERMISSIONS"] == "read-only"
            go, results = await start(w, "!sleep 60")
            async with trio.open_nursery() as n:
                n.start_soon(go)
                await w.wait_until(lambda i: i.state == "busy")
                agent_request(engine, w.id, 1)
                r = await results.receive()
            assert r.failure == "auth_failed" and upstream.requests[0].headers["x-api-key"] == KEY
            shown = [msgspec.json.encode(c.spec).decode(), json.dumps(c.labels),
                     bytes(c.log).decode(errors="replace"),
                     msgspec.json.encode(await sup.snapshot()).decode(),
                     json.dumps(msgspec.to_builtins(await sup.snapshot())),
                     msgspec.json.encode(r).decode(), msgspec.json.encode(await w.info()).decode(),
                     "".join(json.dumps(f, default=repr) for f in wire.frames)]
    shown.append(json.dumps(logs, default=repr))
    assert all(KEY not in text for text in shown)


# --- hermetic images on FakeEngine -----------------------------------------------------------------

async def test_workers_of_one_agent_share_its_agent_image(autojump_clock):
    async with fake_supervisor() as (sup, engine):
        b = sup.builder
        a = await b.image_for("codex", [], stub_agent=False)
        c = await b.image_for("codex", ["git"], stub_agent=False)
        s = await b.image_for("codex", [], stub_agent=True)
        assert a.built and c.built and a.tag != c.tag
        st = b.statistics()
        assert st.agent_builds == 1 and st.builds == 3
        agents = [img for ref, img in engine.images.items() if ref.startswith("corral/agent-codex:")]
        assert len(agents) == 1 and agents[0].labels["corral.package"].startswith("@openai/codex@")
        again = await b.image_for("codex", ["git"], stub_agent=False)
        assert not again.built and b.statistics().builds == 3     # warm: no build, no fetch
        assert s.tag != a.tag


def test_the_pin_is_an_input_of_the_image_hash(monkeypatch):
    base = "sha256:" + "0" * 64
    tag = image_tag(image_inputs(agent="claude", capabilities=[], stub_agent=False,
                                 base_image_id=base))[0]
    stub = image_tag(image_inputs(agent="claude", capabilities=[], stub_agent=True,
                                  base_image_id=base))[0]
    import runtime.agents as agents
    pkg = AGENT_PACKAGES["claude"]
    bumped = msgspec.structs.replace(agents.AGENTS["claude"], package=AgentPackage(
        **{**msgspec.structs.asdict(pkg), "version": "9.9.9"}))
    monkeypatch.setitem(agents.AGENTS, "claude", bumped)
    tag2 = image_tag(image_inputs(agent="claude", capabilities=[], stub_agent=False,
                                  base_image_id=base))[0]
    stub2 = image_tag(image_inputs(agent="claude", capabilities=[], stub_agent=True,
                                   base_image_id=base))[0]
    assert tag != tag2 and stub == stub2


async def test_a_cold_cache_without_npm_is_a_clear_error_naming_the_package(
        autojump_clock, tmp_path, monkeypatch):
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    async with fake_supervisor() as (sup, engine):
        with pytest.raises(AgentPackageError) as ei:
            await sup.spawn(WorkerSpec(agent="factory", secrets={"OPENAI_API_KEY": KEY}))
    assert "@factory/cli-linux-x64@0.225.2" in str(ei.value) and "npm" in str(ei.value)
    assert engine.stats["creates"] == 0
