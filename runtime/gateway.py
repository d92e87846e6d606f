"""The supervisor side of the model gateway.

An agent in a container (no network) talks HTTP to its wrapper on the container's
127.0.0.1; the wrapper forwards each request as frames (``gateway_frames``) over the attached
stdio. Here each request is forwarded to the worker's configured upstream with httpx, the real
credential injected (the container never holds it), and the response is streamed back as it
arrives (SSE included), in frames under the line limit.

- Only the configured upstream is reachable: any other host, an absolute URL for another
  origin, CONNECT, or a path with dot segments gets 403 and a ``gateway_refused`` event.
- Any credential the agent sent is dropped; the worker's secret is injected per ``AuthRule``.
- Failures are classified as they happen (``classify_status``: 401/403 auth_failed, 429
  rate_limited, 5xx upstream_error; connect errors and timeouts upstream_unreachable) and
  reported at once through ``on_event`` (``UpstreamFailed``), so a worker can fail its task in
  seconds instead of waiting out the agent's own retries.
- Token usage is read from the bodies as they stream (``UsageMeter``), never buffering a stream.
- Secrets never reach a log line or an event: paths are logged without their query, and every
  logged string is scrubbed of the secret values.

Use: ``async with open_gateway(upstream=..., agent=..., secrets=..., send=...) as gw:`` then
``await gw.feed(frame)`` for each gateway frame from the wrapper. ``gw.last_activity`` (trio
clock) serves a stall watchdog; ``gw.statistics()`` the totals.
"""

from __future__ import annotations

import posixpath
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable, Literal, Mapping, Union

import httpx
import msgspec
import structlog
import trio
from msgspec import Struct

from . import events
from .errors import ConfigError
from .gateway_frames import (CHUNK_BYTES, GatewayFrame, HttpChunk, HttpEnd, HttpRequest,
                             HttpResponse, WrapperGatewayFrame)

log = structlog.get_logger("corral.gateway")

GatewayFailure = Literal["auth_failed", "rate_limited", "upstream_error", "upstream_unreachable"]
"""the agent-level failures (TaskResult.failure) that the gateway itself can see"""

MAX_REQUEST_BYTES = 32 * 1024 * 1024
"""a request body larger than this is answered 413 (model requests are far smaller)"""


# --- credentials -------------------------------------------------------------------------------

class AuthRule(Struct, frozen=True, kw_only=True):
    """Inject ``secrets[secret]`` as header ``header`` with ``prefix`` (e.g. ``"Bearer "``)."""
    secret: str
    header: str
    prefix: str = ""


ANTHROPIC_API_KEY = AuthRule(secret="ANTHROPIC_API_KEY", header="x-api-key")
ANTHROPIC_AUTH_TOKEN = AuthRule(secret="ANTHROPIC_AUTH_TOKEN", header="authorization",
                                prefix="Bearer ")
OPENAI_API_KEY = AuthRule(secret="OPENAI_API_KEY", header="authorization", prefix="Bearer ")

AGENT_AUTH: dict[str, tuple[AuthRule, ...]] = {
    "claude": (ANTHROPIC_API_KEY, ANTHROPIC_AUTH_TOKEN),
    "codex": (OPENAI_API_KEY,),
    # droid with a BYOK custom model: provider "anthropic" (x-api-key) or an OpenAI-style one
    # ("openai", "generic-chat-completion-api": Bearer); which one follows from the secret given
    "factory": (ANTHROPIC_API_KEY, OPENAI_API_KEY),
}
"""per agent, the credentials it can use, in order of preference"""

PUBLIC_UPSTREAMS: dict[str, str] = {
    "ANTHROPIC_API_KEY": "https://api.anthropic.com",
    "ANTHROPIC_AUTH_TOKEN": "https://api.anthropic.com",
    "OPENAI_API_KEY": "https://api.openai.com",
}
"""the default upstream for each kind of credential (WorkerSpec.upstream's default)"""

CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "api-key", "x-goog-api-key",
                                "proxy-authorization", "cookie"})
"""dropped from every request the agent sends: only the injected credential goes upstream"""

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "upgrade", "host", "content-length",
                        "accept-encoding"})


def auth_rule(agent: str, secrets: Mapping[str, str]) -> AuthRule:
    """The credential to inject for this agent: the first of its rules whose secret is given.
    No such secret: ConfigError naming what is needed (a worker without credentials must not
    start)."""
    rules = AGENT_AUTH.get(agent)
    if rules is None:
        raise ConfigError(f"agent {agent!r} cannot reach a model through the gateway; agents "
                          f"that can: {', '.join(sorted(AGENT_AUTH))}")
    for rule in rules:
        if secrets.get(rule.secret):
            return rule
    names = " or ".join(r.secret for r in rules)
    raise ConfigError(f"agent {agent!r} needs a credential: set {names} in WorkerSpec.secrets")


def default_upstream(agent: str, secrets: Mapping[str, str]) -> str:
    return PUBLIC_UPSTREAMS[auth_rule(agent, secrets).secret]


# --- classification ----------------------------------------------------------------------------

def classify_status(status: int) -> GatewayFailure | None:
    """What an upstream status means for the task (None: not a failure the gateway can name)."""
    if status in (401, 403):
        return "auth_failed"
    if status == 429:
        return "rate_limited"
    if status >= 500:
        return "upstream_error"
    return None


def classify_exception(exc: BaseException, *, responded: bool) -> GatewayFailure:
    """An httpx error: before the response's headers, a failure to reach the upstream (connect,
    DNS, TLS, timeouts); after them, a broken response (upstream_error)."""
    if responded:
        return "upstream_error"
    if isinstance(exc, (httpx.TimeoutException, httpx.ConnectError, httpx.NetworkError,
                        httpx.ProxyError, httpx.UnsupportedProtocol)):
        return "upstream_unreachable"
    return "upstream_error"


# --- usage -------------------------------------------------------------------------------------

class Usage(Struct, frozen=True, kw_only=True):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(input_tokens=self.input_tokens + other.input_tokens,
                     output_tokens=self.output_tokens + other.output_tokens,
                     cache_read_input_tokens=self.cache_read_input_tokens
                     + other.cache_read_input_tokens,
                     cache_creation_input_tokens=self.cache_creation_input_tokens
                     + other.cache_creation_input_tokens)


class _Details(Struct):
    cached_tokens: int | None = None


class _Tokens(Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    input_tokens_details: _Details | None = None
    prompt_tokens_details: _Details | None = None


class _HasUsage(Struct):
    usage: _Tokens | None = None


class _Event(Struct):
    type: str = ""
    message: _HasUsage | None = None
    response: _HasUsage | None = None
    usage: _Tokens | None = None


_decode_event = msgspec.json.Decoder(_Event).decode

MAX_SSE_LINE = 16 * 1024 * 1024
MAX_JSON_BODY = 4 * 1024 * 1024


class UsageMeter:
    """Reads token usage from a response body as it streams (sans-IO: feed bytes, then
    ``usage``). Understands Anthropic Messages (``message_start`` / ``message_delta``, or a
    whole message), OpenAI Responses (``response.completed``) and chat completions (a chunk or a
    whole completion with ``usage``). Keeps only the current SSE line (a JSON body up to 4 MiB)."""

    def __init__(self, content_type: str) -> None:
        ct = content_type.lower()
        self._sse = "text/event-stream" in ct
        self._json = not self._sse and "json" in ct
        self._buf = bytearray()
        self._skipping = False
        self._seen = False
        self._in = self._out = self._cread = self._cwrite = 0

    def feed(self, data: bytes) -> None:
        if self._sse:
            self._feed_sse(data)
        elif self._json and len(self._buf) <= MAX_JSON_BODY:
            self._buf += data

    def _feed_sse(self, data: bytes) -> None:
        start = 0
        while (nl := data.find(b"\n", start)) != -1:
            if self._skipping:
                self._skipping = False
            else:
                self._buf += data[start:nl]
                self._line(bytes(self._buf))
            self._buf.clear()
            start = nl + 1
        if not self._skipping:
            self._buf += data[start:]
            if len(self._buf) > MAX_SSE_LINE:
                self._buf.clear()
                self._skipping = True

    def _line(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if not payload.startswith(b"{"):
            return
        self._event(payload)

    def _event(self, payload: bytes) -> None:
        try:
            ev = _decode_event(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if ev.type == "message_start" and ev.message and ev.message.usage:
            self._take(ev.message.usage)
        elif ev.type.startswith("response.") and ev.response and ev.response.usage:
            self._take(ev.response.usage)
        elif ev.usage:
            self._take(ev.usage)

    def _take(self, t: _Tokens) -> None:
        self._seen = True
        if t.input_tokens is not None:
            self._in = t.input_tokens
        elif t.prompt_tokens is not None:
            self._in = t.prompt_tokens
        if t.output_tokens is not None:
            self._out = t.output_tokens
        elif t.completion_tokens is not None:
            self._out = t.completion_tokens
        if t.cache_read_input_tokens is not None:
            self._cread = t.cache_read_input_tokens
        for d in (t.input_tokens_details, t.prompt_tokens_details):
            if d is not None and d.cached_tokens is not None:
                self._cread = d.cached_tokens
        if t.cache_creation_input_tokens is not None:
            self._cwrite = t.cache_creation_input_tokens

    @property
    def usage(self) -> Usage | None:
        """The usage seen so far; for a JSON body, once it is complete. None: none reported."""
        if self._json and self._buf and len(self._buf) <= MAX_JSON_BODY:
            self._event(bytes(self._buf))
            self._buf.clear()
        if not self._seen:
            return None
        return Usage(input_tokens=self._in, output_tokens=self._out,
                     cache_read_input_tokens=self._cread, cache_creation_input_tokens=self._cwrite)


# --- records -----------------------------------------------------------------------------------

class UpstreamFailed(Struct, frozen=True, kw_only=True, tag="upstream_failed"):
    """Reported as soon as a failure is seen (the response may still be streaming)."""
    req_id: int
    failure: GatewayFailure
    status: int | None = None
    detail: str = ""


class ExchangeDone(Struct, frozen=True, kw_only=True, tag="exchange_done"):
    """Reported when an exchange ends, however it ends."""
    req_id: int
    method: str
    path: str
    """without its query"""
    status: int | None
    failure: GatewayFailure | None = None
    refused: bool = False
    """the gateway refused it (another host, CONNECT, dot segments, too large)"""
    aborted: bool = False
    """the agent went away before the response was complete"""
    usage: Usage | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    ttfb_s: float | None = None
    duration_s: float = 0.0
    error: str = ""


GatewayEvent = Union[UpstreamFailed, ExchangeDone]
EventFn = Callable[[GatewayEvent], None]
SendFn = Callable[[GatewayFrame], Awaitable[None]]


class GatewayStatistics(Struct, frozen=True, kw_only=True):
    active: int
    exchanges: int
    refused: int
    failures: dict[str, int]
    usage: Usage
    last_activity: float


# --- the gateway -------------------------------------------------------------------------------

class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Pending:
    __slots__ = ("request", "body", "too_large", "scope")

    def __init__(self, request: HttpRequest) -> None:
        self.request = request
        self.body = bytearray()
        self.too_large = False
        self.scope: trio.CancelScope | None = None


class Gateway:
    """Forwards one wrapper's HTTP exchanges to one upstream. Create with ``open_gateway``."""

    def __init__(self, *, upstream: str, agent: str, secrets: Mapping[str, str], send: SendFn,
                 client: httpx.AsyncClient, nursery: trio.Nursery,
                 on_event: EventFn | None = None, rule: AuthRule | None = None,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        url = httpx.URL(upstream)
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(f"upstream {upstream!r} is not an http(s) URL")
        if url.query or url.fragment or url.userinfo:
            raise ConfigError(f"upstream {upstream!r}: give scheme, host, port and path only")
        self.upstream = url
        self._prefix = url.path.rstrip("/")
        self._rule = rule or auth_rule(agent, secrets)
        self._credential = self._rule.prefix + secrets[self._rule.secret]
        self._secrets = [v for v in secrets.values() if v]
        self._send = send
        self._client = client
        self._nursery = nursery
        self._on_event = on_event or (lambda e: None)
        self._chunk = chunk_bytes
        self._pending: dict[int, _Pending] = {}
        self._send_lock = trio.Lock()
        self.last_activity = trio.current_time()
        self._exchanges = 0
        self._refused = 0
        self._failures: dict[str, int] = {}
        self._usage = Usage()

    # -- frames in ------------------------------------------------------------------------
    async def feed(self, frame: WrapperGatewayFrame) -> None:
        """Take one gateway frame from the wrapper. A complete request is forwarded in its own
        task; this returns at once."""
        self.last_activity = trio.current_time()
        match frame:
            case HttpRequest(req_id=rid):
                if rid in self._pending:
                    await self._answer_error(rid, 400, f"duplicate req_id {rid}")
                    return
                self._pending[rid] = _Pending(frame)
            case HttpChunk(req_id=rid, data=data):
                p = self._pending.get(rid)
                if p is None or p.scope is not None:
                    return  # an exchange already answered or aborted: late data is dropped
                if len(p.body) + len(data) > MAX_REQUEST_BYTES:
                    p.too_large = True
                    p.body.clear()
                elif not p.too_large:
                    p.body += data
            case HttpEnd(req_id=rid, error=error):
                p = self._pending.get(rid)
                if p is None:
                    return
                if p.scope is not None:          # the agent went away mid-exchange
                    p.scope.cancel()
                elif error:                      # the agent went away while sending
                    del self._pending[rid]
                else:
                    p.scope = trio.CancelScope()
                    self._nursery.start_soon(self._run_exchange, p)

    async def aclose(self) -> None:
        """Cancel every exchange in flight; nothing more is sent for them (the session is ending:
        the wrapper drops its agents' connections with it)."""
        for p in list(self._pending.values()):
            if p.scope is not None:
                p.scope.cancel()

    def statistics(self) -> GatewayStatistics:
        return GatewayStatistics(active=sum(1 for p in self._pending.values() if p.scope),
                                 exchanges=self._exchanges, refused=self._refused,
                                 failures=dict(self._failures), usage=self._usage,
                                 last_activity=self.last_activity)

    # -- one exchange ---------------------------------------------------------------------
    async def _run_exchange(self, p: _Pending) -> None:
        req = p.request
        rid = req.req_id
        start = trio.current_time()
        path = _loggable_path(req.target)
        st = _ExchangeState()
        assert p.scope is not None
        try:
            with p.scope:
                if p.too_large:
                    raise _Refused(413, f"request body over {MAX_REQUEST_BYTES} bytes")
                url = self._resolve(req.method, req.target)
                headers = self._headers(req.headers)
                await self._forward(rid, req.method, url, headers, bytes(p.body), st)
            if p.scope.cancelled_caught:
                st.aborted = True
        except _Refused as exc:
            self._refused += 1
            st.refused = True
            st.status = exc.status
            log.warning("gateway_refused", req_id=rid, method=req.method,
                        target=self._scrub(_loggable_path(req.target, keep_host=True)),
                        status=exc.status, reason=self._scrub(exc.reason))
            with trio.CancelScope() as cs:
                p.scope = cs
                await self._answer_error(rid, exc.status, exc.reason)
        except Exception as exc:
            # a failure nobody foresaw (the HTTP client's, or ours) ends this exchange only,
            # never the worker's session: the agent gets a 502 or a cut-short body
            st.error = f"{type(exc).__name__}: {exc}"
            log.error("gateway_exchange_failed", req_id=rid, error=self._scrub(st.error),
                      exc_info=False)
            if st.failure is None:
                st.failure = "upstream_error"
                self._failed(rid, "upstream_error", st.status,
                             "corral gateway error: " + st.error)
            with trio.CancelScope() as cs:
                p.scope = cs
                if st.responded:
                    await self._emit(HttpEnd(req_id=rid, error="gateway: " + self._scrub(
                        st.error)[:900]))
                else:
                    await self._answer_error(rid, 502, "gateway error: " + st.error)
        finally:
            self._pending.pop(rid, None)
            self._exchanges += 1
            if st.usage:
                self._usage = self._usage + st.usage
            if st.failure:
                self._failures[st.failure] = self._failures.get(st.failure, 0) + 1
            done = ExchangeDone(req_id=rid, method=req.method, path=self._scrub(path),
                                status=st.status, failure=st.failure, refused=st.refused,
                                aborted=st.aborted, usage=st.usage, bytes_up=len(p.body),
                                bytes_down=st.bytes_down, ttfb_s=st.ttfb_s,
                                duration_s=trio.current_time() - start,
                                error=self._scrub(st.error))
            log.info("gateway_exchange", req_id=rid, method=req.method, path=done.path,
                     status=done.status, failure=done.failure, aborted=done.aborted,
                     bytes_down=done.bytes_down, duration_s=round(done.duration_s, 3))
            events.gateway_exchange(done)
            self._on_event(done)

    def _resolve(self, method: str, target: str) -> httpx.URL:
        if method == "CONNECT":
            raise _Refused(403, "CONNECT is not allowed: only the configured upstream is "
                                "reachable")
        if target.startswith("/") and not target.startswith("//"):
            path, _, query = target.partition("?")
            url_path = self._prefix + path
        else:
            try:
                absolute = httpx.URL(target)
            except httpx.InvalidURL:
                raise _Refused(403, "not a valid request target") from None
            if (absolute.scheme, absolute.host, absolute.port or _default_port(absolute)) != (
                    self.upstream.scheme, self.upstream.host,
                    self.upstream.port or _default_port(self.upstream)):
                raise _Refused(403, f"host {absolute.host or '?'} is not the configured "
                                    f"upstream")
            url_path = absolute.raw_path.decode("ascii").partition("?")[0]
            query = absolute.query.decode("ascii")
        segments = url_path.split("/")
        if "." in segments or ".." in segments or "%2e" in url_path.lower():
            raise _Refused(403, "dot segments in the path")
        if posixpath.normpath(url_path or "/") != (url_path.rstrip("/") or "/"):
            raise _Refused(403, "a path that does not normalise to itself")
        try:
            raw = url_path.encode("ascii") + (b"?" + query.encode("ascii") if query else b"")
            return self.upstream.copy_with(raw_path=raw)
        except (UnicodeError, httpx.InvalidURL):
            raise _Refused(400, "not a valid request target") from None

    def _headers(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        out = [(k, v) for k, v in pairs
               if k.lower() not in HOP_BY_HOP and k.lower() not in CREDENTIAL_HEADERS
               and k.lower() != self._rule.header]
        out.append(("accept-encoding", "identity"))
        out.append((self._rule.header, self._credential))
        return out

    async def _forward(self, rid: int, method: str, url: httpx.URL,
                       headers: list[tuple[str, str]], body: bytes, st: "_ExchangeState") -> None:
        t0 = trio.current_time()
        try:
            request = self._client.build_request(method, url, headers=headers, content=body)
        except (UnicodeError, ValueError, httpx.InvalidURL) as exc:
            raise _Refused(400, f"bad request: {type(exc).__name__}") from None
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            st.failure = classify_exception(exc, responded=False)
            st.error = f"{type(exc).__name__}: {exc}"
            st.status = 504 if isinstance(exc, httpx.TimeoutException) else 502
            self._failed(rid, st.failure, None, st.error)
            await self._answer_error(rid, st.status, f"upstream unreachable: {st.error}")
            return
        try:
            st.status = response.status_code
            st.ttfb_s = trio.current_time() - t0
            if failure := classify_status(response.status_code):
                st.failure = failure
                self._failed(rid, failure, response.status_code,
                             f"upstream answered {response.status_code}")
            meter = UsageMeter(response.headers.get("content-type", ""))
            await self._emit(HttpResponse(req_id=rid, status=response.status_code,
                                          headers=_response_headers(response)))
            st.responded = True
            try:
                async for data in response.aiter_raw():
                    self.last_activity = trio.current_time()
                    meter.feed(data)
                    st.bytes_down += len(data)
                    for i in range(0, len(data), self._chunk):
                        await self._emit(HttpChunk(req_id=rid, data=data[i:i + self._chunk]))
            except httpx.HTTPError as exc:
                st.usage = meter.usage
                st.error = f"{type(exc).__name__}: {exc}"
                if st.failure is None:
                    st.failure = classify_exception(exc, responded=True)
                    self._failed(rid, st.failure, st.status, "response cut short: " + st.error)
                await self._emit(HttpEnd(req_id=rid, error="upstream: " + self._scrub(st.error)))
                return
            st.usage = meter.usage
            await self._emit(HttpEnd(req_id=rid))
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5):
                    await response.aclose()

    def _failed(self, rid: int, failure: GatewayFailure, status: int | None, detail: str) -> None:
        detail = self._scrub(detail)
        log.warning("gateway_upstream_failed", req_id=rid, failure=failure, status=status,
                    detail=detail)
        self._on_event(UpstreamFailed(req_id=rid, failure=failure, status=status, detail=detail))

    async def _answer_error(self, rid: int, status: int, message: str) -> None:
        body = msgspec.json.encode({"type": "error", "error": {
            "type": "corral_gateway_error", "code": "corral_gateway_error",
            "message": "corral gateway: " + self._scrub(message)}})
        await self._emit(HttpResponse(req_id=rid, status=status, headers=[
            ("content-type", "application/json"), ("content-length", str(len(body)))]))
        await self._emit(HttpChunk(req_id=rid, data=body))
        await self._emit(HttpEnd(req_id=rid))

    async def _emit(self, frame: GatewayFrame) -> None:
        async with self._send_lock:
            await self._send(frame)
        self.last_activity = trio.current_time()

    def _scrub(self, text: str) -> str:
        for s in self._secrets:
            if s in text:
                text = text.replace(s, "[secret]")
        return text


class _ExchangeState:
    __slots__ = ("status", "failure", "refused", "aborted", "usage", "bytes_down", "ttfb_s",
                 "error", "responded")

    def __init__(self) -> None:
        self.responded = False
        self.status: int | None = None
        self.failure: GatewayFailure | None = None
        self.refused = False
        self.aborted = False
        self.usage: Usage | None = None
        self.bytes_down = 0
        self.ttfb_s: float | None = None
        self.error = ""


def _default_port(url: httpx.URL) -> int:
    return 443 if url.scheme == "https" else 80


def _loggable_path(target: str, *, keep_host: bool = False) -> str:
    """A target without its query (which may carry anything); with its host when asked."""
    t = target.partition("?")[0]
    if not keep_host and "://" in t:
        t = "/" + t.split("://", 1)[1].partition("/")[2]
    return t[:512]


def _response_headers(response: httpx.Response) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw
            if k.decode("latin-1").lower() not in ("connection", "keep-alive", "transfer-encoding",
                                                   "set-cookie")]


def default_client(*, connect_timeout_s: float = 10.0) -> httpx.AsyncClient:
    """An httpx client for the gateway: a connect timeout, no read timeout (a model may think
    for minutes between events; the worker's stall watchdog ends what truly hangs), no
    redirects, no environment proxies or .netrc (``trust_env=False``)."""
    timeout = httpx.Timeout(connect=connect_timeout_s, read=None, write=60.0, pool=60.0)
    return httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False,
                             limits=httpx.Limits(max_connections=64,
                                                 max_keepalive_connections=16))


@asynccontextmanager
async def open_gateway(*, upstream: str, agent: str, secrets: Mapping[str, str], send: SendFn,
                       on_event: EventFn | None = None, rule: AuthRule | None = None,
                       client: httpx.AsyncClient | None = None,
                       chunk_bytes: int = CHUNK_BYTES) -> AsyncIterator[Gateway]:
    """A Gateway for one wrapper session. ``send`` writes a frame to the wrapper (the gateway
    serialises its calls); it must write a whole frame or nothing when cancelled (an aborted
    exchange is cancelled wherever it is), e.g. by putting the frame on a channel. On exit, exchanges still in flight are cancelled. A ``client`` passed
    in is not closed here (share one across workers); otherwise one is made and closed."""
    own = client is None
    http = client or default_client()
    try:
        async with trio.open_nursery() as nursery:
            gw = Gateway(upstream=upstream, agent=agent, secrets=secrets, send=send,
                         client=http, nursery=nursery, on_event=on_event, rule=rule,
                         chunk_bytes=chunk_bytes)
            try:
                yield gw
            finally:
                await gw.aclose()
    finally:
        if own:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5):
                    await http.aclose()


__all__ = ["AGENT_AUTH", "AuthRule", "ExchangeDone", "Gateway", "GatewayEvent", "GatewayFailure",
           "GatewayStatistics", "MAX_REQUEST_BYTES", "PUBLIC_UPSTREAMS", "UpstreamFailed", "Usage",
           "UsageMeter", "auth_rule", "classify_exception", "classify_status", "default_client",
           "default_upstream", "open_gateway"]
