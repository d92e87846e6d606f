"""ImageBuilder actor: content-addressed worker images per (agent, capabilities, stub).

Answers "which image for this worker?" over its mailbox. The tag is
``corral/worker-<agent>:<12 hex>``, a sha256 over every real input; the same inputs reuse the
image, and concurrent requests for one missing tag share one build. Builds run in the actor's
nursery, never in its receive loop.

Real agents are built hermetically: the agent's pinned package is fetched on the host
(``runtime.agentpkgs``: the machine's own npm, a verified cache) and COPYed into an agent image
``corral/agent-<agent>:<12 hex>`` = the base image plus ONE layer holding the package
(``/opt/agents/<agent>``). Worker images of that agent are built FROM it, so they all share that
big layer, and the worker-specific layers (wrapper, capabilities) come after it. Nothing is
installed inside a build: agent builds always run without network, and the package pin
(name, version, integrity) is an input of both tags.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import tarfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import msgspec
import structlog
import trio

from runtime import events
from runtime.agentpkgs import AgentFiles, Progress, ensure_agent_files
from runtime.agents import CAPABILITIES, get_agent, normalise_capabilities
from runtime.engines import Engine
from runtime.errors import ImageBuildError, ImageNotFound
from runtime.messages import ImageRequest, ask, drain_mailbox, reply_error, reply_value
from runtime.wrapper import agents as agent_table

SCHEMA_VERSION = 3
WORKER_USER = "worker"
AGENTS_DIR = "/opt/agents"
"""where an agent image holds its package: ``/opt/agents/<agent>/``"""
WRAPPER_DIR = Path(__file__).resolve().parent.parent / "runtime" / "wrapper"
WRAPPER_FILES = tuple(sorted(p.name for p in WRAPPER_DIR.glob("*.py") if p.name != "__init__.py"))
"""what is shipped into /opt/corral: every module of runtime/wrapper (the process driver, its
sans-IO core, the agent table, the stub agent, the gateway endpoint); each is hashed into the
image tag"""
STUB_CLIS = {name: a.cli for name, a in agent_table.AGENTS.items() if a.stubbable}
"""agent -> the CLI name the stub agent is installed under (from the agent table)"""

log = structlog.get_logger("corral.builder")
_canonical = msgspec.json.Encoder(order="sorted").encode


class ImageInfo(msgspec.Struct, frozen=True, kw_only=True):
    tag: str
    image_id: str
    agent: str
    capabilities: list[str]
    stub_agent: bool
    built: bool = False
    """True when this request ran the build (False: reused)"""


@dataclass
class BuilderStats:
    requests: int = 0
    builds: int = 0
    """worker images built"""
    reused: int = 0
    failures: int = 0
    agent_builds: int = 0
    """agent images (base + the agent's package) built"""


@functools.lru_cache(maxsize=1)
def _read_wrapper_sources() -> tuple[tuple[str, bytes], ...]:
    return tuple((name, (WRAPPER_DIR / name).read_bytes()) for name in WRAPPER_FILES)


def wrapper_sources() -> dict[str, bytes]:
    """The in-container code this process ships (read once: it is part of every image's tag)."""
    return dict(_read_wrapper_sources())


def image_inputs(*, agent: str, capabilities: list[str], stub_agent: bool, base_image_id: str,
                 sources: dict[str, bytes] | None = None) -> dict:
    """Every real input of a worker image, canonically ordered."""
    adef = get_agent(agent)
    caps = normalise_capabilities(capabilities)
    if stub_agent and not adef.stubbable:
        stub_agent = False  # the shell agent is its own stub: same image either way
    sources = sources if sources is not None else wrapper_sources()
    package = adef.package if not stub_agent else None
    return {
        "schema": SCHEMA_VERSION,
        "base_image_id": base_image_id,
        "agent": {"name": adef.name, "cli": adef.cli, "stubbable": adef.stubbable},
        "package": package.image_inputs() if package is not None else None,
        "capabilities": [msgspec.to_builtins(CAPABILITIES[c]) for c in caps],
        "wrapper": {k: hashlib.sha256(v).hexdigest() for k, v in sorted(sources.items())},
        "stub_agent": stub_agent,
        "user": WORKER_USER,
    }


def agent_image_inputs(inputs: dict) -> dict:
    """The inputs of the agent image a worker image (of a real agent) is built FROM: the base
    and the package pin, nothing worker-specific."""
    return {"schema": SCHEMA_VERSION, "kind": "agent", "base_image_id": inputs["base_image_id"],
            "agent": inputs["agent"]["name"], "package": inputs["package"],
            "dir": f"{AGENTS_DIR}/{inputs['agent']['name']}"}


def agent_image_tag(inputs: dict) -> tuple[str, str]:
    digest = hashlib.sha256(_canonical(inputs)).hexdigest()
    return f"corral/agent-{inputs['agent']}:{digest[:12]}", digest


def image_tag(inputs: dict) -> tuple[str, str]:
    digest = hashlib.sha256(_canonical(inputs)).hexdigest()
    return f"corral/worker-{inputs['agent']['name']}:{digest[:12]}", digest


def agent_dockerfile(inputs: dict) -> str:
    """base + one layer: the agent's package (root-owned, read-only for the worker)."""
    return (f"FROM {inputs['base_image_id']}\n"
            f"COPY {inputs['agent']}/ {inputs['dir']}/\n")


def dockerfile(inputs: dict, *, base_ref: str, from_ref: str | None = None) -> str:
    """The worker image's Dockerfile. ``from_ref``: the agent image of a real agent (else the
    base)."""
    agent = inputs["agent"]
    base_id = inputs["base_image_id"]
    lines = [f"FROM {from_ref or base_id}", "USER root"]
    check = (f"id -u {WORKER_USER} >/dev/null 2>&1 || {{ echo \"corral: the base image {base_ref} "
             f"({base_id[:19]}) has no user '{WORKER_USER}': workers run as user {WORKER_USER} "
             f"(uid 1000); rebuild the base with 'corral base-image'\" >&2; exit 1; }}")
    # precompiled: a worker's wrapper starts without compiling its modules (it cannot write
    # /opt/corral/__pycache__ as user worker, so it would compile them at every start)
    setup = [check, "chmod 0755 /opt/corral/*.py", "python3 -m compileall -q /opt/corral"]
    if inputs["stub_agent"]:
        setup.append(f"ln -sf /opt/corral/stub_agent.py /usr/local/bin/{STUB_CLIS[agent['name']]}")
    pkg = inputs["package"]
    if pkg is not None:
        home = f"{AGENTS_DIR}/{agent['name']}"
        setup.append(f"test -x {home}/{pkg['entry']}")
        setup.append(f"ln -sf {home}/{pkg['entry']} /usr/local/bin/{agent['cli']}")
    lines.append("COPY corral/ /opt/corral/")
    lines.append("RUN " + " && ".join(setup))
    for cap in inputs["capabilities"]:
        for step in cap["install"]:
            lines.append(f"RUN {step}")
    lines += [f"USER {WORKER_USER}", "WORKDIR /workspace", f"ENV CORRAL_AGENT={agent['name']}"]
    if pkg is not None and pkg["path_dirs"]:
        dirs = ":".join(f"{AGENTS_DIR}/{agent['name']}/{d}" for d in pkg["path_dirs"])
        lines.append(f"ENV PATH={dirs}:$PATH")
    lines += ['ENTRYPOINT ["python3", "/opt/corral/wrapper.py"]', "CMD []"]
    return "\n".join(lines) + "\n"


def agent_context(inputs: dict, files: AgentFiles) -> bytes:
    """The agent image's build context: its Dockerfile and the package's files under
    ``<agent>/`` (owned by root, mtimes zeroed: the same package gives the same context)."""
    buf = io.BytesIO()
    root = files.root
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = agent_dockerfile(inputs).encode()
        ti = tarfile.TarInfo("Dockerfile")
        ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
        tar.addfile(ti, io.BytesIO(data))
        prefix = inputs["agent"]
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            arc = prefix if rel == "." else f"{prefix}/{rel}"
            ti = tarfile.TarInfo(arc)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(ti)
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                ti = tarfile.TarInfo(f"{arc}/{name}")
                ti.size, ti.mtime = st.st_size, 0
                ti.mode = 0o755 if st.st_mode & 0o111 else 0o644
                with open(path, "rb") as f:
                    tar.addfile(ti, f)
    return buf.getvalue()


def build_context(dockerfile_text: str, sources: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name: str, data: bytes, mode: int = 0o644) -> None:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), mode, 0
            tar.addfile(ti, io.BytesIO(data))
        add("Dockerfile", dockerfile_text.encode())
        for name, data in sorted(sources.items()):
            add(f"corral/{name}", data, 0o755)
    return buf.getvalue()


def network_steps(inputs: dict) -> list[str]:
    """What needs network at build time, described for the error message. (Never an agent:
    its package is fetched on the host and COPYed.)"""
    return [f"capability {c['name']!r}" for c in inputs["capabilities"] if c["needs_network"]]


class ImageBuilderHandle:
    def __init__(self, mailbox: trio.MemorySendChannel, actor: "ImageBuilder") -> None:
        self._mailbox = mailbox
        self._actor = actor

    async def image_for(self, agent: str, capabilities: list[str] = (), stub_agent: bool = False) -> ImageInfo:
        return await ask(self._mailbox, lambda r: ImageRequest(
            agent=agent, capabilities=list(capabilities), stub_agent=stub_agent, reply=r),
            gone="the image builder has stopped")

    def invalidate(self, tag: str | None) -> None:
        """Forget that ``tag`` exists (a container create found it missing): the next request
        for it looks at the engine again, and rebuilds if needed."""
        if tag:
            self._actor._known.pop(tag, None)

    def statistics(self) -> BuilderStats:
        return BuilderStats(**vars(self._actor.stats))


class ImageBuilder:
    def __init__(self, engine: Engine, *, base_image: str = "corral/worker-base:latest",
                 build_network: bool = False, mailbox_size: int = 256,
                 agent_cache_dir: Path | None = None) -> None:
        self.engine = engine
        self.base_image = base_image
        self.build_network = build_network
        self.agent_cache_dir = agent_cache_dir
        """where agent packages are cached (None: runtime.agentpkgs.default_cache_dir())"""
        self.stats = BuilderStats()
        self._known: dict[str, str] = {}            # tag -> image id, seen on the engine
        self._inflight: dict[str, trio.Event] = {}  # tag -> set when its build ends
        self._failed: dict[str, BaseException] = {}
        self._send, self._recv = trio.open_memory_channel[ImageRequest](mailbox_size)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        structlog.contextvars.bind_contextvars(actor="builder")
        async with trio.open_nursery() as nursery:
            task_status.started(ImageBuilderHandle(self._send, self))
            try:
                async for req in self._recv:
                    nursery.start_soon(self._serve, req)
            finally:
                drain_mailbox(self._recv, "the image builder has stopped")

    async def _serve(self, req: ImageRequest) -> None:
        try:
            reply_value(req.reply, await self.image_for(req.agent, req.capabilities, req.stub_agent))
        except Exception as exc:  # every failure goes back to the asker
            reply_error(req.reply, exc)

    async def _base_id(self) -> str:
        try:
            return (await self.engine.image_inspect(self.base_image)).id
        except ImageNotFound:
            raise ImageBuildError(f"base image {self.base_image} is missing: build it with "
                                  "'corral base-image' (or scripts/setup)") from None

    async def image_for(self, agent: str, capabilities: list[str], stub_agent: bool) -> ImageInfo:
        self.stats.requests += 1
        get_agent(agent)
        caps = normalise_capabilities(capabilities)
        inputs = image_inputs(agent=agent, capabilities=caps, stub_agent=stub_agent,
                              base_image_id=await self._base_id())
        tag, digest = image_tag(inputs)
        info = dict(tag=tag, agent=agent, capabilities=caps, stub_agent=inputs["stub_agent"])
        image_id, built = await self._ensure(tag, lambda: self._build(tag, digest, inputs))
        if not built:
            self.stats.reused += 1
        return ImageInfo(image_id=image_id, built=built, **info)

    async def _ensure(self, tag: str, build) -> tuple[str, bool]:
        """The image ``tag``: known, found on the engine, or built by ``build()`` (one build per
        tag at a time: concurrent requests wait for it). -> (image id, built by this call)."""
        while True:
            if tag in self._known:
                return self._known[tag], False
            if tag in self._inflight:
                await self._inflight[tag].wait()
                if tag in self._failed:
                    raise self._failed[tag]
                continue
            try:
                self._known[tag] = (await self.engine.image_inspect(tag)).id
                continue
            except ImageNotFound:
                pass
            if tag in self._inflight:   # another request started it while we looked
                continue
            done = self._inflight[tag] = trio.Event()
            self._failed.pop(tag, None)
            try:
                image_id = await build()
                self._known[tag] = image_id
                return image_id, True
            except BaseException as exc:
                self._failed[tag] = exc
                raise
            finally:
                del self._inflight[tag]
                done.set()

    async def _agent_image(self, inputs: dict) -> str:
        """The agent image (base + the package's layer) a real agent's worker images are built
        FROM: found, or built from the package fetched on the host. -> its id."""
        ainputs = agent_image_inputs(inputs)
        tag, digest = agent_image_tag(ainputs)
        image_id, _ = await self._ensure(tag, lambda: self._build_agent(tag, digest, ainputs))
        return image_id

    async def _build_agent(self, tag: str, digest: str, ainputs: dict) -> str:
        agent = ainputs["agent"]
        last: dict[str, float] = {}

        def progress(p: Progress) -> None:
            now = time.monotonic()
            if p.phase in ("fetching", "unpacking") and now - last.get(p.phase, -1e9) < 5.0:
                return
            last[p.phase] = now
            log.info("agent_package", agent=p.agent, package=p.package, phase=p.phase,
                     elapsed_s=round(p.elapsed_s, 1) if p.elapsed_s else None,
                     done_mb=round(p.done / 1e6, 1) if p.total else None,
                     total_mb=round(p.total / 1e6, 1) if p.total else None)
        files = await ensure_agent_files(agent, cache_dir=self.agent_cache_dir, progress=progress)
        t0 = time.monotonic()
        ctx = await trio.to_thread.run_sync(agent_context, ainputs, files)
        labels = {"corral.image": "1", "corral.kind": "agent", "corral.agent": agent,
                  "corral.package": files.package.spec, "corral.spec": digest,
                  "corral.base": ainputs["base_image_id"], "corral.schema": str(SCHEMA_VERSION)}
        self.stats.agent_builds += 1
        log.info("image_build_started", tag=tag, agent=agent, package=files.package.spec,
                 context_mb=round(len(ctx) / 1e6, 1))

        def on_line(line: str) -> None:
            if line.startswith("Step "):
                log.info("image_build_progress", tag=tag, line=line.strip())
        try:
            # always without network: the package is in the context, nothing is installed
            image_id = await self.engine.image_build(ctx, tag=tag, labels=labels, network=False,
                                                     on_progress=on_line)
        except ImageBuildError as exc:
            self.stats.failures += 1
            log.error("image_build_failed", tag=tag, step=exc.step, error=str(exc).splitlines()[0])
            raise
        del ctx
        log.info("image_built", tag=tag, image_id=image_id, seconds=round(time.monotonic() - t0, 2))
        events.image_built(tag, agent, time.monotonic() - t0)
        return image_id

    async def _build(self, tag: str, digest: str, inputs: dict) -> str:
        needs = network_steps(inputs)
        if needs and not self.build_network:
            self.stats.failures += 1
            raise ImageBuildError(
                f"cannot build {tag}: {', '.join(needs)} needs network at build time, but builds run "
                "without network. Bake it into the base image, or enable build "
                "network with build_network = true in the supervisor config.")
        labels = {
            "corral.image": "1", "corral.kind": "worker", "corral.agent": inputs["agent"]["name"],
            "corral.capabilities": ",".join(c["name"] for c in inputs["capabilities"]),
            "corral.spec": digest, "corral.base": inputs["base_image_id"],
            "corral.stub": "1" if inputs["stub_agent"] else "0", "corral.schema": str(SCHEMA_VERSION),
        }
        from_ref = None
        if inputs["package"] is not None:
            from_ref = await self._agent_image(inputs)
            labels["corral.package"] = f"{inputs['package']['name']}@{inputs['package']['version']}"
        sources = wrapper_sources()
        ctx = build_context(dockerfile(inputs, base_ref=self.base_image, from_ref=from_ref),
                            sources)
        self.stats.builds += 1
        t0 = time.monotonic()
        log.info("image_build_started", tag=tag, agent=labels["corral.agent"],
                 capabilities=labels["corral.capabilities"])

        def progress(line: str) -> None:
            log.debug("image_build_progress", tag=tag, line=line)
        try:
            image_id = await self.engine.image_build(
                ctx, tag=tag, labels=labels, network=self.build_network,
                on_progress=progress)
        except ImageBuildError as exc:
            self.stats.failures += 1
            log.error("image_build_failed", tag=tag, step=exc.step, error=str(exc).splitlines()[0])
            raise
        log.info("image_built", tag=tag, image_id=image_id, seconds=round(time.monotonic() - t0, 2))
        events.image_built(tag, labels["corral.agent"], time.monotonic() - t0)
        return image_id


@asynccontextmanager
async def open_image_builder(engine: Engine, **kwargs) -> AsyncIterator[ImageBuilderHandle]:
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(ImageBuilder(engine, **kwargs).run)
        try:
            yield handle
        finally:
            nursery.cancel_scope.cancel()


def describe_dockerfile(agent: str, capabilities: list[str], stub_agent: bool, base_image_id: str) -> str:
    """The Dockerfile(s) corral would build (for `corral build --dry-run` and docs): for a real
    agent, its agent image's first, then the worker image's FROM it."""
    inputs = image_inputs(agent=agent, capabilities=capabilities, stub_agent=stub_agent,
                          base_image_id=base_image_id)
    if inputs["package"] is None:
        return dockerfile(inputs, base_ref=base_image_id)
    ainputs = agent_image_inputs(inputs)
    atag, _ = agent_image_tag(ainputs)
    pkg = inputs["package"]
    return (f"# {atag}: the agent's package {pkg['name']}@{pkg['version']}, fetched on the host "
            f"(npm pack, integrity {pkg['integrity'][:19]}...), in one layer\n"
            + agent_dockerfile(ainputs)
            + f"\n# {image_tag(inputs)[0]}\n"
            + dockerfile(inputs, base_ref=base_image_id, from_ref=atag))


__all__ = ["ImageBuilder", "ImageBuilderHandle", "ImageInfo", "open_image_builder", "image_inputs",
           "image_tag"]
