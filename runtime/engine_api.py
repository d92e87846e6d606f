"""The engine interface the actors depend on.

`runtime.engine.DockerEngine` (real Docker through aiodocker) and `runtime.testing.FakeEngine`
(trio-native, in memory) both implement it, so supervision logic can run against either.
Container configs are Docker Engine API JSON (`POST /containers/create` bodies) in both.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import trio

STDOUT = 1
STDERR = 2


class Attachment(Protocol):
    """A container's attached stdio. ``output`` yields ``(stream, bytes)`` and closes at EOF."""

    output: trio.MemoryReceiveChannel[tuple[int, bytes]]

    async def send(self, data: bytes) -> None: ...

    async def close_stdin(self) -> None: ...


class EventStream(Protocol):
    """An engine events subscription. ``receive`` yields event dicts; it closes when the stream
    ends, and ``ended`` then says why (None while it runs)."""

    receive: trio.MemoryReceiveChannel[dict[str, Any]]
    ended: str | None


class Engine(Protocol):
    url: str

    async def ping(self) -> None: ...
    async def version(self) -> dict[str, Any]: ...

    async def image_inspect(self, ref: str) -> dict[str, Any]: ...
    async def image_build(self, context_tar: bytes, *, tag: str, labels: dict[str, str],
                          network_mode: str = "none", on_progress: Any = None) -> str: ...
    async def image_list(self, *, labels: dict[str, str] | list[str] | None = None) -> list[dict[str, Any]]: ...
    async def image_remove(self, ref: str, *, force: bool = False) -> None: ...
    async def image_tag(self, ref: str, repo: str, tag: str) -> None: ...

    async def container_create(self, config: dict[str, Any], *, name: str | None = None) -> str: ...
    async def container_start(self, cid: str) -> None: ...
    async def container_inspect(self, cid: str) -> dict[str, Any]: ...
    async def container_wait(self, cid: str) -> int: ...
    async def container_kill(self, cid: str, signal: str = "SIGKILL") -> None: ...
    async def container_remove(self, cid: str, *, force: bool = True) -> None: ...
    async def container_list(self, *, labels: dict[str, str] | list[str] | None = None,
                             all: bool = True) -> list[dict[str, Any]]: ...
    async def container_logs(self, cid: str, *, tail_bytes: int = 4096) -> str: ...
    async def container_exec(self, cid: str, cmd: list[str], *, user: str = "") -> tuple[int, str]: ...

    def attach(self, cid: str) -> AbstractAsyncContextManager[Attachment]: ...
    def events(self, *, filters: dict[str, list[str]] | None = None,
               since: float | None = None) -> AbstractAsyncContextManager[EventStream]: ...


def label_filters(labels: dict[str, str] | list[str] | None) -> list[str]:
    """Docker's label filter syntax: ``key`` or ``key=value`` strings."""
    if labels is None:
        return []
    if isinstance(labels, dict):
        return [f"{k}={v}" if v is not None else k for k, v in labels.items()]
    return list(labels)


def labels_match(have: dict[str, str] | None, want: list[str]) -> bool:
    have = have or {}
    for f in want:
        key, eq, value = f.partition("=")
        if key not in have or (eq and have[key] != value):
            return False
    return True
