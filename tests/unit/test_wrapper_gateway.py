"""The model gateway's endpoint in the wrapper: the sans-IO core (HTTP requests in, http_* frames
out; the actor's frames in, bytes for the client out), and the process driver's HTTP server on
127.0.0.1 with the test playing the actor.

Every frame the wrapper writes is decoded with the actor's own decoder; every frame the test
sends as the actor is encoded with the actor's own encoder (runtime/gateway_frames.py).
"""

import base64
import http.client
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

from runtime.gateway_frames import (CHUNK_BYTES, HttpChunk, HttpEnd, HttpRequest, HttpResponse,
                                    decode_from_wrapper)
from runtime.protocol import MAX_LINE, decode_wrapper_frame, encode_frame
from runtime.wrapper import core as c

ENV = {"CORRAL_WORKER_ID": "w-1", "CORRAL_AGENT": "shell", "CORRAL_HEARTBEAT_S": "1",
       "CORRAL_WORKSPACE": "/ws", "CORRAL_GATEWAY": "1", "HOME": "/home/worker"}


class Clock:
    t = 100.0

    def __call__(self):
        return self.t


def of(actions, cls):
    return [a for a in actions if isinstance(a, cls)]


def kind(frame):
    """A decoded frame's tag, e.g. "http_request"."""
    return type(frame).__struct_config__.tag


def frames(actions):
    """The frames among ``actions``, each decoded as the actor decodes it."""
    out = []
    for a in actions:
        if isinstance(a, c.Send):
            assert a.data.endswith(b"\n") and len(a.data) < MAX_LINE
            out.append(decode_wrapper_frame(a.data.rstrip(b"\n")))
    return out


def client(actions, rid=None):
    """What the driver is told to do for HTTP clients, as (kind, ...) tuples."""
    out = []
    for a in actions:
        if isinstance(a, c.HttpRespond) and rid in (None, a.req_id):
            out.append(("respond", a.status, dict(a.headers), a.framing))
        elif isinstance(a, c.HttpBody) and rid in (None, a.req_id):
            out.append(("body", a.data))
        elif isinstance(a, c.HttpFinish) and rid in (None, a.req_id):
            out.append(("finish", a.error))
    return out


def local_answer(actions, rid):
    """(status, error message) of a request the core answered by itself."""
    acts = client(actions, rid)
    assert [a[0] for a in acts] == ["respond", "body", "finish"], acts
    (_, status, headers, framing), (_, body), (_, error) = acts
    assert framing == "length" and headers["Content-Length"] == str(len(body)) and error == ""
    assert headers["Content-Type"] == "application/json"
    message = json.loads(body)["error"]["message"]
    assert message.startswith("corral gateway: ")
    return status, message[len("corral gateway: "):]


class G:
    """A core with the gateway on, ready, running a task (the agent started)."""

    def __init__(self, task=True):
        self.core = c.WrapperCore(ENV, clock=Clock())
        self.core.handle(c.Boot())
        self.core.handle(c.WorkspaceChecked(None))
        self.core.handle(c.GatewayStarted(8787))
        self.core.handle(c.AgentPrepared("/home/worker", ()))
        self.core.handle(c.ProbeDone(0, b"sh\n"))
        assert self.core.state == "serving"
        if task:
            self.actor({"kind": "run_task", "task_id": "t", "prompt": "curl ..."})
            self(c.AgentStarted("t", 42))

    def __call__(self, ev):
        return self.core.handle(ev)

    def actor(self, *frames_):
        """Frames from the actor: dicts, or gateway Structs encoded as the actor encodes them."""
        data = b"".join(f if isinstance(f, bytes) else
                        (json.dumps(f).encode() + b"\n" if isinstance(f, dict) else encode_frame(f))
                        for f in frames_)
        return self.core.handle(c.StdinData(data))

    def request(self, rid, method="POST", target="/v1/messages?beta=true", headers=(), body=b"",
                version="HTTP/1.1"):
        acts = self(c.HttpRequestStarted(rid, method, target, tuple(headers), version))
        if body:
            acts += self(c.HttpRequestBody(rid, body))
        return acts + self(c.HttpRequestEnd(rid))

    def end_task(self):
        self(c.AgentExited("t", 0))
        self(c.AgentOutput("t", "stdout", b""))
        acts = self(c.AgentOutput("t", "stderr", b""))
        assert c.Cleanup("t") in acts
        return self(c.CleanupDone("t"))


HEADERS = [("Host", "127.0.0.1:8787"), ("x-api-key", "corral-gateway"),
           ("Content-Type", "application/json"), ("Content-Length", "11"),
           ("X-Repeat", "1"), ("X-Repeat", "2")]


# --- requests -> frames ----------------------------------------------------------------------------

def test_a_request_becomes_http_request_chunks_and_end():
    g = G()
    acts = g.request(1, headers=HEADERS, body=b'{"a": "b"}\n')
    assert frames(acts) == [
        HttpRequest(req_id=1, method="POST", target="/v1/messages?beta=true",
                    headers=[tuple(h) for h in HEADERS]),
        HttpChunk(req_id=1, data=b'{"a": "b"}\n'),
        HttpEnd(req_id=1, error=""),
    ]
    assert client(acts) == []


def test_a_large_body_goes_in_chunks_of_256_kib_and_every_frame_under_1_mib():
    g = G()
    body = os.urandom(CHUNK_BYTES * 2 + 1000)
    acts = g(c.HttpRequestStarted(1, "POST", "/v1/responses", ()))
    for i in range(0, len(body), 700_000):                  # the driver reads in any pieces
        acts += g(c.HttpRequestBody(1, body[i:i + 700_000]))
    acts += g(c.HttpRequestEnd(1))
    got = frames(acts)
    chunks = [f for f in got if isinstance(f, HttpChunk)]
    assert all(len(f.data) <= CHUNK_BYTES for f in chunks)
    assert b"".join(f.data for f in chunks) == body
    assert max(len(a.data) for a in of(acts, c.Send)) < 400_000
    assert isinstance(got[-1], HttpEnd) and got[-1].error == ""


@pytest.mark.parametrize("method,target,headers,status,why", [
    ("post", "/v1", [], 400, "a method of 1 to 16 capital letters is needed"),
    ("X" * 17, "/v1", [], 400, "a method of 1 to 16 capital letters"),
    ("GET", "/" + "a" * c.MAX_TARGET, [], 414, "a request target of 1 to 16384 characters"),
    ("GET", "/v1", [("a", "b")] * 129, 431, "more than 128 header fields"),
    ("GET", "/v1", [("x" * 257, "b")], 431, "a header field over the limits"),
    ("GET", "/v1", [("x", "b" * (16 * 1024 + 1))], 431, "a header field over the limits"),
    ("GET", "/v1", [("x%d" % i, "b" * 16000) for i in range(9)], 431,
     "request target and header fields over 131072 characters"),
])
def test_what_no_frame_can_carry_is_answered_by_the_wrapper(method, target, headers, status, why):
    g = G()
    acts = g.request(1, method, target, headers, body=b"x")
    assert frames(acts) == []
    got_status, message = local_answer(acts, 1)
    assert got_status == status and message.startswith(why), message


def test_no_task_running_503_and_the_next_task_s_requests_go_through():
    g = G(task=False)
    acts = g.request(1)
    assert frames(acts) == [] and local_answer(acts, 1) == (503, "no task is running")
    g.actor({"kind": "run_task", "task_id": "t", "prompt": "x"})
    g(c.AgentStarted("t", 42))
    assert [type(f) for f in frames(g.request(2))] == [HttpRequest, HttpEnd]


def test_a_body_over_32_mib_is_413_and_the_actor_is_told():
    g = G()
    acts = g(c.HttpRequestStarted(1, "POST", "/v1/messages", ()))
    for _ in range(32):
        acts += g(c.HttpRequestBody(1, b"x" * (1 << 20)))
    assert client(acts) == []
    acts = g(c.HttpRequestBody(1, b"x"))
    assert frames(acts) == [HttpEnd(req_id=1, error="request body over 33554432 bytes")]
    assert local_answer(acts, 1) == (413, "request body over 33554432 bytes")
    assert g(c.HttpRequestEnd(1)) == []          # the rest of it goes nowhere


def test_more_than_64_requests_at_once_are_answered_503():
    g = G()
    for rid in range(1, 65):
        assert frames(g(c.HttpRequestStarted(rid, "GET", "/v1/models", ())))
    acts = g(c.HttpRequestStarted(65, "GET", "/v1/models", ()))
    assert local_answer(acts, 65) == (503, "more than 64 requests at once")


# --- the actor's frames -> the client ---------------------------------------------------------------

SSE = [b"event: message_start\ndata: {}\n\n", b"event: content_block_delta\ndata: {}\n\n",
       b"event: message_stop\ndata: {}\n\n"]


def test_the_response_streams_to_the_client_as_its_frames_come():
    g = G()
    g.request(7, body=b"{}")
    acts = g.actor(HttpResponse(req_id=7, status=200, headers=[
        ("content-type", "text/event-stream"), ("Content-Length", "99"), ("connection", "keep-alive"),
        ("Transfer-Encoding", "chunked"), ("x-request-id", "r1")]))
    assert client(acts) == [("respond", 200, {"content-type": "text/event-stream", "x-request-id": "r1",
                                              "Transfer-Encoding": "chunked"}, "chunked")]
    for event in SSE:                          # each event reaches the client when it comes
        assert client(g.actor(HttpChunk(req_id=7, data=event))) == [("body", event)]
    assert client(g.actor(HttpEnd(req_id=7))) == [("finish", "")]
    assert g.actor(HttpChunk(req_id=7, data=b"late")) == []      # over: late frames are dropped


def test_a_response_cut_short_upstream_aborts_the_client_s_connection():
    g = G()
    g.request(1)
    g.actor(HttpResponse(req_id=1, status=200, headers=[("content-type", "text/event-stream")]),
            HttpChunk(req_id=1, data=SSE[0]))
    acts = g.actor(HttpEnd(req_id=1, error="upstream: RemoteProtocolError: peer closed connection"))
    assert client(acts) == [("finish", "upstream: RemoteProtocolError: peer closed connection")]
    assert frames(acts) == []


def test_a_refusal_of_the_gateway_reaches_the_client_as_it_is():
    g = G()
    g.request(1, target="http://evil.example/x")
    body = b'{"type":"error","error":{"message":"corral gateway: host evil.example is not the configured upstream"}}'
    acts = g.actor(HttpResponse(req_id=1, status=403, headers=[("content-type", "application/json"),
                                                              ("content-length", str(len(body)))]),
                   HttpChunk(req_id=1, data=body), HttpEnd(req_id=1))
    assert client(acts) == [("respond", 403, {"content-type": "application/json",
                                              "Transfer-Encoding": "chunked"}, "chunked"),
                            ("body", body), ("finish", "")]


def test_head_and_no_content_have_no_body_and_http_1_0_ends_with_the_connection():
    g = G()
    g.request(1, "HEAD", "/api/hello")
    acts = g.actor(HttpResponse(req_id=1, status=200, headers=[("content-length", "20")]))
    assert client(acts) == [("respond", 200, {"content-length": "20"}, "none")]
    g.request(2, "DELETE", "/v1/files/x")
    assert client(g.actor(HttpResponse(req_id=2, status=204))) == [("respond", 204, {}, "none")]
    g.request(3, version="HTTP/1.0")
    acts = g.actor(HttpResponse(req_id=3, status=200, headers=[("content-length", "2")]))
    assert client(acts) == [("respond", 200, {"Connection": "close"}, "close")]


@pytest.mark.parametrize("frames_,why", [
    ([{"kind": "http_response", "req_id": 1, "status": 200, "headers": [["x", "a\r\nSet-Cookie: y"]]}],
     "http_response with unusable headers"),
    ([{"kind": "http_response", "req_id": 1, "status": 200, "headers": [["x", "\u20ac"]]}],
     "http_response with unusable headers"),
    ([{"kind": "http_response", "req_id": 1, "status": 101}], "http_response with a bad status 101"),
    ([{"kind": "http_response", "req_id": 1, "status": "200"}], 'http_response with a bad status "200"'),
    ([{"kind": "http_chunk", "req_id": 1, "data": "aGk="}], "http_chunk before http_response"),
    ([{"kind": "http_response", "req_id": 1, "status": 200}, {"kind": "http_chunk", "req_id": 1, "data": "@@"}],
     "http_chunk whose data is not base64"),
    ([{"kind": "http_response", "req_id": 1, "status": 200}, {"kind": "http_response", "req_id": 1, "status": 200}],
     "a second http_response"),
])
def test_bad_frames_from_the_actor_end_the_exchange_on_both_sides(frames_, why):
    g = G()
    g.request(1)
    acts = g.actor(*frames_)
    assert frames(acts) == [HttpEnd(req_id=1, error=why)]
    if client(acts)[0][0] == "respond" and client(acts)[0][1] != 502:
        assert client(acts)[-1] == ("finish", why)          # already streaming: aborted
    else:
        assert local_answer(acts, 1) == (502, why)
    assert g.actor({"kind": "http_end", "req_id": 1}) == []


@pytest.mark.parametrize("frame", [
    {"kind": "http_response", "req_id": 99, "status": 200},    # unknown (or over)
    {"kind": "http_chunk", "req_id": 99, "data": "aGk="},
    {"kind": "http_end", "req_id": 99, "error": "x"},
])
def test_frames_of_an_exchange_that_is_over_are_dropped(frame):
    g = G()
    assert g.actor(frame) == []


@pytest.mark.parametrize("frame", [
    {"kind": "http_chunk", "req_id": "1", "data": "aGk="}, {"kind": "http_end", "req_id": True},
    {"kind": "http_response", "status": 200},
])
def test_frames_without_a_usable_req_id_are_logged_and_ignored(frame):
    g = G()
    g.request(1)
    acts = g.actor(frame)
    assert frames(acts) == [] and client(acts) == [] and of(acts, c.Log)


def test_the_actor_ending_a_request_unanswered_is_a_502_for_the_client():
    g = G()
    g.request(1)
    acts = g.actor(HttpEnd(req_id=1, error="gateway shutting down"))
    assert frames(acts) == [] and local_answer(acts, 1) == (502, "gateway shutting down")


# --- errors from the client's side, task end, actor gone ------------------------------------------

def test_a_client_that_goes_away_is_an_http_end_with_an_error_for_the_actor():
    g = G()
    g.request(1)
    g.actor(HttpResponse(req_id=1, status=200), HttpChunk(req_id=1, data=b"a"))
    acts = g(c.HttpClientGone(1, "[Errno 32] Broken pipe"))
    assert frames(acts) == [HttpEnd(req_id=1, error="the agent went away: [Errno 32] Broken pipe")]
    assert client(acts) == []
    assert g.actor(HttpChunk(req_id=1, data=b"b"), HttpEnd(req_id=1)) == []
    # while still sending its request
    g(c.HttpRequestStarted(2, "POST", "/v1/messages", ()))
    acts = g(c.HttpClientGone(2, "the request body ended early"))
    assert frames(acts) == [HttpEnd(req_id=2, error="the agent went away: the request body ended early")]
    assert g(c.HttpClientGone(2, "again")) == []


def test_requests_in_flight_when_the_task_ends_are_ended_on_both_sides_before_task_done():
    g = G()
    g.request(1)                                             # waiting for its response
    g.request(2)
    g.actor(HttpResponse(req_id=2, status=200), HttpChunk(req_id=2, data=b"a"))    # streaming
    g(c.HttpRequestStarted(3, "POST", "/v1/messages", ()))   # still sending its body
    acts = g.end_task()
    got = frames(acts)
    assert [type(f).__name__ for f in got] == ["HttpEnd", "HttpEnd", "HttpEnd", "TaskDone"]
    assert {f.req_id: f.error for f in got[:3]} == {1: "the task ended", 2: "the task ended",
                                                  3: "the task ended"}
    assert local_answer(acts, 1) == (503, "the task ended")
    assert client(acts, 2) == [("finish", "the task ended")]
    assert local_answer(acts, 3) == (503, "the task ended")
    assert g.actor(HttpChunk(req_id=2, data=b"b")) == []
    assert local_answer(g.request(4), 4) == (503, "no task is running")


def test_when_the_actor_goes_away_every_client_is_cut_off():
    g = G()
    g.request(1)
    g.request(2)
    g.actor(HttpResponse(req_id=2, status=200))
    acts = g(c.StdinClosed())
    assert [f for f in frames(acts) if not hasattr(f, "task_id")] == []   # nobody to tell
    assert local_answer(acts, 1) == (503, "the supervisor went away")
    assert client(acts, 2) == [("finish", "the supervisor went away")]
    assert local_answer(g.request(3), 3) == (503, "the supervisor went away")


def test_concurrent_requests_are_independent():
    g = G()
    acts = g.request(1, body=b"one") + g.request(2, body=b"two")
    assert [(type(f).__name__, f.req_id) for f in frames(acts)] == [
        ("HttpRequest", 1), ("HttpChunk", 1), ("HttpEnd", 1),
        ("HttpRequest", 2), ("HttpChunk", 2), ("HttpEnd", 2)]
    acts = g.actor(HttpResponse(req_id=2, status=200), HttpResponse(req_id=1, status=429),
                   HttpChunk(req_id=1, data=b"slow down"), HttpChunk(req_id=2, data=b"two-a"),
                   HttpEnd(req_id=2, error="upstream: cut"), HttpChunk(req_id=1, data=b"!"),
                   HttpEnd(req_id=1))
    assert client(acts, 1) == [("respond", 429, {"Transfer-Encoding": "chunked"}, "chunked"),
                               ("body", b"slow down"), ("body", b"!"), ("finish", "")]
    assert client(acts, 2) == [("respond", 200, {"Transfer-Encoding": "chunked"}, "chunked"),
                               ("body", b"two-a"), ("finish", "upstream: cut")]


def test_no_gateway_no_endpoint():
    core = c.WrapperCore({**ENV, "CORRAL_GATEWAY": "0"}, clock=Clock())
    core.handle(c.Boot())
    acts = core.handle(c.WorkspaceChecked(None))
    assert [type(a) for a in acts] == [c.RunProbe] and acts[0].env is None
    core.handle(c.ProbeDone(0, b"sh\n"))
    assert local_answer(core.handle(c.HttpRequestStarted(1, "GET", "/", ())), 1) == \
        (503, "the endpoint is not serving")


# --- the process: the real wrapper's HTTP server, the test playing the actor -----------------------

ROOT = Path(__file__).resolve().parents[2]
WRAPPER = ROOT / "runtime" / "wrapper" / "wrapper.py"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Actor:
    """A wrapper process with the gateway on; the test answers its http_* frames."""

    def __init__(self, tmp: Path, port: int):
        ws = tmp / "ws"
        ws.mkdir()
        env = {**os.environ, **ENV, "CORRAL_WORKSPACE": str(ws), "CORRAL_GATEWAY_PORT": str(port),
               "CORRAL_HEARTBEAT_S": "30", "HOME": str(tmp / "home"), "TMPDIR": str(tmp)}
        self.port = port
        self.proc = subprocess.Popen([sys.executable, str(WRAPPER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.frames: "queue.Queue" = queue.Queue()
        self.pending: list = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain, daemon=True).start()
        ready = self.next(lambda f: f.get("kind") in ("ready", "fatal"))
        assert ready["kind"] == "ready", ready

    def _read(self):
        for line in self.proc.stdout:
            assert len(line) < MAX_LINE
            decode_wrapper_frame(line.rstrip(b"\n"))        # every line is a frame the actor takes
            self.frames.put(json.loads(line))
        self.frames.put(None)

    def _drain(self):
        for _ in self.proc.stderr:
            pass

    def send(self, frame):
        data = frame if isinstance(frame, bytes) else (
            json.dumps(frame).encode() + b"\n" if isinstance(frame, dict) else encode_frame(frame))
        with self.lock:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    def next(self, pred=lambda f: True, timeout=10):
        """The first frame (but heartbeats) that ``pred`` takes; the others stay for later."""
        for i, f in enumerate(self.pending):
            if pred(f):
                return self.pending.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            f = self.frames.get(timeout=max(0.01, deadline - time.monotonic()))
            assert f is not None, "the wrapper exited"
            if f.get("kind") == "heartbeat":
                continue
            if pred(f):
                return f
            self.pending.append(f)

    def request_frames(self):
        """The next whole request as frames: (HttpRequest, body)."""
        first = decode_from_wrapper(json.dumps(self.next(lambda f: f["kind"] == "http_request")).encode())
        body = b""
        while True:
            f = decode_from_wrapper(json.dumps(self.next(lambda f: f.get("req_id") == first.req_id)).encode())
            if isinstance(f, HttpEnd):
                assert f.error == ""
                return first, body
            body += f.data

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def actor(tmp_path):
    a = Actor(tmp_path, free_port())
    a.send({"kind": "run_task", "task_id": "t", "prompt": "sleep 30"})
    assert a.next()["kind"] == "task_started"
    yield a
    a.close()


def test_process_a_streamed_response_reaches_the_client_event_by_event(actor):
    conn = http.client.HTTPConnection("127.0.0.1", actor.port, timeout=10)
    body = json.dumps({"stream": True}).encode()
    conn.request("POST", "/v1/messages?beta=true", body=body,
                 headers={"x-api-key": "corral-gateway", "content-type": "application/json"})
    req, got = actor.request_frames()
    assert (req.method, req.target, got) == ("POST", "/v1/messages?beta=true", body)
    assert ("x-api-key", "corral-gateway") in req.headers
    actor.send(HttpResponse(req_id=req.req_id, status=200, headers=[
        ("content-type", "text/event-stream"), ("content-length", "999")]))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type") == "text/event-stream"
    assert resp.getheader("transfer-encoding") == "chunked" and resp.getheader("content-length") is None
    for event in SSE:       # the client reads each event before the next one is even sent
        actor.send(HttpChunk(req_id=req.req_id, data=event))
        got = b""
        while len(got) < len(event):
            got += resp.read1(len(event) - len(got))
        assert got == event
    actor.send(HttpEnd(req_id=req.req_id))
    assert resp.read() == b""
    # keep-alive: the same connection serves the next request
    conn.request("GET", "/v1/models")
    req2, _ = actor.request_frames()
    assert req2.req_id != req.req_id
    actor.send(HttpResponse(req_id=req2.req_id, status=200))
    actor.send(HttpChunk(req_id=req2.req_id, data=b"{}"))
    actor.send(HttpEnd(req_id=req2.req_id))
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, b"{}")
    conn.close()


def test_process_sse_flows_chunk_by_chunk(actor):
    """Each chunk is readable by the client while the response is still open."""
    sock = socket.create_connection(("127.0.0.1", actor.port), timeout=10)
    sock.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    req, body = actor.request_frames()
    assert body == b"{}"
    actor.send(HttpResponse(req_id=req.req_id, status=200, headers=[("content-type", "text/event-stream")]))
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, buf = buf.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
    for event in SSE:
        actor.send(HttpChunk(req_id=req.req_id, data=event))
        want = b"%x\r\n" % len(event) + event + b"\r\n"
        while len(buf) < len(want):
            buf += sock.recv(65536)
        assert buf[:len(want)] == want
        buf = buf[len(want):]
    actor.send(HttpEnd(req_id=req.req_id))
    while len(buf) < 5:
        buf += sock.recv(65536)
    assert buf == b"0\r\n\r\n"
    sock.close()


def test_process_a_chunked_request_body_and_a_large_response(actor):
    conn = http.client.HTTPConnection("127.0.0.1", actor.port, timeout=10)
    body = os.urandom(600_000)
    conn.request("POST", "/v1/chat/completions",
                 body=iter([body[:100_000], body[100_000:]]), encode_chunked=True)
    req, got = actor.request_frames()
    assert got == body
    big = os.urandom(3 * CHUNK_BYTES + 5)
    actor.send(HttpResponse(req_id=req.req_id, status=200))
    for i in range(0, len(big), CHUNK_BYTES):
        actor.send(HttpChunk(req_id=req.req_id, data=big[i:i + CHUNK_BYTES]))
    actor.send(HttpEnd(req_id=req.req_id))
    resp = conn.getresponse()
    assert resp.read() == big
    conn.close()


def test_process_an_aborted_response_is_an_error_for_the_client(actor):
    conn = http.client.HTTPConnection("127.0.0.1", actor.port, timeout=10)
    conn.request("POST", "/v1/messages", body=b"{}")
    req, _ = actor.request_frames()
    actor.send(HttpResponse(req_id=req.req_id, status=200))
    actor.send(HttpChunk(req_id=req.req_id, data=SSE[0]))
    actor.send(HttpEnd(req_id=req.req_id, error="upstream: cut"))
    resp = conn.getresponse()
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        resp.read()
    conn.close()


def test_process_the_agent_hanging_up_tells_the_actor(actor):
    sock = socket.create_connection(("127.0.0.1", actor.port), timeout=10)
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    req, _ = actor.request_frames()
    actor.send(HttpResponse(req_id=req.req_id, status=200))
    actor.send(HttpChunk(req_id=req.req_id, data=b"x" * 10))
    sock.close()
    for _ in range(200):       # the next write finds the connection gone
        actor.send(HttpChunk(req_id=req.req_id, data=b"y" * 65536))
        try:
            end = actor.next(lambda f: f["kind"] == "http_end", timeout=0.05)
            break
        except queue.Empty:
            continue
    else:
        pytest.fail("the wrapper never said the agent went away")
    assert end["req_id"] == req.req_id and end["error"].startswith("the agent went away")
    # a request cut short while it is sent
    sock = socket.create_connection(("127.0.0.1", actor.port), timeout=10)
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}")
    first = actor.next(lambda f: f["kind"] == "http_request")
    sock.close()
    end = actor.next(lambda f: f["kind"] == "http_end" and f["req_id"] == first["req_id"])
    assert end["error"] == "the agent went away: the request body ended early"


def test_process_concurrent_requests_and_the_task_s_end(actor):
    conns = [http.client.HTTPConnection("127.0.0.1", actor.port, timeout=10) for _ in range(5)]
    for i, conn in enumerate(conns):
        conn.request("POST", f"/v1/messages?n={i}", body=b"{}")
    reqs = {}
    for _ in conns:
        req, _ = actor.request_frames()
        reqs[int(req.target.rsplit("=", 1)[1])] = req.req_id
    assert len(set(reqs.values())) == 5
    for i in (4, 2, 0):                     # answered out of order
        rid = reqs[i]
        actor.send(HttpResponse(req_id=rid, status=200))
        actor.send(HttpChunk(req_id=rid, data=b"answer %d" % i))
        actor.send(HttpEnd(req_id=rid))
    for i in (0, 2, 4):
        assert conns[i].getresponse().read() == b"answer %d" % i
    # the task ends with 1 and 3 in flight: both sides hear of it
    actor.send({"kind": "cancel_task", "task_id": "t"})
    ends = [actor.next(lambda f: f["kind"] == "http_end") for _ in range(2)]
    assert sorted(e["req_id"] for e in ends) == sorted([reqs[1], reqs[3]])
    assert all(e["error"] == "the task ended" for e in ends)
    assert actor.next(lambda f: f["kind"] == "task_done")["status"] == "cancelled"
    for i in (1, 3):
        resp = conns[i].getresponse()
        assert resp.status == 503 and b"the task ended" in resp.read()
    for conn in conns:
        conn.close()


def test_process_no_task_is_503_and_the_port_is_loopback_only(tmp_path):
    a = Actor(tmp_path, free_port())
    try:
        conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=10)
        conn.request("GET", "/v1/models")
        resp = conn.getresponse()
        assert resp.status == 503 and json.loads(resp.read())["error"]["message"] == \
            "corral gateway: no task is running"
        # listening on the loopback address only: /proc/net/tcp's local addresses in state LISTEN
        local = []
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            addr, port = fields[1].split(":")
            if int(port, 16) == a.port and fields[3] == "0A":
                local.append(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
        assert local == ["127.0.0.1"]
    finally:
        a.close()


def test_process_a_port_in_use_is_fatal_78(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        ws = tmp_path / "ws"
        ws.mkdir()
        env = {**os.environ, **ENV, "CORRAL_WORKSPACE": str(ws), "CORRAL_GATEWAY_PORT": str(port)}
        p = subprocess.run([sys.executable, str(WRAPPER)], input=b"", capture_output=True, env=env,
                           timeout=30)
    assert p.returncode == 78
    fatal = json.loads(p.stdout.splitlines()[-1])
    assert fatal == {"kind": "fatal", "reason": f"cannot serve the model gateway on 127.0.0.1:{port}: "
                                                "Address already in use"}


def test_process_a_read_only_home_gets_a_private_writable_one(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o500)
    ws = tmp_path / "ws"
    ws.mkdir()
    env = {**os.environ, **ENV, "CORRAL_WORKSPACE": str(ws), "CORRAL_GATEWAY_PORT": "0",
           "HOME": str(home), "TMPDIR": str(tmp_path)}
    p = subprocess.Popen([sys.executable, str(WRAPPER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    try:
        assert json.loads(p.stdout.readline())["kind"] == "ready"
        p.stdin.write(b'{"kind":"run_task","task_id":"t","prompt":"echo $HOME; touch $HOME/x"}\n')
        p.stdin.flush()
        done = None
        while done is None:
            f = json.loads(p.stdout.readline())
            done = f if f["kind"] == "task_done" else None
    finally:
        p.kill()
        p.wait()
        home.chmod(0o700)
    if os.geteuid() == 0:       # root writes anywhere: its own HOME is kept
        assert done["output"].strip() == str(home)
    else:
        assert done["status"] == "ok" and done["output"].startswith(str(tmp_path / "corral-home-"))


# --- shutdown: the running task's exchanges go on during the grace --------------------------------

def test_during_the_shutdown_grace_the_running_task_s_responses_still_come():
    g = G()
    g.request(1)
    acts = g.actor({"kind": "shutdown", "grace_s": 5},
                   {"kind": "run_task", "task_id": "late", "prompt": "x"},       # not read
                   HttpResponse(req_id=1, status=200), HttpChunk(req_id=1, data=b"a"), HttpEnd(req_id=1))
    assert c.StartTimer("grace", 5.0) in acts and frames(acts) == []
    assert client(acts, 1) == [("respond", 200, {"Transfer-Encoding": "chunked"}, "chunked"),
                               ("body", b"a"), ("finish", "")]
    assert [type(f) for f in frames(g.request(2))] == [HttpRequest, HttpEnd]     # the agent goes on
    acts = g.actor({"kind": "cancel_task", "task_id": "t", "reason": "stalled"})
    assert of(acts, c.KillAgent) == [c.KillAgent("t")]
    acts = g(c.StdinClosed())           # the actor is gone: its client is cut off, nothing more read
    assert local_answer(acts, 2) == (503, "the supervisor went away") and not g.core.wants_stdin
    acts = g.end_task()
    assert [(type(f).__name__, f.status, f.failure) for f in frames(acts)] == [("TaskDone", "error", "stalled")]
    assert acts[-1] == c.Exit(0)


# --- FakeEngine's driver: the same core, HTTP in process ------------------------------------------

async def test_fake_wrapper_carries_http_through_the_real_core(autojump_clock, nursery):
    from runtime.engines.fake_wrapper import FakeControls, run_fake_wrapper

    stdin_send, stdin_recv = trio.open_memory_channel(100)
    out: list = []
    wrote = trio.Event()
    box = {"wrote": wrote}

    def write(stream, data):
        if stream == 1:
            out.append(decode_wrapper_frame(data.rstrip(b"\n")))
            box["wrote"].set()
            box["wrote"] = trio.Event()

    async def next_frame(pred):
        while True:
            for f in out:
                if pred(f):
                    out.remove(f)
                    return f
            await box["wrote"].wait()

    controls = FakeControls()
    env = {"CORRAL_WORKER_ID": "w-1", "CORRAL_AGENT": "claude", "CORRAL_HEARTBEAT_S": "30",
           "CORRAL_GATEWAY": "1", "CORRAL_MODEL": "m"}
    nursery.start_soon(lambda: run_fake_wrapper(env=env, stdin=stdin_recv, write=write,
                                                controls=controls))
    await next_frame(lambda f: kind(f) == "ready")
    no_task = await controls.http("GET", "/v1/models")
    assert no_task.status == 503 and b"no task is running" in no_task.body

    await stdin_send.send(b'{"kind":"run_task","task_id":"t","prompt":"!sleep 10"}\n')
    await next_frame(lambda f: kind(f) == "task_started")

    async def actor():
        req = await next_frame(lambda f: kind(f) == "http_request")
        body = await next_frame(lambda f: kind(f) == "http_chunk")
        await next_frame(lambda f: kind(f) == "http_end")
        assert (req.method, req.target, body.data) == ("POST", "/v1/messages", b'{"stream":true}')
        for frame in (HttpResponse(req_id=req.req_id, status=200, headers=[("content-type", "text/event-stream")]),
                      HttpChunk(req_id=req.req_id, data=SSE[0]), HttpChunk(req_id=req.req_id, data=SSE[1]),
                      HttpEnd(req_id=req.req_id)):
            await trio.sleep(0.5)
            await stdin_send.send(encode_frame(frame))

    nursery.start_soon(actor)
    t0 = trio.current_time()
    resp = await controls.http("POST", "/v1/messages", [("x-api-key", "corral-gateway")], b'{"stream":true}')
    assert (resp.status, resp.body, resp.error) == (200, SSE[0] + SSE[1], "")
    assert trio.current_time() - t0 == 2.0
    assert ("content-type", "text/event-stream") in resp.headers
    # a request in flight when the task ends: cut short for the client, ended for the actor
    pending: list = []
    answered = trio.Event()

    async def agent():
        pending.append(await controls.http("POST", "/v1/messages", [], b"{}"))
        answered.set()

    nursery.start_soon(agent)
    req = await next_frame(lambda f: kind(f) == "http_request")
    await stdin_send.send(encode_frame(HttpResponse(req_id=req.req_id, status=200)))
    done = await next_frame(lambda f: kind(f) == "task_done")
    end = await next_frame(lambda f: kind(f) == "http_end" and f.req_id == req.req_id and f.error)
    assert done.status == "ok" and end.error == "the task ended"
    await answered.wait()
    assert pending[0].status == 200 and pending[0].error == "the task ended"
    await stdin_send.aclose()
