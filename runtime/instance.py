"""One instance per supervisor name per engine, enforced when a supervisor starts.

Two guards, both taken by `open_supervisor()` before it touches any container:

1. An advisory lock (``flock``) on a file named by the engine and the supervisor name, holding the
   owner's pid. It dies with the process, so a crashed corral never leaves a stale lock. The file
   lives in ``$CORRAL_LOCK_DIR``, else ``/run/corral`` (root), else ``$XDG_RUNTIME_DIR/corral``,
   else ``/tmp/corral-<uid>``. An in-memory engine (FakeEngine) is locked in memory, per engine.
2. With the lock held, the previous instance of this name is gone: the containers it left that
   still run are adopted by the new instance's workers of the same id (``claim_engine`` returns
   them); the newest container of a worker that died meanwhile is returned too, for its worker to
   certify its death (and record the results it wrote) before removing it; the rest (older
   generations, containers never started) are removed. (The lock is per host: two hosts must
   not run the same supervisor name against one engine.)
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import stat
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Iterator

import structlog

from .engines import ContainerSummary, Engine
from .errors import ConfigError, ContainerNotFound, CorralError, RemovalInProgress

log = structlog.get_logger("corral.instance")

LIVE_STATES = frozenset({"running", "restarting", "paused"})
"""container states that mean "someone is still using this supervisor name\""""


DEAD_STATES = frozenset({"exited", "dead"})
"""container states of a container that ran and ended"""


class AlreadyRunning(CorralError):
    """Another corral instance runs a supervisor of this name on this engine."""


def lock_dir() -> str:
    d = os.environ.get("CORRAL_LOCK_DIR")
    if d:
        return d
    if os.geteuid() == 0:
        return "/run/corral"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "corral")
    return os.path.join(tempfile.gettempdir(), f"corral-{os.geteuid()}")


def engine_key(url: str) -> str:
    """One engine reached by two spellings of its local socket path is still one engine."""
    if url.startswith("unix://"):
        return "unix://" + os.path.realpath(url[len("unix://"):])
    return url


def lock_path(engine_url: str, name: str, directory: str | None = None) -> str:
    digest = hashlib.sha256(engine_key(engine_url).encode()).hexdigest()[:12]
    return os.path.join(directory or lock_dir(), f"{name}@{digest}.lock")


def _ensure_dir(d: str) -> None:
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        st = os.lstat(d)
    except OSError as exc:
        raise ConfigError(f"cannot create the lock directory {d}: {exc.strerror} "
                          f"(set CORRAL_LOCK_DIR to a writable directory)") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (os.geteuid(), 0):
        raise ConfigError(f"the lock directory {d} is not a directory owned by this user or root "
                          f"(set CORRAL_LOCK_DIR)")


def _holder(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096) or b"{}")
    except (OSError, ValueError):
        return {}


class InstanceLock:
    """A held lock; `release()` (or process exit) frees it."""

    def __init__(self, path: str, fd: int | None) -> None:
        self.path = path
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)   # while still holding it: a waiter re-checks the inode
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def acquire_file_lock(engine_url: str, name: str, *, directory: str | None = None) -> InstanceLock:
    """Take the lock of supervisor ``name`` on the engine at ``engine_url``, or raise
    AlreadyRunning naming the process that holds it."""
    d = directory or lock_dir()
    _ensure_dir(d)
    path = lock_path(engine_url, name, d)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot open the lock file {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(f"cannot lock {path}: {exc.strerror}") from None
            raise AlreadyRunning(
                f"supervisor {name!r} is already running on engine {engine_url}: "
                f"pid {holder.get('pid', '?')} holds {path}; stop it first (SIGTERM), or use "
                f"another supervisor name") from None
        try:   # released (and unlinked) between our open and our flock: lock the new file
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "supervisor": name, "engine": engine_url,
                                 "since": time.time()}).encode() + b"\n")
        return InstanceLock(path, fd)


_in_memory: dict[tuple[int, str], int] = {}


def _is_local_engine(engine: Engine) -> bool:
    url = getattr(engine, "url", "") or ""
    return url.startswith(("unix://", "tcp://", "http://", "https://", "ssh://", "npipe://"))


@contextmanager
def hold_instance(engine: Engine, name: str) -> Iterator[None]:
    """Hold the instance lock of supervisor ``name`` on ``engine`` for the block."""
    if not _is_local_engine(engine):        # an in-memory engine: lock per engine object
        key = (id(engine), name)
        if key in _in_memory:
            raise AlreadyRunning(f"supervisor {name!r} is already running on engine "
                                 f"{getattr(engine, 'url', engine)!s} (in this process)")
        _in_memory[key] = os.getpid()
        try:
            yield
        finally:
            _in_memory.pop(key, None)
        return
    lock = acquire_file_lock(engine.url, name)
    try:
        yield
    finally:
        lock.release()


async def claim_engine(engine: Engine, name: str) -> dict[str, ContainerSummary]:
    """With the lock held, survey the containers of supervisor ``name`` and return, by worker
    id, the one each worker takes over: its running container (the newest generation), to be
    adopted, or else its newest container that ended while no corral process was attached, to
    be certified and removed by the worker (runtime.instance: ``DEAD_STATES``). The others
    (older generations, containers created but never started, unlabelled ones) are removed."""
    found = await engine.container_list(labels={"corral.supervisor": name})
    claimed: dict[str, ContainerSummary] = {}
    doomed: list[ContainerSummary] = []
    newest: dict[str, int] = {}
    for c in found:
        wid = c.labels.get("corral.worker")
        if wid:
            newest[wid] = max(newest.get(wid, 0), _generation(c))
    for c in found:
        wid = c.labels.get("corral.worker")
        if not wid or (c.status not in LIVE_STATES and c.status not in DEAD_STATES) \
                or (c.status in DEAD_STATES and _generation(c) < newest[wid]):
            # (an ended container with a newer one beside it was certified by the process
            # that made the newer one, which could not remove it)
            doomed.append(c)
            continue
        other = claimed.get(wid)
        if other is None or _rank(c) > _rank(other):
            if other is not None:
                doomed.append(other)
            claimed[wid] = c
        else:
            doomed.append(c)
    for c in doomed:
        try:
            await engine.container_remove(c.id, force=True)
            log.info("stale_container_removed", supervisor=name, name=c.name, state=c.status)
        except (ContainerNotFound, RemovalInProgress):
            pass
    if claimed:
        live = sorted(w for w, c in claimed.items() if c.status in LIVE_STATES)
        log.info("containers_to_adopt", supervisor=name, count=len(live), workers=live[:20],
                 dead=sorted(set(claimed) - set(live))[:20])
    return claimed


def _rank(c: ContainerSummary) -> tuple[bool, int]:
    return c.status in LIVE_STATES, _generation(c)


def _generation(c: ContainerSummary) -> int:
    try:
        return int(c.labels.get("corral.generation", "0"))
    except ValueError:
        return 0
