"""The bodies of corral's HTTP API (`runtime.apps.httpapi`), shared by the server and its client
(`runtime.apps.client`): msgspec Structs, decoded at the edge; unknown fields are errors.

Responses that are corral's own records are sent as they are: `SupervisorSnapshot` (the tree),
`WorkerSnapshot` (one worker with its certificates), `WorkerInfo`, `PoolSnapshot`,
`TaskResult`, `runtime.journal.TaskRecord` (a task's status and result), and the events of
`runtime.events`.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct, field

from ..errors import ConfigError
from ..specs import Name, Task, TaskId, WorkerId

API_VERSION = "v1"


class _Body(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class TaskSubmit(_Body):
    """``POST /v1/tasks``: a task for a pool or a worker (exactly one of them)."""
    prompt: str
    pool: Name | None = None
    worker_id: WorkerId | None = None
    args: list[str] = field(default_factory=list)
    timeout_s: float | None = None
    max_attempts: int = 1
    max_output_bytes: int | None = None
    task_id: TaskId | None = None
    wait: bool = False
    """answer the TaskResult once the task has ended (a client that goes away meanwhile cancels
    the task); otherwise answer `TaskAccepted` at once (needs the task journal)"""

    def __post_init__(self) -> None:
        if (self.worker_id is None) == (self.pool is None):
            raise ValueError("a task names exactly one of `worker_id` and `pool`")

    @property
    def target(self) -> str:
        return f"pool:{self.pool}" if self.pool is not None else f"worker:{self.worker_id}"

    def task(self) -> Task:
        """The Task; its own validation raises ConfigError naming the field."""
        extra: dict[str, Any] = {}
        if self.max_output_bytes is not None:
            extra["max_output_bytes"] = self.max_output_bytes
        if self.task_id is not None:
            extra["task_id"] = self.task_id
        return Task(prompt=self.prompt, args=self.args, timeout_s=self.timeout_s,
                    max_attempts=self.max_attempts, **extra)


class TaskAccepted(Struct, frozen=True, kw_only=True):
    task_id: str
    target: str


class Scale(_Body):
    """``POST /v1/pools/{name}/scale``"""
    replicas: Annotated[int, Meta(ge=0, le=10_000)]


class Done(Struct, frozen=True, kw_only=True):
    """The answer of an action with nothing else to say (restart, stop)."""
    ok: bool = True


class ApiError(Struct, frozen=True, kw_only=True):
    """Every error: ``code`` is stable (clients branch on it), ``message`` is for people."""
    code: str
    message: str


class _WorkerRef(_Body):
    worker_id: WorkerId


class _PoolRef(_Body):
    pool: Name


class _TaskRef(_Body):
    task_id: TaskId


def check_param(kind: type[Struct], **values: Any) -> Any:
    """A path parameter, checked like a body field (the error names `$.field`)."""
    return msgspec.convert(values, kind)


__all__ = ["API_VERSION", "ApiError", "ConfigError", "Done", "Scale", "TaskAccepted", "TaskSubmit",
           "check_param"]
