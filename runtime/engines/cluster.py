"""What corral needs of a cluster manager (Docker Swarm's manager API), as typed values.

`runtime.engines.swarm` places one single-task service per worker container through these; the
Docker adapter (`runtime.engines.docker`) translates them to and from Swarm's JSON, and nothing
else speaks that JSON. Pure: no I/O.
"""

from __future__ import annotations

from typing import Literal, TypeAlias

import msgspec

from .base import TmpfsMount

NodeStatus: TypeAlias = Literal["ready", "down", "unknown", "disconnected"]

TaskStatus: TypeAlias = Literal["new", "allocated", "pending", "assigned", "accepted", "preparing",
                                "ready", "starting", "running", "complete", "shutdown", "failed",
                                "rejected", "remove", "orphaned"]
TASK_ENDED: frozenset[str] = frozenset({"complete", "shutdown", "failed", "rejected", "remove",
                                        "orphaned"})
"""a task in one of these will not run (again)"""


class NodeInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A node of the cluster, as its manager sees it."""
    id: str
    hostname: str
    status: NodeStatus
    """"ready": its agent reports; "down": the manager lost it (heartbeats missed)"""
    availability: str
    """"active", "pause" or "drain\""""
    role: str
    """"manager" or "worker\""""
    addr: str = ""
    labels: dict[str, str] = {}
    """the node's labels (set by an operator): ``corral.engine`` is its engine's URL"""
    engine_version: str = ""


class ServiceSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One service that runs one container once: no restart, no update, no network of its own
    (the node's default one). The hardening the Docker adapter adds: capabilities dropped, an
    init, stdin open."""
    name: str
    image: str
    """``sha256:<id>``: a tag would make every node try a registry first"""
    env: dict[str, str] = {}
    labels: dict[str, str] = {}
    """the service's and its container's labels"""
    command: list[str] | None = None
    entrypoint: list[str] | None = None
    user: str | None = None
    working_dir: str | None = None
    memory: int | None = None
    cpus: float | None = None
    pids_limit: int | None = None
    read_only_rootfs: bool = False
    tmpfs: tuple[TmpfsMount, ...] = ()
    constraints: tuple[str, ...] = ()
    """placement constraints, e.g. ``node.labels.corral.node==n2``"""
    reserve_memory: int | None = None
    reserve_cpus: float | None = None
    replicas: int = 0
    stop_grace_s: float = 10.0


class ServiceInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    labels: dict[str, str]
    replicas: int
    version: int
    """the service's version index (an update names it)"""
    image: str
    created_at: float | None = None


class TaskInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One task (a container's run) of a service."""
    id: str
    service_id: str
    node_id: str
    status: TaskStatus
    desired: str
    """the state the manager wants it in ("running", "shutdown", ...)"""
    container_id: str = ""
    """once a node made its container"""
    exit_code: int | None = None
    message: str = ""
    error: str = ""
    at: float | None = None
    """the time of its last status, seconds since the epoch"""
