"""A mock model API for the test suite, served on the host's 127.0.0.1 (hypercorn's trio worker,
a tiny ASGI app).

It speaks just enough of three wire formats for the real agent CLIs to complete a task:
- Anthropic Messages: ``HEAD /api/hello``, ``POST /v1/messages[?beta=true]`` (SSE when the body
  says ``"stream": true``, JSON otherwise), ``POST /v1/messages/count_tokens``;
- OpenAI Responses: ``POST /v1/responses`` (SSE), ``GET /v1/models``;
- OpenAI chat completions: ``POST /v1/chat/completions`` (SSE or JSON).

Per test: ``answer`` (the text every model request answers), ``expect_key`` (model requests with
another credential get 401), ``fail_with(status, times=...)`` (scripted 401 / 429 / 500 ...),
``stall()`` (model responses send their first event, then never finish), ``cut()`` (they send
their first event, then the connection drops), ``usage`` (the token
counts reported). Every request is recorded in ``requests``.

``open_refusing_proxy()`` is a forward proxy that refuses everything and records what was asked
for: point an agent's HTTP(S)_PROXY at it to see (and prevent) any traffic that is not for the
mock.
"""

from __future__ import annotations

import json
import time
from contextlib import asynccontextmanager
from functools import partial
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

MODEL_PATHS = ("/v1/messages", "/v1/responses", "/v1/chat/completions")

Send = Callable[[dict], Awaitable[None]]


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    """lower-case names; a repeated header keeps its last value"""
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def credential(self) -> str | None:
        """the key the client sent: ``x-api-key`` or a Bearer token"""
        if "x-api-key" in self.headers:
            return self.headers["x-api-key"]
        auth = self.headers.get("authorization", "")
        return auth[7:] if auth.lower().startswith("bearer ") else None


@dataclass
class _Failure:
    status: int
    times: int | None
    headers: dict[str, str]


@dataclass
class MockModelAPI:
    url: str = ""
    """``http://127.0.0.1:PORT``"""
    answer: str = "MOCK-ANSWER: the mock model says hello"
    expect_key: str | None = None
    usage: tuple[int, int] = (11, 7)
    """(input tokens, output tokens) every model answer reports"""
    delta_size: int = 8
    """the answer is streamed in text deltas of this many characters"""
    tool_use: dict | None = None
    """Anthropic Messages only: ``{"name": "Bash", "input": {...}}`` makes the first turn ask for
    this tool; a request carrying a tool_result then gets the text answer"""
    requests: list[RecordedRequest] = field(default_factory=list)
    _failures: list[_Failure] = field(default_factory=list)
    _stall: bool = False
    _cut: bool = False
    stalled: trio.Event = field(default_factory=trio.Event)
    """set when a response has stalled (sent its start, then nothing)"""

    # --- scripting -------------------------------------------------------------------------
    def fail_with(self, status: int, *, times: int | None = None,
                  headers: dict[str, str] | None = None) -> None:
        """The next ``times`` model requests (all of them if None) answer ``status``."""
        self._failures.append(_Failure(status, times, dict(headers or {})))

    def cut(self, on: bool = True) -> None:
        """Model responses send their headers and first event, then the connection drops."""
        self._cut = on

    def stall(self, on: bool = True) -> None:
        """Model responses send their headers and first event, then never finish."""
        self._stall = on

    def model_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.startswith(MODEL_PATHS)]

    # --- ASGI ------------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Send) -> None:
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        req = RecordedRequest(method=scope["method"], path=scope["path"],
                              query=scope["query_string"].decode("latin-1"),
                              headers=headers, body=body)
        self.requests.append(req)
        await self._dispatch(req, send)

    async def _dispatch(self, req: RecordedRequest, send: Send) -> None:
        path, method = req.path, req.method
        if path == "/api/hello":
            return await _json(send, 200, {"message": "hello"}, head=method == "HEAD")
        if path == "/v1/models" and method == "GET":
            return await _json(send, 200, {"object": "list", "data": [
                {"id": "mock-model", "object": "model", "created": 0, "owned_by": "mock"}]})
        if path == "/v1/messages/count_tokens" and method == "POST":
            return await _json(send, 200, {"input_tokens": self.usage[0]})
        if method != "POST" or path not in MODEL_PATHS:
            return await _json(send, 404, {"error": {"type": "not_found_error",
                                                     "message": f"mock: no {method} {path}"}})
        style = "anthropic" if path == "/v1/messages" else "openai"
        if self.expect_key is not None and req.credential != self.expect_key:
            return await _error(send, style, 401)
        if self._failures:
            f = self._failures[0]
            if f.times is not None:
                f.times -= 1
                if f.times <= 0:
                    self._failures.pop(0)
            return await _error(send, style, f.status, f.headers)
        try:
            payload = req.json()
        except ValueError:
            return await _error(send, style, 400)
        stream = bool(payload.get("stream"))
        model = str(payload.get("model") or "mock-model")
        if path == "/v1/messages":
            tool = self.tool_use if self.tool_use and not _has_tool_result(payload) else None
            if stream:
                return await self._sse(send, self._anthropic_events(model, tool))
            return await _json(send, 200, self._anthropic_message(model))
        if path == "/v1/responses":
            return await self._sse(send, self._responses_events(model))
        if stream:
            opts = payload.get("stream_options") or {}
            return await self._sse(send, self._chat_chunks(model, bool(opts.get("include_usage"))),
                                   done=True)
        return await _json(send, 200, self._chat_completion(model))

    async def _sse(self, send: Send, events: list[tuple[str | None, dict]], *,
                   done: bool = False) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"),
                                (b"cache-control", b"no-cache")]})
        for i, (name, data) in enumerate(events):
            text = (f"event: {name}\n" if name else "") + f"data: {json.dumps(data)}\n\n"
            await send({"type": "http.response.body", "body": text.encode(), "more_body": True})
            if self._cut and i == 0:
                raise ConnectionAbortedError("mock: cut the response short")
            if self._stall and i == 0:
                self.stalled.set()
                await trio.sleep_forever()
        if done:
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _pieces(self) -> list[str]:
        n = max(1, self.delta_size)
        return [self.answer[i:i + n] for i in range(0, len(self.answer), n)] or [""]

    # Anthropic Messages
    def _anthropic_message(self, model: str) -> dict:
        return {"id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": self.answer}], "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": self.usage[0], "output_tokens": self.usage[1],
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}

    def _anthropic_events(self, model: str,
                          tool: dict | None = None) -> list[tuple[str | None, dict]]:
        start = {"id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                 "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": {"input_tokens": self.usage[0], "output_tokens": 1,
                           "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}
        ev: list[tuple[str | None, dict]] = [
            ("message_start", {"type": "message_start", "message": start}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            ("ping", {"type": "ping"}),
        ]
        if tool is not None:
            return ev[:1] + [
                ("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "tool_use", "id": "toolu_mock",
                                                           "name": tool["name"], "input": {}}}),
                ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                    "type": "input_json_delta", "partial_json": json.dumps(tool["input"])}}),
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                ("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                                   "usage": {"output_tokens": self.usage[1]}}),
                ("message_stop", {"type": "message_stop"}),
            ]
        for piece in self._pieces():
            ev.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": piece}}))
        ev += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": self.usage[1]}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        return ev

    # OpenAI Responses
    def _responses_events(self, model: str) -> list[tuple[str | None, dict]]:
        created = int(time.time())
        item_id = "msg_mock"
        resp = {"id": "resp_mock", "object": "response", "created_at": created,
                "status": "in_progress", "model": model, "output": []}
        part = {"type": "output_text", "text": "", "annotations": []}
        done_item = {"id": item_id, "type": "message", "status": "completed", "role": "assistant",
                     "content": [{"type": "output_text", "text": self.answer, "annotations": []}]}
        seq = iter(range(1_000_000))
        ev: list[tuple[str | None, dict]] = [
            ("response.created", {"type": "response.created", "sequence_number": next(seq),
                                  "response": resp}),
            ("response.in_progress", {"type": "response.in_progress",
                                      "sequence_number": next(seq), "response": resp}),
            ("response.output_item.added", {
                "type": "response.output_item.added", "sequence_number": next(seq),
                "output_index": 0, "item": {"id": item_id, "type": "message",
                                            "status": "in_progress", "role": "assistant",
                                            "content": []}}),
            ("response.content_part.added", {
                "type": "response.content_part.added", "sequence_number": next(seq),
                "item_id": item_id, "output_index": 0, "content_index": 0, "part": part}),
        ]
        for piece in self._pieces():
            ev.append(("response.output_text.delta", {
                "type": "response.output_text.delta", "sequence_number": next(seq),
                "item_id": item_id, "output_index": 0, "content_index": 0, "delta": piece}))
        usage = {"input_tokens": self.usage[0], "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": self.usage[1], "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": self.usage[0] + self.usage[1]}
        ev += [
            ("response.output_text.done", {
                "type": "response.output_text.done", "sequence_number": next(seq),
                "item_id": item_id, "output_index": 0, "content_index": 0, "text": self.answer}),
            ("response.content_part.done", {
                "type": "response.content_part.done", "sequence_number": next(seq),
                "item_id": item_id, "output_index": 0, "content_index": 0,
                "part": {**part, "text": self.answer}}),
            ("response.output_item.done", {
                "type": "response.output_item.done", "sequence_number": next(seq),
                "output_index": 0, "item": done_item}),
            ("response.completed", {
                "type": "response.completed", "sequence_number": next(seq),
                "response": {**resp, "status": "completed", "output": [done_item],
                             "usage": usage}}),
        ]
        return ev

    # OpenAI chat completions
    def _chat_completion(self, model: str) -> dict:
        return {"id": "chatcmpl-mock", "object": "chat.completion", "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": self.answer}}],
                "usage": {"prompt_tokens": self.usage[0], "completion_tokens": self.usage[1],
                          "total_tokens": sum(self.usage)}}

    def _chat_chunks(self, model: str, include_usage: bool) -> list[tuple[str | None, dict]]:
        base = {"id": "chatcmpl-mock", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model}

        def chunk(delta: dict, finish: str | None = None) -> tuple[None, dict]:
            return None, {**base, "choices": [{"index": 0, "delta": delta,
                                               "finish_reason": finish}]}

        ev = [chunk({"role": "assistant", "content": ""})]
        ev += [chunk({"content": p}) for p in self._pieces()]
        ev.append(chunk({}, "stop"))
        if include_usage:
            ev.append((None, {**base, "choices": [], "usage": {
                "prompt_tokens": self.usage[0], "completion_tokens": self.usage[1],
                "total_tokens": sum(self.usage)}}))
        return ev


async def lifespan(receive: Callable[[], Awaitable[dict]], send: Send) -> None:
    """An ASGI app's lifespan protocol, for the test servers here (nothing to set up)."""
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _has_tool_result(payload: dict) -> bool:
    for message in payload.get("messages") or []:
        content = message.get("content")
        if isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == "tool_result"
                                             for b in content):
            return True
    return False


_ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error",
                     403: "permission_error", 404: "not_found_error", 429: "rate_limit_error",
                     500: "api_error", 529: "overloaded_error"}


async def _error(send: Send, style: str, status: int,
                 headers: dict[str, str] | None = None) -> None:
    if style == "anthropic":
        kind = _ANTHROPIC_ERRORS.get(status, "api_error")
        body: dict = {"type": "error", "error": {"type": kind, "message": f"mock {status}"}}
    else:
        code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status, "server_error")
        body = {"error": {"message": f"mock {status}", "type": code, "param": None,
                          "code": code}}
    await _json(send, status, body, headers=headers)


async def _json(send: Send, status: int, body: dict, *, head: bool = False,
                headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": b"" if head else data})


@asynccontextmanager
async def open_mock_model_api(**settings: Any) -> AsyncIterator[MockModelAPI]:
    """Serve a MockModelAPI on 127.0.0.1 (a free port) for the duration of the block."""
    mock = MockModelAPI(**settings)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.1
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(_serve, mock, config)
        mock.url = binds[0]
        try:
            yield mock
        finally:
            nursery.cancel_scope.cancel()


async def _serve(app: Any, config: Config, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    await serve(app, config, mode="asgi", task_status=task_status)


@dataclass
class RefusingProxy:
    url: str = ""
    asked: list[str] = field(default_factory=list)
    """request lines received, e.g. ``CONNECT api.anthropic.com:443 HTTP/1.1``"""


@asynccontextmanager
async def open_refusing_proxy() -> AsyncIterator[RefusingProxy]:
    """A forward proxy on 127.0.0.1 that answers 403 to everything and records each request
    line: set as HTTP_PROXY / HTTPS_PROXY of an agent so nothing else is reachable."""
    proxy = RefusingProxy()

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            with trio.move_on_after(5):
                while b"\r\n\r\n" not in data and len(data) < 65536:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    data += chunk
            if data:
                proxy.asked.append(data.split(b"\r\n", 1)[0].decode("latin-1"))
            try:
                await stream.send_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n"
                                      b"connection: close\r\n\r\n")
            except trio.BrokenResourceError:
                pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        proxy.url = f"http://127.0.0.1:{port}"
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()
