"""A private Docker engine for tests and chaos runs: a dockerd of its own, which a test may stop,
kill and start again without touching the engine everyone else uses.

    async with private_dockerd() as d:              # root only; dockerd must be installed
        async with open_engine(d.url) as engine:    # unix:///var/lib/corral-dockerd-XXXX/docker.sock
            ...
        await d.restart()                           # SIGTERM, then start on the same data-root:
                                                    # with live-restore the containers ran on
    # gone: its containers, processes (dockerd, containerd, shims), mounts, cgroups, directories

It runs beside the machine's engine and shares nothing with it: its own data-root, exec-root,
pidfile, unix socket (no TCP), daemon.json and cgroup parent, all under one temporary directory
(``/var/lib/corral-dockerd-XXXX``). Its network is the one corral uses: none (``--bridge=none
--iptables=false --ip6tables=false``, no IP forwarding or masquerading, and a default address
pool inside 198.18.0.0/15 that nothing uses because no network is ever created). The storage
driver is the machine engine's (``docker info``), and the named images are copied from that
engine into it (``GET /images/get`` streamed into ``POST /images/load``: same image ids).

Closing it (also after a failure, a cancellation or Ctrl-C; a session fixture also registers
it with ``atexit``) starts it again if a test left it stopped, removes every container in it,
stops it, ends what is left of its processes by pid (the containerd-shims of live-restored
containers are re-parented and found by the private root in their command lines; only those),
unmounts what is mounted under its root, removes its cgroups and its directory, and then checks
that none of it is left: `DockerdError` names what is.

The process control is synchronous (subprocess, http.client on the unix sockets) so that the
pytest fixtures can hold one engine across a session, outside any one test's trio run; the
async methods run it in a worker thread.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import ipaddress
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

import trio

from ..errors import EngineError

DEFAULT_IMAGES = ("corral/worker-base:latest",)
ROOT_PREFIX = "corral-dockerd-"
DEFAULT_BASE_DIR = "/var/lib"
PROCESS_NAMES = frozenset({"dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v1",
                           "containerd-shim-runc-v2"})
"""the programs of an engine (``argv[0]``'s basename); a shim's descendants are its containers"""
ADDRESS_POOLS = tuple(f"198.18.{x}.0/20" for x in range(0, 256, 16))
"""inside 198.18.0.0/15 (198.19.0.0/16 is the test swarm's ingress pool): one is drawn at random"""
BENCHMARK_NET = ipaddress.ip_network("198.18.0.0/15")
MNT_DETACH = 2


class DockerdError(Exception):
    """The private engine could not start, copy an image, or be cleaned up entirely."""


class DockerdUnavailable(DockerdError):
    """A private dockerd cannot run here (not root, or dockerd is not installed)."""


def unavailable_reason() -> str | None:
    """Why a private dockerd cannot be started on this machine; None if it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "a private dockerd needs root"
    for prog in ("dockerd", "containerd"):
        if shutil.which(prog) is None:
            return f"{prog} is not installed (scripts/setup installs docker.io as root on Debian)"
    return None


# -- processes, mounts, cgroups -------------------------------------------------------------------
@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    start: int
    """start time in clock ticks since boot (with the pid: the process, not a reused pid)"""
    state: str
    argv: tuple[str, ...]

    @property
    def name(self) -> str:
        return os.path.basename(self.argv[0]) if self.argv else ""

    def describe(self) -> str:
        return f"{self.pid} {' '.join(self.argv)[:160]}"


def _proc(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = tuple(a.decode(errors="replace") for a in f.read().split(b"\0") if a)
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return Proc(pid, int(fields[1]), int(fields[19]), fields[0], argv)


def _all_procs() -> list[Proc]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            p = _proc(int(entry))
            if p is not None:
                out.append(p)
    return out


def _alive(p: Proc) -> bool:
    now = _proc(p.pid)
    return now is not None and now.start == p.start and now.state not in ("Z", "X")


def _engine_procs(root: str) -> list[Proc]:
    """The live processes of the engine under ``root``: its dockerd, containerd and shims (their
    command lines name the root), and the shims' descendants (the containers' processes)."""
    mark = root.rstrip("/") + "/"
    procs = [p for p in _all_procs() if p.state not in ("Z", "X")]
    mine = {p.pid: p for p in procs if p.name in PROCESS_NAMES and any(mark in a for a in p.argv)}
    shims = [p.pid for p in mine.values() if p.name.startswith("containerd-shim")]
    children: dict[int, list[Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    stack = list(shims)
    while stack:
        for c in children.get(stack.pop(), []):
            if c.pid not in mine:
                mine[c.pid] = c
                stack.append(c.pid)
    return sorted(mine.values(), key=lambda p: p.pid)


def _unescape(field: str) -> str:
    """A mountinfo path: spaces, tabs, newlines and backslashes come octal-escaped."""
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def _mounts_under(root: str) -> list[str]:
    root = root.rstrip("/")
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point == root or point.startswith(root + "/"):
                out.append(point)
    return out


def _cgroup_mounts() -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] in ("cgroup", "cgroup2"):
                out.append(_unescape(fields[4]))
    return out


def _cgroup_dirs(parent: str) -> list[str]:
    """The directories of cgroup ``parent`` (absolute, as given to ``--cgroup-parent``) in every
    mounted hierarchy, with their sub-groups, deepest first."""
    out: list[str] = []
    for mount in _cgroup_mounts():
        top = os.path.join(mount, parent.lstrip("/"))
        if not os.path.isdir(top):
            continue
        for dirpath, _, _ in os.walk(top):
            out.append(dirpath)
    return sorted(set(out), key=lambda d: (-d.count("/"), d))


def _docker() -> Any:
    """The Docker adapter's synchronous administration (imported when first needed)."""
    from ..engines import docker
    return docker


_libc: Any = None


def _umount(path: str) -> int:
    """umount2(path); lazily (MNT_DETACH) if it is busy. 0, or the errno."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    for flags in (0, MNT_DETACH):
        if _libc.umount2(os.fsencode(path), flags) == 0:
            return 0
        err = ctypes.get_errno()
        if err != errno.EBUSY:
            return err
    return errno.EBUSY


def _kill_cgroup(path: str) -> None:
    """SIGKILL every process in cgroup directory ``path`` (one of the engine's own)."""
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            pids = [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_gone(procs: Sequence[Proc], timeout: float) -> list[Proc]:
    deadline = time.monotonic() + timeout
    left = [p for p in procs if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if _alive(p)]
    return left


def _tail(path: str, n: int = 12) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


# -- the engine -----------------------------------------------------------------------------------
class PrivateDockerd:
    """A dockerd of its own (see the module's docstring). Use `private_dockerd()` in a trio
    program; the pytest fixture ``private_docker`` holds one per session.

    ``url`` (``unix://...``), ``pid`` (None while stopped), ``running``; ``start()``, ``stop()``
    (SIGTERM and wait: with live-restore the containers run on), ``kill()`` (SIGKILL),
    ``restart()``; ``remove_containers()``. ``start_costs`` (seconds, each start until the API
    answered), ``copy_cost`` and ``copy_bytes`` (the image copy) are measured."""

    def __init__(self, *, live_restore: bool = True, images: Sequence[str] = DEFAULT_IMAGES,
                 source_url: str | None = None, base_dir: str | None = None,
                 storage_driver: str | None = "auto", address_pool: str | None = None,
                 extra_args: Sequence[str] = (), start_timeout_s: float = 60.0) -> None:
        self.live_restore = live_restore
        self.images = tuple(images)
        self.source_url = source_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        self.base_dir = base_dir or DEFAULT_BASE_DIR
        self.storage_driver = storage_driver
        """"auto": the source engine's; None: dockerd's own choice"""
        self.address_pool = address_pool or random.choice(ADDRESS_POOLS)
        try:
            inside = ipaddress.ip_network(self.address_pool).subnet_of(BENCHMARK_NET)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            inside = False
        if not inside:
            raise DockerdError(f"address_pool {self.address_pool!r}: it must lie inside {BENCHMARK_NET}")
        self.extra_args = tuple(extra_args)
        if any("tcp://" in a or a in ("-H", "--host") or a.startswith("--host=") for a in self.extra_args):
            raise DockerdError("extra_args: the private dockerd listens on its unix socket only")
        self.start_timeout_s = start_timeout_s
        self.root: str | None = None
        self.start_costs: list[float] = []
        self.copy_cost: float | None = None
        self.copy_bytes = 0
        self.image_ids: dict[str, str] = {}
        """ref -> image id, in the source engine and (the same) here"""
        self._proc: subprocess.Popen | None = None
        self._ready = False
        """its dockerd answered since it was last started"""
        self._seen: dict[int, Proc] = {}
        """every dockerd and containerd of this engine seen (pid -> process)"""
        self._lock = threading.RLock()
        self._closed = False
        self._at_exit = False

    # -- paths ----------------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        if self.root is None:
            raise DockerdError("the private dockerd is not open")
        return os.path.join(self.root, *parts)

    @property
    def data_root(self) -> str:
        return self._path("data")

    @property
    def exec_root(self) -> str:
        return self._path("exec")

    @property
    def pidfile(self) -> str:
        return self._path("dockerd.pid")

    @property
    def socket(self) -> str:
        return self._path("docker.sock")

    @property
    def log_path(self) -> str:
        return self._path("dockerd.log")

    @property
    def url(self) -> str:
        return "unix://" + self.socket

    @property
    def cgroup_parent(self) -> str:
        return "/" + os.path.basename(self._path())

    @property
    def pid(self) -> int | None:
        """Its dockerd's pid while it runs."""
        return self._proc.pid if self.running else None

    @property
    def running(self) -> bool:
        """Its dockerd runs and has answered (`start()` has returned, no `stop()` began)."""
        return self._ready and self._process_alive()

    def _process_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def args(self) -> list[str]:
        """dockerd's command line."""
        args = [shutil.which("dockerd") or "dockerd",
                "--config-file", self._path("daemon.json"),
                "--data-root", self.data_root, "--exec-root", self.exec_root,
                "--pidfile", self.pidfile, "-H", self.url,
                "--bridge=none", "--iptables=false", "--ip6tables=false",
                "--ip-forward=false", "--ip-masq=false",
                "--default-address-pool", f"base={self.address_pool},size=24",
                "--cgroup-parent", self.cgroup_parent]
        if self.storage_driver:
            args += ["--storage-driver", self.storage_driver]
        if self.live_restore:
            args.append("--live-restore")
        return args + list(self.extra_args)

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<PrivateDockerd {self.root or '(not open)'} {state}>"

    # -- life (synchronous) -----------------------------------------------------------------------
    def open_sync(self) -> None:
        """Make its directory, start it, copy the images in."""
        reason = unavailable_reason()
        if reason is not None:
            raise DockerdUnavailable(reason)
        if self.root is not None:
            raise DockerdError("the private dockerd is open already")
        if self.storage_driver == "auto":
            try:
                self.storage_driver = _docker().admin_info(self.source_url).storage_driver or None
            except EngineError:
                self.storage_driver = None
        self.root = tempfile.mkdtemp(prefix=ROOT_PREFIX, dir=self.base_dir)
        try:
            with open(self._path("daemon.json"), "w") as f:
                f.write("{}\n")          # not the machine's /etc/docker/daemon.json
            with open(self._path("owner"), "w") as f:
                me = _proc(os.getpid())
                f.write(f"{os.getpid()} {me.start if me else 0}\n")
            self.start_sync()
            self.copy_images_sync()
        except BaseException as exc:
            try:
                self.close_sync()
            except DockerdError as cleanup:
                exc.add_note(str(cleanup))
            raise

    def _stale_containerd(self) -> None:
        """Until the containerd of a dockerd that was killed is gone (it dies with its parent),
        and its pidfile with it (else the next dockerd takes it for alive)."""
        exec_root = self.exec_root
        left = _wait_gone([p for p in _engine_procs(self._path()) if p.name == "containerd"], 10.0)
        if left:
            raise DockerdError(f"the previous containerd still runs: {[p.describe() for p in left]}")
        pidfile = os.path.join(exec_root, "containerd", "containerd.pid")
        try:
            os.unlink(pidfile)
        except FileNotFoundError:
            pass

    def start_sync(self) -> None:
        """Start dockerd (on the same data-root as before, if it ran before) and wait until it
        answers. Raises DockerdError with its log's tail if it exits or does not answer."""
        with self._lock:
            if self.running:
                return
            if self._process_alive():        # a start that failed half-way
                self._signal_and_wait(signal.SIGKILL, 10)
            self._reap()
            self._stale_containerd()
            t0 = time.monotonic()
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(self.args(), stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True,
                                              close_fds=True)
            proc = self._proc
            deadline = t0 + self.start_timeout_s
            while True:
                code = proc.poll()
                if code is not None:
                    self._proc = None
                    raise DockerdError(f"dockerd exited with {code} at start:\n{_tail(self.log_path)}")
                if self._answers():
                    self._ready = True
                    break
                if time.monotonic() > deadline:
                    self._signal_and_wait(signal.SIGKILL, 10)
                    raise DockerdError(f"dockerd did not answer within {self.start_timeout_s:g} s:\n"
                                       f"{_tail(self.log_path)}")
                time.sleep(0.05)
            self.start_costs.append(time.monotonic() - t0)
            self._remember()

    def _answers(self) -> bool:
        return _docker().admin_ping(self.url)

    def _remember(self) -> None:
        for p in _engine_procs(self._path()):
            if p.name in ("dockerd", "containerd"):
                self._seen[p.pid] = p

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None
            self._ready = False

    def _signal_and_wait(self, sig: int, timeout: float) -> bool:
        """Signal dockerd; True once it and its containerd have ended within ``timeout``."""
        proc = self._proc
        if proc is None:
            return True
        self._ready = False
        self._remember()
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        self._proc = None
        ours = [p for p in self._seen.values() if p.name == "containerd"]
        return not _wait_gone(ours, max(1.0, timeout / 2))

    def stop_sync(self, *, grace_s: float = 30.0) -> None:
        """SIGTERM dockerd and wait until it (and its containerd) ended; SIGKILL after
        ``grace_s``. With live-restore its containers run on (their shims stay)."""
        with self._lock:
            if not self._process_alive():
                self._reap()
                return
            if not self._signal_and_wait(signal.SIGTERM, grace_s):
                self._signal_and_wait(signal.SIGKILL, 10)

    def kill_sync(self) -> None:
        """SIGKILL dockerd (its containerd dies with it; shims and containers run on)."""
        with self._lock:
            if self._process_alive():
                self._signal_and_wait(signal.SIGKILL, 10)
            self._reap()

    def restart_sync(self) -> None:
        self.stop_sync()
        self.start_sync()

    # -- its API ------------------------------------------------------------------------------
    def info(self):
        """Its ``docker info``, as `runtime.engines.docker.AdminInfo`."""
        return _docker().admin_info(self.url)

    def image_id(self, ref: str, *, source: bool = False) -> str | None:
        """The id of image ``ref`` here (``source``: in the engine the images come from)."""
        return _docker().admin_image_id(self.source_url if source else self.url, ref)

    def copy_images_sync(self, images: Sequence[str] | None = None) -> None:
        """Copy ``images`` (default: the constructor's) from the source engine: its
        ``GET /images/get`` streamed into ``POST /images/load`` here. The ids stay the same."""
        images = tuple(self.images if images is None else images)
        if not images:
            self.copy_cost = self.copy_cost or 0.0
            return
        t0 = time.monotonic()
        try:
            copied = _docker().admin_copy_images(self.source_url, self.url, images)
        except EngineError as exc:
            raise DockerdError(f"copying {', '.join(images)} into the private dockerd: {exc}"
                               + (" (scripts/setup builds corral/worker-base)"
                                  if "is not in the engine" in str(exc) else "")) from None
        for ref in images:
            want, have = self.image_id(ref, source=True), self.image_id(ref)
            if have != want:
                raise DockerdError(f"{ref}: loaded as {have}, the source has {want}")
            self.image_ids[ref] = have
        self.copy_cost = (self.copy_cost or 0.0) + time.monotonic() - t0
        self.copy_bytes += copied

    def remove_containers_sync(self) -> int:
        """Remove every container of this engine (forced, with their anonymous volumes).
        Returns how many there were."""
        docker = _docker()
        removed: set[str] = set()
        for _ in range(100):
            ids = docker.admin_container_ids(self.url)
            if not ids:
                return len(removed)
            for cid in ids:
                if docker.admin_remove_container(self.url, cid):
                    removed.add(cid)
            time.sleep(0.1)
        raise DockerdError(f"containers are still there: {[c[:12] for c in docker.admin_container_ids(self.url)]}")

    # -- teardown -------------------------------------------------------------------------------
    def leftovers(self) -> list[str]:
        """What of this engine exists outside its running dockerd's care: after close, [] ."""
        if self.root is None:
            return []
        out = [f"process {p.describe()}" for p in _engine_procs(self.root)]
        out += [f"process {p.describe()}" for p in self._seen.values()
                if _alive(p) and f"process {p.describe()}" not in out]
        out += [f"mount {m}" for m in _mounts_under(self.root)]
        out += [f"cgroup {d}" for d in _cgroup_dirs(self.cgroup_parent)]
        if os.path.lexists(self.root):
            out.append(f"directory {self.root}")
        return out

    def close_sync(self) -> None:
        """Remove everything of it (see the module's docstring). Raises DockerdError naming
        whatever could not be removed. Safe to call twice."""
        with self._lock:
            if self._closed or self.root is None:
                return
            self._closed = True
            if self._at_exit:
                atexit.unregister(self.close_sync)
                self._at_exit = False
            problems: list[str] = []
            try:
                if not self.running and os.path.isdir(self.data_root):
                    self.start_sync()        # so that it removes its containers itself
                self.remove_containers_sync()
            except (DockerdError, EngineError, OSError) as exc:
                problems.append(f"(could not remove the containers through the API: {exc})")
            try:
                self.stop_sync(grace_s=20)
            except (DockerdError, OSError) as exc:
                problems.append(f"(stopping dockerd: {exc})")
            problems += _clean_root(self.root, self.cgroup_parent, seen=list(self._seen.values()))
            left = self.leftovers()
            if left:
                raise DockerdError("the private dockerd left behind: " + "; ".join(left)
                                   + ("\n" + "\n".join(problems) if problems else ""))

    def close_at_exit(self) -> None:
        """Close it when the interpreter exits, if nobody did before (a session fixture)."""
        with self._lock:
            if not self._at_exit and not self._closed:
                atexit.register(self.close_sync)
                self._at_exit = True

    # -- async ----------------------------------------------------------------------------------
    async def open(self) -> None:
        await trio.to_thread.run_sync(self.open_sync)

    async def start(self) -> None:
        """Start it (again: on the same data-root; containers that survived are there) and wait
        until it answers."""
        await trio.to_thread.run_sync(self.start_sync)

    async def stop(self) -> None:
        """SIGTERM, and wait until it ended (with live-restore its containers run on)."""
        await trio.to_thread.run_sync(self.stop_sync)

    async def kill(self) -> None:
        """SIGKILL, and wait until it ended."""
        await trio.to_thread.run_sync(self.kill_sync)

    async def restart(self) -> None:
        await trio.to_thread.run_sync(self.restart_sync)

    async def remove_containers(self) -> int:
        return await trio.to_thread.run_sync(self.remove_containers_sync)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.close_sync)


def _clean_root(root: str, cgroup_parent: str, *, seen: Sequence[Proc] = ()) -> list[str]:
    """End every process of the engine under ``root`` (by pid), unmount what is mounted under it,
    remove its cgroups and the directory. Returns what went wrong on the way."""
    problems: list[str] = []
    procs = _engine_procs(root) + [p for p in seen if _alive(p)]
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    left = _wait_gone(procs, 15.0)
    if left:
        problems.append(f"(still running after SIGKILL: {[p.describe() for p in left]})")
    for point in sorted(_mounts_under(root), key=lambda m: (-m.count("/"), m)):
        err = _umount(point)
        if err not in (0, errno.EINVAL, errno.ENOENT):    # EINVAL: gone with its parent already
            problems.append(f"(umount {point}: {os.strerror(err)})")
    deadline = time.monotonic() + 10.0
    for d in _cgroup_dirs(cgroup_parent):
        while True:
            try:
                os.rmdir(d)
                break
            except OSError as exc:
                # busy: a container's process is still dying (or was missed): it is in this
                # engine's own cgroup parent, so it is one of its containers'
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    problems.append(f"(rmdir {d}: {exc.strerror})")
                    break
                _kill_cgroup(d)
                time.sleep(0.05)
    if _mounts_under(root):             # never remove files through a mount that is left
        return problems
    # rm: twice as fast as shutil.rmtree on the image layers, and it stays on this filesystem
    r = subprocess.run(["rm", "-rf", "--one-file-system", "--", root], capture_output=True, text=True)
    if r.returncode != 0:
        problems.append(f"(rm -rf {root}: {r.stderr.strip()[-300:]})")
    return problems


def reap_stale(base_dir: str | None = None) -> list[str]:
    """Clean up after private engines whose owner process died without closing them (a test run
    that was SIGKILLed): the ``corral-dockerd-*`` directories under ``base_dir`` whose ``owner``
    is gone. Returns the roots cleaned."""
    cleaned = []
    for entry, root in orphaned_roots(base_dir or DEFAULT_BASE_DIR, ROOT_PREFIX):
        _clean_root(root, "/" + entry)
        cleaned.append(root)
    return cleaned


def owned_roots(base: str, prefix: str) -> list[tuple[str, str, int, bool]]:
    """(entry, path, owner pid, owner alive) of the directories ``prefix*`` under ``base`` with
    an ``owner`` file (its pid and start time: a reused pid is not the owner)."""
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return []
    found = []
    for entry in entries:
        root = os.path.join(base, entry)
        if not entry.startswith(prefix) or not os.path.isdir(root):
            continue
        try:
            with open(os.path.join(root, "owner")) as f:
                pid, start = (int(x) for x in f.read().split())
        except (OSError, ValueError):
            continue                     # not ours, or being made just now
        owner = _proc(pid)
        found.append((entry, root, pid, owner is not None and owner.start == start))
    return found


def orphaned_roots(base: str, prefix: str) -> list[tuple[str, str]]:
    """(entry, path) of those whose owner is gone."""
    return [(entry, root) for entry, root, _, alive in owned_roots(base, prefix) if not alive]


@asynccontextmanager
async def private_dockerd(*, live_restore: bool = True, images: Sequence[str] = DEFAULT_IMAGES,
                          **kwargs: Any) -> AsyncIterator[PrivateDockerd]:
    """A private dockerd for the block (see the module's docstring): started, with ``images``
    copied in from the machine's engine (``source_url=``, default DOCKER_HOST, else
    /var/run/docker.sock). Other keywords: ``base_dir`` (default /var/lib), ``storage_driver``
    ("auto": the source engine's), ``address_pool``, ``extra_args``, ``start_timeout_s``.
    Raises DockerdUnavailable when not root or dockerd is not installed."""
    d = PrivateDockerd(live_restore=live_restore, images=images, **kwargs)
    try:
        await d.open()
        yield d
    finally:
        await d.aclose()
