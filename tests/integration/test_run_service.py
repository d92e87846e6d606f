"""`corral run` as an operator runs it: a real process on the real engine, driven by signals and
its control socket. Every test ends its process and leaves no container (corral_name checks)."""

import json
import os
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from tests.apiclient import run_task, snapshot
from runtime.engines import ContainerSpec
from runtime.errors import ContainerNotFound, CorralError

CORRAL = [sys.executable, "-m", "runtime.apps.cli"]
ROOT = Path(__file__).resolve().parents[2]
SHELLS = '''
[[pools]]
name = "shells"
replicas = {replicas}
[pools.worker]
agent = "shell"
'''


class Service:
    """A running `corral run`: its JSON log lines as they come, and its control socket."""

    def __init__(self, proc: trio.Process, sock: str) -> None:
        self.proc = proc
        self.sock = sock
        self.logs: list[dict] = []
        self.text: list[str] = []
        self._more = trio.Event()
        self.eof = False

    async def read_stderr(self) -> None:
        buf = b""
        async for chunk in self.proc.stderr:
            buf += chunk
            *done, buf = buf.split(b"\n")
            for raw in done:
                line = raw.decode(errors="replace")
                self.text.append(line)
                try:
                    self.logs.append(json.loads(line))
                except ValueError:
                    pass
            self._more.set()
            self._more = trio.Event()
        self.eof = True
        self._more.set()

    async def wait_log(self, event: str, **fields) -> dict:
        seen = 0
        while True:
            for entry in self.logs[seen:]:
                if entry.get("event") == event and all(entry.get(k) == v for k, v in fields.items()):
                    return entry
            seen = len(self.logs)
            if self.eof:
                raise AssertionError(f"corral run ended without logging {event} {fields}:\n"
                                     + self.stderr())
            await self._more.wait()

    def stderr(self) -> str:
        return "\n".join(self.text[-60:])

    async def worker(self, worker_id: str) -> dict:
        snap = await snapshot(self.sock)
        for child in snap["children"]:
            for w in child.get("workers", [child]):
                if w.get("type") == "worker" and w["info"]["id"] == worker_id:
                    return w["info"]
        raise AssertionError(f"no worker {worker_id} in {snap}")

    async def wait_worker_state(self, worker_id: str, state: str) -> dict:
        while True:     # the control API has no state-change feed: poll the snapshot
            info = await self.worker(worker_id)
            if info["state"] == state:
                return info
            await trio.sleep(0.1)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def wait(self) -> int:
        rc = await self.proc.wait()
        while not self.eof:
            await self._more.wait()
        return rc


async def stop_process(proc: trio.Process) -> None:
    """SIGTERM (a graceful stop: up to 60 s), then SIGKILL; shielded from cancellation."""
    with trio.CancelScope(shield=True):
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(60):
                await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@asynccontextmanager
async def corral_run(tmp_path: Path, name: str, body: str, *, sock: str | None = None):
    """`corral run` with its own socket and task journal under ``tmp_path`` (never the default
    state directory, /var/lib/corral/NAME as root: a test leaves nothing behind)."""
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(f'name = "{name}"\n{body}')
    sock = sock or str(tmp_path / "ctl.sock")
    proc = await trio.lowlevel.open_process(
        CORRAL + ["--log-json", "run", "--config", str(cfg), "--socket", sock,
                  "--state-dir", str(tmp_path / "state")],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    svc = Service(proc, sock)
    try:
        async with trio.open_nursery() as n:
            n.start_soon(svc.read_stderr)
            try:
                yield svc
            finally:
                await stop_process(proc)
                n.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()


async def run_cli(*args: str | bytes, timeout: float = 60) -> subprocess.CompletedProcess:
    with trio.fail_after(timeout):
        return await trio.run_process([*CORRAL, *args], cwd=ROOT, check=False,
                                      capture_stdout=True, capture_stderr=True)


def no_traceback(out: subprocess.CompletedProcess) -> str:
    err = out.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    return err


# -- finding 3 ----------------------------------------------------------------------------------
async def test_a_second_instance_of_a_name_refuses_and_leaves_the_first_alone(engine, corral_name, tmp_path):
    with trio.fail_after(120):
        async with corral_run(tmp_path, corral_name, SHELLS.format(replicas=1)) as first:
            await first.wait_log("configured_children_started")
            before = {c.id: c.status for c in
                      await engine.container_list(labels={"corral.supervisor": corral_name})}
            assert list(before.values()) == ["running"]
            # the same name and even the same socket: refused before anything is touched
            second = await run_cli("run", "--config", str(tmp_path / f"{corral_name}.toml"),
                                   "--socket", first.sock, "--state-dir", str(tmp_path / "state"))
            err = no_traceback(second)
            assert second.returncode == 2, err
            assert f"supervisor '{corral_name}' is already running" in err
            assert f"pid {first.proc.pid} holds" in err
            after = {c.id: c.status for c in
                     await engine.container_list(labels={"corral.supervisor": corral_name})}
            assert after == before
            res = await run_task(first.sock, pool="shells", prompt="echo still mine")
            assert res["output"] == "still mine\n"
            first.signal(signal.SIGTERM)
            assert await first.wait() == 0, first.stderr()


async def test_a_running_container_of_the_name_no_worker_claims_is_removed_when_corral_stops(
        engine, corral_name, tmp_path):
    """No corral holds the name's lock, so the instance that left it is gone: the start is not
    refused (it adopts what it can); a running container of a worker id it does not have is left
    alone while it runs, and removed when it stops (README, Adoption)."""
    with trio.fail_after(120):
        cid = await engine.container_create(ContainerSpec(
            image="corral/worker-base:latest", command=["sleep", "300"],
            labels={"corral.supervisor": corral_name, "corral.worker": "elsewhere",
                    "corral.generation": "1"}, name=f"{corral_name}-elsewhere"))
        try:
            await engine.container_start(cid)
            async with corral_run(tmp_path, corral_name, SHELLS.format(replicas=1)) as svc:
                await svc.wait_log("configured_children_started")
                survey = await svc.wait_log("containers_to_adopt")
                assert (survey["count"], survey["workers"]) == (1, ["elsewhere"])
                res = await call(svc.sock, {"op": "task", "pool": "shells", "prompt": "echo served"})
                assert res["output"] == "served\n"
                assert (await engine.container_inspect(cid)).running          # not touched
                assert sorted(c.labels["corral.worker"] for c in await engine.container_list(
                    labels={"corral.supervisor": corral_name})) == ["elsewhere", "shells-1"]
                svc.signal(signal.SIGTERM)
                assert await svc.wait() == 0, svc.stderr()
                assert any(e.get("event") == "container_swept" and e.get("container_id") == cid[:12]
                           for e in svc.logs), svc.stderr()
            assert await engine.container_list(labels={"corral.supervisor": corral_name}) == []
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await engine.container_remove(cid, force=True)
                except ContainerNotFound:
                    pass


# -- finding 6 ----------------------------------------------------------------------------------
async def test_an_interrupted_client_cancels_its_task_in_the_container(engine, corral_name, tmp_path):
    with trio.fail_after(120):
        async with corral_run(tmp_path, corral_name, SHELLS.format(replicas=1)) as svc:
            await svc.wait_log("configured_children_started")
            client = await trio.lowlevel.open_process(
                CORRAL + ["task", "--pool", "shells", "--socket", svc.sock, "sleep 600"],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                await svc.wait_worker_state("shells-1", "busy")
                client.send_signal(signal.SIGINT)           # Ctrl-C
                assert await client.wait() == 130
            finally:
                if client.returncode is None:
                    client.kill()
            with trio.fail_after(20):
                info = await svc.wait_worker_state("shells-1", "ready")
            assert info["generation"] == 1                   # the task was cancelled, not the container
            with trio.fail_after(20):
                res = await run_task(svc.sock, pool="shells", prompt="echo next")
            assert res["output"] == "next\n"


# -- finding 9 ----------------------------------------------------------------------------------
async def test_requests_sent_while_starting_wait_for_the_configured_tree(engine, corral_name, tmp_path):
    with trio.fail_after(120):
        async with corral_run(tmp_path, corral_name, SHELLS.format(replicas=3)) as svc:
            await svc.wait_log("control_socket_listening")
            res = await run_task(svc.sock, pool="shells", prompt="echo early")
            assert res["output"] == "early\n"
            assert any(e.get("event") == "configured_children_started" for e in svc.logs)


# -- findings 8 and 10: signals while stopping, requests in flight -------------------------------
async def test_in_flight_requests_at_sigterm_are_answered(engine, corral_name, tmp_path):
    with trio.fail_after(120):
        async with corral_run(tmp_path, corral_name, SHELLS.format(replicas=1)) as svc:
            await svc.wait_log("configured_children_started")
            errors = []

            async def ask() -> None:
                try:
                    await run_task(svc.sock, pool="shells", prompt="sleep 600")
                except CorralError as exc:
                    errors.append(str(exc))
            async with trio.open_nursery() as n:
                n.start_soon(ask)
                await svc.wait_worker_state("shells-1", "busy")
                svc.signal(signal.SIGTERM)
            assert errors == ["corral is shutting down"]
            assert await svc.wait() == 0, svc.stderr()
        assert await engine.container_list(labels={"corral.supervisor": corral_name}) == []


async def test_a_second_signal_while_stopping_forces_the_stop_and_still_removes_containers(
        engine, corral_name, tmp_path):
    # workers stop one after another (reverse start order): a graceful stop of six takes a while
    body = "".join(f'[[workers]]\nid = "w{i}"\nagent = "shell"\n' for i in range(6))
    with trio.fail_after(180):
        async with corral_run(tmp_path, corral_name, body) as svc:
            await svc.wait_log("configured_children_started")
            svc.signal(signal.SIGTERM)
            await svc.wait_log("worker_state", state="stopping")
            svc.signal(signal.SIGINT)
            await svc.wait_log("forced_stop")
            svc.signal(signal.SIGTERM)                   # a third one changes nothing
            with trio.fail_after(60):
                rc = await svc.wait()
            assert rc == 0, svc.stderr()
            assert any(e.get("event") == "stopped" and e.get("forced") for e in svc.logs), svc.stderr()
            assert await engine.container_list(labels={"corral.supervisor": corral_name}) == []
            assert not os.path.exists(svc.sock)


async def call(sock: str, req: dict) -> dict:
    """The control requests these tests make, over the HTTP API (runtime.apps.client): a task's
    journal record ("result"), or a task run to its end ("task"); answered as plain dicts."""
    import msgspec
    from runtime.apps.apitypes import TaskSubmit
    from runtime.apps.client import Client

    def go():
        with Client(sock) as c:
            if req["op"] == "result":
                return c.task(req["task_id"])
            assert req["op"] == "task"
            return c.run(TaskSubmit(**{k: v for k, v in req.items() if k != "op"}, wait=True))
    return msgspec.to_builtins(await trio.to_thread.run_sync(go))
