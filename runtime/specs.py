"""Configuration and specs: msgspec Structs, validated on decode (TOML, JSON or Python)."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from typing import Annotated, Literal
from urllib.parse import urlsplit

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
Constraint = Annotated[str, Meta(max_length=512)]
"""a Swarm placement constraint: ``node.hostname==n2``, ``node.labels.zone!=b``, ``node.role==worker``"""
_CONSTRAINT = re.compile(r"(node|engine)\.[A-Za-z0-9_.-]+ *(==|!=) *[^ =!][^ ]*")
Permissions = Literal["read-only", "workspace-write", "full"]


class EnvSecret(_Config):
    """A secret held in an environment variable of the supervisor's process (``corral run``),
    read when a container starts: ``secrets = {ANTHROPIC_API_KEY = {env = "MY_KEY"}}``."""
    env: EnvName


SecretValue = str | EnvSecret

REDACTED = "<redacted>"

_FOREIGN_LOGINS = {
    "CLAUDE_CODE_OAUTH_TOKEN": "claude's subscription login (OAuth, /login)",
    "FACTORY_API_KEY": "droid's Factory account login",
    "CODEX_API_KEY": "codex's own login",
    "CHATGPT_TOKEN": "codex's ChatGPT login",
}
"""credentials of agent logins that talk to their vendor's own service, not to a model API:
they cannot go through an upstream override (nor through corral's gateway)"""


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
    upstream: str | None = None
    """the model API's base URL (``https://host[:port][/path]``) that corral's gateway forwards
    the agent's requests to; None: the agent's public API for the credential given
    (api.anthropic.com, api.openai.com). Only this origin is reachable for the agent."""
    secrets: dict[EnvName, SecretValue] = field(default_factory=dict)
    """credentials (``ANTHROPIC_API_KEY``, ``ANTHROPIC_AUTH_TOKEN``, ``OPENAI_API_KEY``), each a
    value or ``EnvSecret(env=NAME)``. Held by the supervisor, which injects them into the agent's
    requests as they cross the gateway: never written into a container (env, labels, files)
    and never shown (repr, logs, snapshots)."""
    model: str | None = None
    """the model name passed to the agent, where it takes one"""
    permissions: Permissions = "workspace-write"
    """what the agent may do, mapped to each agent's own flags: ``read-only`` (no edits, no
    commands), ``workspace-write`` (edits in /workspace), ``full`` (anything, inside the
    container)"""
    orphan_timeout_s: Pos = 60.0
    """the wrapper's lease: with no frame from a supervisor for this long (corral sends one
    every ``heartbeat_s``), the wrapper ends its task as ``orphan_policy`` says and exits, so a
    container whose supervisor is gone for good does not live forever. A supervisor that comes
    back within it adopts the container, task and unacknowledged results included"""
    orphan_policy: Literal["cancel", "finish"] = "cancel"
    """an orphaned wrapper's running task: ``cancel`` it at once, or let it ``finish`` first
    (its result is kept for a supervisor that attaches before the wrapper exits)"""
    placement: list[Constraint] = field(default_factory=list)
    """(Docker Swarm only) where the worker's containers may run: Swarm placement constraints,
    all of which must hold, added to the engine URL's own (``?constraint=``). A worker with a
    placement on a single engine does not start (config_error)"""
    stall_timeout_s: NonNeg | None = None
    """a task with no agent output and no model traffic for this long ends "error" with failure
    ``stalled`` (the agent is killed, the container stays). None: 300 s for real agents (which
    reach a model through the gateway), off for stub and shell agents; 0: off"""

    def _check(self) -> None:
        for k, v in self.env.items():
            _check_text(f"env[{k!r}]", v)
        for c in self.capabilities:
            _check_text("a capability name", c)
        _check_text("agent", self.agent)
        if self.model is not None:
            _check_text("model", self.model)
        for k, v in self.secrets.items():
            if isinstance(v, str):
                _check_text(f"secrets[{k!r}]", v)
        if self.upstream is not None:
            check_upstream(self.upstream)
        for i, c in enumerate(self.placement):
            if not _CONSTRAINT.fullmatch(c):
                raise ConfigError(f"placement[{i}] {c!r} is not a Swarm placement constraint: "
                                  f"node.<attribute> or engine.labels.<name>, then == or !=, then "
                                  f"a value (e.g. node.hostname==n2)")
        if self.orphan_timeout_s < 2 * self.heartbeat_s:
            raise ConfigError(f"orphan_timeout_s ({self.orphan_timeout_s}) must be at least twice "
                              f"heartbeat_s ({self.heartbeat_s}): corral renews the lease every "
                              f"heartbeat_s")
        self._check_credentials()

    def _check_credentials(self) -> None:
        from .gateway import AGENT_AUTH
        rules = AGENT_AUTH.get(self.agent)
        if rules is None:
            if self.agent in ("claude", "codex", "factory"):   # pragma: no cover - table drift
                raise ConfigError(f"agent {self.agent!r} has no gateway credentials")
            used = [n for n, v in (("upstream", self.upstream), ("secrets", self.secrets),
                                   ("model", self.model)) if v]
            if used:
                raise ConfigError(f"agent {self.agent!r} calls no model: {', '.join(used)} "
                                  f"{'is' if len(used) == 1 else 'are'} not used by it (agents "
                                  f"that reach a model through corral's gateway: "
                                  f"{', '.join(sorted(AGENT_AUTH))})")
            return
        known = [r.secret for r in rules]
        for name in self.secrets:
            if name in known:
                continue
            if name in _FOREIGN_LOGINS:
                raise ConfigError(
                    f"secrets[{name!r}]: {_FOREIGN_LOGINS[name]} cannot go through an upstream "
                    f"override: corral's gateway forwards model API calls only. Give agent "
                    f"{self.agent!r} a model API key instead: {' or '.join(known)}")
            raise ConfigError(f"secrets[{name!r}] is not a credential agent {self.agent!r} can "
                              f"use through corral's gateway; it takes {' or '.join(known)}")

    @property
    def uses_gateway(self) -> bool:
        """A real agent (not a stub, not shell): it reaches its model API through corral's
        gateway, with the credential from ``secrets``."""
        from .gateway import AGENT_AUTH
        return not self.stub_agent and self.agent in AGENT_AUTH

    @property
    def effective_stall_timeout_s(self) -> float | None:
        if self.stall_timeout_s is None:
            return 300.0 if self.uses_gateway else None
        return self.stall_timeout_s or None

    def resolve_secrets(self) -> dict[str, str]:
        """The secrets' values; an ``EnvSecret`` whose variable is unset: ConfigError naming
        it. Call where the credential is needed, and keep the result out of anything shown."""
        out: dict[str, str] = {}
        for k, v in self.secrets.items():
            if isinstance(v, EnvSecret):
                value = os.environ.get(v.env)
                if not value:
                    raise ConfigError(f"secrets[{k!r}] is read from the environment variable "
                                      f"{v.env}, which is not set in this process")
                out[k] = value
            else:
                out[k] = v
        return out

    def redacted(self) -> "WorkerSpec":
        """This spec with every secret value replaced by ``<redacted>`` (environment variable
        names are kept): what may be shown or logged."""
        if not any(isinstance(v, str) for v in self.secrets.values()):
            return self
        return msgspec.structs.replace(self, secrets={
            k: v if isinstance(v, EnvSecret) else REDACTED for k, v in self.secrets.items()})

    def fingerprint(self) -> str:
        """16 hex digits that change whenever the spec does (secrets included) and reveal no
        secret: each value enters as a domain-separated sha256 of itself, never as text."""
        data = msgspec.to_builtins(self)
        if not data["placement"]:
            del data["placement"]      # (a field added later: the hash of a spec without it stays)
        data["secrets"] = {k: v if isinstance(v, dict) else
                           "sha256:" + hashlib.sha256(b"corral.secret\x00" + v.encode()).hexdigest()
                           for k, v in data["secrets"].items()}
        return hashlib.sha256(_canonical(data)).hexdigest()[:16]

    def __repr__(self) -> str:
        spec = self.redacted()
        fields = ", ".join(f"{f}={getattr(spec, f)!r}" for f in spec.__struct_fields__)
        return f"WorkerSpec({fields})"


def check_upstream(url: str) -> None:
    """An upstream is an http(s) URL with a host, and nothing but scheme, host, port and path."""
    _check_text("upstream", url)
    try:
        parts = urlsplit(url)
        parts.port
    except ValueError as exc:
        raise ConfigError(f"upstream {url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"upstream {url!r} is not an http(s) URL with a host "
                          f"(e.g. https://api.anthropic.com or http://127.0.0.1:8080)")
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise ConfigError(f"upstream {url!r}: give scheme, host, port and path only "
                          f"(no credentials, query or fragment: put keys in secrets)")


_canonical = msgspec.json.Encoder(order="sorted").encode


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
    state_dir: str | None = None
    """where the task journal (SQLite) lives; None: no journal (tasks live only in memory).
    `corral run` defaults it to /var/lib/corral/<name> (``--state-dir``)"""
    result_retention_s: Pos = 7 * 24 * 3600.0
    """finished tasks stay in the journal this long"""
    engine_outage_s: Pos = 60.0
    """how long the engine may be unreachable before the supervisor escalates with cause
    ``engine_unavailable``; meanwhile its workers wait in ``engine_down`` and re-attach to the
    containers that survived"""
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
    """Decode a SupervisorConfig; errors name the ``$.path`` of the bad field. A secret read
    from an environment variable (``{env = "NAME"}``) that is not set is an error here, naming
    the variable."""
    try:
        if fmt == "toml":
            config = msgspec.toml.decode(data, type=SupervisorConfig)
        else:
            config = msgspec.json.decode(data, type=SupervisorConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid config: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"config is not valid {fmt.upper()}: {exc}") from None
    check_secret_env(config)
    return config


def check_secret_env(config: SupervisorConfig) -> None:
    """ConfigError naming the first secret whose environment variable is unset."""
    specs = [(f"$.workers[{i}]", w) for i, w in enumerate(config.workers)]
    specs += [(f"$.pools[{i}].worker", p.worker) for i, p in enumerate(config.pools)]
    for where, spec in specs:
        for k, v in spec.secrets.items():
            if isinstance(v, EnvSecret) and not os.environ.get(v.env):
                raise ConfigError(f"invalid config: `{where}.secrets.{k}` is read from the "
                                  f"environment variable {v.env}, which is not set (export "
                                  f"{v.env} before `corral run`)")


def load_config_file(path: str) -> SupervisorConfig:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    return load_config(data, fmt="json" if path.endswith(".json") else "toml")
