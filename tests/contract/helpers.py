"""What the contract cases share: a worker container's spec and the test's side of its stdio."""

from __future__ import annotations

import collections
from contextlib import AsyncExitStack

import trio

from runtime.engines import STDOUT, Attachment, ContainerEvent, ContainerSpec, Engine, EventStream
from runtime.protocol import (Heartbeat, LineSplitter, Ready, TaskOutput, TaskStarted,
                             decode_wrapper_frame, encode_frame)

DEADLINE = 60
"""seconds for any one case, on any engine: a guard against a hang, not a time to meet (a case
that starts four containers on a 2-node test swarm under a loaded machine took over 30 s)"""


def worker_spec(image: str, sup_name: str, wid: str, *, env: dict[str, str] | None = None,
                **kw) -> ContainerSpec:
    return ContainerSpec(
        image=image, name=f"{sup_name}-{wid}",
        env={"CORRAL_WORKER_ID": wid, "CORRAL_AGENT": "claude", "CORRAL_HEARTBEAT_S": "1",
             **(env or {})},
        labels={"corral.supervisor": sup_name, "corral.worker": wid, "corral.generation": "1"},
        user="worker", working_dir="/workspace", pids_limit=128, **kw)


class Session:
    """The test's side of a worker container's attached stdio: frames in and out."""

    def __init__(self, att: Attachment) -> None:
        self.att = att
        self.stderr = b""
        self._splitter = LineSplitter()
        self._frames: collections.deque = collections.deque()

    async def send(self, frame) -> None:
        await self.att.send(encode_frame(frame))

    async def next(self):
        """The next frame but heartbeats; None once the output has ended."""
        while True:
            while not self._frames:
                try:
                    stream, data = await self.att.output.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    return None
                if stream == STDOUT:
                    self._frames.extend(decode_wrapper_frame(line) for line in self._splitter.feed(data))
                else:
                    self.stderr += data
            frame = self._frames.popleft()
            if not isinstance(frame, Heartbeat):
                return frame

    async def expect(self, cls):
        """The next frame but heartbeats and a task's progress (started, output)."""
        frame = await self.next()
        while isinstance(frame, (TaskStarted, TaskOutput)):
            frame = await self.next()
        assert isinstance(frame, cls), f"expected {cls.__name__}, got {frame!r} (stderr {self.stderr!r})"
        return frame

    async def until_end(self) -> list:
        frames = []
        while (frame := await self.next()) is not None:
            frames.append(frame)
        return frames


async def start_worker(stack: AsyncExitStack, engine: Engine, spec: ContainerSpec) -> tuple[str, Session]:
    """Create, attach, start; returns once the wrapper is READY. Attached until ``stack`` ends."""
    cid = await engine.container_create(spec)
    session = Session(await stack.enter_async_context(engine.attach(cid)))
    await engine.container_start(cid)
    ready = await session.expect(Ready)
    assert ready.worker_id == spec.env["CORRAL_WORKER_ID"]
    return cid, session


async def collect(stream: EventStream, until) -> list[ContainerEvent]:
    """Events of ``stream`` until ``until(events so far)`` is true."""
    seen: list[ContainerEvent] = []
    async for ev in stream.receive:
        seen.append(ev)
        if until(seen):
            return seen
    raise AssertionError(f"the events stream ended ({stream.ended}) after {seen}")


def story(events: list[ContainerEvent], cid: str) -> list[tuple]:
    """One container's events as (kind, exit code or signal) pairs, in order."""
    out = []
    for ev in events:
        if ev.container_id == cid:
            out.append((ev.kind, ev.exit_code if ev.kind == "died" else ev.signal if ev.kind == "killed" else None))
    return out
