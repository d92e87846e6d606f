"""corral's exceptions. Every error a user can see is a CorralError."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .records import DeathCertificate


class CorralError(Exception):
    """Base of every corral error."""


class ConfigError(CorralError, ValueError):
    """A configuration, spec or task is invalid; the message says which field and why.

    It is a ValueError too, so msgspec reports it with the ``$.path`` of the bad field when it
    happens while decoding (a config file, a control request)."""


class EngineError(CorralError):
    """The container engine answered with an error. ``status`` is its HTTP status."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class EngineUnavailable(EngineError):
    """The container engine cannot be reached."""


class ImageNotFound(EngineError):
    """The engine has no such image."""


class ContainerNotFound(EngineError):
    """The engine has no such container (it may have been removed out of band)."""


class NameConflict(EngineError):
    """A container with that name exists already (HTTP 409)."""


class ContainerNotRunning(EngineError):
    """The operation needs a running container (kill, exec) and this one is not (HTTP 409)."""


class RemovalInProgress(EngineError):
    """Someone else is removing this container already (HTTP 409): for its owner, it is gone."""


class ImageBuildError(CorralError):
    """An image could not be built. ``step`` is the failing step, ``output_tail`` its last output."""

    def __init__(self, message: str, *, step: str | None = None, output_tail: str = "") -> None:
        text = message
        if step:
            text += f"\n  failing step: {step}"
        if output_tail:
            text += "\n  output tail:\n    " + "\n    ".join(output_tail.rstrip().splitlines()[-20:])
        super().__init__(text)
        self.step = step
        self.output_tail = output_tail


class WorkerStartupError(CorralError):
    """A worker did not become READY. ``certificate`` says why."""

    def __init__(self, message: str, certificate: "DeathCertificate | None" = None) -> None:
        super().__init__(message)
        self.certificate = certificate


class ActorStopped(CorralError):
    """An actor (a worker, a pool, a supervisor, the image builder) has stopped: it takes no
    more requests."""


class WorkerGone(ActorStopped):
    """The worker was stopped or has failed for good; it takes no more requests."""


class PoolStopped(ActorStopped):
    """The pool was stopped; it takes no more tasks."""


class SupervisorStopped(ActorStopped):
    """The supervisor has stopped (or escalated); it takes no more requests."""


class BuilderStopped(ActorStopped):
    """The image builder has stopped."""


class NoSuchChild(CorralError, LookupError):
    """No worker, pool or nested supervisor of that name under this supervisor."""


class ProtocolError(CorralError):
    """A worker-wrapper sent a frame that is malformed, oversized or unknown."""


class SupervisorEscalation(CorralError):
    """A supervisor exceeded its restart intensity (or saw a shared cause of death) and gave up.

    ``certificates`` are the DeathCertificates that caused it, oldest first.
    """

    def __init__(self, message: str, certificates: "Sequence[DeathCertificate]" = (), *,
                 supervisor: str = "", reason: str = "intensity") -> None:
        super().__init__(message)
        self.certificates = list(certificates)
        self.supervisor = supervisor
        self.reason = reason
