"""A pool: N interchangeable workers behind one bounded task queue.

`pool.run(task)` waits for room in the queue (backpressure), and the task goes to a READY worker
that has no pool task. A task whose worker dies under it is redelivered to another worker while it
has attempts left (``Task.max_attempts``); otherwise it ends "worker_died" with the certificate.

Two tasks per pool (a dispatcher and a collector), none per worker: pools of thousands stay small.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import msgspec
import outcome
import structlog
import trio

from runtime import events
from runtime.errors import PoolStopped
from runtime.messages import CancelTaskRequest, RunTaskRequest, reply_value
from runtime.records import PoolSnapshot, TaskResult
from runtime.specs import PoolSpec, Task
from runtime.util import unwrap_single

from .worker import Worker, WorkerHandle

log = structlog.get_logger("corral.pool")


@dataclass(eq=False)
class _Job:
    task: Task
    reply: Any
    attempts: int = 0
    charged_deaths: int = 0
    """attempts that killed the container running them (a poison task kills every one)"""


class PoolHandle:
    def __init__(self, pool: "Pool") -> None:
        self._pool = pool
        self.name = pool.spec.name

    async def run(self, task: Task | str) -> TaskResult:
        """Run a task on some idle worker of the pool; waits for room in the queue first."""
        if isinstance(task, str):
            task = Task(prompt=task)
        send, recv = trio.open_memory_channel[outcome.Outcome](1)
        events.task_queued(task.task_id, f"pool:{self.name}")
        try:
            await self._pool.jobs_send.send(_Job(task, send))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise PoolStopped(f"pool {self.name} has stopped") from None
        try:
            with recv:
                return events.task_done(f"pool:{self.name}", (await recv.receive()).unwrap())
        except trio.EndOfChannel:
            raise PoolStopped(f"pool {self.name} has stopped") from None
        except trio.Cancelled:
            self._pool.cancel(task.task_id)
            raise

    async def scale(self, replicas: int) -> None:
        """Grow (waits until the new workers are READY) or shrink (stops the newest first)."""
        await self._pool.scale(replicas)

    @property
    def workers(self) -> list[WorkerHandle]:
        return [WorkerHandle(w) for w in self._pool.members]

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
        self.members: list[Worker] = []
        self.jobs_send, self.jobs_recv = trio.open_memory_channel[_Job](spec.queue_size)
        # workers reply here; unbounded so that a worker's reply never blocks or drops
        self._results_send, self._results_recv = trio.open_memory_channel[outcome.Outcome](math.inf)
        self._inflight: dict[str, tuple[_Job, Worker]] = {}
        self._busy: set[Worker] = set()
        self._idle: dict[Worker, None] = {}   # READY members with no pool task, oldest first
        self._held: dict[_Job, None] = {}
        """jobs out of the queue and with no worker yet (the dispatcher's, a full queue's
        requeues): answered too if the pool stops"""
        self._cancelled: set[str] = set()
        self._changed = trio.Event()
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self.stopped = trio.Event()
        self._scale_lock = trio.Lock()

    def snapshot(self) -> PoolSnapshot:
        return PoolSnapshot(name=self.spec.name, replicas=len(self.members),
                            queued=self.jobs_send.statistics().current_buffer_used,
                            workers=[w.snapshot() for w in self.members])

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        structlog.contextvars.bind_contextvars(actor="pool", pool=self.spec.name)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._grow(self.spec.replicas)
                nursery.start_soon(self._dispatcher)
                nursery.start_soon(self._collector)
                task_status.started(PoolHandle(self))
                await self.stopped.wait()
                await self._shrink(0)
                nursery.cancel_scope.cancel()
        finally:
            self._fail_queued()

    def _fail_queued(self) -> None:
        self.jobs_send.close()
        pending = [job for job, _ in self._inflight.values()] + list(self._held)
        self._held.clear()
        while True:
            try:
                pending.append(self.jobs_recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        for job in pending:
            reply_value(job.reply, TaskResult(task_id=job.task.task_id, status="cancelled",
                                              error=f"pool {self.spec.name} stopped", attempts=job.attempts))
        self.jobs_recv.close()

    async def stop(self) -> None:
        self.stopped.set()

    def cancel(self, task_id: str) -> None:
        """The caller gave up on a task: drop it if queued, cancel it in its container if running."""
        if task_id in self._inflight:
            _, worker = self._inflight[task_id]
            try:
                worker.mailbox.send_nowait(CancelTaskRequest(task_id=task_id))
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        else:
            self._cancelled.add(task_id)

    def _refresh(self, worker: Worker) -> None:
        # (a READY worker is a member: workers leave ``members`` only once stopped or failed)
        if worker.state == "ready" and worker not in self._busy:
            self._idle[worker] = None
        else:
            self._idle.pop(worker, None)

    def _notify(self, worker: Worker | None = None) -> None:
        """A member changed state (the listener), or a pool task ended: update who is idle."""
        if worker is not None:
            if worker.state in ("stopped", "failed") and worker in self.members:
                self.members.remove(worker)
                self._busy.discard(worker)
            self._refresh(worker)
        self._changed.set()
        self._changed = trio.Event()

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
            worker = self._make_worker(msgspec.structs.replace(self.spec.worker, id=wid), pool=self.spec.name)
            worker.listeners.append(self._notify)
            self.members.append(worker)
            try:
                await self._nursery.start(worker.run)
            except Exception as exc:
                if worker in self.members:
                    self.members.remove(worker)
                errors.append(unwrap_single(exc))

        async with trio.open_nursery() as starter:
            for _ in range(n):
                starter.start_soon(one)
        if errors:
            raise errors[0]

    async def _shrink(self, keep: int) -> None:
        going = self.members[keep:]
        async with trio.open_nursery() as n:
            for w in going:
                n.start_soon(WorkerHandle(w).stop)

    async def _idle_worker(self) -> Worker:
        while not self._idle:
            await self._changed.wait()
        return next(iter(self._idle))

    async def _dispatcher(self) -> None:
        while True:
            # take a job only once a worker is free, so the queue bound is exactly queue_size
            await self._idle_worker()
            try:
                job = await self.jobs_recv.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            if job.task.task_id in self._cancelled:
                self._cancelled.discard(job.task.task_id)
                continue
            self._held[job] = None           # out of the queue, not yet with a worker
            worker = await self._idle_worker()
            del self._held[job]
            self._busy.add(worker)
            self._idle.pop(worker, None)
            job.attempts += 1
            self._inflight[job.task.task_id] = (job, worker)
            try:
                await worker.mailbox.send(RunTaskRequest(task=msgspec.structs.replace(job.task, max_attempts=1),
                                                         reply=self._results_send))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._inflight.pop(job.task.task_id, None)
                self._busy.discard(worker)
                self._refresh(worker)
                job.attempts -= 1
                self._requeue(job)

    async def _collector(self) -> None:
        async for result in self._results_recv:
            try:
                res: TaskResult = result.unwrap()
            except Exception:   # workers answer RunTaskRequests with TaskResults only
                continue
            entry = self._inflight.pop(res.task_id, None)
            if entry is None:
                continue
            job, worker = entry
            self._busy.discard(worker)
            self._notify(worker)
            gone = worker.finished.is_set() and res.status == "cancelled" and res.task_id not in self._cancelled
            if res.status == "worker_died" and res.poison:   # (the worker ran it once)
                job.charged_deaths += 1
            if gone:                 # the worker was stopped (scale-down) before running it
                job.attempts -= 1
                self._requeue(job)
            elif self._should_redeliver(job, res):
                log.info("task_redelivered", task_id=job.task.task_id, attempts=job.attempts)
                self._requeue(job)
            else:
                poison = res.status == "worker_died" and job.charged_deaths == job.attempts
                if poison:
                    log.warning("poison_task", task_id=job.task.task_id, attempts=job.attempts)
                    res = msgspec.structs.replace(
                        res, error=f"worker died: {res.death.cause if res.death else '?'} (poison "
                                   f"task: each of its {job.attempts} attempt(s) killed the "
                                   f"container running it)")
                reply_value(job.reply, msgspec.structs.replace(res, attempts=job.attempts, poison=poison))

    def _should_redeliver(self, job: _Job, res: TaskResult) -> bool:
        """A task whose worker died under it runs again while it has attempts left."""
        return res.status == "worker_died" and job.attempts < job.task.max_attempts

    def _requeue(self, job: _Job) -> None:
        try:
            self.jobs_send.send_nowait(job)
        except trio.WouldBlock:
            assert self._nursery is not None
            self._nursery.start_soon(self._requeue_wait, job)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            reply_value(job.reply, TaskResult(task_id=job.task.task_id, status="cancelled",
                                              error=f"pool {self.spec.name} stopped", attempts=job.attempts))

    async def _requeue_wait(self, job: _Job) -> None:
        self._held[job] = None
        try:
            await self.jobs_send.send(job)
            del self._held[job]
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._held.pop(job, None)
            reply_value(job.reply, TaskResult(task_id=job.task.task_id, status="cancelled",
                                              error=f"pool {self.spec.name} stopped", attempts=job.attempts))
