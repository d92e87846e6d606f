"""Small helpers shared by actors and the API."""

from __future__ import annotations


def leaf_exceptions(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for e in exc.exceptions:
            out.extend(leaf_exceptions(e))
        return out
    return [exc]


def unwrap_single(exc: BaseException) -> BaseException:
    """A group holding exactly one exception (as trio's strict groups make) -> that exception."""
    leaves = leaf_exceptions(exc)
    return leaves[0] if len(leaves) == 1 else exc
