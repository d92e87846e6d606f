"""Configuration and specs: msgspec Structs, validated on decode (TOML, JSON or Python)."""

from __future__ import annotations

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


_checking = False


def _check_text(where: str, value: str, *, allow_nul: bool = False) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{where} is not valid Unicode text: lone surrogate {value[exc.start]!r} "
                          f"at position {exc.start} (decode input as UTF-8, not with "
                          f"surrogateescape)") from None
    if not allow_nul and "\x00" in value:
        raise ConfigError(f"{where} contains a NUL byte at position {value.index(chr(0))}")


class _Validated(Struct, frozen=True, kw_only=True):
    """Validated when built, however it is built: in code (``Task(prompt=1)`` raises ConfigError),
    by msgspec decoding, ``convert`` or ``structs.replace``. msgspec checks types and ``Meta``
    constraints only when decoding; ``__post_init__`` runs the same check on every construction."""

    def __post_init__(self) -> None:
        global _checking
        if _checking:           # the conversion below builds a copy: don't check it again
            return
        _checking = True
        try:
            checked = msgspec.convert(msgspec.to_builtins(self), type=type(self))
        except msgspec.ValidationError as exc:
            raise ConfigError(f"invalid {type(self).__name__}: {exc}") from None
        finally:
            _checking = False
        # keep the checked values: `restart={"max_restarts": 3}` becomes a RestartPolicy
        for name in self.__struct_fields__:
            msgspec.structs.force_setattr(self, name, getattr(checked, name))
        self._check()

    def _check(self) -> None:
        """Checks that types and Meta constraints cannot express."""


class _Config(_Validated, frozen=True, kw_only=True, forbid_unknown_fields=True):
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


EnvName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=255)]


class WorkerSpec(_Config):
    agent: str = "shell"
    capabilities: list[str] = field(default_factory=list)
    stub_agent: bool = False
    id: WorkerId | None = None
    """worker id; default: a fresh ``w-<8 hex>``"""
    env: dict[EnvName, str] = field(default_factory=dict)
    required_env: list[EnvName] = field(default_factory=list)
    """the wrapper refuses to start (exit 78) unless these are set"""
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    memory: Annotated[int, Meta(ge=6 * 1024 * 1024)] | None = None
    """memory limit in bytes"""
    cpus: Pos | None = None
    pids_limit: Annotated[int, Meta(ge=16)] = 512
    read_only_rootfs: bool = False
    disk: Annotated[int, Meta(ge=1024 * 1024)] | None = None
    """bytes a task may write: /workspace and /tmp become tmpfs mounts of this size (they count
    toward ``memory``), and the container's writable layer gets this size too where the storage
    driver enforces it (overlay2 on xfs with pquota)"""
    startup_timeout_s: Pos = 30.0
    heartbeat_s: Pos = 5.0
    heartbeat_timeout_s: Pos = 30.0
    """no frame from the wrapper for this long: the worker is hung (killed and restarted)"""
    stop_grace_s: NonNeg = 5.0
    task_grace_s: NonNeg = 5.0
    """past a task's timeout_s plus this, corral ends the task itself ("timeout") even if the
    wrapper does not; if the wrapper still has not answered after another task_grace_s, the
    container is replaced"""

    def _check(self) -> None:
        for k, v in self.env.items():
            _check_text(f"env[{k!r}]", v)
        for c in self.capabilities:
            _check_text("a capability name", c)
        _check_text("agent", self.agent)


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
    """let image builds use the host network (they run without network otherwise)"""
    control_socket: str | None = None
    """`corral run`: a unix socket for `corral ps` / `corral spawn` / `corral stop`"""
    workers: list[WorkerSpec] = field(default_factory=list)
    pools: list[PoolSpec] = field(default_factory=list)


MAX_PROMPT_BYTES = 1 << 20
"""a task's prompt and args together: at most 1 MiB of UTF-8"""
DEFAULT_OUTPUT_BYTES = 256 * 1024
MAX_OUTPUT_BYTES = 512 * 1024
TaskId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]


class Task(_Validated, frozen=True, kw_only=True):
    prompt: str
    args: list[str] = field(default_factory=list)
    timeout_s: Pos | None = None
    """the wrapper kills the agent's whole process tree past this; corral itself ends the task
    ``timeout`` at timeout_s + WorkerSpec.task_grace_s whatever the wrapper does"""
    max_attempts: Annotated[int, Meta(ge=1, le=100)] = 1
    max_output_bytes: Annotated[int, Meta(ge=1024, le=MAX_OUTPUT_BYTES)] = DEFAULT_OUTPUT_BYTES
    """the result keeps at most this much output (its tail), and says ``truncated``"""
    task_id: TaskId = field(default_factory=lambda: "t-" + secrets.token_hex(6))

    def _check(self) -> None:
        _check_text("prompt", self.prompt)
        size = len(self.prompt.encode())
        for i, a in enumerate(self.args):
            _check_text(f"args[{i}]", a)
            size += len(a.encode())
        if size > MAX_PROMPT_BYTES:
            raise ConfigError(f"prompt and args are {size} bytes: the limit is {MAX_PROMPT_BYTES} "
                              f"bytes (1 MiB) of UTF-8")


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
