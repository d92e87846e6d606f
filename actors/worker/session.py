"""The wrapper session: the container's attached stdio, read as typed frames. READY, heartbeats
(a silent wrapper is ``hung``, unless the engine itself stalls), task frames, ``fatal``; a bad
frame is a protocol error of this worker only.

A real agent's frames to the wrapper go through one writer task per container
(``_Life.outbox``): every frame is written whole and in order, whoever sends it (tasks, cancels,
shutdown, the model gateway's streamed responses). Other workers send their few frames (run,
cancel, shutdown) straight to the attachment, which serializes writes: no task per worker. A real agent's container has a model gateway (``runtime.gateway``) for its life:
the wrapper's ``http_*`` frames are fed to it, and what it sees comes back here: upstream
failures end the running task at once, token usage is counted."""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING

import msgspec
import structlog
import trio

from runtime import events
from runtime import gateway as gateway_mod
from runtime.engines import STDOUT, Attachment
from runtime.errors import EngineError, EngineUnavailable, ProtocolError
from runtime.gateway import ExchangeDone, UpstreamFailed
from runtime.protocol import (
    Fatal,
    Heartbeat,
    Hello,
    Lease,
    HttpChunk,
    HttpEnd,
    HttpRequest,
    HttpResponse,
    LineSplitter,
    Ready,
    TaskDone,
    TaskOutput,
    TaskStarted,
    decode_wrapper_frame,
    encode_frame,
)
from runtime.util import unwrap_single

from .life import OUTBOX

if TYPE_CHECKING:
    from .life import _Life

log = structlog.get_logger("corral.worker")

WRITE_BATCH = 1 << 20
"""frames already queued are joined into one stdin write up to this many bytes"""


class WrapperSession:
    """The Worker's wrapper-session concern."""

    async def _send(self, life: _Life, frame) -> None:
        """Write one frame to the wrapper's stdin. A failed write means the container is going
        away: its death is noticed (and classified) by the reader at EOF."""
        await self._send_bytes(life, encode_frame(frame))

    async def _send_bytes(self, life: _Life, data: bytes) -> None:
        """Queue whole frame(s) for the container's stdin (the writer writes them in order), or
        write them straight when the container has no writer (no model gateway)."""
        if life.outbox is None:
            if life.att is not None:
                try:
                    await life.att.send(data)
                except EngineError as exc:
                    log.debug("stdin_write_failed", error=str(exc))
            return
        try:
            await life.outbox.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass        # the container's session is over

    async def _writer(self, life: _Life, frames: trio.MemoryReceiveChannel) -> None:
        """Writes the queued frames in order to the container's current attachment; what is
        queued at once goes in one write (a streamed response's many small chunks cost one
        engine round trip, not one each). Frames queued while it has none (the engine is away)
        are dropped: the wrapper's lease and replay make up for them."""
        async with frames:
            async for data in frames:
                batch = [data]
                size = len(data)
                while size < WRITE_BATCH:
                    try:
                        more = frames.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    batch.append(more)
                    size += len(more)
                att = life.att
                if att is None:
                    continue
                try:
                    await att.send(b"".join(batch) if len(batch) > 1 else data)
                except EngineError as exc:
                    log.debug("stdin_write_failed", error=str(exc))

    async def _attached(self, life: _Life, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Holds the container's attach stream for the life of the container, reading it; with
        its stdin writer, its lease and, for a real agent, its model gateway. When the stream
        ends while the container still runs (the engine went away and came back, with
        live-restore), it attaches again and says ``hello``: the wrapper replays what it sent
        meanwhile."""
        setup = self._gateway_setup if self.spec.uses_gateway else None
        try:
            async with trio.open_nursery() as nursery:
                if setup is not None:
                    send, recv = trio.open_memory_channel[bytes](OUTBOX)
                    life.outbox = send
                    nursery.start_soon(self._writer, life, recv)
                    failures_in, failures = trio.open_memory_channel[UpstreamFailed](math.inf)
                    nursery.start_soon(self._upstream_failures, life, failures)
                    async with gateway_mod.open_gateway(
                            upstream=setup.upstream, agent=self.spec.agent, secrets=setup.secrets,
                            rule=setup.rule, send=partial(self._gateway_send, life),
                            on_event=partial(self._gateway_event, life, failures_in),
                            client=self._http_client()) as gw:
                        life.gateway = gw
                        await self._attach_loop(life, nursery, task_status)
                    failures_in.close()
                else:
                    await self._attach_loop(life, nursery, task_status)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            leaf = unwrap_single(group)
            if isinstance(leaf, EngineError):
                # the first attach failed (the engine went away just then): as itself, for the
                # caller's `except EngineError`, which certifies the container's death
                raise leaf from None
            raise

    async def _attach_loop(self, life: _Life, nursery: trio.Nursery, task_status) -> None:
        watch = self.watcher.watch(life.container_id) if self.watcher is not None else None
        first = True
        while True:
            try:
                async with self.engine.attach(life.container_id) as att:
                    life.att = att
                    if first:
                        first = False
                        nursery.start_soon(self._lease, life)
                        task_status.started()
                    else:
                        life.last_frame = trio.current_time()
                        await self._hello(life)
                    try:
                        await self._reader(life, att)
                    finally:
                        life.att = None
            except EngineError as exc:
                if first:
                    if isinstance(exc, EngineUnavailable) and await self._wait_for_engine():
                        # the engine went away between the create and the first attach (a
                        # dockerd shutting down still answers on the connections it has):
                        # not this container's death; attach once it is back
                        continue
                    raise
                log.warning("reattach_failed", error=str(exc))
            if not await self._after_eof(life, watch):
                return

    async def _hello(self, life: _Life) -> None:
        """Ask the wrapper to resume: it answers ``ready`` (resumed) and replays every kept frame
        not yet acknowledged."""
        life.hello_at = trio.current_time()
        life.hellos += 1
        if life.first_unanswered is None:
            life.first_unanswered = life.hellos
        await self._send(life, Hello(worker_id=self.id))

    async def _lease(self, life: _Life) -> None:
        """Renews the wrapper's lease every heartbeat_s and acknowledges the kept frames
        processed so far (the wrapper forgets them)."""
        while not life.ended.is_set():
            await trio.sleep(self.spec.heartbeat_s)
            if life.att is not None:
                await self._send(life, Lease(ack=life.seq))

    # -- the model gateway ----------------------------------------------------------------------
    def _http_client(self):
        """One httpx client per worker (its connections outlive a container), made on first
        use and closed when the worker ends."""
        if self._http is None:
            self._http = gateway_mod.default_client()
        return self._http

    async def _gateway_send(self, life: _Life, frame) -> None:
        # whole frames or nothing: a memory channel send is never half done when cancelled
        await self._send_bytes(life, encode_frame(frame))

    def _gateway_event(self, life: _Life, failures: trio.MemorySendChannel, event) -> None:
        """Called by the gateway as things happen (must not block)."""
        match event:
            case ExchangeDone(usage=usage):
                if usage is not None:
                    self._count_gateway_usage(usage)
            case UpstreamFailed():
                p = self._current
                if p is not None and p.gateway_failure is None:
                    p.gateway_failure = event
                try:
                    failures.send_nowait(event)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    async def _upstream_failures(self, life: _Life, failures: trio.MemoryReceiveChannel) -> None:
        """An upstream failure (401/403, 429, 5xx, unreachable) during a task ends it now: the
        agent's own retries (minutes, for some) are not waited for."""
        async with failures:
            async for ev in failures:
                p = self._current
                if p is None or p.gateway_failure is not ev or life.ended.is_set():
                    continue
                what = {"auth_failed": "the model API refused the credential",
                        "rate_limited": "the model API rate-limited the request",
                        "upstream_error": "the model API failed",
                        "upstream_unreachable": "the model API could not be reached"}[ev.failure]
                await self._end_early(
                    life, p, status="error", failure=ev.failure, cancel_reason=ev.failure,
                    error=f"{ev.failure}: {what}"
                          + (f" ({ev.status})" if ev.status is not None else "")
                          + (f": {ev.detail}" if ev.detail else ""))

    async def _no_gateway(self, life: _Life, frame) -> None:
        """Gateway frames from a wrapper whose worker has no gateway (not a real agent): each
        complete request is refused (403)."""
        if isinstance(frame, HttpRequest):
            log.warning("gateway_refused", req_id=frame.req_id, method=frame.method,
                        reason="this worker has no model gateway")
        elif isinstance(frame, HttpEnd) and not frame.error:
            body = msgspec.json.encode({"type": "error", "error": {
                "type": "corral_gateway_error", "code": "corral_gateway_error",
                "message": "corral gateway: this worker has no model gateway (its agent is a "
                           "stub or calls no model)"}})
            rid = frame.req_id
            await self._send_bytes(life, b"".join(encode_frame(f) for f in (
                HttpResponse(req_id=rid, status=403, headers=[
                    ("content-type", "application/json"), ("content-length", str(len(body)))]),
                HttpChunk(req_id=rid, data=body), HttpEnd(req_id=rid))))

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
                    events.worker_output(self, data)
                    continue
                for line in splitter.feed(data):
                    frame = decode_wrapper_frame(line)
                    life.last_frame = trio.current_time()
                    if not isinstance(frame, (Heartbeat, TaskOutput, HttpRequest, HttpChunk,
                                              HttpEnd)):
                        life.add_tail(line + b"\n")
                    await self._on_frame(life, frame)
                    # the heartbeat period counts the wrapper's silence, not corral's own time
                    # spent on a frame (a journal write)
                    life.last_frame = trio.current_time()
        except ProtocolError as exc:
            log.error("protocol_error", error=str(exc))
            life.end("protocol", str(exc))
            await self._kill(life.container_id)
            return
        # the stream ended: the container died, or the engine went away (see _after_eof)

    async def _on_frame(self, life: _Life, frame) -> None:
        seq = frame.seq if isinstance(frame, (TaskStarted, TaskOutput, TaskDone)) else 0
        if seq and seq <= life.seq:
            return                    # replayed, and processed already (a re-attach)
        match frame:
            case Heartbeat(sent=sent):
                if sent > life.seq and (life.hello_at is None or trio.current_time() - life.hello_at
                                        > 2 * self.spec.heartbeat_s):
                    # frames reach us in order, and this heartbeat comes after frames we never
                    # saw (written while the engine restarted, or the answer to a hello that
                    # was lost): have them replayed (duplicates are dropped by seq)
                    log.warning("frames_lost", processed=life.seq, sent=sent)
                    await self._hello(life)
            case Ready(worker_id=wid):
                if wid != self.id:
                    raise ProtocolError(f"ready from worker {wid!r}, expected {self.id!r}")
                if frame.resumed:
                    answered, life.first_unanswered, life.hello_at = life.first_unanswered, None, None
                    life.seq = max(life.seq, frame.acked)
                    self._resumed(life, frame)
                    await self._redeliver_lost(life, frame, answered)
                else:
                    # a wrapper that just started: a hello sent before it served was dropped
                    life.first_unanswered = life.hello_at = None
                life.ready = True
                life.ready_at = life.ready_at or trio.current_time()
                life.settled.set()
            case TaskDone():
                await self._task_done(frame)
            case TaskStarted(task_id=tid):
                if self.ledger is not None:
                    self.ledger.record(tid, self.id, life.generation, seq)
            case TaskOutput(task_id=tid):
                p = self._current
                if p is not None and p.task.task_id == tid:
                    p.last_output = trio.current_time()
            case HttpRequest() | HttpChunk() | HttpEnd():
                if life.gateway is not None:
                    await life.gateway.feed(frame)
                else:
                    await self._no_gateway(life, frame)
            case Fatal(reason=reason):
                life.fatal_reason = reason
            case _:
                raise ProtocolError(f"unexpected frame {type(frame).__name__}")
        if seq:
            life.seq = seq            # processed (a task_done is in the journal by now)
