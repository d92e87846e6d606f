"""The task book: what happens to a task. Queued while the worker is busy or restarting, one
running at a time, ended by corral's own deadline if the wrapper does not end it, and caught
in a container's death: redelivered while it has attempts left (``Task.max_attempts``), else
it fails "worker_died" with the certificate (at-most-once by default). A task whose every
attempt killed its container is a poison task: it fails alone, marked ``poison``, and its
deaths count against no restart budget or intensity.

Agent-level outcomes (``TaskResult.failure``): a task also ends early, answered at once while
the wrapper kills its agent (never the container), when the model gateway sees its upstream
fail (auth_failed, rate_limited, upstream_error, upstream_unreachable) or when it makes no
progress (no agent output, no model traffic) for the stall timeout (``stalled``). Usage: the
gateway's token counts (what the model API itself reported) are preferred to the agent's own;
the cost comes from the agent (the gateway sees no prices)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
import trio

import msgspec

from runtime import events
from runtime.errors import CorralError
from runtime.messages import reply_value
from runtime.protocol import AgentUsage, CancelTask, Ready, RunTask, TaskDone, encode_frame
from runtime.records import FAILURES, TASK_CAUSES, DeathCertificate, TaskResult, TokenUsage
from runtime.specs import Task

if TYPE_CHECKING:
    from .life import _Life

log = structlog.get_logger("corral.worker")


@dataclass(slots=True)
class _Pending:
    task: Task
    reply: Any
    attempts: int = 0
    started_at: float = 0.0
    cancel_requested: bool = False
    """its caller gave up on it (a "cancelled" answer is then its result)"""
    charged_deaths: int = 0
    """deaths of a container while it ran this task, of a cause the task may have brought about"""
    released: trio.Event | None = None
    """ended by corral (deadline, upstream failure, stall): set once the wrapper reports the
    task done after all"""
    last_output: float = 0.0
    """when the agent last printed something (task_output)"""
    gateway_failure: Any = None
    """the first UpstreamFailed the gateway saw while this task ran"""
    gw_input: int = 0
    gw_output: int = 0
    gw_seen: bool = False
    """token usage that crossed the gateway while this task ran"""
    frame: bytes | None = None
    """its run_task frame as sent (sent again if it was lost on the way)"""
    hellos_before: int = 0
    """how many ``hello`` frames its container's life had sent when its run_task was written"""
    recorded: bool = False
    carried: bool = False
    """running in an adopted container when this corral process found it: nobody here waits
    for it; its result goes to the journal (where a TaskService waits for it)"""


class TaskBook:
    """The Worker's task concern (state: ``_pending``, ``_current``, ``_draining``)."""

    def _end_all_tasks(self, why: str, death: DeathCertificate | None) -> None:
        """The worker ends: every task it holds gets its result ("worker_died" with the last
        certificate when it failed, else "cancelled")."""
        for p in [q for q in (self._current, self._draining) if q is not None] + list(self._pending):
            if death is not None:
                self._answer(p, TaskResult(task_id=p.task.task_id, status="worker_died",
                                           error=why, attempts=p.attempts, worker_id=self.id,
                                           death=death))
            else:
                self._answer(p, TaskResult(task_id=p.task.task_id, status="cancelled",
                                           error=why, attempts=p.attempts, worker_id=self.id))
        self._current = self._draining = None
        self._pending.clear()

    # -- answers and usage ----------------------------------------------------------------------
    def _answer(self, p: _Pending, result: TaskResult, agent_usage: AgentUsage | None = None) -> None:
        """Reply to the task's caller (once: a draining task was answered already), with its
        usage, which is added to the worker's totals."""
        usage = self._task_usage(p, agent_usage)
        p.gw_input = p.gw_output = 0
        p.gw_seen = False
        if usage is not None:
            self.usage_totals = self.usage_totals + usage
            result = msgspec.structs.replace(result, usage=usage)
        reply_value(p.reply, result)
        if p.carried and not p.recorded:
            p.recorded = True
            self._record_carried(result)

    def _record_carried(self, result: TaskResult) -> None:
        """The result of a task this process found running (an adopted container), when it
        came otherwise than by a task_done (the container died, or was drained)."""
        log.info("adopted_task_result", task_id=result.task_id, status=result.status)
        if self.journal is not None and self._nursery is not None:
            gen = self._life.generation if self._life is not None else self.generation
            self._nursery.start_soon(self._journal_call, self.journal.attempt_done, result.task_id,
                                     self.id, gen, result)

    async def _journal_call(self, fn, *args) -> None:
        """A journal write; a journal that fails (disk full, corrupt) fails the record, never
        the worker (the task's caller still gets its answer)."""
        try:
            await fn(*args)
        except CorralError as exc:
            log.error("journal_write_failed", error=str(exc), call=fn.__name__)

    def _resumed(self, life: _Life, frame: Ready) -> None:
        """A wrapper this process did not start said where it is (``ready`` answering
        ``hello``): the task it runs is carried on (the worker is busy with it), and the
        results it replays are recorded when they come. A re-attach to a container this process
        knows already changes nothing."""
        if not life.adopted or life.ready:
            return
        ids = ([frame.running] if frame.running else []) + list(frame.replay)
        self._carried.update(ids)
        if frame.running and self._current is None:
            try:
                task = Task(prompt="(adopted)", task_id=frame.running)
            except (ValueError, msgspec.ValidationError) as exc:
                log.warning("adopted_task_invalid", error=str(exc))
                return
            now = trio.current_time()
            self._current = _Pending(task, None, attempts=1, started_at=now, last_output=now,
                                     carried=True)
        log.info("adopted_tasks", running=frame.running, replay=list(frame.replay))

    @staticmethod
    def _task_usage(p: _Pending, agent: AgentUsage | None) -> TokenUsage | None:
        cost = agent.cost_usd if agent is not None else None
        if p.gw_seen:
            return TokenUsage(input_tokens=p.gw_input, output_tokens=p.gw_output, cost_usd=cost,
                              source="gateway")
        if agent is not None:
            return TokenUsage(input_tokens=agent.input_tokens, output_tokens=agent.output_tokens,
                              cost_usd=cost, source="agent")
        return None

    def _count_gateway_usage(self, usage) -> None:
        """An exchange's usage (runtime.gateway.Usage): the running task's, or straight into the
        totals when no unanswered task is running."""
        p = self._current
        if p is not None:
            p.gw_input += usage.input_tokens
            p.gw_output += usage.output_tokens
            p.gw_seen = True
        else:
            self.usage_totals = self.usage_totals + TokenUsage(
                input_tokens=usage.input_tokens, output_tokens=usage.output_tokens)

    async def _dispatch(self) -> None:
        life = self._life
        while True:
            if self._current is not None or self._draining is not None or not self._pending \
                    or life is None or not life.ready or life.ended.is_set() or self.state != "ready":
                return
            p = self._pending.pop(0)
            p.attempts += 1
            p.started_at = trio.current_time()
            t = p.task
            try:
                data = encode_frame(RunTask(task_id=t.task_id, prompt=t.prompt, args=t.args,
                                            timeout_s=t.timeout_s, max_output_bytes=t.max_output_bytes))
            except (UnicodeError, ValueError, TypeError) as exc:
                # Task validates itself when built; whatever slips past fails alone, here
                reply_value(p.reply, TaskResult(task_id=t.task_id, status="error", attempts=p.attempts,
                                                error=f"the task cannot be sent to the worker: {exc}",
                                                worker_id=self.id))
                continue
            self._current = p
            p.last_output = p.started_at
            p.gateway_failure = None
            self._set_state("busy")
            events.task_started(self, t.task_id, life.generation)
            if self.journal is not None:
                await self._journal_call(self.journal.dispatched, t.task_id, self.id, life.generation)
            if t.timeout_s is not None and life.nursery is not None:
                life.nursery.start_soon(self._enforce_deadline, life, p)
            stall = self.spec.effective_stall_timeout_s
            if stall is not None and life.nursery is not None:
                life.nursery.start_soon(self._watch_stall, life, p, stall)
            p.frame, p.hellos_before = data, life.hellos
            await self._send_bytes(life, data)
            return

    async def _redeliver_lost(self, life: _Life, frame: Ready, first_unanswered: int | None) -> None:
        """A resumed wrapper answered a ``hello`` written after this worker sent it its task,
        yet it neither runs that task nor holds its result: the run_task frame was lost on the
        way (written while the engine restarted). It is sent again (the task never ran)."""
        p = self._current
        if p is None or p.frame is None or first_unanswered is None \
                or p.hellos_before >= first_unanswered:
            return
        tid = p.task.task_id
        if frame.running == tid or tid in frame.replay:
            return
        log.warning("task_frame_lost", task_id=tid)
        p.hellos_before = life.hellos
        await self._send_bytes(life, p.frame)

    async def _enforce_deadline(self, life: _Life, p: _Pending) -> None:
        """corral's own deadline for a task, whatever the wrapper does: at timeout_s +
        task_grace_s the task ends "timeout" and the wrapper is told to cancel it. If the wrapper
        has still not reported it done after another task_grace_s (its agent cannot be stopped,
        or the wrapper is wedged while its heartbeats go on), the container is replaced."""
        grace = self.spec.task_grace_s
        assert p.task.timeout_s is not None
        await trio.sleep_until(p.started_at + p.task.timeout_s + grace)
        if self._current is not p or life.ended.is_set():
            return
        log.warning("task_deadline_passed", task_id=p.task.task_id, timeout_s=p.task.timeout_s,
                    grace_s=grace)
        await self._end_early(life, p, status="timeout", error=(
            f"no result {p.task.timeout_s} s (timeout_s) + {grace} s (task_grace_s) after it "
            f"started: corral ended the task"))

    async def _watch_stall(self, life: _Life, p: _Pending, stall_s: float) -> None:
        """The progress watchdog: no agent output and no model traffic (either way, through the
        gateway) for ``stall_s`` ends the task "error" with failure ``stalled``; the wrapper
        kills the agent, the container stays."""
        while True:
            if self._current is not p or life.ended.is_set():
                return
            last = p.last_output
            gw = life.gateway
            if gw is not None:
                last = max(last, gw.last_activity)
            if trio.current_time() >= last + stall_s:
                break
            await trio.sleep_until(last + stall_s)
        log.warning("task_stalled", task_id=p.task.task_id, stall_timeout_s=stall_s)
        await self._end_early(
            life, p, status="error", failure="stalled", cancel_reason="stalled",
            error=f"stalled: no agent output and no model traffic for {stall_s:g} s "
                  f"(stall_timeout_s): corral stopped the agent")

    async def _end_early(self, life: _Life, p: _Pending, *, status: str, error: str,
                         failure: str | None = None, cancel_reason: str = "") -> None:
        """corral ends the running task itself: its caller is answered now, the wrapper is told
        to cancel it (killing the agent). Until the wrapper reports it done the worker takes no
        other task; if that takes more than task_grace_s, the container is replaced (its agent
        could not be stopped)."""
        if self._current is not p or life.ended.is_set():
            return
        tid = p.task.task_id
        grace = self.spec.task_grace_s
        self._current, self._draining = None, p
        p.released = trio.Event()
        self._answer(p, TaskResult(task_id=tid, status=status, attempts=p.attempts,  # type: ignore[arg-type]
                                   worker_id=self.id, failure=failure,  # type: ignore[arg-type]
                                   duration_s=trio.current_time() - p.started_at, error=error))
        await self._send(life, CancelTask(task_id=tid, reason=cancel_reason))
        with trio.move_on_after(grace):
            await p.released.wait()
        if self._draining is p and not life.ended.is_set():
            life.end("hung", f"task {tid} did not end within {grace:g} s (task_grace_s) of its "
                             f"cancel: the wrapper could not stop it")

    async def _cancel(self, task_id: str) -> None:
        for p in list(self._pending):
            if p.task.task_id == task_id:
                self._pending.remove(p)
                reply_value(p.reply, TaskResult(task_id=task_id, status="cancelled", error="cancelled",
                                                attempts=p.attempts, worker_id=self.id))
                return
        if self._current and self._current.task.task_id == task_id and self._life:
            self._current.cancel_requested = True
            await self._send(self._life, CancelTask(task_id=task_id))

    async def _task_done(self, frame: TaskDone) -> None:
        if self.journal is not None:
            # recorded before the wrapper is told it may forget it (the next lease's ack)
            cur = self._current if (self._current is not None
                                    and self._current.task.task_id == frame.task_id) else None
            status, failure, error = task_outcome(frame, cur.gateway_failure if cur else None)
            gen = self._life.generation if self._life is not None else self.generation
            await self._journal_call(self.journal.attempt_done, frame.task_id, self.id, gen, TaskResult(
                task_id=frame.task_id, status=status, output=frame.output,  # type: ignore[arg-type]
                exit_code=frame.exit_code, error=error, duration_s=frame.duration_s,
                attempts=cur.attempts if cur else 1, worker_id=self.id, truncated=frame.truncated,
                failure=failure))  # type: ignore[arg-type]
            if cur is not None and cur.carried:
                cur.recorded = True
        d = self._draining
        if d is not None and d.task.task_id == frame.task_id:
            # the wrapper did end the task after corral's deadline: the worker is free again
            self._draining = None
            assert d.released is not None
            d.released.set()
            if self.state == "busy":
                self._set_state("ready")
            await self._dispatch()
            return
        p = self._current
        if p is not None and p.task.task_id == frame.task_id and frame.status == "cancelled" \
                and not p.cancel_requested and self._life is not None and self._life.shutdown_sent:
            # cut off by the shutdown corral itself asked for (a restart or a stop): not the
            # task's result; the end of this container decides (redelivery, or "cancelled")
            log.debug("task_cut_off_by_shutdown", task_id=frame.task_id)
            return
        p = self._current
        if p is None or p.task.task_id != frame.task_id:
            if frame.task_id in self._carried:
                # a task that ended while no corral process was attached, replayed
                log.info("adopted_task_result", task_id=frame.task_id, status=frame.status)
            else:
                log.warning("task_done_unknown", task_id=frame.task_id)
            return
        self._current = None
        status, failure, error = task_outcome(frame, p.gateway_failure)
        self._answer(p, TaskResult(task_id=frame.task_id, status=status, output=frame.output,  # type: ignore[arg-type]
                                   exit_code=frame.exit_code, error=error,
                                   duration_s=frame.duration_s, attempts=p.attempts,
                                   worker_id=self.id, truncated=frame.truncated,
                                   failure=failure),  # type: ignore[arg-type]
                     frame.usage)
        log.debug("task_done", task_id=frame.task_id, status=status, failure=failure)
        if self.state == "busy":
            self._set_state("ready")
        await self._dispatch()

    def _charged_task(self, cert: DeathCertificate) -> _Pending | None:
        """The task this death is charged to: the one running (or being ended) when the container
        died of a cause that a task may bring about (records.TASK_CAUSES)."""
        p = self._current or self._draining
        return p if p is not None and cert.cause in TASK_CAUSES else None

    def _on_death(self, cert: DeathCertificate, charged: _Pending | None = None) -> None:
        """The in-flight task: redelivered after the restart if it has attempts left, else it
        ends 'worker_died' with the certificate (at-most-once by default). A task whose every
        attempt killed its container is a poison task: it fails alone, marked ``poison``."""
        p, self._current = self._current, None
        self._draining = None
        if p is None:
            return
        if charged is p:
            p.charged_deaths += 1
        if p.attempts < p.task.max_attempts and cert.restart_in_s is not None:
            self._pending.insert(0, p)
        else:
            poison = p.charged_deaths == p.attempts
            if poison:
                log.warning("poison_task", task_id=p.task.task_id, attempts=p.attempts, cause=cert.cause)
            self._answer(p, TaskResult(task_id=p.task.task_id, status="worker_died",
                                            error=f"worker died: {cert.cause}"
                                                  + (f" (poison task: each of its {p.attempts} "
                                                     f"attempt(s) killed the container running it)"
                                                     if poison else ""),
                                            attempts=p.attempts, worker_id=self.id, death=cert,
                                            duration_s=trio.current_time() - p.started_at,
                                            poison=poison))


def task_outcome(frame: TaskDone, gateway_failure=None) -> tuple[str, str | None, str]:
    """(status, failure, error) of a task the wrapper reported done. Pure.

    - A failure the gateway saw during the task (an UpstreamFailed) is the truthful one: some
      agents only say "Exec failed".
    - A failure named by the wrapper (its agent's result, or the reason of a cancel) makes the
      task an "error" even if the agent exited 0 (claude's refused tool calls do).
    - Any other "error" is the agent's own: ``agent_error``. timeout and cancelled carry none.
    """
    status = frame.status if frame.status in ("ok", "error", "timeout", "cancelled") else "error"
    failure: str | None = frame.failure or None
    if failure is not None and failure not in FAILURES:
        failure = "agent_error"
    error = frame.error
    if gateway_failure is not None and status in ("ok", "error"):
        failure = gateway_failure.failure
        detail = f"{failure}: the model API answered " + (
            str(gateway_failure.status) if gateway_failure.status is not None else "nothing")
        error = detail + (f"; the agent said: {frame.error}" if frame.error else "")
    if failure is not None and status == "ok":
        status = "error"
        error = error or failure
    if status == "error" and failure is None:
        failure = "agent_error"
    return status, failure, error
