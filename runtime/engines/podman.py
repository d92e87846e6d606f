"""What Podman's Docker-compatible API reports differently, in the port's own terms.

Podman (its ping answers with a ``Libpod-Api-Version`` header) is served by the Docker adapter
(`runtime.engines.docker`), which detects it when it opens the engine and translates Podman's JSON,
status codes and error texts there (`PodmanEngine`). What is left here is pure and typed: no JSON,
no I/O.

- `KillSignals`: Podman's kill events carry no signal. The death that follows names it when the
  container died of a signal (exit 128 + n); otherwise the kill stays without one (never a guess).
- `LIMITS_ENV`: whether a container may run without limits the engine did not apply (rootless
  Podman on cgroup v1 drops memory, cpu and pids limits without a word).
- `SETTLE_S`, `OUTSIDE_REMOVAL_S`: how long a forced removal looks for another removal of the
  same container (Podman answers both of two overlapping removals 204; see
  `PodmanEngine.container_remove`).
- The hints that turn Podman's failures into something a person can act on.
"""

from __future__ import annotations

import math
import os
import signal as _signal

import msgspec

from .base import ContainerEvent

KILL_HOLD_S = 1.0
"""how long a kill event without a signal waits for the container's death to name the signal"""

SETTLE_S = 2.0
"""how long a forced removal waits for a container on its way out (stopping, or exited and not yet
cleaned up) to settle before it removes it all the same"""

OUTSIDE_REMOVAL_S = 0.3
"""how long after a container's death by a signal from elsewhere a forced removal waits for a
removal out of band to take it (Podman's own takes it 0.08-0.17 s after the death, measured)"""

LIMITS_ENV = "CORRAL_ALLOW_UNENFORCED_LIMITS"
"""``1``: run a container whose limits the engine did not apply, with a warning (default: refuse)"""


def unenforced_limits_allowed() -> bool:
    return os.environ.get(LIMITS_ENV, "") in ("1", "true", "yes")


class KillSignals:
    """Fills in the signal of kill events that come without one, from the death that follows.

    Sans-IO: ``feed(event, now)`` and ``expire(now)`` return the events to pass on, in the order
    they came; ``deadline`` says when to call ``expire`` next (None: nothing is held). A kill
    without a signal is held until its container dies (exit 128 + n: signal n; any other exit: no
    signal) or ``hold_s`` passes; the events after it are held behind it, so that nothing
    overtakes it (a subscriber's replay bookkeeping relies on the order of times)."""

    def __init__(self, hold_s: float = KILL_HOLD_S) -> None:
        self.hold_s = hold_s
        self._queue: list[list] = []        # [event, deadline or None (done)], in arrival order

    @property
    def deadline(self) -> float | None:
        open_ = [d for _, d in self._queue if d is not None]
        return min(open_) if open_ else None

    def feed(self, ev: ContainerEvent, now: float) -> list[ContainerEvent]:
        if ev.kind == "killed" and ev.signal is None:
            self._queue.append([ev, now + self.hold_s])
            return self._release()
        if ev.kind in ("died", "removed"):
            held = [entry for entry in self._queue
                    if entry[1] is not None and entry[0].container_id == ev.container_id]
            for entry in held:
                entry[1] = None
            if held and ev.kind == "died":
                sig = _death_signal(ev.exit_code)
                if sig is not None:           # the last kill before the death is what ended it
                    held[-1][0] = msgspec.structs.replace(held[-1][0], signal=sig)
        if not self._queue:
            return [ev]
        self._queue.append([ev, None])
        return self._release()

    def expire(self, now: float) -> list[ContainerEvent]:
        for entry in self._queue:
            if entry[1] is not None and entry[1] <= now:
                entry[1] = None
        return self._release()

    def flush(self) -> list[ContainerEvent]:
        return self.expire(math.inf)

    def _release(self) -> list[ContainerEvent]:
        out = []
        while self._queue and self._queue[0][1] is None:
            out.append(self._queue.pop(0)[0])
        return out


def _death_signal(exit_code: int | None) -> int | None:
    """The signal an init process's exit code stands for (128 + n), if it is one."""
    if exit_code is None or exit_code <= 128:
        return None
    try:
        return int(_signal.Signals(exit_code - 128))
    except ValueError:
        return None


RLIMIT_HINT = (
    "Rootful Podman raises every container's nofile/nproc limits, and root here lacks "
    "CAP_SYS_RESOURCE to do so. Set default_ulimits in the containers.conf of that Podman service "
    "to limits at or below its own (scripts/setup does this where it is needed; see README "
    "\"Running on Podman\")")
INIT_HINT = ("Podman runs catatonit as the container's init (corral asks for an init): "
             "apt-get install catatonit")


def limits_reason(*, rootless: bool, cgroup_version: str) -> str:
    if rootless and cgroup_version == "1":
        return "rootless Podman cannot enforce resource limits on cgroup v1"
    return "the engine cannot enforce them here"
