"""When next: the restart window and the backoff, pure (no I/O, no clock of their own).

One implementation serves both tiers: a Worker's own restart budget (RestartPolicy.max_restarts
within within_s) and a Supervisor's intensity (SupervisorConfig.max_restarts within within_s), as
OTP's intensity/period; and the Worker's exponential backoff with full jitter (Backoff).
"""

from __future__ import annotations

import collections
import random
from typing import Deque

from runtime.records import DeathCertificate
from runtime.specs import Backoff, RestartPolicy


class RestartWindow:
    """At most ``max_restarts`` restarts within any ``within_s``: one more is refused."""

    __slots__ = ("max_restarts", "within_s", "_times")

    def __init__(self, max_restarts: int, within_s: float) -> None:
        self.max_restarts = max_restarts
        self.within_s = within_s
        self._times: Deque[float] = collections.deque()

    def _prune(self, now: float) -> None:
        while self._times and now - self._times[0] > self.within_s:
            self._times.popleft()

    def admit(self, now: float) -> bool:
        """Count a restart at ``now`` if the window has room; False: the budget is spent."""
        self._prune(now)
        if len(self._times) >= self.max_restarts:
            return False
        self._times.append(now)
        return True

    def count(self, now: float) -> int:
        """Restarts within the window that ends at ``now``."""
        return sum(1 for t in self._times if now - t <= self.within_s)


def backoff_delay(backoff: Backoff, consecutive: int, rng: random.Random) -> float:
    """Delay before the restart that follows the ``consecutive``-th failure in a row: 0 for the
    first, then ``min(max_s, initial_s * factor**(n-2))``, uniform in [0, that] with full jitter."""
    if consecutive <= 1:
        return 0.0
    cap = backoff_cap(backoff, consecutive)
    return rng.uniform(0, cap) if backoff.jitter == "full" else cap


def backoff_cap(backoff: Backoff, consecutive: int) -> float:
    """The upper bound of the delay after the ``consecutive``-th failure in a row."""
    if consecutive <= 1:
        return 0.0
    return min(backoff.max_s, backoff.initial_s * backoff.factor ** (consecutive - 2))


class BackoffState:
    """Consecutive failures of one worker: reset by a container that was READY for stable_s."""

    __slots__ = ("backoff", "consecutive")

    def __init__(self, backoff: Backoff) -> None:
        self.backoff = backoff
        self.consecutive = 0

    def next_delay(self, *, stable: bool, rng: random.Random) -> float:
        self.consecutive = 1 if stable else self.consecutive + 1
        return backoff_delay(self.backoff, self.consecutive, rng)

    @property
    def next_cap(self) -> float:
        """The bound of the delay if the next container fails too."""
        return backoff_cap(self.backoff, self.consecutive + 1)


def decide(policy: RestartPolicy, cert: DeathCertificate, *, charged: bool, stopping: bool,
           window: RestartWindow, backoff: BackoffState, now: float,
           rng: random.Random) -> tuple[str, float]:
    """After a death: ("restart", delay), ("done", 0) or ("give_up", 0).

    - stopping, a temporary worker, or a transient one that exited 0: done.
    - config_error: give up at once (the same config fails the same way; no hot loop).
    - past ``max_restarts`` within ``within_s``: give up (the supervisor escalates).
    - a death charged to a task (records.TASK_CAUSES while it ran) backs off like any other but
      does not count against the budget: bad data never makes a worker give up.
    - the delay: 0 after a container that was READY for ``stable_s``, else exponential with
      full jitter (``Backoff``)."""
    if stopping or policy.restart == "temporary":
        return "done", 0.0
    if policy.restart == "transient" and cert.cause == "exited":
        return "done", 0.0
    if cert.cause == "config_error":
        return "give_up", 0.0
    if not charged and not window.admit(now):
        return "give_up", 0.0
    stable = cert.ready and cert.uptime_s >= policy.backoff.stable_s
    return "restart", backoff.next_delay(stable=stable, rng=rng)
