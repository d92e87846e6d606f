"""The task journal: what happened to each task, kept in SQLite so that it outlives corral.

`TaskJournal` is an embedded SQLite database (``journal.sqlite3`` under the state directory, WAL
mode). It holds, per task: the task as accepted and its target (``pool:NAME`` or ``worker:ID``),
each dispatch to a container (worker and generation), each result a container answered (attempt
results), and the final result, which is written exactly once (the first one wins). Every
database call runs in a worker thread, one at a time (a CapacityLimiter of 1 over one
connection), so trio's loop never waits for the disk.

Durability: WAL with ``synchronous=NORMAL``. A committed write survives the process being
killed (SIGKILL, a crash); a power loss may roll back the last few commits (the containers do not
survive that either).

`TaskService` ties a journal to a running supervisor: it accepts tasks (``submit``), runs them in
the background and records their final result (``result``); after a restart, ``resume`` decides
what becomes of the tasks that were not finished (see `decide`).
"""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any, AsyncIterator, Callable, Literal

import msgspec
import structlog
import trio
from msgspec import Struct, field

from .errors import ActorStopped, CorralError, NoSuchChild, SupervisorStopped
from .records import TaskResult
from .specs import Task

log = structlog.get_logger("corral.journal")

JOURNAL_FILE = "journal.sqlite3"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 10.0
"""how long a write waits for another connection's lock (another process reading the file)"""

TaskState = Literal["queued", "dispatched", "done"]

INLINE: ContextVar[bool] = ContextVar("corral_journal_inline", default=False)
"""True: the database calls run on trio's own thread instead of a worker thread. For tests under
a virtual clock only (trio's autojump clock jumps whenever every task waits, and a task waiting
for a thread is waiting: the clock would run through every timer, leases included, while the
disk works). Set it in the task that opens the supervisor (a journal opened then stays inline,
whoever calls it); the chaos kit does on FakeEngine."""


async def _off_loop(fn, *args, inline: bool = False):
    """``fn(*args)`` in a worker thread, or ``inline``."""
    if inline:
        await trio.lowlevel.checkpoint()
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args)


# -- errors -------------------------------------------------------------------------------------
class JournalError(CorralError):
    """The task journal cannot be opened, read or written (corrupt, unwritable, a newer schema);
    the message names its path."""


class UnknownTask(JournalError, LookupError):
    """No task of that id in the journal (never accepted, or expired after its retention)."""


class DuplicateTask(JournalError):
    """A task of that id was accepted already."""


class NoJournal(CorralError):
    """This supervisor keeps no task journal (no ``state_dir``): results are not kept."""


# -- records ------------------------------------------------------------------------------------
class Dispatch(Struct, frozen=True, kw_only=True):
    """The task was sent to a container: worker ``worker_id``'s container ``generation``."""
    worker_id: str
    generation: int
    at: float
    """wall-clock time (epoch seconds)"""


class Attempt(Struct, frozen=True, kw_only=True):
    """What a container answered for the task (recorded before the answer is acknowledged)."""
    worker_id: str
    generation: int
    result: TaskResult
    at: float


class TaskRecord(Struct, frozen=True, kw_only=True):
    task: Task
    """as accepted (``max_attempts`` is the task's whole budget, over restarts too)"""
    target: str
    """``pool:NAME`` or ``worker:ID``"""
    state: TaskState
    """``queued`` (accepted, never sent to a container), ``dispatched``, ``done`` (has its final
    result)"""
    dispatches: list[Dispatch] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    result: TaskResult | None = None
    """the final result (None until ``done``)"""
    accepted_at: float = 0.0
    finished_at: float | None = None

    @property
    def task_id(self) -> str:
        return self.task.task_id


_task_dec = msgspec.json.Decoder(Task)
_result_dec = msgspec.json.Decoder(TaskResult)
_enc = msgspec.json.Encoder()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id     TEXT PRIMARY KEY,
    target      TEXT NOT NULL,
    task        BLOB NOT NULL,
    accepted_at REAL NOT NULL,
    finished_at REAL,
    result      BLOB
);
CREATE INDEX IF NOT EXISTS tasks_unfinished ON tasks (accepted_at) WHERE finished_at IS NULL;
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS dispatches (
    task_id     TEXT NOT NULL,
    worker_id   TEXT NOT NULL,
    generation  INTEGER NOT NULL,
    at          REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dispatches_task ON dispatches (task_id);
CREATE TABLE IF NOT EXISTS attempts (
    task_id     TEXT NOT NULL,
    worker_id   TEXT NOT NULL,
    generation  INTEGER NOT NULL,
    at          REAL NOT NULL,
    result      BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_task ON attempts (task_id);
"""


def parse_target(target: str) -> tuple[Literal["pool", "worker"], str]:
    """``pool:NAME`` / ``worker:ID`` -> (kind, name); ConfigError otherwise."""
    from .errors import ConfigError
    kind, sep, name = target.partition(":")
    if not sep or kind not in ("pool", "worker") or not name:
        raise ConfigError(f"a task target is `pool:NAME` or `worker:ID`, not {target!r}")
    return kind, name  # type: ignore[return-value]


# -- the journal --------------------------------------------------------------------------------
class _Op:
    """One database call waiting for its turn (group commit: see `TaskJournal._run`)."""
    __slots__ = ("fn", "args", "value", "error", "done")

    def __init__(self, fn, args: tuple) -> None:
        self.fn, self.args = fn, args
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = False


class TaskJournal:
    """Open it with `open_journal`. Every method is async and runs its database work in a
    thread, one flush at a time over one connection (a CapacityLimiter of 1). Calls made while
    a flush runs are done together in the next one, in the order they were made, in one
    transaction (group commit): under load, one thread hop and one commit serve many calls."""

    def __init__(self, path: str, conn: sqlite3.Connection, *, retention_s: float,
                 clock: Callable[[], float], inline: bool = False) -> None:
        self.path = path
        self.inline = inline
        """database calls on trio's thread (`INLINE`)"""
        self.retention_s = retention_s
        self._conn: sqlite3.Connection | None = conn
        self._clock = clock
        self._limiter = trio.CapacityLimiter(1)
        self._queue: list[_Op] = []
        self._changed: dict[str, trio.Event] = {}
        """task id -> an event set at its next change in this process (dispatch, attempt,
        final result)"""

    def __repr__(self) -> str:
        return f"<TaskJournal {self.path}>"

    # -- plumbing --------------------------------------------------------------------------------
    async def _run(self, fn, *args):
        """``fn(conn, *args)`` in a thread, in a transaction; sqlite errors become JournalError
        naming the path. Cancelled while it waits for its turn, the call is dropped; once its
        flush has started, it completes (a thread is never abandoned)."""
        op = _Op(fn, args)
        self._queue.append(op)
        try:
            async with self._limiter:
                if not op.done:                 # not done by the flush before ours
                    batch, self._queue = self._queue, []
                    await _off_loop(self._flush, batch, inline=self.inline)
        except BaseException:
            if not op.done and op in self._queue:
                self._queue.remove(op)
            raise
        if op.error is not None:
            raise op.error
        return op.value

    def _flush(self, batch: list[_Op]) -> None:
        """In the thread: every call of the batch in one transaction, each in a savepoint of
        its own (a call that fails changes nothing and fails alone)."""
        conn = self._conn
        try:
            if conn is None:
                raise JournalError(f"the task journal {self.path} is closed")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for op in batch:
                    conn.execute("SAVEPOINT op")
                    try:
                        op.value = op.fn(conn, *op.args)
                    except Exception as exc:
                        op.error = exc
                        conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except Exception as exc:                # the transaction failed: every call of it did
            for op in batch:
                if not isinstance(op.error, sqlite3.Error):    # (keep a call's own cause)
                    op.error, op.value = exc, None
        for op in batch:
            if isinstance(op.error, sqlite3.Error):
                op.error = _journal_error(self.path, op.error)
            op.done = True

    def _notify(self, task_id: str) -> None:
        ev = self._changed.pop(task_id, None)
        if ev is not None:
            ev.set()

    # -- writes ----------------------------------------------------------------------------------
    async def accepted(self, task: Task, target: str) -> None:
        """Record a task accepted for ``target`` (``pool:NAME`` / ``worker:ID``). DuplicateTask
        if its id is in the journal already."""
        parse_target(target)
        data, now = _enc.encode(task), self._clock()

        def write(conn: sqlite3.Connection) -> None:
            try:
                conn.execute("INSERT INTO tasks (task_id, target, task, accepted_at) VALUES (?, ?, ?, ?)",
                             (task.task_id, target, data, now))
            except sqlite3.IntegrityError:
                raise DuplicateTask(f"task {task.task_id!r} is in the journal {self.path} already "
                                    f"(task ids are unique)") from None
        await self._run(write)

    async def dispatched(self, task_id: str, worker_id: str, generation: int) -> bool:
        """Record that the task is being sent to ``worker_id``'s container ``generation``.
        False (nothing recorded) for a task that is not in the journal or has its result."""
        now = self._clock()

        def write(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT INTO dispatches (task_id, worker_id, generation, at) SELECT ?, ?, ?, ? "
                "WHERE EXISTS (SELECT 1 FROM tasks WHERE task_id = ? AND finished_at IS NULL)",
                (task_id, worker_id, generation, now, task_id))
            return cur.rowcount == 1
        done = await self._run(write)
        if done:
            self._notify(task_id)
        return done

    async def attempt_done(self, task_id: str, worker_id: str, generation: int,
                           result: TaskResult) -> bool:
        """Record what ``worker_id``'s container ``generation`` answered for the task (before the
        answer is acknowledged to the wrapper). False for a task that is not in the journal, and
        for an answer of that container that is recorded already: a wrapper replays the answers
        it has not had acknowledged to the supervisor that adopts it, also those that a killed
        corral process had recorded."""
        data, now = _enc.encode(result), self._clock()

        def write(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT INTO attempts (task_id, worker_id, generation, at, result) "
                "SELECT ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM tasks WHERE task_id = ?) "
                "AND NOT EXISTS (SELECT 1 FROM attempts WHERE task_id = ? AND worker_id = ? "
                "AND generation = ?)",
                (task_id, worker_id, generation, now, data, task_id, task_id, worker_id, generation))
            return cur.rowcount == 1
        done = await self._run(write)
        if done:
            self._notify(task_id)
        return done

    async def finished(self, result: TaskResult) -> bool:
        """Record the task's final result. The first one wins: False if it had one already.
        UnknownTask if the task is not in the journal."""
        data, now, tid = _enc.encode(result), self._clock(), result.task_id

        def write(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("UPDATE tasks SET result = ?, finished_at = ? "
                               "WHERE task_id = ? AND finished_at IS NULL", (data, now, tid))
            if cur.rowcount == 1:
                return True
            if conn.execute("SELECT 1 FROM tasks WHERE task_id = ?", (tid,)).fetchone() is None:
                raise self._unknown(tid)
            return False
        first = await self._run(write)
        if first:
            self._notify(tid)
        return first

    async def expire(self, now: float | None = None) -> int:
        """Drop the finished tasks older than the retention; returns how many."""
        cutoff = (self._clock() if now is None else now) - self.retention_s

        def write(conn: sqlite3.Connection) -> int:
            old = "SELECT task_id FROM tasks WHERE finished_at IS NOT NULL AND finished_at < ?"
            conn.execute(f"DELETE FROM dispatches WHERE task_id IN ({old})", (cutoff,))
            conn.execute(f"DELETE FROM attempts WHERE task_id IN ({old})", (cutoff,))
            return conn.execute("DELETE FROM tasks WHERE finished_at IS NOT NULL "
                                "AND finished_at < ?", (cutoff,)).rowcount
        n = await self._run(write)
        if n:
            log.info("journal_expired", tasks=n, retention_s=self.retention_s)
        return n

    # -- reads -----------------------------------------------------------------------------------
    async def get(self, task_id: str) -> TaskRecord | None:
        def read(conn: sqlite3.Connection) -> TaskRecord | None:
            row = conn.execute("SELECT task_id, target, task, accepted_at, finished_at, result "
                               "FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            if row is None:
                return None
            return self._records(conn, [row], "task_id = ?", (task_id,))[0]
        return await self._run(read)

    async def wait(self, task_id: str) -> TaskRecord:
        """The record, once it has its final result. Wakes when `finished` records it in this
        process (no polling). UnknownTask for an id that is not in the journal."""
        return await self.wait_until(task_id, lambda r: r.result is not None)

    async def wait_until(self, task_id: str, predicate: Callable[[TaskRecord], bool]) -> TaskRecord:
        """The record, once ``predicate(record)`` holds; checked at each change made in this
        process (dispatch, attempt result, final result)."""
        while True:
            ev = self._changed.get(task_id)
            if ev is None:
                ev = self._changed[task_id] = trio.Event()
            rec = await self.get(task_id)
            if rec is None:
                raise self._unknown(task_id)
            if predicate(rec):
                return rec
            await ev.wait()

    async def unfinished(self) -> list[TaskRecord]:
        """Every task without a final result, oldest first."""
        def read(conn: sqlite3.Connection) -> list[TaskRecord]:
            rows = conn.execute("SELECT task_id, target, task, accepted_at, finished_at, result "
                                "FROM tasks WHERE finished_at IS NULL "
                                "ORDER BY accepted_at, rowid").fetchall()
            sub = "task_id IN (SELECT task_id FROM tasks WHERE finished_at IS NULL)"
            return self._records(conn, rows, sub, ())
        return await self._run(read)

    async def counts(self) -> dict[str, int]:
        """Tasks in the journal by state."""
        def read(conn: sqlite3.Connection) -> dict[str, int]:
            done, = conn.execute("SELECT count(*) FROM tasks WHERE finished_at IS NOT NULL").fetchone()
            disp, = conn.execute("SELECT count(*) FROM tasks WHERE finished_at IS NULL AND task_id "
                                 "IN (SELECT task_id FROM dispatches)").fetchone()
            total, = conn.execute("SELECT count(*) FROM tasks").fetchone()
            return {"queued": total - done - disp, "dispatched": disp, "done": done}
        return await self._run(read)

    def _records(self, conn: sqlite3.Connection, rows, where: str, args: tuple) -> list[TaskRecord]:
        disp: dict[str, list[Dispatch]] = {}
        for tid, wid, gen, at in conn.execute(
                f"SELECT task_id, worker_id, generation, at FROM dispatches WHERE {where} "
                f"ORDER BY rowid", args):
            disp.setdefault(tid, []).append(Dispatch(worker_id=wid, generation=gen, at=at))
        atts: dict[str, list[Attempt]] = {}
        for tid, wid, gen, at, data in conn.execute(
                f"SELECT task_id, worker_id, generation, at, result FROM attempts WHERE {where} "
                f"ORDER BY rowid", args):
            atts.setdefault(tid, []).append(Attempt(worker_id=wid, generation=gen, at=at,
                                                    result=self._decode(_result_dec, data, tid)))
        out = []
        for tid, target, task, accepted_at, finished_at, result in rows:
            d = disp.get(tid, [])
            out.append(TaskRecord(
                task=self._decode(_task_dec, task, tid), target=target,
                state="done" if finished_at is not None else ("dispatched" if d else "queued"),
                dispatches=d, attempts=atts.get(tid, []),
                result=None if result is None else self._decode(_result_dec, result, tid),
                accepted_at=accepted_at, finished_at=finished_at))
        return out

    def _decode(self, dec: msgspec.json.Decoder, data: bytes, tid: str):
        try:
            return dec.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise JournalError(f"the task journal {self.path} holds an unreadable record of task "
                               f"{tid!r}: {exc}") from None

    def _unknown(self, task_id: str) -> UnknownTask:
        return UnknownTask(f"no task {task_id!r} in the journal {self.path} (never accepted, or "
                           f"expired: finished tasks are kept {_duration(self.retention_s)})")

    async def aclose(self) -> None:
        """Close the connection (after the calls already made), checkpointing the WAL into the
        database file."""
        conn = self._conn
        if conn is None:
            return

        def close() -> None:
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("journal_checkpoint_failed", path=self.path, error=str(exc))
            finally:
                conn.close()
        with trio.CancelScope(shield=True):
            async with self._limiter:
                self._conn = None
                await _off_loop(close, inline=self.inline)


def _duration(s: float) -> str:
    for unit, n in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if s >= n:
            return f"{s / n:g} {unit}"
    return f"{s:g} s"


def _journal_error(path: str, exc: sqlite3.Error) -> JournalError:
    text = str(exc)
    if isinstance(exc, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text):
        return JournalError(f"the task journal {path} is corrupt ({text}); move it aside to "
                            f"start with an empty journal")
    if "readonly" in text or "unable to open" in text or "disk I/O error" in text:
        return JournalError(f"the task journal {path} cannot be written ({text}): check the "
                            f"permissions of its directory and files, and free space")
    return JournalError(f"the task journal {path}: {text}")


def _open_sync(state_dir: str) -> tuple[str, sqlite3.Connection]:
    """Create the state directory (0700) and the database file (0600), open it, set it up."""
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise JournalError(f"cannot create the state directory {state_dir} for the task "
                           f"journal: {exc.strerror or exc}") from None
    path = os.path.join(state_dir, JOURNAL_FILE)
    try:
        # created 0600 here, so that SQLite's -wal and -shm files (which copy the database
        # file's mode) are private too: prompts and outputs are in there
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        raise JournalError(f"cannot open the task journal {path}: {exc.strerror or exc}") from None
    conn = None
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)
        version, = conn.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise JournalError(f"the task journal {path} was written by a newer corral (schema "
                               f"{version}; this one knows {SCHEMA_VERSION})")
        mode, = conn.execute("PRAGMA journal_mode=WAL").fetchone()
        if mode.lower() != "wal":
            raise JournalError(f"the task journal {path} cannot use WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("PRAGMA quick_check(1)").fetchone()
    except sqlite3.Error as exc:
        if conn is not None:
            conn.close()
        raise _journal_error(path, exc) from None
    except BaseException:
        if conn is not None:
            conn.close()
        raise
    return path, conn


@asynccontextmanager
async def open_journal(state_dir: str, *, retention_s: float = 7 * 24 * 3600.0,
                       clock: Callable[[], float] = time.time) -> AsyncIterator[TaskJournal]:
    """Open (or create) the task journal under ``state_dir`` for the block. JournalError (a
    CorralError naming the path) if it cannot be created, opened or is corrupt. ``clock``: wall
    clock for the records' times and for retention (tests pass their own)."""
    inline = INLINE.get()
    path, conn = await _off_loop(_open_sync, os.path.abspath(state_dir), inline=inline)
    journal = TaskJournal(path, conn, retention_s=retention_s, clock=clock, inline=inline)
    log.info("journal_opened", path=path)
    try:
        yield journal
    finally:
        await journal.aclose()


# -- what becomes of an unfinished task after a restart (pure) -----------------------------------
class Requeue(Struct, frozen=True, kw_only=True):
    """Submit it again with ``max_attempts`` attempts left."""
    max_attempts: int


class Finish(Struct, frozen=True, kw_only=True):
    result: TaskResult
    why: Literal["answered", "lost"] = "answered"
    """``answered``: a container's answer; ``lost``: its container was gone, no attempts left"""


class Continue(Struct, frozen=True, kw_only=True):
    """Its container survived and carries it: wait for that attempt's result."""
    worker_id: str
    generation: int


Decision = Requeue | Finish | Continue


def decide(rec: TaskRecord, carried: bool) -> Decision:
    """After a restart: what becomes of an unfinished task. ``carried``: the worker of its last
    dispatch exists now and its (adopted) container is running it or will replay its result."""
    task = rec.task
    if not rec.dispatches:
        return Requeue(max_attempts=task.max_attempts)
    last = rec.dispatches[-1]
    attempt = next((a for a in reversed(rec.attempts)
                    if (a.worker_id, a.generation) == (last.worker_id, last.generation)), None)
    if attempt is not None:
        return after_attempt(rec, attempt.result)
    if carried:
        return Continue(worker_id=last.worker_id, generation=last.generation)
    n = len(rec.dispatches)
    if n < task.max_attempts:
        return Requeue(max_attempts=task.max_attempts - n)
    return Finish(why="lost", result=TaskResult(
        task_id=task.task_id, status="worker_died", attempts=n, worker_id=last.worker_id,
        error=f"corral restarted and the container running the task (worker {last.worker_id}, "
              f"generation {last.generation}) was gone; max_attempts={task.max_attempts} spent"))


def after_attempt(rec: TaskRecord, result: TaskResult) -> Requeue | Finish:
    """An attempt's result is the task's final one unless its container died under it and it
    has attempts left."""
    n = len(rec.dispatches)
    if result.status != "worker_died" or n >= rec.task.max_attempts:
        return Finish(result=msgspec.structs.replace(result, attempts=max(n, result.attempts)))
    return Requeue(max_attempts=rec.task.max_attempts - n)


class ResumeSummary(Struct, frozen=True, kw_only=True):
    requeued: int = 0
    """never sent to a container: submitted again"""
    continued: int = 0
    """carried by an adopted container: its result is awaited"""
    finalized: int = 0
    """a container had answered before the restart: that answer is the final result"""
    retried: int = 0
    """lost with attempts left (its container gone, or it died under it): submitted again"""
    lost: int = 0
    """lost with no attempts left: finished ``worker_died``"""


# -- the service --------------------------------------------------------------------------------
class _Live:
    """A task this process drives: how to cancel it, and when it has ended here."""
    __slots__ = ("scope", "ended")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.ended = trio.Event()


class TaskService:
    """Durable tasks on a running supervisor (what `open_supervisor` yields as ``.tasks`` when
    the config has a ``state_dir``). Open it with `open_task_service`."""

    def __init__(self, sup, journal: TaskJournal, *, expire_every_s: float | None = None) -> None:
        self._sup = sup
        self.journal = journal
        self.expire_every_s = expire_every_s if expire_every_s is not None else \
            min(3600.0, max(1.0, journal.retention_s / 10))
        self._nursery: trio.Nursery | None = None
        self._live: dict[str, _Live] = {}
        """tasks this process drives, by id (resume leaves them alone)"""
        self._client_cancelled: set[str] = set()
        self._closing = False
        self._backlog: list[TaskRecord] = []
        """the tasks unfinished when the service started (what `resume` takes care of)"""
        self._resume_started = False
        self._resumed = trio.Event()
        self._summary: ResumeSummary | None = None

    # -- public -----------------------------------------------------------------------------------
    async def submit(self, target: str, task: Task) -> str:
        """Accept ``task`` for ``target`` (``pool:NAME`` / ``worker:ID``): recorded, then run in
        the background; returns its id at once. NoSuchChild (nothing recorded) for an unknown
        target; DuplicateTask for an id already in the journal."""
        self._check_open()
        kind, name = parse_target(target)
        await self._sup.wait_configured()
        self._check_open()
        self._resolve(kind, name)                     # NoSuchChild: nothing recorded
        tid = task.task_id
        if tid in self._live:
            raise DuplicateTask(f"task {tid!r} is running already (task ids are unique)")
        live = self._live[tid] = _Live()
        try:
            await self.journal.accepted(task, target)
        except BaseException:
            self._live.pop(tid, None)
            raise
        log.debug("task_accepted", task_id=tid, target=target)
        self._start(self._drive, task, target, 0, task.max_attempts, live)
        return tid

    async def result(self, task_id: str, *, wait: bool = False) -> TaskRecord:
        """The task's record; with ``wait``, once it has its final result. UnknownTask for an id
        that is not in the journal."""
        if wait:
            live = self._live.get(task_id)
            if live is not None:          # driven here: its end is known without reading
                await live.ended.wait()
            return await self.journal.wait(task_id)
        rec = await self.journal.get(task_id)
        if rec is None:
            raise self.journal._unknown(task_id)
        return rec

    def cancel(self, task_id: str) -> bool:
        """Its client gave up: take the task out of its queue or cancel it in its container; it
        ends ``cancelled``. False if this process does not drive it."""
        live = self._live.get(task_id)
        if live is None:
            return False
        self._client_cancelled.add(task_id)
        live.scope.cancel()
        return True

    async def resume(self) -> ResumeSummary:
        """Once, after a restart, when the configured tree is up (and live containers were
        adopted): decide what becomes of each task that was unfinished when the service started
        (see `decide`), start that, and return how many went which way. Continued tasks finish
        in the background; tasks submitted since the start are not touched."""
        if self._resume_started:
            await self._resumed.wait()
            assert self._summary is not None
            return self._summary
        self._resume_started = True
        counts = dict.fromkeys(ResumeSummary.__struct_fields__, 0)
        backlog, self._backlog = self._backlog, []
        try:
            for rec in backlog:
                tid = rec.task_id
                if tid in self._live or self._closing:
                    continue                  # accepted by this process: already driven
                carried = False
                if rec.dispatches:
                    carried = self._carries(rec.dispatches[-1].worker_id, tid)
                d = decide(rec, carried)
                match d:
                    case Requeue(max_attempts=left):
                        counts["retried" if rec.dispatches else "requeued"] += 1
                        live = self._live[tid] = _Live()
                        self._start(self._drive, rec.task, rec.target, len(rec.dispatches), left, live)
                    case Continue():
                        counts["continued"] += 1
                        live = self._live[tid] = _Live()
                        self._start(self._continue, rec, d, live)
                    case Finish(result=res, why=why):
                        counts["finalized" if why == "answered" else "lost"] += 1
                        await self._finish(res, how="finalized" if why == "answered" else "lost")
            self._summary = ResumeSummary(**counts)
        finally:
            if self._summary is None:
                self._summary = ResumeSummary(**counts)
            self._resumed.set()
        log.info("tasks_resumed", **msgspec.structs.asdict(self._summary))
        return self._summary

    async def wait_resumed(self) -> ResumeSummary:
        """Wait until `resume` has decided every unfinished task; its summary."""
        await self._resumed.wait()
        assert self._summary is not None
        return self._summary

    def close(self) -> None:
        """corral is stopping: take no more tasks, and record no result that the stop itself
        brings about (a queued task answered "cancelled", a running one "worker_died"): those
        tasks stay unfinished in the journal and are resumed at the next start."""
        self._closing = True

    def statistics(self) -> dict[str, int]:
        return {"running": len(self._live)}

    # -- the service's own tasks ------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        structlog.contextvars.bind_contextvars(actor="tasks")
        self._backlog = await self.journal.unfinished()   # before any new task is accepted
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._expire_loop)
            task_status.started(self)
            await trio.sleep_forever()

    async def _expire_loop(self) -> None:
        while True:
            try:
                await self.journal.expire()
            except JournalError as exc:
                log.error("journal_expire_failed", error=str(exc))
            await trio.sleep(self.expire_every_s)

    def _start(self, fn, *args) -> None:
        if self._nursery is None:
            raise CorralError("the task service is not running")
        self._nursery.start_soon(fn, *args)

    def _check_open(self) -> None:
        if self._closing or self._nursery is None:
            raise SupervisorStopped("corral is shutting down: it takes no more tasks")

    def _resolve(self, kind: str, name: str):
        return self._sup.pool(name) if kind == "pool" else self._sup.worker(name)

    def _carries(self, worker_id: str, task_id: str) -> bool:
        try:
            w = self._sup.worker(worker_id)
        except NoSuchChild:
            return False
        carries = getattr(w, "carries", None)
        return bool(carries(task_id)) if carries is not None else False

    async def _stopping(self) -> bool:
        """Is corral stopping (or has the supervisor escalated)? Then "cancelled" and
        "worker_died" answers are the stop's doing, not the task's result."""
        if self._closing:
            return True
        try:
            return (await self._sup.snapshot()).state != "running"
        except CorralError:
            return True

    async def _finish(self, result: TaskResult, *, how: str) -> None:
        try:
            first = await self.journal.finished(result)
        except JournalError as exc:
            log.error("journal_write_failed", task_id=result.task_id, error=str(exc))
            return
        if first:
            log.debug("task_finished", task_id=result.task_id, status=result.status,
                     attempts=result.attempts, how=how)

    async def _drive(self, task: Task, target: str, prior: int, attempts_left: int,
                     live: _Live) -> None:
        """Run the task on its target with ``attempts_left`` attempts; record its final result
        (its ``attempts`` counting the ``prior`` dispatches before a restart)."""
        tid = task.task_id
        res: TaskResult | None = None
        scope = live.scope
        try:
            with scope:
                kind, name = parse_target(target)
                run_task = msgspec.structs.replace(task, max_attempts=attempts_left)
                try:
                    res = await self._resolve(kind, name).run(run_task)
                except (ActorStopped, NoSuchChild) as exc:
                    if not await self._stopping():
                        res = TaskResult(task_id=tid, status="cancelled", attempts=prior,
                                         error=f"{type(exc).__name__}: {exc}")
                except CorralError as exc:
                    res = TaskResult(task_id=tid, status="error", attempts=prior,
                                     error=f"{type(exc).__name__}: {exc}")
                except Exception as exc:    # a bug must not take the supervisor down
                    log.exception("task_run_failed", task_id=tid)
                    res = TaskResult(task_id=tid, status="error", attempts=prior,
                                     error=f"internal error: {type(exc).__name__}: {exc}")
                else:
                    if res.status in ("cancelled", "worker_died") and await self._stopping():
                        res = None
                    elif prior:
                        res = msgspec.structs.replace(res, attempts=prior + res.attempts)
            if scope.cancelled_caught and tid in self._client_cancelled:
                res = TaskResult(task_id=tid, status="cancelled", attempts=prior,
                                 error="cancelled: its client gave up on it")
            if res is not None:
                await self._finish(res, how="ran")
            else:
                log.info("task_left_unfinished", task_id=tid, why="corral is stopping")
        finally:
            self._ended(tid, live)

    def _ended(self, tid: str, live: _Live) -> None:
        if self._live.get(tid) is live:
            del self._live[tid]
        self._client_cancelled.discard(tid)
        live.ended.set()

    async def _continue(self, rec: TaskRecord, d: Continue, live: _Live) -> None:
        """Its adopted container carries the task: wait for its answer (the worker records it
        with `attempt_done`); if the container goes without answering, the task was lost."""
        tid = rec.task_id
        key = (d.worker_id, d.generation)

        def answered(r: TaskRecord) -> bool:
            return r.result is not None or any((a.worker_id, a.generation) == key for a in r.attempts)

        outcome: Decision | None = None
        fresh: TaskRecord | None = None
        try:
            with live.scope:
                async with trio.open_nursery() as n:
                    async def watch_worker() -> None:
                        try:
                            w = self._sup.worker(d.worker_id)
                            await w.wait_until(lambda _: not self._carries(d.worker_id, tid))
                        except (NoSuchChild, ActorStopped):
                            pass
                        n.cancel_scope.cancel()
                    n.start_soon(watch_worker)
                    await self.journal.wait_until(tid, answered)
                    n.cancel_scope.cancel()
                fresh = await self.journal.get(tid)
                if fresh is None or fresh.result is not None:
                    return
                if answered(fresh):
                    attempt = next(a for a in reversed(fresh.attempts)
                                   if (a.worker_id, a.generation) == key)
                    outcome = after_attempt(fresh, attempt.result)
                elif not await self._stopping():
                    outcome = decide(fresh, carried=False)
                    log.info("carried_task_lost", task_id=tid, worker_id=d.worker_id,
                             generation=d.generation)
            match outcome:
                case Finish(result=res):
                    await self._finish(res, how="continued")
                case Requeue(max_attempts=left) if fresh is not None and not self._closing:
                    live.scope = trio.CancelScope()
                    await self._drive(rec.task, rec.target, len(fresh.dispatches), left, live)
                case _:
                    pass
        finally:
            self._ended(tid, live)


@asynccontextmanager
async def open_task_service(sup, journal: TaskJournal, *,
                            expire_every_s: float | None = None) -> AsyncIterator[TaskService]:
    """A TaskService over a supervisor handle, for the block. Leaving it cancels the tasks it
    drives without recording a result for them (they stay unfinished: see `TaskService.close`)."""
    service = TaskService(sup, journal, expire_every_s=expire_every_s)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        try:
            yield service
        finally:
            service.close()
            nursery.cancel_scope.cancel()
