"""Wire frames of the model gateway: HTTP exchanges carried over the wrapper's stdio.

They share ``protocol.Frame`` (one JSON object per line, tagged by ``"kind"``) and its 1 MiB line
limit, and are defined in ``runtime.protocol`` beside the other frames (so that the actor's one
decoder knows them all); this module re-exports them with the helpers of an exchange. Bodies
travel base64-encoded (msgspec encodes ``bytes`` so) in chunks of at most ``CHUNK_BYTES`` raw
bytes, which keeps every frame far below the limit.

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

import msgspec

from .protocol import CHUNK_BYTES as CHUNK_BYTES
from .protocol import MAX_HEADER_BYTES as MAX_HEADER_BYTES
from .protocol import MAX_HEADERS as MAX_HEADERS
from .protocol import ActorGatewayFrame as ActorGatewayFrame
from .protocol import GatewayFrame as GatewayFrame
from .protocol import Header as Header
from .protocol import Headers as Headers
from .protocol import HttpChunk as HttpChunk
from .protocol import HttpEnd as HttpEnd
from .protocol import HttpRequest as HttpRequest
from .protocol import HttpResponse as HttpResponse
from .protocol import ReqId as ReqId
from .protocol import WrapperGatewayFrame as WrapperGatewayFrame

_decode_from_wrapper = msgspec.json.Decoder(WrapperGatewayFrame).decode
_decode_from_actor = msgspec.json.Decoder(ActorGatewayFrame).decode


def decode_from_wrapper(line: bytes) -> WrapperGatewayFrame:
    return _decode_from_wrapper(line)


def decode_from_actor(line: bytes) -> ActorGatewayFrame:
    return _decode_from_actor(line)


def chunks(req_id: int, data: bytes, size: int = CHUNK_BYTES) -> list[HttpChunk]:
    """``data`` as http_chunk frames of at most ``size`` bytes each (none for empty data)."""
    return [HttpChunk(req_id=req_id, data=data[i:i + size]) for i in range(0, len(data), size)]
