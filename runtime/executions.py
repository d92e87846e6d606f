"""Executions counted where they happen: each `task_started` frame a worker-wrapper sends (it
writes it once it has started the agent process for the task) is one execution.

Pass an `ExecutionLedger` to `open_supervisor(..., ledger=...)` to check delivery guarantees in
tests and chaos runs: a task ran exactly once with ``max_attempts=1`` unless its container died
under it, and never more than ``max_attempts`` times. Counting is opt-in: a long-running service
keeps no per-task record.
"""

from __future__ import annotations

from collections import Counter


class ExecutionLedger:
    """Task id -> executions, and (task id, worker id, generation) of each."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.where: list[tuple[str, str, int]] = []
        self._seen: set[tuple[str, str, int, int]] = set()

    def record(self, task_id: str, worker_id: str, generation: int, seq: int = 0) -> None:
        """One execution of ``task_id`` (its task_started frame). ``seq``: the frame's sequence
        number: a replayed frame (a supervisor that adopted the container) counts once."""
        if seq:
            key = (task_id, worker_id, generation, seq)
            if key in self._seen:
                return
            self._seen.add(key)
        self.counts[task_id] += 1
        self.where.append((task_id, worker_id, generation))

    def __getitem__(self, task_id: str) -> int:
        return self.counts[task_id]


def check_deliveries(tasks, results, ledger: ExecutionLedger) -> list[str]:
    """The delivery invariants, counted where executions happen. ``tasks``: task id -> Task;
    ``results``: task id -> every TaskResult its caller got. Returns the violations (empty: all
    hold):

    - every task has exactly one result;
    - no task ran more than ``max_attempts`` times, nor more often than it was dispatched;
    - a task that succeeded ran at least once, and exactly once with ``max_attempts=1``;
    - nothing ran that was not submitted.
    """
    bad: list[str] = []
    for tid, task in tasks.items():
        got = results.get(tid) or []
        ran = ledger[tid]
        if len(got) != 1:
            bad.append(f"{tid}: {len(got)} results (expected exactly 1)")
            continue
        r = got[0]
        if ran > task.max_attempts:
            bad.append(f"{tid}: ran {ran} times, max_attempts={task.max_attempts}")
        if r.attempts > task.max_attempts:
            bad.append(f"{tid}: {r.attempts} attempts reported, max_attempts={task.max_attempts}")
        if ran > max(r.attempts, 1) and r.status != "cancelled":
            bad.append(f"{tid}: ran {ran} times in {r.attempts} attempts")
        if r.status == "ok" and ran < 1:
            bad.append(f"{tid}: ok without running")
        if r.status == "ok" and task.max_attempts == 1 and ran != 1:
            bad.append(f"{tid}: ok with max_attempts=1 but ran {ran} times")
    for tid in ledger.counts:
        if tid not in tasks:
            bad.append(f"{tid}: ran but was never submitted")
    return bad
