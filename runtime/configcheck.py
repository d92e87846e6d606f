"""Static checks of a SupervisorConfig: what can be known wrong before anything starts.

Field types and ranges are checked when the config is built (runtime.specs); this adds what
needs the whole config or the registries: unknown agents and capabilities, duplicate worker ids
and pool names, and a worker id that a pool's members would take (``<pool>-<n>``).
"""

from __future__ import annotations

import re

from .agents import get_agent, normalise_capabilities
from .errors import ConfigError
from .specs import SupervisorConfig, WorkerSpec


def config_problems(config: SupervisorConfig) -> list[str]:
    """Every static problem of ``config``, each naming the ``$.path`` of its field."""
    problems: list[str] = []

    def spec(where: str, s: WorkerSpec) -> None:
        try:
            get_agent(s.agent)
        except ConfigError as exc:
            problems.append(f"`{where}.agent`: {exc}")
        try:
            normalise_capabilities(s.capabilities)
        except ConfigError as exc:
            problems.append(f"`{where}.capabilities`: {exc}")

    for i, w in enumerate(config.workers):
        spec(f"$.workers[{i}]", w)
    for i, p in enumerate(config.pools):
        spec(f"$.pools[{i}].worker", p.worker)

    first: dict[str, int] = {}
    for i, w in enumerate(config.workers):
        if w.id is None:
            continue
        if w.id in first:
            problems.append(f"`$.workers[{i}].id`: duplicate worker id {w.id!r} "
                            f"(also `$.workers[{first[w.id]}].id`)")
        else:
            first[w.id] = i
    pools: dict[str, int] = {}
    for i, p in enumerate(config.pools):
        if p.name in pools:
            problems.append(f"`$.pools[{i}].name`: duplicate pool name {p.name!r} "
                            f"(also `$.pools[{pools[p.name]}].name`)")
        else:
            pools[p.name] = i
    for i, w in enumerate(config.workers):
        for name, j in pools.items():
            if w.id is not None and re.fullmatch(re.escape(name) + r"-[0-9]+", w.id):
                problems.append(f"`$.workers[{i}].id`: {w.id!r} is the id of a member of pool "
                                f"{name!r} (`$.pools[{j}]`: its workers are named {name}-1, "
                                f"{name}-2, ...)")
    return problems


def check_config(config: SupervisorConfig) -> None:
    """Raise ConfigError listing every static problem of ``config``; nothing has started yet."""
    problems = config_problems(config)
    if len(problems) == 1:
        raise ConfigError(f"invalid config: {problems[0]}")
    if problems:
        raise ConfigError(f"invalid config ({len(problems)} problems):\n  "
                          + "\n  ".join(problems))
