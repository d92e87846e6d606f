"""Actor-to-actor messages: frozen, kw_only, tagged msgspec Structs sharing one base.

A request carries ``reply``: a one-shot trio channel the asker waits on. It is a plain Python
object, never encoded: these messages never cross the wire (wire frames live in protocol.py).
"""

from __future__ import annotations

from typing import Any, Union

import outcome
import trio
from msgspec import Struct

from .errors import ActorStopped
from .records import DeathCertificate, TaskResult
from .specs import PoolSpec, SupervisorConfig, Task, WorkerSpec


class Msg(Struct, frozen=True, kw_only=True, tag=True):
    pass


Reply = trio.MemorySendChannel  # carries an outcome.Outcome


# -- ImageBuilder ------------------------------------------------------------------------------
class ImageRequest(Msg):
    agent: str
    capabilities: list[str]
    stub_agent: bool
    reply: Any


# -- Worker ------------------------------------------------------------------------------------
class RunTaskRequest(Msg):
    task: Task
    reply: Any


class CancelTaskRequest(Msg):
    task_id: str


class InfoRequest(Msg):
    reply: Any


class SnapshotRequest(Msg):
    reply: Any


class RestartRequest(Msg):
    reply: Any | None = None
    reason: str = "requested"
    hold: bool = False
    """replace the container only once the supervisor calls ``Worker.release()`` (a group
    restart stops its children first, then starts them one by one); the reply comes when the
    old container is gone"""


class StopRequest(Msg):
    reply: Any | None = None
    grace_s: float | None = None


WorkerMsg = Union[RunTaskRequest, CancelTaskRequest, InfoRequest, SnapshotRequest, RestartRequest,
                  StopRequest]


# -- Supervisor --------------------------------------------------------------------------------
class SpawnRequest(Msg):
    spec: WorkerSpec
    reply: Any


class StartPoolRequest(Msg):
    spec: PoolSpec
    reply: Any


class StartSupervisorRequest(Msg):
    config: SupervisorConfig
    reply: Any


class StopChildRequest(Msg):
    child_id: str
    reply: Any


class ChildDied(Msg):
    """A worker's container died; ``restarting`` says whether the worker brings it back itself."""
    child_id: str
    certificate: DeathCertificate
    restarting: bool
    charged_to_task: str | None = None
    """the id of the task whose run caused this death (see records.TASK_CAUSES): such a death
    does not count against the supervisor's intensity"""
    in_outage: bool = False
    """the container died while the engine was away and the engine came back: the engine's
    doing, so neither a shared cause nor a restart the intensity counts"""
    reply: Any | None = None
    """answered False (restart when ready) or True: wait for ``Worker.release()`` before the
    next container (the supervisor restarts a group of children in order)"""


class ChildFailed(Msg):
    """A child gave up for good (its restart budget is spent, or it escalated)."""
    child_id: str
    certificates: list[DeathCertificate]
    reason: str
    kind: str = "child_failed"
    """child_failed (spent its restarts, or escalated) | start_failed (a configured child)"""


class ChildExited(Msg):
    """A child ended normally (stopped, or a transient/temporary worker that exited)."""
    child_id: str


SupervisorMsg = Union[SpawnRequest, StartPoolRequest, StartSupervisorRequest, StopChildRequest,
                      SnapshotRequest, ChildDied, ChildFailed, ChildExited, StopRequest]


# -- request/reply helpers ---------------------------------------------------------------------
def reply_value(reply: Any, value: Any) -> None:
    if reply is not None:
        try:
            reply.send_nowait(outcome.Value(value))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def reply_error(reply: Any, exc: BaseException) -> None:
    if reply is not None:
        try:
            reply.send_nowait(outcome.Error(exc))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def reply_to(msg: Msg) -> Any:
    return getattr(msg, "reply", None)


def _stopped(gone: str | ActorStopped) -> ActorStopped:
    return gone if isinstance(gone, ActorStopped) else ActorStopped(gone)


async def ask(mailbox: trio.MemorySendChannel, make: Any, *,
              gone: str | ActorStopped = "the actor has stopped") -> Any:
    """Send ``make(reply)`` to ``mailbox`` and wait for the answer (value or raised error).
    ``gone`` is raised if the actor has stopped (an ActorStopped: WorkerGone, PoolStopped...)."""
    send, recv = trio.open_memory_channel[outcome.Outcome](1)
    try:
        await mailbox.send(make(send))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        raise _stopped(gone) from None
    with recv:
        try:
            result = await recv.receive()
        except trio.EndOfChannel:
            raise _stopped(gone) from None
    return result.unwrap()


def drain_mailbox(recv: trio.MemoryReceiveChannel, why: str | ActorStopped, *,
                  worker_id: str | None = None) -> None:
    """An actor that ends answers everything still queued, then closes its mailbox: a task gets a
    TaskResult ("cancelled"), never an exception; any other request gets ``why`` (an
    ActorStopped)."""
    gone = _stopped(why)
    why = str(gone)
    while True:
        try:
            msg = recv.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError):
            break
        if isinstance(msg, RunTaskRequest):
            reply_value(msg.reply, TaskResult(task_id=msg.task.task_id, status="cancelled", error=why,
                                              attempts=0, worker_id=worker_id))
        else:
            reply_error(reply_to(msg), gone)
    recv.close()
