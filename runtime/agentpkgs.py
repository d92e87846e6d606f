"""Hermetic agent packages: the real agent CLIs, fetched on the host, never inside a build.

Each agent's CLI is a self-contained binary shipped in one npm package, pinned here by name,
version and sha512 integrity (the npm "SRI" string). ``ensure_agent_files(agent)`` fetches the
package with the machine's own ``npm pack`` (its registry, proxy and CA configuration as they are),
checks the integrity, unpacks it into a cache keyed by package@version and integrity, and returns
where the files are, for the image builder to COPY. A cache hit runs no npm at all; offline with a
cold cache it is a clear error naming the package.

Pins are inputs of the image hash: ``AGENT_PACKAGES[agent].image_inputs()``.
No Node is needed at run time: each pin names its entry binary, which is called directly.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Callable, Literal

import msgspec
import trio
from msgspec import Struct

from .errors import ConfigError, ImageBuildError

CACHE_LAYOUT = 1
"""bumped when the cache's directory layout changes (old entries are then ignored)"""


class AgentPackage(Struct, frozen=True, kw_only=True):
    """One pinned npm package holding an agent's CLI."""
    agent: str
    name: str
    """npm package name, e.g. ``@anthropic-ai/claude-code-linux-x64``"""
    version: str
    integrity: str
    """npm's SRI string: ``sha512-<base64>``"""
    entry: str
    """path of the CLI binary, relative to the unpacked package root"""
    path_dirs: tuple[str, ...] = ()
    """directories (relative to the root) that the CLI expects on PATH"""
    exclude: tuple[str, ...] = ()
    """path prefixes (relative to the root) not unpacked: parts of the package the agent does not
    need in a worker (they are not in the image either)"""

    @property
    def spec(self) -> str:
        """``name@version``, as npm takes it"""
        return f"{self.name}@{self.version}"

    def image_inputs(self) -> dict[str, object]:
        """What the image hash must cover for this package."""
        return {"name": self.name, "version": self.version, "integrity": self.integrity,
                "entry": self.entry, "path_dirs": list(self.path_dirs),
                "exclude": list(self.exclude), "layout": CACHE_LAYOUT}


_CODEX_TRIPLE = "vendor/x86_64-unknown-linux-musl"

AGENT_PACKAGES: dict[str, AgentPackage] = {
    # The umbrella @anthropic-ai/claude-code (same version) is only a shim choosing this one.
    "claude": AgentPackage(
        agent="claude", name="@anthropic-ai/claude-code-linux-x64", version="2.1.332",
        integrity=("sha512-f4JWhzwYutJIHScC7/dYOPX6s28tt7ZADhsOi8zwOHq5fFPEuUeCh"
                   "h2NMfinSg0GrUckYxaeebC4h0DqiKzLcw=="),
        entry="claude"),
    # @openai/codex@0.171.0 is a Node shim; its linux-x64 binary is published as a version of the
    # same package name (the shim's optional dependency @openai/codex-linux-x64 aliases it).
    "codex": AgentPackage(
        agent="codex", name="@openai/codex", version="0.171.0-linux-x64",
        integrity=("sha512-l66NZkQgdk2C3pbcfULDz42yEUB581MVA6I+Y43Wp4OIqEy73HCdm"
                   "Z0GTjeAHY2ycuH4N00d9VsLrwT1jxshTw=="),
        entry=f"{_CODEX_TRIPLE}/bin/codex",
        path_dirs=(f"{_CODEX_TRIPLE}/codex-path",),
        exclude=(f"{_CODEX_TRIPLE}/codex-resources/voice/",)),
    # The umbrella @factory/cli@0.225.1 points at a platform version the registry lacks (npm then
    # installs only its shim): pin the platform package itself.
    "factory": AgentPackage(
        agent="factory", name="@factory/cli-linux-x64", version="0.225.2",
        integrity=("sha512-1ctPmJwAqs0s/QNiaFp6vxr90AQa7j3VgFzLns9OaTffzOCd4csEx"
                   "NpL4w99tNlBLmQbbYqp0rUHlAhoD8R31A=="),
        entry="bin/droid"),
}


class AgentFiles(Struct, frozen=True, kw_only=True):
    """An agent package, unpacked and verified in the cache."""
    package: AgentPackage
    root: Path
    """the package's files (npm's ``package/`` directory)"""

    @property
    def entry(self) -> str:
        return self.package.entry

    @property
    def binary(self) -> Path:
        return self.root / self.package.entry

    @property
    def version(self) -> str:
        return self.package.version

    @property
    def integrity(self) -> str:
        return self.package.integrity


Phase = Literal["cached", "fetching", "verifying", "unpacking", "ready"]


class Progress(Struct, frozen=True, kw_only=True):
    """Reported while an agent package is made ready: ``fetching`` repeats about once a second
    with the time spent so far; ``unpacking`` with bytes written of ``total`` bytes."""
    agent: str
    package: str
    """``name@version``"""
    phase: Phase
    elapsed_s: float = 0.0
    done: int = 0
    total: int = 0


ProgressFn = Callable[[Progress], None]


class AgentPackageError(ImageBuildError):
    """An agent package cannot be made ready: not fetchable (offline, no npm), or not what its
    pin says (integrity mismatch). The message names the package. An ImageBuildError: the worker
    image cannot be built without it."""


def package_for(agent: str) -> AgentPackage:
    try:
        return AGENT_PACKAGES[agent]
    except KeyError:
        raise ConfigError(f"agent {agent!r} has no pinned package; known: "
                          f"{', '.join(sorted(AGENT_PACKAGES))}") from None


def default_cache_dir() -> Path:
    """``$CORRAL_CACHE_DIR/agents``, else ``$XDG_CACHE_HOME/corral/agents``, else
    ``~/.cache/corral/agents``."""
    if d := os.environ.get("CORRAL_CACHE_DIR"):
        return Path(d) / "agents"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "corral" / "agents"


def cache_key(pkg: AgentPackage) -> str:
    """A directory name unique to package@version and integrity (and the cache layout)."""
    safe = pkg.name.lstrip("@").replace("/", "+")
    digest = hashlib.sha256(f"{pkg.integrity}|{pkg.exclude}|{CACHE_LAYOUT}".encode()).hexdigest()
    return f"{safe}@{pkg.version}-{digest[:16]}"


_MARKER = ".corral-package.json"


def cached_files(pkg: AgentPackage, cache_dir: Path | None = None) -> AgentFiles | None:
    """The package's files if they are complete in the cache, else None (runs nothing)."""
    d = (cache_dir or default_cache_dir()) / cache_key(pkg)
    try:
        marker = msgspec.json.decode((d / _MARKER).read_bytes(), type=AgentPackage)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    if marker != pkg:
        return None
    files = AgentFiles(package=pkg, root=d / "package")
    if not os.access(files.binary, os.X_OK):
        return None
    return files


_locks: dict[str, trio.Lock] = {}


async def ensure_agent_files(agent: str | AgentPackage, *, cache_dir: Path | None = None,
                             progress: ProgressFn | None = None,
                             npm: str = "npm") -> AgentFiles:
    """The agent's pinned package, unpacked and verified; fetched with ``npm pack`` unless the
    cache has it. Concurrent calls for one package share one fetch (within a process; across
    processes the last complete unpack wins, atomically)."""
    pkg = agent if isinstance(agent, AgentPackage) else package_for(agent)
    cache = cache_dir or default_cache_dir()
    report = progress or (lambda p: None)
    key = str(cache / cache_key(pkg))
    lock = _locks.setdefault(key, trio.Lock())
    async with lock:
        if (files := cached_files(pkg, cache)) is not None:
            report(Progress(agent=pkg.agent, package=pkg.spec, phase="cached"))
            return files
        return await _fetch(pkg, cache, report, npm)


async def _fetch(pkg: AgentPackage, cache: Path, report: ProgressFn, npm: str) -> AgentFiles:
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AgentPackageError(f"cannot fetch {pkg.spec}: cache directory {cache}: "
                                f"{exc.strerror}") from None
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
    try:
        tarball = await _npm_pack(pkg, work, report, npm)
        report(Progress(agent=pkg.agent, package=pkg.spec, phase="verifying"))
        actual = await trio.to_thread.run_sync(sri_sha512, tarball)
        if actual != pkg.integrity:
            raise AgentPackageError(
                f"{pkg.spec}: integrity mismatch: the pin says {pkg.integrity}, the fetched "
                f"tarball is {actual}; refusing to use it (a registry or mirror serving other "
                f"bytes, or a wrong pin)")
        unpacked = work / "unpacked"
        await trio.to_thread.run_sync(
            _unpack, pkg, tarball, unpacked, lambda p: trio.from_thread.run_sync(report, p))
        tarball.unlink()
        binary = unpacked / "package" / pkg.entry
        if not binary.is_file():
            raise AgentPackageError(f"{pkg.spec}: the package has no {pkg.entry} (the pin's "
                                    f"entry); its layout changed")
        binary.chmod(binary.stat().st_mode | 0o755)
        (unpacked / _MARKER).write_bytes(msgspec.json.encode(pkg))
        final = cache / cache_key(pkg)
        try:
            os.rename(unpacked, final)
        except OSError:
            # another process completed it first (rename onto a non-empty dir fails), or a
            # broken leftover is in the way: replace the leftover
            if cached_files(pkg, cache) is None:
                await trio.to_thread.run_sync(shutil.rmtree, final, True)
                os.rename(unpacked, final)
    finally:
        await trio.to_thread.run_sync(shutil.rmtree, work, True)
    files = cached_files(pkg, cache)
    if files is None:  # pragma: no cover - only if the cache is tampered with meanwhile
        raise AgentPackageError(f"{pkg.spec}: unpacked into {cache} but not found there after")
    report(Progress(agent=pkg.agent, package=pkg.spec, phase="ready"))
    return files


_OFFLINE_CODES = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT",
                  "ENETUNREACH", "EHOSTUNREACH", "ERR_SOCKET_TIMEOUT", "network")


async def _npm_pack(pkg: AgentPackage, dest: Path, report: ProgressFn, npm: str) -> Path:
    exe = shutil.which(npm)
    if exe is None:
        raise AgentPackageError(
            f"cannot fetch {pkg.spec} for agent {pkg.agent!r}: npm is not installed (and the "
            f"cache {dest.parent} does not have it); install npm or fill the cache on a machine "
            f"that has it")
    cmd = [exe, "pack", "--json", "--pack-destination", str(dest), pkg.spec]
    env = {**os.environ, "npm_config_update_notifier": "false", "npm_config_fund": "false",
           "npm_config_audit": "false"}
    start = trio.current_time()
    done = trio.Event()

    async def tick() -> None:
        while not done.is_set():
            report(Progress(agent=pkg.agent, package=pkg.spec, phase="fetching",
                            elapsed_s=trio.current_time() - start))
            with trio.move_on_after(1.0):
                await done.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        try:
            proc = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True,
                                          check=False, env=env, cwd=str(dest))
        finally:
            done.set()
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace")
        tail = "\n".join(line for line in err.splitlines() if line.strip())[-1500:]
        if any(code in err for code in _OFFLINE_CODES):
            why = "the package registry cannot be reached (offline?)"
        elif "E404" in err or "ETARGET" in err or "No matching version" in err:
            why = "the registry does not have this version"
        else:
            why = f"npm pack exited {proc.returncode}"
        raise AgentPackageError(
            f"cannot fetch {pkg.spec} for agent {pkg.agent!r}: {why}; the cache "
            f"{dest.parent} does not have it either.\n  npm said:\n    "
            + tail.replace("\n", "\n    "))
    tgz = [p for p in dest.iterdir() if p.name.endswith(".tgz")]
    if len(tgz) != 1:
        raise AgentPackageError(f"{pkg.spec}: npm pack succeeded but left {len(tgz)} tarballs "
                                f"in {dest}")
    return tgz[0]


def sri_sha512(path: Path) -> str:
    """npm's integrity string for a file: ``sha512-<base64 digest>``."""
    h = hashlib.sha512()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha512-" + base64.b64encode(h.digest()).decode()


def _unpack(pkg: AgentPackage, tarball: Path, dest: Path, report: ProgressFn) -> None:
    """Unpack the regular files and directories under ``package/``; nothing outside ``dest``
    (no links, no absolute or ``..`` paths, no device files)."""
    dest.mkdir()
    with tarfile.open(tarball, "r:gz") as tf:
        members = []
        for m in tf.getmembers():
            parts = PurePosixPath(m.name).parts
            if not parts or parts[0] != "package" or ".." in parts or m.name.startswith("/"):
                raise AgentPackageError(f"{pkg.spec}: unsafe path in the tarball: {m.name!r}")
            rel = "/".join(parts[1:])
            if any(rel.startswith(x) or rel + "/" == x for x in pkg.exclude):
                continue
            if not (m.isfile() or m.isdir()):
                raise AgentPackageError(f"{pkg.spec}: unexpected {m.type!r} entry {m.name!r}")
            members.append(m)
        total = sum(m.size for m in members)
        done = 0
        for m in members:
            target = dest / m.name
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(m)
            assert src is not None
            with src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            target.chmod(0o755 if m.mode & 0o111 else 0o644)
            done += m.size
            report(Progress(agent=pkg.agent, package=pkg.spec, phase="unpacking",
                            done=done, total=total))


def main(argv: list[str] | None = None) -> int:
    """``python -m runtime.agentpkgs [AGENT ...]``: make the pinned packages ready in the cache
    (all of them by default), showing progress on stderr. Exit 1 naming what failed."""
    import sys
    agents = (argv if argv is not None else sys.argv[1:]) or sorted(AGENT_PACKAGES)
    last: dict[str, tuple[str, int]] = {}

    def show(p: Progress) -> None:
        step = int(p.elapsed_s) // 5 if p.phase == "fetching" else \
            (p.done * 4 // p.total if p.total else 0)
        if last.get(p.agent) == (p.phase, step):
            return
        last[p.agent] = (p.phase, step)
        extra = (f" {p.elapsed_s:.0f} s" if p.phase == "fetching" else
                 f" {p.done / 1e6:.0f}/{p.total / 1e6:.0f} MB" if p.total else "")
        print(f"[agents] {p.agent}: {p.package} {p.phase}{extra}", file=sys.stderr, flush=True)

    async def run() -> int:
        failed = 0
        for agent in agents:
            try:
                files = await ensure_agent_files(agent, progress=show)
            except (AgentPackageError, ConfigError) as exc:
                print(f"[agents] {agent}: {exc}", file=sys.stderr, flush=True)
                failed += 1
                continue
            print(f"[agents] {agent}: ready in {files.root}", file=sys.stderr, flush=True)
        return 1 if failed else 0
    return trio.run(run)


if __name__ == "__main__":
    raise SystemExit(main())
