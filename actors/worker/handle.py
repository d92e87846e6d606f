"""The public handle of a worker."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import outcome
import trio

from runtime import events
from runtime.errors import WorkerGone
from runtime.messages import CancelTaskRequest, RestartRequest, RunTaskRequest, StopRequest, ask
from runtime.records import TaskResult, WorkerInfo, WorkerSnapshot
from runtime.specs import Task

if TYPE_CHECKING:
    from .actor import Worker

class WorkerHandle:
    """What `sup.spawn()` returns. ``id`` is the worker id, never a container id."""

    def __init__(self, actor: "Worker") -> None:
        self._actor = actor
        self.id = actor.id

    def __repr__(self) -> str:
        return f"<WorkerHandle {self.id} {self._actor.state}>"

    @property
    def state(self) -> str:
        return self._actor.state

    async def info(self) -> WorkerInfo:
        return self._actor.info()

    def info_nowait(self) -> WorkerInfo:
        return self._actor.info()

    def snapshot_nowait(self) -> WorkerSnapshot:
        return self._actor.snapshot()

    def carries(self, task_id: str) -> bool:
        """True if this worker adopted a container (left by an earlier corral process) that
        was running ``task_id`` or had its result to replay: its result is recorded in the
        journal when it comes, and the task is not lost."""
        return self._actor.carries(task_id)

    async def run(self, task: Task | str) -> TaskResult:
        """Run a task on this worker and wait for its result. Tasks queue while the worker is
        busy or restarting. Cancelling the caller cancels the task in the container."""
        if isinstance(task, str):
            task = Task(prompt=task)
        send, recv = trio.open_memory_channel[outcome.Outcome](1)
        events.task_queued(task.task_id, f"worker:{self.id}")
        try:
            await self._actor.mailbox.send(RunTaskRequest(task=task, reply=send))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise WorkerGone(f"worker {self.id} has stopped ({self._actor.state})") from None
        try:
            with recv:
                res = await recv.receive()
        except trio.EndOfChannel:
            raise WorkerGone(f"worker {self.id} has stopped") from None
        except trio.Cancelled:
            try:
                self._actor.mailbox.send_nowait(CancelTaskRequest(task_id=task.task_id))
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            raise
        return events.task_done(f"worker:{self.id}", res.unwrap())

    async def restart(self) -> None:
        """Replace the container (graceful: shutdown within stop_grace_s, then kill)."""
        await self._ask(lambda r: RestartRequest(reply=r))

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop the worker and remove its container. Returns when it is gone."""
        if self._actor.finished.is_set():
            return
        try:
            await self._ask(lambda r: StopRequest(reply=r, grace_s=grace_s))
        except WorkerGone:
            pass
        await self._actor.finished.wait()

    async def wait_ready(self) -> None:
        await self._actor.wait_ready()

    async def wait_until(self, predicate) -> WorkerInfo:
        return await self._actor.wait_until(predicate)

    async def wait_finished(self) -> None:
        await self._actor.finished.wait()

    async def _ask(self, make) -> Any:
        return await ask(self._actor.mailbox, make, gone=WorkerGone(f"worker {self.id} has stopped"))


