"""Wire frames between the worker-wrapper (in the container) and its Worker actor.

One JSON object per line over the container's stdin/stdout, tagged by ``"kind"``. Lines longer
than MAX_LINE, undecodable lines and unknown kinds are protocol errors of that worker.
"""

from __future__ import annotations

from typing import Union

import msgspec
from msgspec import Struct, field

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


class Heartbeat(Frame, tag="heartbeat"):
    seq: int


class TaskStarted(Frame, tag="task_started"):
    task_id: str


class TaskOutput(Frame, tag="task_output"):
    task_id: str
    data: str


class TaskDone(Frame, tag="task_done"):
    task_id: str
    status: str
    exit_code: int | None = None
    output: str = ""
    error: str = ""
    duration_s: float = 0.0
    truncated: bool = False
    """the output was longer than the task's max_output_bytes: ``output`` is its tail"""


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


class Shutdown(Frame, tag="shutdown"):
    grace_s: float = 5.0


WrapperFrame = Union[Ready, Heartbeat, TaskStarted, TaskOutput, TaskDone, Fatal]
ActorFrame = Union[RunTask, CancelTask, Shutdown]

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
