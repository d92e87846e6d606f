"""Tests' own client of `corral run`'s HTTP API over its unix socket (httpx, trio-native)."""

from __future__ import annotations

from typing import Any

import httpx

from runtime.errors import CorralError


class ApiError(CorralError):
    """An error answer: its message (what a user reads), with ``code`` and ``status``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


async def api(sock: str, method: str, path: str, body: Any = None, **params: Any) -> Any:
    """One request; its JSON answer, or ApiError with the answer's code."""
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=sock),
                                 base_url="http://corral", timeout=None) as c:
        r = await c.request(method, path, json=body, params=params or None)
    if r.status_code >= 400:
        err = r.json()
        raise ApiError(r.status_code, err["code"], err["message"])
    return r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text


async def snapshot(sock: str) -> dict:
    return await api(sock, "GET", "/v1/tree")


async def run_task(sock: str, **task: Any) -> dict:
    """A task, waited for (``pool=`` or ``worker_id=``, ``prompt=``): its TaskResult."""
    return await api(sock, "POST", "/v1/tasks", dict(task, wait=True))
