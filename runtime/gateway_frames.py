"""Wire frames of the model gateway: HTTP exchanges carried over the wrapper's stdio.

They share ``protocol.Frame`` (one JSON object per line, tagged by ``"kind"``) and its 1 MiB line
limit. Bodies travel base64-encoded (msgspec encodes ``bytes`` so) in chunks of at most
``CHUNK_BYTES`` raw bytes, which keeps every frame far below the limit.

One exchange, ``req_id`` chosen by the wrapper (unique within its container's life):

    wrapper -> actor   http_request {req_id, method, target, headers}
                       http_chunk {req_id, data} *          the request body
                       http_end {req_id}                    the request is complete
    actor -> wrapper   http_response {req_id, status, headers}
                       http_chunk {req_id, data} *          the response body, as it arrives
                       http_end {req_id, error=""}          the response is complete

- ``http_end`` with a non-empty ``error`` ends an exchange abnormally: from the actor, the
  response body is cut short (the wrapper must then abort the agent's connection, not end the
  body cleanly); from the wrapper, after its request's end, the agent went away (the actor stops
  forwarding, and sends nothing more for that ``req_id``).
- The actor always answers a complete request with exactly one ``http_response`` and one final
  ``http_end``, unless the wrapper aborted it first. Refusals and gateway errors are ordinary
  responses (403, 413, 502, 504) with a JSON error body.
- The wrapper is standard-library only: ``data`` is plain base64 (``base64.b64encode``), headers
  are ``[name, value]`` pairs of strings (latin-1 as HTTP/1.1 carries them), in order, repeats kept.
"""

from __future__ import annotations

from typing import Annotated, Union

import msgspec
from msgspec import Meta, field

from .protocol import Frame

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
"""what a wrapper sends; the actor's decoder should accept these beside its other frames"""
ActorGatewayFrame = Union[HttpResponse, HttpChunk, HttpEnd]

_decode_from_wrapper = msgspec.json.Decoder(WrapperGatewayFrame).decode
_decode_from_actor = msgspec.json.Decoder(ActorGatewayFrame).decode


def decode_from_wrapper(line: bytes) -> WrapperGatewayFrame:
    return _decode_from_wrapper(line)


def decode_from_actor(line: bytes) -> ActorGatewayFrame:
    return _decode_from_actor(line)


def chunks(req_id: int, data: bytes, size: int = CHUNK_BYTES) -> list[HttpChunk]:
    """``data`` as http_chunk frames of at most ``size`` bytes each (none for empty data)."""
    return [HttpChunk(req_id=req_id, data=data[i:i + size]) for i in range(0, len(data), size)]
