"""What corral reports: death certificates, task results, worker info, snapshots."""

from __future__ import annotations

from typing import Literal, Union

from msgspec import Struct, field

Cause = Literal["config_error", "startup_timeout", "early_exit", "oom_killed", "killed", "crashed",
                "exited", "hung", "removed", "engine_error", "protocol_error",
                "engine_unavailable", "node_lost"]
CAUSES: tuple[str, ...] = Cause.__args__  # type: ignore[attr-defined]

WorkerState = Literal["pending", "building", "creating", "starting", "ready", "busy", "backoff",
                      "held", "stopping", "stopped", "failed", "engine_down"]
"""``held``: between containers, waiting for its supervisor to restart it in start order
(one_for_all / rest_for_one). ``engine_down``: the engine went away; the worker waits for it
(up to SupervisorConfig.engine_outage_s) and re-attaches to its container if it survived"""
TaskStatus = Literal["ok", "error", "timeout", "cancelled", "worker_died"]
Failure = Literal["auth_failed", "rate_limited", "upstream_error", "upstream_unreachable",
                  "permission_denied", "stalled", "agent_error"]
"""Why a task failed while its container stayed healthy (``TaskResult.failure``): the model
API refused the key (401/403), rate-limited it (429), failed (5xx, a response cut short) or could
not be reached; the agent was refused a tool by its permissions; no progress for
``WorkerSpec.stall_timeout_s``; or the agent failed on its own."""
FAILURES: tuple[str, ...] = Failure.__args__  # type: ignore[attr-defined]

TASK_CAUSES: frozenset[str] = frozenset({"crashed", "exited", "oom_killed", "hung", "protocol_error"})
"""Causes of death that a task running at the time may have brought about (a kill from outside,
an out-of-band removal or an engine error never are). Such deaths are charged to the task: they
restart the container (with backoff) but count against neither the worker's restart budget nor
its supervisor's intensity, so bad data can never escalate the tree."""


class _Record(Struct, frozen=True, kw_only=True):
    pass


class DeathCertificate(_Record):
    """Why one container of a worker ended."""
    worker_id: str
    container_id: str | None
    generation: int
    cause: Cause
    reason: str = ""
    """human-readable detail: the wrapper's fatal reason, the engine error, ..."""
    exit_code: int | None = None
    oom_killed: bool = False
    ready: bool = False
    """did it die after READY?"""
    uptime_s: float = 0.0
    logs_tail: str = ""
    """last 4 KiB of the container's output"""
    at: float = 0.0
    """wall-clock time (epoch seconds)"""
    restart_in_s: float | None = None
    """delay before the next container; None when the worker gives up and escalates"""


class TokenUsage(_Record):
    """Model tokens and cost. In a TaskResult: that task's; in WorkerInfo: the worker's totals
    since it was spawned (every container, every task, and model calls between tasks)."""
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None
    """as the agent reported it (the gateway sees tokens, not prices); None: not reported"""
    source: Literal["gateway", "agent", ""] = ""
    """where the token counts come from: ``gateway`` (counted from the model API's own responses
    as they crossed corral's gateway: preferred), ``agent`` (the agent's own report, when nothing
    crossed the gateway, e.g. a stub agent); "" for totals"""

    def __add__(self, other: "TokenUsage") -> "TokenUsage":
        cost = None if self.cost_usd is None and other.cost_usd is None else \
            (self.cost_usd or 0.0) + (other.cost_usd or 0.0)
        return TokenUsage(input_tokens=self.input_tokens + other.input_tokens,
                          output_tokens=self.output_tokens + other.output_tokens, cost_usd=cost)


class TaskResult(_Record):
    task_id: str
    status: TaskStatus
    output: str = ""
    exit_code: int | None = None
    error: str = ""
    duration_s: float = 0.0
    attempts: int = 1
    worker_id: str | None = None
    death: DeathCertificate | None = None
    truncated: bool = False
    """the output exceeded Task.max_output_bytes; ``output`` holds its tail"""
    poison: bool = False
    """every attempt of this task killed the container running it: it is not retried further"""
    failure: Failure | None = None
    """with status "error": why, at the agent level (see ``Failure``); None otherwise"""
    usage: TokenUsage | None = None
    """tokens and cost of this task, where the gateway or the agent saw them"""


class WorkerInfo(_Record):
    id: str
    state: WorkerState
    agent: str
    container_id: str | None = None
    container_name: str | None = None
    image_id: str | None = None
    image_tag: str | None = None
    generation: int = 0
    restarts: int = 0
    pool: str | None = None
    last_death: DeathCertificate | None = None
    usage: TokenUsage = field(default_factory=TokenUsage)
    """totals since the worker was spawned (they survive container restarts)"""


class WorkerSnapshot(_Record, tag="worker"):
    info: WorkerInfo
    current_backoff_s: float = 0.0
    next_backoff_s: float = 0.0
    deaths: list[DeathCertificate] = field(default_factory=list)
    """the most recent deaths, oldest first (at most 10)"""
    deaths_by_cause: dict[str, int] = field(default_factory=dict)
    """every death of this worker since it was spawned, counted by cause"""


class PoolSnapshot(_Record, tag="pool"):
    name: str
    replicas: int
    queued: int
    workers: list[WorkerSnapshot] = field(default_factory=list)


class SupervisorSnapshot(_Record, tag="supervisor"):
    name: str
    strategy: str
    state: str
    restarts_in_window: int = 0
    children: list[Union[WorkerSnapshot, PoolSnapshot, "SupervisorSnapshot"]] = field(default_factory=list)


ChildSnapshot = Union[WorkerSnapshot, PoolSnapshot, SupervisorSnapshot]
