"""A pool: N interchangeable workers behind one bounded task queue.

`pool.run(task)` waits for room in the queue (backpressure), and the task goes to whichever
worker is idle first. A task whose worker dies under it is redelivered to another worker while it
has attempts left (``Task.max_attempts``); otherwise it ends "worker_died" with the certificate.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import msgspec
import outcome
import structlog
import trio

from runtime.errors import WorkerGone
from runtime.messages import reply_value
from runtime.records import PoolSnapshot, TaskResult
from runtime.specs import PoolSpec, Task
from runtime.util import unwrap_single

from .worker import Worker, WorkerHandle

log = structlog.get_logger("corral.pool")


@dataclass
class _Job:
    task: Task
    reply: Any
    attempts: int = 0


@dataclass
class _Member:
    worker: Worker
    handle: WorkerHandle | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class PoolHandle:
    def __init__(self, pool: "Pool") -> None:
        self._pool = pool
        self.name = pool.spec.name

    async def run(self, task: Task | str) -> TaskResult:
        if isinstance(task, str):
            task = Task(prompt=task)
        send, recv = trio.open_memory_channel[outcome.Outcome](1)
        try:
            await self._pool.jobs_send.send(_Job(task, send))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise WorkerGone(f"pool {self.name} has stopped") from None
        with recv:
            try:
                return (await recv.receive()).unwrap()
            except trio.EndOfChannel:
                raise WorkerGone(f"pool {self.name} has stopped") from None

    async def scale(self, replicas: int) -> None:
        """Grow (waits until the new workers are READY) or shrink (stops the newest first)."""
        await self._pool.scale(replicas)

    @property
    def workers(self) -> list[WorkerHandle]:
        return [m.handle for m in self._pool.members if m.handle is not None]

    def snapshot_nowait(self) -> PoolSnapshot:
        return self._pool.snapshot()

    def statistics(self) -> trio.MemoryChannelStatistics:
        return self._pool.jobs_send.statistics()

    async def stop(self) -> None:
        await self._pool.stop()


class Pool:
    def __init__(self, spec: PoolSpec, *, make_worker) -> None:
        self.spec = spec
        self._make_worker = make_worker
        self.members: list[_Member] = []
        self.jobs_send, self.jobs_recv = trio.open_memory_channel[_Job](spec.queue_size)
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self.stopped = trio.Event()
        self._scale_lock = trio.Lock()

    def snapshot(self) -> PoolSnapshot:
        return PoolSnapshot(name=self.spec.name, replicas=len(self.members),
                            queued=self.jobs_send.statistics().current_buffer_used,
                            workers=[m.worker.snapshot() for m in self.members])

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        structlog.contextvars.bind_contextvars(actor="pool", pool=self.spec.name)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._grow(self.spec.replicas)
                task_status.started(PoolHandle(self))
                await self.stopped.wait()
                await self._shrink(0)
                nursery.cancel_scope.cancel()
        finally:
            self._fail_queued()

    def _fail_queued(self) -> None:
        self.jobs_send.close()
        while True:
            try:
                job = self.jobs_recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            reply_value(job.reply, TaskResult(task_id=job.task.task_id, status="cancelled",
                                              error=f"pool {self.spec.name} stopped",
                                              attempts=job.attempts))
        self.jobs_recv.close()

    async def stop(self) -> None:
        self.stopped.set()

    async def scale(self, replicas: int) -> None:
        async with self._scale_lock:
            if replicas > len(self.members):
                await self._grow(replicas - len(self.members))
            elif replicas < len(self.members):
                await self._shrink(replicas)
            log.info("pool_scaled", replicas=len(self.members))

    async def _grow(self, n: int) -> None:
        assert self._nursery is not None
        errors: list[BaseException] = []

        async def one() -> None:
            wid = f"{self.spec.name}-{next(self._ids)}"
            spec = msgspec.structs.replace(self.spec.worker, id=wid)
            member = _Member(self._make_worker(spec, pool=self.spec.name))
            self.members.append(member)
            try:
                member.handle = await self._nursery.start(self._member, member)
            except Exception as exc:
                if member in self.members:
                    self.members.remove(member)
                errors.append(unwrap_single(exc))

        async with trio.open_nursery() as starter:
            for _ in range(n):
                starter.start_soon(one)
        if errors:
            raise errors[0]

    async def _shrink(self, keep: int) -> None:
        going = self.members[keep:]
        async with trio.open_nursery() as n:
            for m in going:
                if m.handle is not None:
                    n.start_soon(m.handle.stop)
        for m in going:
            m.scope.cancel()
            if m in self.members:
                self.members.remove(m)

    async def _member(self, member: _Member, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with member.scope:
            async with trio.open_nursery() as n:
                handle = await n.start(member.worker.run)
                n.start_soon(self._feeder, handle)
                task_status.started(handle)
        if member in self.members:
            self.members.remove(member)

    async def _feeder(self, handle: WorkerHandle) -> None:
        """Takes a job only while its worker is READY, so jobs go to idle workers."""
        while True:
            try:
                await handle.wait_ready()
            except WorkerGone:
                return
            try:
                job = await self.jobs_recv.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            job.attempts += 1
            try:
                res = await handle.run(msgspec.structs.replace(job.task, max_attempts=1))
            except WorkerGone:
                job.attempts -= 1
                await self._requeue(job)
                return
            if res.status == "worker_died" and job.attempts < job.task.max_attempts:
                log.info("task_redelivered", task_id=job.task.task_id, attempts=job.attempts)
                await self._requeue(job)
                continue
            reply_value(job.reply, msgspec.structs.replace(res, attempts=job.attempts))

    async def _requeue(self, job: _Job) -> None:
        try:
            await self.jobs_send.send(job)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            reply_value(job.reply, TaskResult(task_id=job.task.task_id, status="cancelled",
                                              error=f"pool {self.spec.name} stopped",
                                              attempts=job.attempts))
