"""Contracts of the layout that other parts rely on."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WRAPPER = ROOT / "runtime" / "wrapper"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


DOCKER_ADAPTER = ROOT / "runtime" / "engines" / "docker.py"
DOCKER_JSON = ("HostConfig", "NetworkMode", "OOMKilled", "Attributes", "CapDrop", "StatusCode",
               "RepoTags", "NanoCpus", "PidsLimit", "ReadonlyRootfs", "SecurityOpt", "MemorySwap",
               "ExitCode", "exitCode", "timeNano", "\"Actor\"", "StdinOnce", "OpenStdin", "ImageID",
               "\"Names\"", "\"Id\"", "\"State\"", "\"Env\"", "\"Labels\"", "\"Image\"",
               "\"Action\"", "already in progress", "already in use", "No such container")


def core_modules() -> list[Path]:
    return list((ROOT / "runtime").rglob("*.py")) + list((ROOT / "actors").rglob("*.py"))


def test_only_the_docker_adapter_touches_asyncio_aiodocker_trio_asyncio():
    offenders = []
    for path in core_modules():
        if path == DOCKER_ADAPTER:
            continue
        bad = imported_modules(path) & {"asyncio", "aiodocker", "trio_asyncio", "aiohttp"}
        if bad:
            offenders.append(f"{path.relative_to(ROOT)}: {sorted(bad)}")
    assert offenders == []


def test_docker_json_stays_in_the_docker_adapter():
    """The engine port is typed: HostConfig, event Attributes, State.OOMKilled, Docker's error
    texts and the rest of Docker's JSON are spoken in runtime/engines/docker.py and nowhere else
    (the wrapper, running inside containers, is no engine client)."""
    offenders = []
    for path in core_modules():
        if path == DOCKER_ADAPTER or WRAPPER in path.parents:
            continue
        text = path.read_text()
        found = [word for word in DOCKER_JSON if word in text]
        if found:
            offenders.append(f"{path.relative_to(ROOT)}: {found}")
    assert offenders == []


def test_actors_take_a_typed_engine():
    """Every actor that talks to the engine takes it as an `Engine` (the port), not untyped."""
    untyped = []
    for path in (ROOT / "actors").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for arg in node.args.args + node.args.kwonlyargs:
                    if arg.arg == "engine" and not (arg.annotation is not None
                                                    and "Engine" in ast.unparse(arg.annotation)):
                        untyped.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert untyped == []


def test_in_container_code_is_stdlib_only_and_python39_syntax():
    shipped_beside = {p.stem for p in WRAPPER.glob("*.py")}   # /opt/corral/core.py, agents.py...
    for path in WRAPPER.glob("*.py"):
        src = path.read_text()
        ast.parse(src, feature_version=(3, 9))          # no match statements, no 3.10+ syntax
        non_std = {m for m in imported_modules(path)
                   if m not in sys.stdlib_module_names and m not in shipped_beside}
        assert non_std == set(), f"{path.name} imports {non_std}"


def test_every_in_container_module_is_shipped_and_hashed_into_the_image_tag():
    from actors.builder import WRAPPER_FILES
    assert sorted(WRAPPER_FILES) == sorted(p.name for p in WRAPPER.glob("*.py") if p.name != "__init__.py")


def test_the_agent_table_is_defined_once():
    """Agent names, CLI names, probes, command lines and stub versions live in the wrapper's
    agent table (runtime/wrapper/agents.py, shipped into images); the host's registry and the
    image builder derive from it, and no other module keeps a table of its own."""
    from actors import builder
    from runtime import agents as host
    from runtime.wrapper import agents as table

    assert {n: (a.cli, a.stubbable) for n, a in host.AGENTS.items()} == \
        {n: (a.cli, a.stubbable) for n, a in table.AGENTS.items()}
    assert builder.STUB_CLIS == {n: a.cli for n, a in table.AGENTS.items() if a.stub_version}
    for path in (ROOT / "runtime" / "agents.py", ROOT / "actors" / "builder.py"):
        imports = {(node.module, alias.name) for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.ImportFrom) for alias in node.names}
        assert imports & {("wrapper", "agents"), ("runtime.wrapper", "agents")}, path
    names = set(table.AGENTS) | {a.cli for a in table.AGENTS.values()}
    defining = {a.cli for a in table.AGENTS.values()} - set(table.AGENTS) - {"sh"}     # droid
    defining |= {a.stub_version for a in table.AGENTS.values() if a.stub_version}
    defining |= {" ".join(a.probe) for a in table.AGENTS.values()}
    offenders = []
    for path in core_modules():
        if path == WRAPPER / "agents.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in defining:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
            if isinstance(node, ast.Dict):       # e.g. {"claude": "claude", "factory": "droid"}
                keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
                if len(set(keys) & names) >= 2 and all(isinstance(v, ast.Constant) for v in node.values):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} a table of agents")
    assert offenders == []


def test_the_library_core_does_not_depend_on_the_applications():
    """runtime/apps (cli, control, demo, chaos, bench, base image) stand on the library, never the
    other way round."""
    offenders = []
    for path in [p for p in (ROOT / "runtime").rglob("*.py") if "apps" not in p.parts] \
            + list((ROOT / "actors").rglob("*.py")):
        src = path.read_text()
        tree = ast.parse(src)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                if "apps" in mod.split(".") or mod.startswith("runtime.apps"):
                    offenders.append(f"{path.relative_to(ROOT)}: {mod}")
    assert offenders == []
