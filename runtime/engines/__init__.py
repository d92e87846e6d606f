"""The engine port (`Engine` and its typed values) and its adapters: `open_engine()` opens the
Docker adapter (DOCKER_HOST, else unix:///var/run/docker.sock), or the Swarm adapter for a
``swarm+`` URL; the in-memory one is `runtime.testing.FakeEngine`. The Docker adapter (asyncio, aiodocker) is imported only when it is
opened."""

from __future__ import annotations

import os
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from .base import EVENT_KINDS as EVENT_KINDS
from .base import STDERR as STDERR
from .base import STDOUT as STDOUT
from .base import Attachment as Attachment
from .base import ContainerEvent as ContainerEvent
from .base import ContainerSpec as ContainerSpec
from .base import ContainerState as ContainerState
from .base import ContainerStatus as ContainerStatus
from .base import ContainerSummary as ContainerSummary
from .base import Engine as Engine
from .base import EngineVersion as EngineVersion
from .base import EventKind as EventKind
from .base import EventStream as EventStream
from .base import ImageSummary as ImageSummary
from .base import LabelFilter as LabelFilter
from .base import TmpfsMount as TmpfsMount

if TYPE_CHECKING:
    from .docker import DockerEngine as DockerEngine


def open_engine(url: str | None = None) -> AbstractAsyncContextManager[Any]:
    """Open the engine at ``url`` for the block: Docker (or Podman) at ``unix://`` / ``tcp://``
    (None: DOCKER_HOST, else unix:///var/run/docker.sock), or a Docker Swarm through its
    manager's engine at ``swarm+unix://...`` / ``swarm+tcp://...`` (`runtime.engines.swarm`).
    Raises EngineUnavailable (naming the URL) within 5 s if it does not answer."""
    if url is None:
        url = os.environ.get("DOCKER_HOST") or None
    if url is not None and url.startswith("swarm+"):
        from .swarm import open_swarm_engine
        return open_swarm_engine(url)
    from .docker import open_engine as _open_docker
    return _open_docker(url)


def __getattr__(name: str) -> Any:
    if name in ("DockerEngine", "resolve_url"):
        from . import docker
        return getattr(docker, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
