"""The chaos kit's private dockerd (runtime.chaoskit.dockerd): an engine of the tests' own, which
they may stop, kill and start again. It has the machine engine's images with the same ids, its
containers run on across a restart (live-restore) and can be attached to again, and its
teardown leaves nothing: no process (dockerd, containerd, shims, containers), no mount, no cgroup,
no directory; also when a test leaves it stopped with live containers, and also on failure."""

import io
import os
import re
import subprocess
import tarfile
import uuid

import pytest
import trio

from runtime.chaoskit.dockerd import _engine_procs, _mounts_under, private_dockerd, unavailable_reason
from runtime.engines import ContainerSpec, open_engine
from runtime.errors import EngineUnavailable

BASE = "corral/worker-base:latest"
TICKER = ["sh", "-c", "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.1; done"]


async def ticks_until(att, at_least: int) -> list[int]:
    """The tick numbers the container writes, until one is at least ``at_least``."""
    buf, seen = b"", []
    async for _, data in att.output:
        buf += data
        *lines, buf = buf.split(b"\n")
        seen += [int(m.group(1)) for line in lines if (m := re.fullmatch(rb"tick (\d+)", line))]
        if seen and seen[-1] >= at_least:
            return seen
    raise AssertionError(f"the output ended after ticks {seen}")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


async def test_it_answers_with_live_restore_and_the_base_image_of_the_same_id(private_docker, engine):
    with trio.fail_after(60):
        assert private_docker.url == f"unix://{private_docker.root}/docker.sock"
        assert private_docker.url != engine.url and private_docker.pid is not None
        info = private_docker.info()
        assert info.live_restore and info.containers == 0
        assert info.storage_driver == private_docker.storage_driver and info.storage_driver
        async with open_engine(private_docker.url) as mine:
            assert (await mine.image_inspect(BASE)).id == (await engine.image_inspect(BASE)).id
        assert private_docker.image_ids[BASE] == (await engine.image_inspect(BASE)).id
        # its command line is the one the rules ask for: no network of its own, a unix socket
        args = private_docker.args()
        for flag in ("--bridge=none", "--iptables=false", "--ip6tables=false", "--live-restore"):
            assert flag in args
        assert args[args.index("-H") + 1].startswith("unix://")
        assert args[args.index("--default-address-pool") + 1].startswith("base=198.18.")


async def test_subscribing_to_events_while_the_engine_is_down_is_engine_unavailable(private_docker):
    """What a watcher that resubscribes while dockerd restarts gets: EngineUnavailable itself,
    which it retries on (it was an ExceptionGroup around it, which took the supervisor down)."""
    with trio.fail_after(60):
        async with open_engine(private_docker.url) as e:
            await private_docker.stop()
            with pytest.raises(EngineUnavailable, match="cannot subscribe to events"):
                async with e.events():
                    pass
            await private_docker.start()
            async with e.events():
                pass


async def test_a_container_runs_on_across_a_restart_and_can_be_attached_again(private_docker):
    spec = ContainerSpec(image=BASE, name=f"t{uuid.uuid4().hex[:10]}", command=TICKER, stdin_once=False)
    with trio.fail_after(120):
        async with open_engine(private_docker.url) as e:
            cid = await e.container_create(spec)
            async with e.attach(cid) as att:
                await e.container_start(cid)
                first = await ticks_until(att, 3)
            before = await e.container_inspect(cid)
        assert before.running and before.pid and first[0] == 0

        old = private_docker.pid
        await private_docker.stop()
        assert private_docker.pid is None and not alive(old)
        assert alive(before.pid)                      # the engine is gone; the container is not
        await trio.sleep(0.5)
        await private_docker.start()

        await private_docker.restart()                # (the same once more, in one call)
        assert private_docker.pid not in (None, old)
        async with open_engine(private_docker.url) as e:
            after = await e.container_inspect(cid)
            assert (after.id, after.running, after.pid, after.started_at) == \
                   (cid, True, before.pid, before.started_at)
            async with e.attach(cid) as att:          # a new attach: the output still flows
                later = await ticks_until(att, first[-1] + 10)
            assert later[0] > first[-1] + 3           # it kept counting while the engine was down
            assert [(c.id, c.status) for c in await e.container_list()] == [(cid, "running")]


def tiny_image_tar() -> bytes:
    """A root filesystem of links into /usr, which the container gets from the host read-only:
    an image of a few hundred bytes that runs the host's `sleep`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("usr", "tmp"):
            d = tarfile.TarInfo(name)
            d.type, d.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(d)
        for name in ("bin", "lib", "lib64", "sbin"):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.SYMTYPE, f"usr/{name}"
            tar.addfile(link)
    return buf.getvalue()


async def docker_cli(d, *args: str, stdin: bytes = b"") -> str:
    r = await trio.run_process(["docker", "-H", d.url, *args], stdin=stdin, capture_stdout=True,
                               capture_stderr=True, check=False)
    assert r.returncode == 0, f"docker {' '.join(args)}: {r.stderr.decode()}"
    return r.stdout.decode().strip()


class Planted(Exception):
    pass


@pytest.mark.parametrize("how", ["stopped", "killed"])
async def test_teardown_leaves_nothing_even_with_live_containers_of_a_stopped_engine(how):
    """The hardest case: the test fails while the engine is stopped (or killed) and its
    live-restored containers run on, re-parented with their shims."""
    if unavailable_reason():
        pytest.skip(unavailable_reason())
    if subprocess.run(["which", "docker"], capture_output=True).returncode != 0:
        pytest.skip("the docker CLI is not installed")
    with trio.fail_after(120):
        with pytest.raises(Planted):
            async with private_dockerd(images=()) as d:
                root, cgroup_parent = d.root, d.cgroup_parent
                assert d.copy_cost == 0.0 and len(d.start_costs) == 1
                await docker_cli(d, "import", "-", "corral-test/tiny:1", stdin=tiny_image_tar())
                cids = [await docker_cli(d, "run", "-d", "--network", "none", "-v", "/usr:/usr:ro",
                                         "corral-test/tiny:1", "/usr/bin/sleep", "infinity")
                        for _ in range(2)]
                async with open_engine(d.url) as e:
                    pids = [(await e.container_inspect(c)).pid for c in cids]
                assert all(pids) and all(map(alive, pids))
                if how == "stopped":
                    await d.stop()
                else:
                    await d.kill()
                procs = _engine_procs(root)
                shims = [p for p in procs if p.name.startswith("containerd-shim")]
                assert len(shims) == 2, procs
                assert {p.name for p in procs} == {"containerd-shim-runc-v2", "sleep"}
                assert all(map(alive, pids))
                raise Planted()
    assert _engine_procs(root) == []
    assert not any(map(alive, pids + [p.pid for p in procs]))
    assert _mounts_under(root) == []
    assert not os.path.lexists(root)
    assert d.leftovers() == [] and not any(os.path.isdir(os.path.join(m, cgroup_parent.lstrip("/")))
                                          for m in ("/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids"))


@pytest.mark.corral_engine("private", deadline=120)
async def test_the_chaos_monkey_stops_a_private_engine_and_starts_it_again(corral_engine,
                                                                          corral_engine_control, chaos):
    d = corral_engine_control
    assert corral_engine.url == d.url
    with trio.fail_after(60):
        first = d.pid
        fault = await chaos.inject("stop_engine", for_s=0.5)
        assert fault is not None and "live-restore" in fault.detail and not d.running
        with pytest.raises(EngineUnavailable):
            await corral_engine.ping()
        while not d.running:          # (its dockerd is a process of its own: nothing to wait on)
            await trio.sleep(0.1)
        assert d.pid != first
        await corral_engine.ping()
        # stopped and left so: the harness starts it again for its cleanup
        assert await chaos.inject("stop_engine") is not None and not d.running
    assert [f.kind for f in chaos.harness.history.live_faults()] == ["stop_engine", "stop_engine"]
