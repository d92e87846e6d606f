"""Wire frames between the worker-wrapper (in the container) and its Worker actor.

One JSON object per line over the container's stdin/stdout, tagged by ``"kind"``. Lines longer
than MAX_LINE, undecodable lines and unknown kinds are protocol errors of that worker.
"""

from __future__ import annotations

from typing import Annotated, Union

import msgspec
from msgspec import Meta, Struct, field

from .errors import ProtocolError

MAX_LINE = 1 << 20  # 1 MiB: task_output frames are chunked well below this by the wrapper


class Frame(Struct, frozen=True, kw_only=True, tag_field="kind"):
    pass


# wrapper -> actor
class Ready(Frame, tag="ready"):
    worker_id: str
    agent: str
    agent_version: str = ""
    wrapper_version: str = ""
    pid: int = 0
    resumed: bool = False
    """the answer to ``hello``: a supervisor attached to a wrapper that was already running"""
    running: str | None = None
    """(resumed) the task the wrapper is running now, if any"""
    replay: list[str] = field(default_factory=list)
    """(resumed) the tasks whose unacknowledged ``task_done`` follows (replayed in order, with
    every other unacknowledged frame, right after this one)"""
    acked: int = 0
    """(resumed) every kept frame up to this seq was acknowledged already (by an earlier
    supervisor): the replay starts after it"""


class Heartbeat(Frame, tag="heartbeat"):
    seq: int
    sent: int = 0
    """the seq of the last kept frame the wrapper sent before this heartbeat (frames reach the
    actor in order: a higher number than the actor processed means frames were lost on the way,
    and a ``hello`` has them replayed); 0 from a wrapper older than version 6"""


class TaskStarted(Frame, tag="task_started"):
    task_id: str
    seq: int = 0
    """kept by the wrapper until a ``lease`` acknowledges it (see ``Lease``); 0: not kept"""


class TaskOutput(Frame, tag="task_output"):
    task_id: str
    data: str
    seq: int = 0
    """kept by the wrapper until a ``lease`` acknowledges it (see ``Lease``); 0: not kept"""


class AgentUsage(Struct, frozen=True, kw_only=True):
    """Tokens and cost as the agent itself reported them in its result."""
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None


class TaskDone(Frame, tag="task_done"):
    task_id: str
    status: str
    exit_code: int | None = None
    output: str = ""
    error: str = ""
    duration_s: float = 0.0
    truncated: bool = False
    """the output was longer than the task's max_output_bytes: ``output`` is its tail"""
    failure: str = ""
    """why a task failed while its container stayed healthy (``TaskResult.failure``), as the
    wrapper sees it: its agent's result (``permission_denied``, ``auth_failed``, ...) or the
    reason of a ``cancel_task`` that ended it (``stalled``, an upstream failure); "" if none"""
    usage: AgentUsage | None = None
    seq: int = 0
    """kept by the wrapper until a ``lease`` acknowledges it"""


class Fatal(Frame, tag="fatal"):
    reason: str


# actor -> wrapper
class RunTask(Frame, tag="run_task"):
    task_id: str
    prompt: str
    args: list[str] = field(default_factory=list)
    timeout_s: float | None = None
    max_output_bytes: int | None = None


class CancelTask(Frame, tag="cancel_task"):
    task_id: str
    reason: str = ""
    """"" (the caller gave up, or corral's deadline passed): the task ends "cancelled". A failure
    (``stalled``, ``auth_failed``, ``rate_limited``, ``upstream_error``,
    ``upstream_unreachable``): the wrapper kills the agent (not the container) and answers
    task_done "error" with ``failure`` = reason."""


class Shutdown(Frame, tag="shutdown"):
    grace_s: float = 5.0


class Lease(Frame, tag="lease"):
    """Sent every ``heartbeat_s``: renews the wrapper's lease (any frame from the actor does) and
    acknowledges every kept frame with ``seq <= ack``: the wrapper forgets them. Kept frames
    (task_started, task_output, task_done) are numbered 1, 2, ... over the wrapper's life."""
    ack: int = 0


class Hello(Frame, tag="hello"):
    """A supervisor attached to a running wrapper (adoption, or re-attach after the engine came
    back): the wrapper answers ``ready`` with ``resumed``, ``running`` and ``replay``, then
    sends again, in order, every kept frame not yet acknowledged."""
    worker_id: str


# --- the model gateway's frames: HTTP exchanges carried over the same stdio -------------------
# (see runtime/gateway_frames.py for the exchange's rules; they live here so that one decoder
# per direction knows every frame)

CHUNK_BYTES = 256 * 1024
"""raw body bytes per http_chunk (base64 makes that ~342 KiB of JSON, well under 1 MiB)"""
MAX_HEADERS = 128
MAX_HEADER_BYTES = 16 * 1024

ReqId = Annotated[int, Meta(ge=0, le=2**53)]
Header = tuple[Annotated[str, Meta(min_length=1, max_length=256)],
               Annotated[str, Meta(max_length=MAX_HEADER_BYTES)]]
Headers = Annotated[list[Header], Meta(max_length=MAX_HEADERS)]


class HttpRequest(Frame, tag="http_request"):
    """wrapper -> actor: the start of a request the agent made to the wrapper's endpoint."""
    req_id: ReqId
    method: Annotated[str, Meta(pattern=r"^[A-Z]{1,16}$")]
    target: Annotated[str, Meta(min_length=1, max_length=16 * 1024)]
    """the request target as the agent sent it: origin-form ``/v1/messages?beta=true``, or
    absolute-form ``http://host/path`` when the agent uses the endpoint as a proxy"""
    headers: Headers = field(default_factory=list)


class HttpResponse(Frame, tag="http_response"):
    """actor -> wrapper: the response's status line and headers."""
    req_id: ReqId
    status: Annotated[int, Meta(ge=100, le=599)]
    headers: Headers = field(default_factory=list)


class HttpChunk(Frame, tag="http_chunk"):
    """either way: the next piece of a body (base64 in JSON)."""
    req_id: ReqId
    data: Annotated[bytes, Meta(max_length=CHUNK_BYTES)]


class HttpEnd(Frame, tag="http_end"):
    """either way: the body is complete (``error`` empty) or was cut short (``error`` says why)."""
    req_id: ReqId
    error: Annotated[str, Meta(max_length=1024)] = ""


GatewayFrame = Union[HttpRequest, HttpResponse, HttpChunk, HttpEnd]
WrapperGatewayFrame = Union[HttpRequest, HttpChunk, HttpEnd]
ActorGatewayFrame = Union[HttpResponse, HttpChunk, HttpEnd]

WrapperFrame = Union[Ready, Heartbeat, TaskStarted, TaskOutput, TaskDone, Fatal,
                     HttpRequest, HttpChunk, HttpEnd]
ActorFrame = Union[RunTask, CancelTask, Shutdown, Lease, Hello, HttpResponse, HttpChunk, HttpEnd]

_decode_wrapper = msgspec.json.Decoder(WrapperFrame).decode
_decode_actor = msgspec.json.Decoder(ActorFrame).decode
_encode = msgspec.json.Encoder().encode


def decode_wrapper_frame(line: bytes) -> WrapperFrame:
    if len(line) > MAX_LINE:
        raise ProtocolError(f"frame of {len(line)} bytes exceeds the {MAX_LINE}-byte limit")
    try:
        return _decode_wrapper(line)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        shown = line[:200].decode(errors="replace")
        raise ProtocolError(f"bad frame from wrapper ({exc}): {shown!r}") from None


def decode_actor_frame(line: bytes) -> ActorFrame:
    return _decode_actor(line)


def encode_frame(frame: Frame) -> bytes:
    return _encode(frame) + b"\n"


class LineSplitter:
    """Splits a byte stream into lines; a line longer than MAX_LINE is a ProtocolError."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        if b"\n" not in data:
            if len(self._buf) > self._limit:
                raise ProtocolError(f"line exceeds the {self._limit}-byte limit")
            return []
        *lines, rest = self._buf.split(b"\n")
        self._buf = bytearray(rest)
        for line in lines:
            if len(line) > self._limit:
                raise ProtocolError(f"frame of {len(line)} bytes exceeds the {self._limit}-byte limit")
        if len(self._buf) > self._limit:
            raise ProtocolError(f"line exceeds the {self._limit}-byte limit")
        return [bytes(line) for line in lines if line.strip()]
