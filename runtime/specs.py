"""Configuration and specs: msgspec Structs, validated on decode (TOML, JSON or Python)."""

from __future__ import annotations

import re
import secrets
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct, field

from .errors import ConfigError

NonNeg = Annotated[float, Meta(ge=0)]
Pos = Annotated[float, Meta(gt=0)]
WorkerId = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")]
Name = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")]

Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
RestartType = Literal["permanent", "transient", "temporary"]


class _Config(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class Backoff(_Config):
    """Delay before the n-th consecutive restart: 0 for the first after a stable period, then
    ``min(max_s, initial_s * factor**(n-2))`` with full jitter (uniform in [0, that])."""
    initial_s: NonNeg = 0.2
    factor: Annotated[float, Meta(ge=1)] = 2.0
    max_s: NonNeg = 30.0
    jitter: Literal["full", "none"] = "full"
    stable_s: NonNeg = 10.0
    """a container READY for this long resets the backoff"""


class RestartPolicy(_Config):
    restart: RestartType = "permanent"
    backoff: Backoff = field(default_factory=Backoff)
    max_restarts: Annotated[int, Meta(ge=0)] = 5
    within_s: Pos = 60.0


class WorkerSpec(_Config):
    agent: str = "shell"
    capabilities: list[str] = field(default_factory=list)
    stub_agent: bool = False
    id: WorkerId | None = None
    """worker id; default: a fresh ``w-<8 hex>``"""
    env: dict[str, str] = field(default_factory=dict)
    required_env: list[str] = field(default_factory=list)
    """the wrapper refuses to start (exit 78) unless these are set"""
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    memory: Annotated[int, Meta(ge=6 * 1024 * 1024)] | None = None
    """memory limit in bytes"""
    cpus: Pos | None = None
    pids_limit: Annotated[int, Meta(ge=16)] = 512
    read_only_rootfs: bool = False
    startup_timeout_s: Pos = 30.0
    heartbeat_s: Pos = 5.0
    heartbeat_timeout_s: Pos = 30.0
    """no frame from the wrapper for this long: the worker is hung (killed and restarted)"""
    stop_grace_s: NonNeg = 5.0


class PoolSpec(_Config):
    name: Name
    worker: WorkerSpec = field(default_factory=WorkerSpec)
    replicas: Annotated[int, Meta(ge=0, le=10_000)] = 1
    queue_size: Annotated[int, Meta(ge=1)] = 100


class SupervisorConfig(_Config):
    name: Name = "corral"
    strategy: Strategy = "one_for_one"
    max_restarts: Annotated[int, Meta(ge=0)] = 10
    within_s: Pos = 60.0
    max_concurrent_starts: Annotated[int, Meta(ge=1)] = 16
    shared_cause_threshold: Annotated[int, Meta(ge=2)] = 3
    shared_cause_window_s: Pos = 5.0
    engine_url: str | None = None
    base_image: str = "corral/worker-base:latest"
    build_network: bool = False
    """let image builds use the host network (they run with NetworkMode none otherwise)"""
    control_socket: str | None = None
    """`corral run`: a unix socket for `corral ps` / `corral spawn` / `corral stop`"""
    workers: list[WorkerSpec] = field(default_factory=list)
    pools: list[PoolSpec] = field(default_factory=list)


class Task(Struct, frozen=True, kw_only=True):
    prompt: str
    args: list[str] = field(default_factory=list)
    timeout_s: Pos | None = None
    max_attempts: Annotated[int, Meta(ge=1)] = 1
    task_id: str = field(default_factory=lambda: "t-" + secrets.token_hex(6))


def new_worker_id() -> str:
    return "w-" + secrets.token_hex(4)


def load_config(data: bytes | str, *, fmt: str = "toml") -> SupervisorConfig:
    """Decode a SupervisorConfig; errors name the ``$.path`` of the bad field."""
    try:
        if fmt == "toml":
            return msgspec.toml.decode(data, type=SupervisorConfig)
        return msgspec.json.decode(data, type=SupervisorConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid config: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"config is not valid {fmt.upper()}: {exc}") from None


def load_config_file(path: str) -> SupervisorConfig:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    return load_config(data, fmt="json" if path.endswith(".json") else "toml")


_MEM_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmg]?)i?b?$", re.I)


def parse_memory(text: str | int) -> int:
    """'512m' / '1g' / 1048576 -> bytes."""
    if isinstance(text, int):
        return text
    m = _MEM_RE.match(text.strip())
    if not m:
        raise ConfigError(f"bad memory size {text!r} (use e.g. 256m, 1g)")
    return int(float(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()])
