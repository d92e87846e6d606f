"""The engine adapter against the real Docker engine."""

import time
import uuid

import pytest
import trio

from runtime.apps.baseimage import BASE_REF
from runtime.engine import open_engine
from runtime.engine_api import STDOUT
from runtime.errors import ContainerNotFound, EngineUnavailable, NameConflict


def config(sup_name, cmd, **extra):
    return {"Image": BASE_REF, "Cmd": cmd, "User": "worker", "Labels": {"corral.supervisor": sup_name},
            "AttachStdin": True, "AttachStdout": True, "AttachStderr": True, "OpenStdin": True,
            "StdinOnce": True, "Tty": False,
            "HostConfig": {"NetworkMode": "none", "CapDrop": ["ALL"], "Init": True}, **extra}


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
                        "test -w /workspace && echo workspace-writable"]), name=f"{sup_name}-base")
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
            cid = await engine.container_create(config(sup_name, ["cat"]), name=f"{sup_name}-cat{round_}")
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


async def test_events_subscription_sees_die_with_exit_code(engine, sup_name):
    with trio.fail_after(60):
        filters = {"type": ["container"], "label": [f"corral.supervisor={sup_name}"], "event": ["die"]}
        async with engine.events(filters=filters) as events:
            cid = await engine.container_create(config(sup_name, ["sh", "-c", "exit 7"]),
                                                name=f"{sup_name}-die")
            await engine.container_start(cid)
            async for ev in events.receive:
                if ev["Actor"]["ID"] == cid:
                    assert ev["Action"] == "die"
                    assert ev["Actor"]["Attributes"]["exitCode"] == "7"
                    break
        assert events.ended == "unsubscribed"


async def test_name_collision_raises_name_conflict(engine, sup_name):
    with trio.fail_after(30):
        name = f"{sup_name}-dup"
        await engine.container_create(config(sup_name, ["true"]), name=name)
        with pytest.raises(NameConflict) as ei:
            await engine.container_create(config(sup_name, ["true"]), name=name)
        assert "already in use" in str(ei.value)


async def test_missing_container_raises_container_not_found(engine):
    with pytest.raises(ContainerNotFound):
        await engine.container_inspect("corral-no-such-container-" + uuid.uuid4().hex)


@pytest.mark.parametrize("url", ["unix:///nonexistent/corral.sock", "tcp://127.0.0.1:9"])
async def test_unreachable_engine_raises_within_5s_naming_the_url(url):
    t0 = time.monotonic()
    with trio.fail_after(10):
        with pytest.raises(EngineUnavailable) as ei:
            async with open_engine(url):
                pass
    assert time.monotonic() - t0 < 5
    assert url in str(ei.value)


async def test_events_since_replays_what_happened_before_subscribing(engine, sup_name):
    with trio.fail_after(60):
        t0 = time.time() - 1
        cid = await engine.container_create(config(sup_name, ["sh", "-c", "exit 5"]), name=f"{sup_name}-old")
        await engine.container_start(cid)
        assert await engine.container_wait(cid) == 5
        filters = {"type": ["container"], "label": [f"corral.supervisor={sup_name}"], "event": ["die"]}
        async with engine.events(filters=filters, since=t0) as events:
            ev = await events.receive.receive()
        assert ev["Actor"]["ID"] == cid and ev["Actor"]["Attributes"]["exitCode"] == "5"


@pytest.mark.parametrize("impl", ["native", "aiodocker"])
async def test_attach_to_a_missing_container(engine, impl):
    engine.native_attach = impl == "native"
    with trio.fail_after(10):
        with pytest.raises(ContainerNotFound):
            async with engine.attach("corral-no-such-" + uuid.uuid4().hex):
                pass
