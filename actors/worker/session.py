"""The wrapper session: the container's attached stdio, read as typed frames. READY, heartbeats
(a silent wrapper is ``hung``, unless the engine itself stalls), task frames, ``fatal``; a bad
frame is a protocol error of this worker only."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import structlog
import trio

from runtime.engines import STDOUT, Attachment
from runtime.errors import EngineError, EngineUnavailable, ProtocolError
from runtime.protocol import (
    Fatal,
    Heartbeat,
    LineSplitter,
    Ready,
    TaskDone,
    TaskOutput,
    TaskStarted,
    decode_wrapper_frame,
    encode_frame,
)

if TYPE_CHECKING:
    from .life import _Life

log = structlog.get_logger("corral.worker")


class WrapperSession:
    """The Worker's wrapper-session concern."""

    async def _send(self, life: _Life, frame) -> None:
        """Write one frame to the wrapper's stdin. A failed write means the container is going
        away: its death is noticed (and classified) by the reader at EOF."""
        await self._send_bytes(life, encode_frame(frame))

    async def _send_bytes(self, life: _Life, data: bytes) -> None:
        try:
            await life.att.send(data)
        except EngineError as exc:
            log.debug("stdin_write_failed", error=str(exc))

    async def _attached(self, life: _Life, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Holds the container's attach stream for the life of the container, reading it."""
        async with self.engine.attach(life.container_id) as att:
            life.att = att
            task_status.started()
            await self._reader(life, att)

    async def _reader(self, life: _Life, att: Attachment) -> None:
        splitter = LineSplitter()
        timeout = self.spec.heartbeat_timeout_s
        try:
            while True:
                # once READY, any frame (heartbeats included) must come within heartbeat_timeout_s
                with trio.move_on_at(life.last_frame + timeout if life.ready else math.inf) as cs:
                    try:
                        stream, data = await att.output.receive()
                    except (trio.EndOfChannel, trio.ClosedResourceError):
                        break
                if cs.cancelled_caught:
                    # A frozen engine holds every container's output back: before blaming the
                    # worker, the engine must answer, at once. If it does not, wait on (don't
                    # kill): an engine that was slow to answer may have held frames back too.
                    answered = False
                    t_ping = trio.current_time()
                    with trio.move_on_after(min(5.0, timeout)):
                        try:
                            await self.engine.ping()
                            answered = trio.current_time() - t_ping < 1.0
                        except EngineUnavailable:
                            pass
                        except EngineError:
                            answered = True        # it answered, with an error
                    if not answered:
                        log.warning("engine_unresponsive", timeout_s=timeout,
                                    silent_s=round(trio.current_time() - life.last_frame, 3))
                        life.last_frame = trio.current_time()   # a new heartbeat period from now
                        continue
                    log.error("heartbeat_missed", timeout_s=timeout)
                    life.end("hung", f"no heartbeat for {timeout} s")
                    return
                if stream != STDOUT:
                    life.add_tail(data)
                    continue
                for line in splitter.feed(data):
                    frame = decode_wrapper_frame(line)
                    life.last_frame = trio.current_time()
                    if not isinstance(frame, (Heartbeat, TaskOutput)):
                        life.add_tail(line + b"\n")
                    await self._on_frame(life, frame)
        except ProtocolError as exc:
            log.error("protocol_error", error=str(exc))
            life.end("protocol", str(exc))
            await self._kill(life.container_id)
            return
        life.end("died", "output closed")

    async def _on_frame(self, life: _Life, frame) -> None:
        match frame:
            case Heartbeat():
                pass
            case Ready(worker_id=wid):
                if wid != self.id:
                    raise ProtocolError(f"ready from worker {wid!r}, expected {self.id!r}")
                life.ready = True
                life.ready_at = trio.current_time()
                life.settled.set()
            case TaskDone():
                await self._task_done(frame)
            case TaskStarted(task_id=tid):
                if self.ledger is not None:
                    self.ledger.record(tid, self.id, life.generation)
            case TaskOutput():
                pass
            case Fatal(reason=reason):
                life.fatal_reason = reason
            case _:
                raise ProtocolError(f"unexpected frame {type(frame).__name__}")
