"""Registries of agents and capabilities: what goes into a worker image, and how.

The agents themselves (names, CLI names, version probes, command lines, result parsers, stub
versions) are defined once, in the wrapper's agent table ``runtime/wrapper/agents.py``, which is
shipped into every image; this host-side registry derives from it and adds what only the host
needs: the pinned package holding each real CLI (``runtime.agentpkgs``: fetched on the host,
COPYed into the image; nothing is installed inside a build).

Every field here is an input of the image tag, so changing a pin changes the image.
"""

from __future__ import annotations

from msgspec import Struct, field

from .agentpkgs import AGENT_PACKAGES, AgentPackage
from .errors import ConfigError
from .wrapper import agents as agent_table


class AgentDef(Struct, frozen=True, kw_only=True):
    name: str
    cli: str
    """the CLI's name on PATH (the stub, or a link to the real binary, is installed under it)"""
    package: AgentPackage | None = None
    """the pinned package holding the real CLI (None: the agent needs none, e.g. shell)"""
    stubbable: bool = True


class CapabilityDef(Struct, frozen=True, kw_only=True):
    name: str
    provided_by_base: bool = False
    install: list[str] = field(default_factory=list)
    needs_network: bool = False
    probe: list[str] = field(default_factory=list)


AGENTS: dict[str, AgentDef] = {
    name: AgentDef(name=name, cli=a.cli, stubbable=a.stubbable, package=AGENT_PACKAGES.get(name))
    for name, a in agent_table.AGENTS.items()
}

CAPABILITIES: dict[str, CapabilityDef] = {
    c.name: c for c in [
        CapabilityDef(name="git", provided_by_base=True, probe=["git", "--version"]),
        CapabilityDef(name="curl", provided_by_base=True, probe=["curl", "--version"]),
        CapabilityDef(name="python", provided_by_base=True, probe=["python3", "--version"]),
        CapabilityDef(name="node", install=["apt-get update && apt-get install -y --no-install-recommends "
                                            "nodejs && apt-get clean && rm -rf /var/lib/apt/lists/*"],
                      needs_network=True, probe=["node", "--version"]),
        CapabilityDef(name="jq", install=["apt-get update && apt-get install -y --no-install-recommends "
                                          "jq && apt-get clean && rm -rf /var/lib/apt/lists/*"],
                      needs_network=True, probe=["jq", "--version"]),
        CapabilityDef(name="workspace-tools", install=["mkdir -p /opt/corral/bin && ln -sf /bin/true "
                                                       "/opt/corral/bin/noop"], probe=["/opt/corral/bin/noop"]),
    ]
}


def get_agent(name: str) -> AgentDef:
    try:
        return AGENTS[name]
    except KeyError:
        raise ConfigError(f"unknown agent {name!r}; known agents: {', '.join(sorted(AGENTS))}") from None


def normalise_capabilities(caps: list[str] | tuple[str, ...]) -> list[str]:
    """Sorted, de-duplicated; unknown names raise ConfigError naming the known ones."""
    unknown = sorted({c for c in caps if c not in CAPABILITIES})
    if unknown:
        raise ConfigError(f"unknown capabilit{'y' if len(unknown) == 1 else 'ies'} "
                          f"{', '.join(map(repr, unknown))}; known capabilities: {', '.join(sorted(CAPABILITIES))}")
    return sorted(set(caps))
