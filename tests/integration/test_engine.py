"""What is particular to the Docker adapter, against the real engine (the port's contract runs in
tests/contract for every adapter): the base image, both attach implementations, the hardening
policy as Docker sees it, unreachable engines."""

import functools
import time
import uuid

import pytest
import trio

from runtime.apps.baseimage import BASE_REF
from runtime.engines import STDOUT, ContainerSpec, TmpfsMount, open_engine
from runtime.errors import ContainerNotFound, EngineUnavailable


def config(sup_name, cmd, *, name, **extra):
    return ContainerSpec(image=BASE_REF, command=cmd, user="worker", name=name,
                         labels={"corral.supervisor": sup_name}, **extra)


async def run_collect(engine, cid):
    out = b""
    async with engine.attach(cid) as att:
        await engine.container_start(cid)
        async for stream, data in att.output:
            out += data
    return out.decode(), await engine.container_wait(cid)


async def test_worker_base_runs_as_worker_with_python_git_curl(engine, sup_name):
    with trio.fail_after(60):
        cid = await engine.container_create(config(sup_name, [
            "sh", "-c", "id -un; id -u; python3 --version; git --version; curl --version | head -1; "
                        "test -w /workspace && echo workspace-writable"], name=f"{sup_name}-base"))
        out, code = await run_collect(engine, cid)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[:2] == ["worker", "1000"]
    assert any(l.startswith("Python 3.") for l in lines)
    assert any(l.startswith("git version") for l in lines)
    assert any(l.startswith("curl ") for l in lines)
    assert "workspace-writable" in lines


@pytest.mark.parametrize("impl", ["native", "aiodocker"])
async def test_attach_round_trip_of_100_lines(engine, sup_name, impl):
    """Closing stdin must not lose output still in flight (it did on the aiodocker path in about
    1 run in 4): repeated, so that a lost tail shows."""
    engine.native_attach = impl == "native"
    for round_ in range(6):
        with trio.fail_after(60):
            cid = await engine.container_create(config(sup_name, ["cat"], name=f"{sup_name}-cat{round_}"))
            received = b""
            async with engine.attach(cid) as att:
                await engine.container_start(cid)
                sent = [f"line {i} {uuid.uuid4().hex}\n".encode() for i in range(100)]
                async with trio.open_nursery() as n:
                    async def reader():
                        nonlocal received
                        async for stream, data in att.output:
                            assert stream == STDOUT
                            received += data
                    n.start_soon(reader)
                    for line in sent:
                        await att.send(line)
                    await att.close_stdin()      # cat sees EOF and exits; output then closes
            assert received.splitlines(keepends=True) == sent, f"round {round_}"
            assert await engine.container_wait(cid) == 0
            await engine.container_remove(cid)





@pytest.mark.parametrize("how", ["stop", "restart"])
async def test_a_wait_during_a_stop_returns_the_exit_code_of_the_run_that_ended(engine, sup_name, how):
    """A container that ignores SIGTERM: a stop (or restart) takes its whole grace, then kills.
    A wait that starts meanwhile returns that run's exit code, 137. (Podman shows such a
    container as "stopping", not running, and its wait answered 0 at once: a `docker restart`
    came out of corral's certificate with exit code 0.)"""
    with trio.fail_after(60):
        cid = await engine.container_create(config(
            sup_name, ["sh", "-c", "trap '' TERM; echo up; while :; do sleep 0.1; done"],
            name=f"{sup_name}-{how}"))
        async with engine.attach(cid) as att:
            await engine.container_start(cid)
            assert (await att.output.receive())[1] == b"up\n"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(getattr(engine, f"container_{how}"), cid, grace_s=2))
            await trio.sleep(0.5)
            t0 = time.monotonic()
            assert await engine.container_wait(cid) == 137
            assert time.monotonic() - t0 > 0.5       # it waited for the end of the grace
        assert (await engine.container_inspect(cid)).running is (how == "restart")


@pytest.mark.parametrize("url", ["unix:///nonexistent/corral.sock", "tcp://127.0.0.1:9"])
async def test_unreachable_engine_raises_within_5s_naming_the_url(url):
    t0 = time.monotonic()
    with trio.fail_after(10):
        with pytest.raises(EngineUnavailable) as ei:
            async with open_engine(url):
                pass
    assert time.monotonic() - t0 < 5
    assert url in str(ei.value)



@pytest.mark.parametrize("impl", ["native", "aiodocker"])
async def test_attach_to_a_missing_container(engine, impl):
    engine.native_attach = impl == "native"
    with trio.fail_after(10):
        with pytest.raises(ContainerNotFound):
            async with engine.attach("corral-no-such-" + uuid.uuid4().hex):
                pass



async def test_every_container_gets_the_hardening_policy(engine, sup_name):
    """No network, no capabilities, no-new-privileges, an init, no restart, memory without swap:
    the adapter's fixed policy, whatever the spec (Docker's own view of the container)."""
    with trio.fail_after(30):
        cid = await engine.container_create(config(
            sup_name, ["true"], name=f"{sup_name}-hard", memory=64 << 20, cpus=0.5, pids_limit=64,
            read_only_rootfs=True, tmpfs=(TmpfsMount(path="/workspace", size=1 << 20, mode=0o755,
                                                     uid=1000, gid=1000),)))
        raw = await engine.container_inspect_raw(cid)
    host = raw["HostConfig"]
    assert host["NetworkMode"] == "none" and host["CapDrop"] == ["ALL"] and host["Init"] is True
    assert host["SecurityOpt"] == ["no-new-privileges"] and host["RestartPolicy"]["Name"] == "no"
    assert host["Memory"] == host["MemorySwap"] == 64 << 20 and host["NanoCpus"] == 500_000_000
    assert host["PidsLimit"] == 64 and host["ReadonlyRootfs"] is True
    assert host["Tmpfs"] == {"/workspace": "uid=1000,gid=1000,mode=0755,size=1048576"}
    assert raw["Config"]["OpenStdin"] is True and raw["Config"]["StdinOnce"] is True
    assert raw["Config"]["Tty"] is False
