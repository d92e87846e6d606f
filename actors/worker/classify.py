"""Which cause: the facts of a container's end in, a DeathCertificate's cause and reason out.

Pure: no I/O, no trio. The worker gathers the facts (its own account of how the life ended, the
engine's wait/inspect answers, the watcher's events, a ping afterwards) and calls `classify`.
The causes are runtime.records.CAUSES; DESIGN.md "Exit classification" says what each means.
"""

from __future__ import annotations

import signal as _signal
from dataclasses import dataclass
from typing import Literal

from runtime.records import Cause

EX_CONFIG = 78
"""the wrapper's exit code for a configuration it cannot work with (sysexits.h)"""

End = Literal["died", "hung", "protocol", "startup_timeout", "restart", "stop", "engine_unavailable"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ExitFacts:
    """Everything known about how one container ended."""
    end: End = "died"
    """how corral saw the life end: its output closed (died), heartbeats missed (hung), a bad
    frame (protocol), no READY in time (startup_timeout), or corral ended it on request
    (restart, stop)"""
    detail: str = ""
    """corral's own account when corral ended the life (not for "died": the facts say why)"""
    ready: bool = False
    exit_code: int | None = None
    oom: bool = False
    """the engine says the OOM killer struck in the container (its state, from inspect)"""
    oom_event: bool = False
    """the engine sent an oom event for the container"""
    removed: bool = False
    """the container is gone: removed out of band (404, or a destroy event)"""
    engine_problem: str | None = None
    """what went wrong talking to the engine while gathering these facts (the error's text)"""
    engine_unreachable: bool = False
    """that problem was the engine not answering at all (EngineUnavailable, a deadline)"""
    fatal: str | None = None
    """the reason of the wrapper's fatal frame"""
    watched: bool = True
    """the engine's events were followed for this container (the facts below mean something)"""
    kill_signals: tuple[str, ...] = ()
    """signals of the kill events the engine reported for the container, in order"""
    corral_killed: bool = False
    """corral itself sent a kill"""
    stopped: bool = False
    """the engine reported a stop event (`docker stop`, or the engine stopping its containers)"""
    restarted: bool = False
    """the engine restarted the container after it died (`docker restart`)"""
    engine_answered: bool = True
    """the engine still answered right after the death (a ping, its events stream)"""
    node_lost: str | None = None
    """a cluster engine lost the node the container ran on (why)"""
    unattended: bool = False
    """it ended while no corral process was attached (found dead when corral started)"""
    orphaned: bool = False
    """the wrapper said it was orphaned (its lease ran out with no supervisor attached)"""


def signal_name(sig: str | int) -> str:
    """ "15", "TERM", "SIGTERM", 15 -> "SIGTERM"; anything else is returned as it is."""
    text = str(sig).strip().upper()
    try:
        return _signal.Signals(int(text)).name
    except ValueError:
        pass
    name = text if text.startswith("SIG") else f"SIG{text}"
    return name if name in _signal.Signals.__members__ else str(sig)


def _signum(sig: str) -> int | None:
    name = signal_name(sig)
    return int(_signal.Signals[name]) if name in _signal.Signals.__members__ else None


def _died_of(exit_code: int | None, signals: tuple[str, ...]) -> bool:
    """Is ``exit_code`` what one of ``signals`` makes of a process (128 + n from the init
    process, -n from the engine), or unknown / a clean exit on being told to stop?"""
    if exit_code is None or exit_code == 0:
        return True
    nums = {_signum(s) for s in signals} - {None}
    return any(exit_code in (128 + n, -n) for n in nums)  # type: ignore[operator]


def _exit_signal(exit_code: int | None) -> str | None:
    """The signal an exit code above 128 stands for (the init process reports 128 + n)."""
    if exit_code is None or exit_code <= 128:
        return None
    try:
        return _signal.Signals(exit_code - 128).name
    except ValueError:
        return None


def classify(f: ExitFacts) -> tuple[Cause, str]:
    """The cause of a container's end and a reason a person can act on."""
    cause, reason = _classify(f)
    if f.unattended:
        reason += " (while no corral process was attached)"
    return cause, reason


def _classify(f: ExitFacts) -> tuple[Cause, str]:
    # corral ended it itself: its own account is the cause
    if f.end == "engine_unavailable":
        return "engine_unavailable", f.detail or "the engine stayed unreachable"
    if f.end == "hung":
        return "hung", f.detail or "heartbeats missed"
    if f.end == "protocol":
        return "protocol_error", f.detail or "the wrapper broke the protocol"
    if f.end == "startup_timeout":
        return "startup_timeout", f.detail or "not READY in time"
    if f.end in ("restart", "stop"):
        how = f.detail or ("restart requested" if f.end == "restart" else "stop requested")
        if f.corral_killed and f.exit_code != 0:
            return "killed", f"{how}: killed by corral after its stop grace"
        return "exited", f"{how}: the wrapper shut down (exit {f.exit_code})"

    # what the engine and the wrapper said
    fatal = f.fatal or ""
    if f.node_lost:
        return "node_lost", f"its node was lost: {f.node_lost}"
    if f.removed:
        return "removed", "the container was removed out of band"
    if f.orphaned and f.exit_code == 0:
        return "exited", ("orphaned: its lease ran out with no supervisor attached "
                          "(orphan_timeout_s), and the wrapper exited")
    if fatal.startswith("oom_killed") or f.oom or f.oom_event:
        return "oom_killed", fatal or "killed by the kernel OOM killer"
    if f.exit_code == EX_CONFIG or (fatal and not f.ready):
        return "config_error", fatal or f"exited with {EX_CONFIG} (EX_CONFIG): the wrapper cannot work with its configuration"
    if f.engine_unreachable or not f.engine_answered:
        # an engine that stops (or crashes) takes its containers with it: not the worker's doing
        code = f" (the container exited with {f.exit_code})" if f.exit_code is not None else ""
        return "engine_error", (f"the engine went away{code}: "
                                + (f.engine_problem or "it stopped answering"))

    external = () if f.corral_killed else f.kill_signals
    names = [signal_name(s) for s in f.kill_signals]
    if f.restarted:
        return "killed", "restarted outside corral (docker restart)"
    if f.stopped:
        # (Podman tells no kill event for a stop: the exit code names the signal, 128 + n)
        how = (", then ".join(dict.fromkeys(names)) if names
               else _exit_signal(f.exit_code) or "its stop signal")
        return "killed", f"stopped outside corral (docker stop: {how})"
    if external and _died_of(f.exit_code, external):
        return "killed", f"killed outside corral with {', then '.join(dict.fromkeys(names))}"

    if f.engine_problem and f.exit_code is None:
        return "engine_error", f.engine_problem
    sig = _exit_signal(f.exit_code)
    if sig == "SIGKILL" and f.corral_killed:
        how = " (SIGKILL, from corral)"
    elif sig and f.watched:
        # no kill went through the engine, yet a signal ended the container's init process
        how = (f" ({sig}, not sent through the engine API: a kill on the host, or a process "
               f"inside the container)")
    elif sig:
        how = f" ({sig})"
    else:
        how = ""
    if not f.ready:
        return "early_exit", fatal or f"exited with {f.exit_code} before READY{how}"
    if f.exit_code == 0:
        return "exited", "exited with 0 while serving"
    if sig == "SIGKILL" and not f.watched:
        return "killed", f"exited with {f.exit_code} (SIGKILL)"
    return "crashed", fatal or f"exited with {f.exit_code} after READY{how}"
