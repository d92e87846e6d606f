"""The model gateway (supervisor side) against the mock model API on 127.0.0.1."""

from __future__ import annotations

import json
import socket

import msgspec
import pytest
import trio
from structlog.testing import capture_logs

from runtime.errors import ConfigError
from runtime.gateway import (ExchangeDone, UpstreamFailed, Usage, UsageMeter, auth_rule,
                             classify_status, default_upstream, open_gateway)
from runtime.gateway_frames import (CHUNK_BYTES, HttpChunk, HttpEnd, HttpRequest, HttpResponse,
                                    chunks, decode_from_actor, decode_from_wrapper)
from runtime.protocol import MAX_LINE, encode_frame
from tests.mock_model_api import open_mock_model_api

KEY = "sk-real-secret-4f1c9a"
CLAUDE = {"ANTHROPIC_API_KEY": KEY}
CODEX = {"OPENAI_API_KEY": KEY}


@pytest.fixture
async def mock():
    async with open_mock_model_api() as m:
        yield m


class Run:
    """One wrapper session's view: the frames the gateway sent, and its events."""

    def __init__(self) -> None:
        self.frames: list = []
        self.lines: list[bytes] = []
        self.events: list = []
        self.done = trio.Event()
        self.first_chunk = trio.Event()

    async def send(self, frame) -> None:
        line = encode_frame(frame)
        assert len(line) <= MAX_LINE
        self.lines.append(line)
        self.frames.append(decode_from_actor(line.rstrip(b"\n")))  # the wire round trip
        if isinstance(frame, HttpChunk):
            self.first_chunk.set()

    def on_event(self, event) -> None:
        self.events.append(event)
        if isinstance(event, ExchangeDone):
            self.done.set()

    @property
    def response(self) -> HttpResponse:
        [r] = [f for f in self.frames if isinstance(f, HttpResponse)]
        return r

    @property
    def body(self) -> bytes:
        return b"".join(f.data for f in self.frames if isinstance(f, HttpChunk))

    @property
    def end(self) -> HttpEnd:
        assert isinstance(self.frames[-1], HttpEnd)
        return self.frames[-1]

    @property
    def exchange(self) -> ExchangeDone:
        [d] = [e for e in self.events if isinstance(e, ExchangeDone)]
        return d

    def failures(self) -> list[UpstreamFailed]:
        return [e for e in self.events if isinstance(e, UpstreamFailed)]


def anthropic_body(stream: bool = True) -> bytes:
    return json.dumps({"model": "claude-test", "max_tokens": 64, "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()


async def request(gw, *, req_id: int = 1, method: str = "POST",
                  target: str = "/v1/messages?beta=true", body: bytes = b"",
                  headers: list[tuple[str, str]] | None = None) -> None:
    """Feed one request as the wrapper would, each frame through the wire decoder."""
    hdrs = headers if headers is not None else [("content-type", "application/json"),
                                                ("anthropic-version", "2023-06-01")]
    frames = [HttpRequest(req_id=req_id, method=method, target=target, headers=hdrs),
              *chunks(req_id, body, 1000), HttpEnd(req_id=req_id)]
    for f in frames:
        await gw.feed(decode_from_wrapper(encode_frame(f).rstrip(b"\n")))


async def run_one(upstream: str, *, agent: str = "claude", secrets=CLAUDE, chunk_bytes=CHUNK_BYTES,
                  **req) -> Run:
    run = Run()
    async with open_gateway(upstream=upstream, agent=agent, secrets=secrets, send=run.send,
                            on_event=run.on_event, chunk_bytes=chunk_bytes) as gw:
        await request(gw, **req)
        with trio.fail_after(10):
            await run.done.wait()
    return run


async def test_streams_sse_through_in_chunks_under_the_frame_limit(mock):
    mock.answer = "".join(f"word{i} " for i in range(40_000))   # ~300 KB of text deltas
    mock.delta_size = 50_000
    run = await run_one(mock.url, body=anthropic_body(), chunk_bytes=16 * 1024)
    assert run.response.status == 200
    assert dict(run.response.headers)["content-type"].startswith("text/event-stream")
    assert run.end.error == ""
    text = "".join(json.loads(line[5:])["delta"]["text"]
                   for line in run.body.decode().splitlines()
                   if line.startswith("data:") and '"text_delta"' in line)
    assert text == mock.answer
    data = [f for f in run.frames if isinstance(f, HttpChunk)]
    assert len(data) > 20 and all(0 < len(c.data) <= 16 * 1024 for c in data)
    assert run.exchange.bytes_down == len(run.body)
    assert run.exchange.usage == Usage(input_tokens=11, output_tokens=7)
    assert run.failures() == []


async def test_the_response_streams_as_it_arrives_not_when_it_ends(mock):
    mock.stall()          # the mock sends message_start, then nothing more, ever
    run = Run()
    async with open_gateway(upstream=mock.url, agent="claude", secrets=CLAUDE, send=run.send,
                            on_event=run.on_event) as gw:
        await request(gw, body=anthropic_body())
        with trio.fail_after(10):
            await run.first_chunk.wait()
        assert run.response.status == 200
        assert b"message_start" in run.body and not run.done.is_set()
        assert gw.statistics().active == 1
        # the agent goes away (or the stall watchdog kills it): the exchange is aborted
        await gw.feed(HttpEnd(req_id=1, error="client went away"))
        with trio.fail_after(10):
            await run.done.wait()
    assert run.exchange.aborted and not any(isinstance(f, HttpEnd) for f in run.frames)
    assert run.exchange.usage is None or run.exchange.usage.input_tokens == 11


async def test_a_response_cut_short_upstream_is_cut_short_for_the_agent(mock):
    mock.cut()
    run = await run_one(mock.url, body=anthropic_body())
    assert run.response.status == 200 and b"message_start" in run.body
    assert run.end.error.startswith("upstream: ")
    assert [(f.failure, f.status) for f in run.failures()] == [("upstream_error", 200)]
    assert run.exchange.failure == "upstream_error"
    assert run.exchange.usage == Usage(input_tokens=11, output_tokens=1)


@pytest.mark.parametrize("agent,secrets,header,value", [
    ("claude", CLAUDE, "x-api-key", KEY),
    ("claude", {"ANTHROPIC_AUTH_TOKEN": KEY}, "authorization", f"Bearer {KEY}"),
    ("codex", CODEX, "authorization", f"Bearer {KEY}"),
    ("factory", CODEX, "authorization", f"Bearer {KEY}"),
    ("factory", CLAUDE, "x-api-key", KEY),
])
async def test_the_credential_is_injected_and_the_agents_own_dropped(mock, agent, secrets, header,
                                                                     value):
    mock.expect_key = KEY
    target = "/v1/messages" if header == "x-api-key" or "ANTHROPIC" in str(secrets) \
        else "/v1/responses"
    run = await run_one(mock.url, agent=agent, secrets=secrets, target=target,
                        body=anthropic_body(), headers=[
                            ("content-type", "application/json"), ("x-api-key", "agent-fake"),
                            ("Authorization", "Bearer agent-fake"), ("Cookie", "c=1"),
                            ("Host", "127.0.0.1:9999"), ("x-custom", "kept")])
    assert run.response.status == 200, run.body
    [seen] = mock.requests
    assert seen.headers[header] == value
    other = "authorization" if header == "x-api-key" else "x-api-key"
    assert other not in seen.headers and "cookie" not in seen.headers
    assert seen.headers["x-custom"] == "kept"
    assert seen.headers["host"] == mock.url.removeprefix("http://")
    assert seen.body == anthropic_body()


async def test_a_wrong_key_upstream_is_auth_failed_as_it_happens(mock):
    mock.expect_key = "another-key"
    run = await run_one(mock.url, body=anthropic_body())
    assert run.response.status == 401
    assert json.loads(run.body)["error"]["type"] == "authentication_error"
    assert [(f.failure, f.status) for f in run.failures()] == [("auth_failed", 401)]
    assert run.events.index(run.failures()[0]) < run.events.index(run.exchange)
    assert run.exchange.failure == "auth_failed"


@pytest.mark.parametrize("status,failure", [(401, "auth_failed"), (403, "auth_failed"),
                                            (429, "rate_limited"), (500, "upstream_error"),
                                            (529, "upstream_error")])
async def test_upstream_statuses_are_classified(mock, status, failure):
    mock.fail_with(status)
    run = await run_one(mock.url, agent="codex", secrets=CODEX, target="/v1/responses",
                        body=b'{"stream": true}')
    assert run.response.status == status        # the agent sees the real answer too
    assert run.end.error == ""
    assert [f.failure for f in run.failures()] == [failure]
    assert run.exchange.failure == failure and run.exchange.status == status


def test_status_table():
    assert [classify_status(s) for s in (200, 400, 401, 403, 404, 429, 500, 502, 503, 529)] == [
        None, None, "auth_failed", "auth_failed", None, "rate_limited", "upstream_error",
        "upstream_error", "upstream_error", "upstream_error"]


async def test_an_unreachable_upstream_is_reported_at_once():
    with socket.socket() as s:           # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = trio.current_time()
    run = await run_one(f"http://127.0.0.1:{port}", body=anthropic_body())
    assert trio.current_time() - t0 < 5
    assert run.response.status == 502
    assert "corral gateway" in json.loads(run.body)["error"]["message"]
    assert [f.failure for f in run.failures()] == ["upstream_unreachable"]
    assert run.exchange.failure == "upstream_unreachable"


@pytest.mark.parametrize("method,target", [
    ("POST", "http://evil.example/v1/messages"),
    ("POST", "https://127.0.0.1/v1/messages"),
    ("CONNECT", "api.openai.com:443"),
    ("POST", "//evil.example/v1/messages"),
    ("POST", "/v1/../../admin"),
    ("POST", "/v1/%2e%2e/admin"),
    ("GET", "http://user@evil.example/"),
])
async def test_only_the_upstream_is_reachable(mock, method, target):
    with capture_logs() as logs:
        run = await run_one(mock.url, method=method, target=target, body=anthropic_body())
    assert run.response.status == 403
    assert run.exchange.refused and run.exchange.failure is None
    assert mock.requests == []
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["gateway_refused"]


async def test_an_absolute_url_for_the_upstream_itself_is_forwarded(mock):
    run = await run_one(mock.url, target=mock.url + "/v1/messages?beta=true",
                        body=anthropic_body())
    assert run.response.status == 200
    assert [(r.path, r.query) for r in mock.requests] == [("/v1/messages", "beta=true")]


async def test_an_upstream_path_prefix_is_kept(mock):
    # codex is pointed at <endpoint>/v1 and sends /v1/responses; an upstream with a prefix
    run = await run_one(mock.url + "/v1", agent="codex", secrets=CODEX, target="/responses",
                        body=b'{"stream": true}')
    assert run.response.status == 200
    assert mock.requests[0].path == "/v1/responses"


async def test_the_secret_never_reaches_logs_events_or_frames_to_the_container(mock):
    mock.fail_with(401)
    with capture_logs() as logs:
        await run_one(mock.url, body=anthropic_body())
        refused = await run_one(mock.url, target=f"http://evil.example/?key={KEY}")
        await run_one(mock.url, target=f"/v1/messages?key={KEY}", body=anthropic_body())
    assert logs
    assert KEY not in repr(logs)
    assert KEY not in repr(refused.events)
    assert all(KEY.encode() not in line for line in refused.lines)


@pytest.mark.parametrize("path,body,usage", [
    ("/v1/messages", {"stream": True}, Usage(input_tokens=11, output_tokens=7)),
    ("/v1/messages", {"stream": False}, Usage(input_tokens=11, output_tokens=7)),
    ("/v1/responses", {"stream": True}, Usage(input_tokens=11, output_tokens=7)),
    ("/v1/chat/completions", {"stream": True, "stream_options": {"include_usage": True}},
     Usage(input_tokens=11, output_tokens=7)),
    ("/v1/chat/completions", {"stream": True}, None),
    ("/v1/chat/completions", {"stream": False}, Usage(input_tokens=11, output_tokens=7)),
])
async def test_usage_is_read_from_every_wire_format(mock, path, body, usage):
    secrets = CLAUDE if path == "/v1/messages" else CODEX
    agent = "claude" if path == "/v1/messages" else "codex"
    run = await run_one(mock.url, agent=agent, secrets=secrets, target=path,
                        body=json.dumps({"model": "m", **body}).encode())
    assert run.response.status == 200
    assert run.exchange.usage == usage


async def test_statistics_total_usage_and_failures(mock):
    run = Run()
    async with open_gateway(upstream=mock.url, agent="claude", secrets=CLAUDE, send=run.send,
                            on_event=run.on_event) as gw:
        for rid in (1, 2):
            await request(gw, req_id=rid, body=anthropic_body())
        mock.fail_with(429, times=1)
        await request(gw, req_id=3, body=anthropic_body())
        with trio.fail_after(10):
            while len([e for e in run.events if isinstance(e, ExchangeDone)]) < 3:
                await trio.sleep(0.01)
        stats = gw.statistics()
    assert stats.exchanges == 3 and stats.active == 0
    assert stats.usage == Usage(input_tokens=22, output_tokens=14)
    assert stats.failures == {"rate_limited": 1}
    # concurrent exchanges interleave their frames, each in order
    for rid in (1, 2, 3):
        mine = [f for f in run.frames if f.req_id == rid]
        assert isinstance(mine[0], HttpResponse) and isinstance(mine[-1], HttpEnd)


async def test_a_request_too_large_is_413(mock, monkeypatch):
    monkeypatch.setattr("runtime.gateway.MAX_REQUEST_BYTES", 10_000)
    run = await run_one(mock.url, body=b"x" * 20_000)
    assert run.response.status == 413 and run.exchange.refused
    assert mock.requests == []


def test_usage_meter_reads_sse_split_anywhere():
    events = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 100, "output_tokens": 1,
                                                        "cache_read_input_tokens": 40}}},
        {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "x" * 5000}},
        {"type": "message_delta", "usage": {"output_tokens": 321}},
    ]
    data = b"".join(b"event: e\r\ndata: " + json.dumps(e).encode() + b"\r\n\r\n" for e in events)
    for step in (1, 7, 4096, len(data)):
        meter = UsageMeter("text/event-stream; charset=utf-8")
        for i in range(0, len(data), step):
            meter.feed(data[i:i + step])
        assert meter.usage == Usage(input_tokens=100, output_tokens=321,
                                    cache_read_input_tokens=40)


def test_usage_meter_ignores_what_it_does_not_know():
    meter = UsageMeter("text/event-stream")
    meter.feed(b'data: [DONE]\n\ndata: {"type": "ping"}\n\ndata: {not json\n\n'
               b'data: {"usage": "weird"}\n\n: comment\n\n')
    assert meter.usage is None
    assert UsageMeter("application/octet-stream").usage is None


def test_credentials_are_required_per_agent():
    assert auth_rule("claude", {"ANTHROPIC_API_KEY": "k"}).header == "x-api-key"
    assert default_upstream("codex", CODEX) == "https://api.openai.com"
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN"):
        auth_rule("claude", {"OPENAI_API_KEY": "k"})
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        auth_rule("codex", {"OPENAI_API_KEY": ""})
    with pytest.raises(ConfigError, match="cannot reach a model"):
        auth_rule("shell", {})


def test_frames_round_trip_and_stay_under_the_limit():
    big = HttpChunk(req_id=7, data=b"\xff" * CHUNK_BYTES)
    line = encode_frame(big)
    assert len(line) < MAX_LINE
    assert decode_from_actor(line.rstrip(b"\n")) == big
    assert json.loads(line)["kind"] == "http_chunk"
    req = HttpRequest(req_id=1, method="POST", target="/v1/x", headers=[("a", "b"), ("a", "c")])
    assert decode_from_wrapper(encode_frame(req).rstrip(b"\n")) == req
    with pytest.raises(msgspec.ValidationError):
        decode_from_wrapper(b'{"kind":"http_chunk","req_id":1,"data":"'
                            + b"A" * (CHUNK_BYTES * 2) + b'"}')
    with pytest.raises(msgspec.ValidationError):
        decode_from_wrapper(b'{"kind":"http_response","req_id":1,"status":200}')
