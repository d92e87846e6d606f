"""A test Docker Swarm of N nodes on this one machine, for the Swarm engine's tests and benchmarks.

    async with test_swarm(n=2) as swarm:            # root only; dockerd must be installed
        swarm.url                                   # swarm+unix:///var/lib/corral-swarm-XXXX/.../docker.sock
        async with open_engine(swarm.url) as engine:    # runtime.engines: a SwarmEngine
            ...
        await swarm.stop_node(2)                    # that node's dockerd is gone: the node is lost
    # gone: every node's containers, processes, mounts, cgroups, directories, and the namespaces

Each node is a private dockerd (`runtime.chaoskit.dockerd`: its own data and exec roots, pidfile,
unix socket, cgroup parent; the image copy that keeps ids; its teardown) started inside a
network namespace of its own (``nsenter --net=/var/run/netns/NAME``; ``ip netns exec`` breaks
dockerd) and a UTS namespace of its own (``unshare --uts``: its hostname is ``nI``). The nodes
are joined by veth pairs, one per pair of nodes: node I has the address 198.18.0.I/32 on its
loopback and a route to each other node's address through their veth. There is no default route
and no other interface: nothing but the nodes themselves is reachable from a node. Every dockerd
runs with ``--bridge=none --iptables=false --ip6tables=false`` and its own default address pool
inside 198.18.0.0/15; its API is its unix socket only (Swarm's own ports, 2377, 7946 and 4789,
are bound on the node's address inside its namespace). ``swarm init`` takes 198.19.0.0/16 (/24s)
for the ingress and any overlay network, and a node heartbeat of ``heartbeat_s`` (1 s: a lost
node is marked down within a few seconds). Node I carries the labels ``corral.node=nI`` and
``corral.engine=<its engine's unix URL>``, which `runtime.engines.swarm` reads.

Teardown (`close_sync`, also after a failure, a cancellation or Ctrl-C, and at interpreter exit
for a session fixture) removes every service, closes every node (`PrivateDockerd.close_sync`),
deletes the namespaces and the swarm's directory, then checks that none of it is left
(`DockerdError` names what is). `reap_stale_swarms()`, called at every start, does the same for a
swarm whose owner process died without closing it (a test run that was SIGKILLed).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Sequence

import trio

from ..errors import EngineError
from .dockerd import (
    DEFAULT_IMAGES,
    DockerdError,
    PrivateDockerd,
    _alive,
    _proc,
    orphaned_roots,
    owned_roots,
    reap_stale,
    unavailable_reason,
)

SWARM_PREFIX = "corral-swarm-"
DEFAULT_BASE_DIR = "/var/lib"
NETNS_DIR = "/var/run/netns"
NODE_NET = "198.18.0"
"""node I's address is 198.18.0.I (the nodes' default address pools start at 198.18.16.0)"""
INGRESS_POOL = "198.19.0.0/16"
MAX_NODES = 15


def _run(*args: str) -> str:
    r = subprocess.run(list(args), capture_output=True, text=True)
    if r.returncode != 0:
        raise DockerdError(f"{' '.join(args)}: {r.stderr.strip()[-300:]}")
    return r.stdout


def _docker() -> Any:
    from ..engines import docker
    return docker


def swarm_unavailable_reason() -> str | None:
    """Why a test swarm cannot run on this machine; None if it can."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    for prog in ("ip", "nsenter", "unshare"):
        if shutil.which(prog) is None:
            return f"{prog} is not installed"
    return None


class SwarmNode(PrivateDockerd):
    """A private dockerd in network namespace ``netns``, with hostname ``nI``."""

    def __init__(self, *, index: int, netns: str, **kwargs: Any) -> None:
        super().__init__(live_restore=False,     # dockerd refuses live-restore in swarm mode
                         address_pool=f"198.18.{16 * index}.0/20", **kwargs)
        self.index = index
        self.netns = netns
        self.hostname = f"n{index}"
        self.node_id = ""

    @property
    def addr(self) -> str:
        return f"{NODE_NET}.{self.index}"

    def args(self) -> list[str]:
        # nsenter, unshare and sh each exec the next: the process started is dockerd itself
        return [shutil.which("nsenter") or "nsenter", f"--net={NETNS_DIR}/{self.netns}",
                shutil.which("unshare") or "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.hostname] + super().args()


class TestSwarm:
    """N nodes (see the module's docstring). ``nodes[0]`` is the manager. Use `test_swarm()` in
    a trio program; ``open_sync`` / ``close_sync`` for a pytest session fixture."""

    __test__ = False           # not a pytest test class

    def __init__(self, n: int = 2, *, images: Sequence[str] = DEFAULT_IMAGES,
                 heartbeat_s: float = 1.0, base_dir: str | None = None,
                 source_url: str | None = None) -> None:
        if not 1 <= n <= MAX_NODES:
            raise DockerdError(f"a test swarm has 1 to {MAX_NODES} nodes, not {n}")
        self.n = n
        self.images = tuple(images)
        self.heartbeat_s = heartbeat_s
        self.base_dir = base_dir or DEFAULT_BASE_DIR
        self.source_url = source_url
        self.root: str | None = None
        self.token = ""
        self.nodes: list[SwarmNode] = []
        self.netns: list[str] = []
        self.up_s: float | None = None
        """seconds from nothing to every node ready in the swarm (image copies included)"""
        self.down_s: float | None = None
        self._lock = threading.RLock()
        self._closed = False
        self._at_exit = False

    @property
    def manager(self) -> SwarmNode:
        return self.nodes[0]

    @property
    def url(self) -> str:
        """The Swarm engine's URL for `runtime.engines.open_engine`."""
        return "swarm+" + self.manager.url

    def node(self, name: str | int) -> SwarmNode:
        """Node ``nI`` (or I)."""
        index = int(str(name).lstrip("n"))
        return self.nodes[index - 1]

    def __repr__(self) -> str:
        return f"<TestSwarm {self.root or '(not open)'} {len(self.nodes)} nodes>"

    # -- up -------------------------------------------------------------------------------------
    def open_sync(self) -> None:
        reason = swarm_unavailable_reason()
        if reason is not None:
            from .dockerd import DockerdUnavailable
            raise DockerdUnavailable(reason)
        if self.root is not None:
            raise DockerdError("the test swarm is open already")
        reap_stale_swarms(self.base_dir)
        t0 = time.monotonic()
        self.root = tempfile.mkdtemp(prefix=SWARM_PREFIX, dir=self.base_dir)
        self.token = os.path.basename(self.root)[len(SWARM_PREFIX):]
        try:
            with open(os.path.join(self.root, "owner"), "w") as f:
                me = _proc(os.getpid())
                f.write(f"{os.getpid()} {me.start if me else 0}\n")
            self._make_network()
            self.nodes = [SwarmNode(index=i, netns=self.netns[i - 1], images=self.images,
                                    base_dir=self.root, source_url=self.source_url)
                          for i in range(1, self.n + 1)]
            with ThreadPoolExecutor(self.n) as pool:
                for fut in [pool.submit(node.open_sync) for node in self.nodes]:
                    fut.result()
            self._form()
            self.up_s = time.monotonic() - t0
        except BaseException as exc:
            try:
                self.close_sync()
            except DockerdError as cleanup:
                exc.add_note(str(cleanup))
            raise

    def _make_network(self) -> None:
        assert self.root is not None
        names = [f"{SWARM_PREFIX}{self.token}-n{i}" for i in range(1, self.n + 1)]
        for name in names:
            with open(os.path.join(self.root, "netns"), "a") as f:    # before it exists: reaped
                f.write(name + "\n")
            _run("ip", "netns", "add", name)
            self.netns.append(name)
            _run("ip", "-n", name, "link", "set", "lo", "up")
            _run("ip", "-n", name, "addr", "add", f"{NODE_NET}.{len(self.netns)}/32", "dev", "lo")
        for i in range(1, self.n + 1):
            for j in range(i + 1, self.n + 1):
                a, b = f"sw{i}to{j}", f"sw{j}to{i}"
                _run("ip", "link", "add", "name", a, "netns", names[i - 1], "type", "veth",
                     "peer", "name", b, "netns", names[j - 1])
                for ns, dev, src, dst in ((names[i - 1], a, i, j), (names[j - 1], b, j, i)):
                    _run("ip", "-n", ns, "link", "set", dev, "up")
                    _run("ip", "-n", ns, "route", "add", f"{NODE_NET}.{dst}/32", "dev", dev,
                         "src", f"{NODE_NET}.{src}")

    def _form(self) -> None:
        docker = _docker()
        mgr = self.manager
        mgr.node_id = docker.admin_swarm_init(mgr.url, addr=mgr.addr, addr_pools=[INGRESS_POOL],
                                              pool_mask=24, heartbeat_s=self.heartbeat_s)
        token = docker.admin_swarm_worker_token(mgr.url)
        for node in self.nodes[1:]:
            docker.admin_swarm_join(node.url, addr=node.addr, manager_addr=mgr.addr, token=token)
            node.node_id = docker.admin_swarm_node_id(node.url)
        for node in self.nodes:
            docker.admin_node_labels(mgr.url, node.node_id,
                                     {"corral.node": node.hostname, "corral.engine": node.url})
        self.wait_nodes({node.hostname: "ready" for node in self.nodes}, timeout=60)
        for name, _driver, subnets in docker.admin_networks(mgr.url):
            for subnet in subnets:
                if not subnet.startswith("198.19."):
                    raise DockerdError(f"network {name} took {subnet}, outside {INGRESS_POOL}")

    # -- nodes ----------------------------------------------------------------------------------
    def node_states(self) -> dict[str, str]:
        """Each node's status as the manager sees it (hostname -> ready/down/...)."""
        return {n.hostname: n.status for n in _docker().admin_nodes(self.manager.url)}

    def wait_nodes(self, want: dict[str, str], *, timeout: float = 60.0) -> float:
        """Until the manager sees the nodes in ``want`` so; returns the seconds it took."""
        t0 = time.monotonic()
        while True:
            try:
                have = self.node_states()
            except EngineError:
                have = {}
            if all(have.get(k) == v for k, v in want.items()):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise DockerdError(f"nodes not {want} within {timeout:g} s: {have}")
            time.sleep(0.1)

    def stop_node_sync(self, name: str | int) -> None:
        """SIGTERM that node's dockerd (its containers stop with it) and wait until it ended."""
        self.node(name).stop_sync(grace_s=30)

    def start_node_sync(self, name: str | int) -> None:
        """Start that node's dockerd again; it rejoins the swarm by itself."""
        self.node(name).start_sync()

    async def stop_node(self, name: str | int) -> None:
        await trio.to_thread.run_sync(self.stop_node_sync, name)

    async def start_node(self, name: str | int) -> None:
        await trio.to_thread.run_sync(self.start_node_sync, name)

    # -- down -----------------------------------------------------------------------------------
    def leftovers(self) -> list[str]:
        """What of this swarm is left after close: []."""
        out: list[str] = []
        for node in self.nodes:
            out += node.leftovers()
        have = set(os.listdir(NETNS_DIR)) if os.path.isdir(NETNS_DIR) else set()
        out += [f"netns {ns}" for ns in self.netns if ns in have]
        if self.root and os.path.lexists(self.root):
            out.append(f"directory {self.root}")
        return out

    def close_sync(self) -> None:
        """Remove everything of it; DockerdError names what could not be. Safe to call twice."""
        with self._lock:
            if self._closed or self.root is None:
                return
            self._closed = True
            if self._at_exit:
                atexit.unregister(self.close_sync)
                self._at_exit = False
            t0 = time.monotonic()
            problems: list[str] = []
            docker = _docker()
            if self.nodes and self.manager.running:
                try:
                    for sid in docker.admin_service_ids(self.manager.url):
                        docker.admin_remove_service(self.manager.url, sid)
                except (EngineError, OSError) as exc:
                    problems.append(f"(removing the services: {exc})")
            with ThreadPoolExecutor(max(1, len(self.nodes))) as pool:
                futs = [(node, pool.submit(node.close_sync)) for node in reversed(self.nodes)]
                for node, fut in futs:
                    try:
                        fut.result()
                    except DockerdError as exc:
                        problems.append(f"(node {node.hostname}: {exc})")
            for ns in self.netns:
                problems += _delete_netns(ns)
            if not problems:
                subprocess.run(["rm", "-rf", "--one-file-system", "--", self.root], capture_output=True)
            self.down_s = time.monotonic() - t0
            left = self.leftovers()
            if left or problems:
                raise DockerdError("the test swarm left behind: " + "; ".join(left)
                                   + ("\n" + "\n".join(problems) if problems else ""))

    def close_at_exit(self) -> None:
        with self._lock:
            if not self._at_exit and not self._closed:
                atexit.register(self.close_sync)
                self._at_exit = True

    async def open(self) -> None:
        await trio.to_thread.run_sync(self.open_sync)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.close_sync)


def _delete_netns(name: str) -> list[str]:
    """End what still runs in namespace ``name`` (ours: only our nodes' processes run there),
    then delete it."""
    problems: list[str] = []
    if not os.path.exists(os.path.join(NETNS_DIR, name)):
        return problems
    r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    procs = [p for p in (_proc(int(x)) for x in r.stdout.split() if x.isdigit()) if p is not None]
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    r = subprocess.run(["ip", "netns", "delete", name], capture_output=True, text=True)
    if r.returncode != 0:
        problems.append(f"(ip netns delete {name}: {r.stderr.strip()})")
    return problems


def reap_stale_swarms(base_dir: str | None = None) -> list[str]:
    """Clean up after test swarms whose owner process died without closing them: their nodes
    (`runtime.chaoskit.dockerd.reap_stale`), namespaces and directories. Returns the roots."""
    cleaned = []
    for _, root in orphaned_roots(base_dir or DEFAULT_BASE_DIR, SWARM_PREFIX):
        try:
            with open(os.path.join(root, "netns")) as f:
                names = [line.strip() for line in f if line.strip().startswith(SWARM_PREFIX)]
        except OSError:
            names = []
        reap_stale(root)
        for ns in names:
            _delete_netns(ns)
        subprocess.run(["rm", "-rf", "--one-file-system", "--", root], capture_output=True)
        cleaned.append(root)
    return cleaned


@asynccontextmanager
async def test_swarm(n: int = 2, **kwargs: Any) -> AsyncIterator[TestSwarm]:
    """A test swarm of ``n`` nodes for the block (see the module's docstring). Keywords:
    ``images`` (copied into every node from the machine's engine; default the base image),
    ``heartbeat_s`` (default 1), ``base_dir`` (default /var/lib), ``source_url``."""
    swarm = TestSwarm(n, **kwargs)
    try:
        await swarm.open()
        yield swarm
    finally:
        await swarm.aclose()


test_swarm.__test__ = False  # type: ignore[attr-defined]


# -- scripts/swarm ----------------------------------------------------------------------------------
def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _running_swarms(base_dir: str) -> list[tuple[str, int]]:
    """(root, owner pid) of the test swarms whose owner lives."""
    return [(root, pid) for _, root, pid, alive in owned_roots(base_dir, SWARM_PREFIX) if alive]


def main(argv: Sequence[str] | None = None) -> int:
    """``up [-n N]``: bring a test swarm up and hold it (its URL is printed) until Ctrl-C or
    SIGTERM, then tear it down and check that nothing is left. ``down``: stop the swarms that
    ``up`` holds (SIGTERM to their ``up`` process) and clean up after dead ones. ``status``."""
    import argparse
    parser = argparse.ArgumentParser(prog="scripts/swarm", description=main.__doc__)
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("-n", type=int, default=2, help="nodes (default 2)")
    parser.add_argument("--base-dir", default=DEFAULT_BASE_DIR)
    args = parser.parse_args(argv)
    if args.command == "status":
        for root, pid in _running_swarms(args.base_dir):
            print(f"{root} (held by pid {pid})")
        return 0
    if args.command == "down":
        for root, pid in _running_swarms(args.base_dir):
            cmdline = " ".join(_proc(pid).argv) if _proc(pid) else ""   # type: ignore[union-attr]
            if "runtime.chaoskit.swarm" in cmdline:       # one that `up` holds (not a test run's)
                print(f"stopping {root} (pid {pid})", flush=True)
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 120
                while _proc(pid) is not None and time.monotonic() < deadline:
                    time.sleep(0.1)
        for root in reap_stale_swarms(args.base_dir):
            print(f"cleaned up {root}")
        return 0
    signal.signal(signal.SIGTERM, _interrupt)
    swarm = TestSwarm(args.n, base_dir=args.base_dir)
    try:
        swarm.open_sync()
        print(f"test swarm of {args.n} nodes up in {swarm.up_s:.1f} s", flush=True)
        for node in swarm.nodes:
            print(f"  {node.hostname}: {node.addr}  DOCKER_HOST={node.url}", flush=True)
        print(f"CORRAL_SWARM_URL={swarm.url}", flush=True)
        print("holding it until Ctrl-C or `scripts/swarm down`", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)       # the teardown runs to its end
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            swarm.close_sync()
            print(f"test swarm down in {swarm.down_s or 0:.1f} s: nothing left", flush=True)
        except DockerdError as exc:
            print(str(exc), flush=True)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
