"""The operator's entry points: `corral run` as a service, driven through its HTTP API."""

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import msgspec
import pytest
import trio

from runtime.apps.chaos import run_chaos
from tests.apiclient import ApiError, api, run_task, snapshot

CORRAL = [sys.executable, "-m", "runtime.apps.cli"]
ROOT = Path(__file__).resolve().parents[2]


async def test_corral_run_service_lifecycle(engine, corral_name, tmp_path):
    sock = str(tmp_path / "ctl.sock")
    cfg = tmp_path / "corral.toml"
    cfg.write_text(f'''
name = "{corral_name}"
strategy = "one_for_one"

[[workers]]
id = "solo"
agent = "claude"
stub_agent = true
capabilities = ["git"]

[[pools]]
name = "shells"
replicas = 2
[pools.worker]
agent = "shell"
''')
    proc = subprocess.Popen(CORRAL + ["--log-json", "run", "--config", str(cfg), "--socket", sock,
                                      "--state-dir", str(tmp_path / "state")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with trio.fail_after(90):
            while True:   # the socket appears once the supervisor runs; workers start behind it
                if os.path.exists(sock):
                    snap = await snapshot(sock)
                    names = [c.get("info", {}).get("id") or c.get("name") for c in snap["children"]]
                    ready = [c for c in snap["children"] if c.get("info", {}).get("state") == "ready"
                             or (c.get("type") == "pool" and c["replicas"] == 2)]
                    if len(ready) == 2:
                        break
                await trio.sleep(0.2)
            assert sorted(names) == ["shells", "solo"]
            res = await run_task(sock, worker_id="solo", prompt="hi")
            assert res["status"] == "ok" and res["output"] == "stub-claude: hi"
            res = await run_task(sock, pool="shells", prompt="echo pooled")
            assert res["output"] == "pooled\n"
            out = await trio.to_thread.run_sync(lambda: subprocess.run(
                CORRAL + ["ps", "--socket", sock], cwd=ROOT, capture_output=True, text=True))
            assert "worker solo" in out.stdout and "pool shells replicas=2" in out.stdout
            with pytest.raises(ApiError, match="Not Found") as err:
                await api(sock, "GET", "/v1/nope")
            assert (err.value.status, err.value.code) == (404, "not_found")
            assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
        proc.send_signal(signal.SIGTERM)
        rc = await trio.to_thread.run_sync(lambda: proc.wait(60))
        assert rc == 0, proc.stderr.read().decode()[-3000:]
        assert not os.path.exists(sock)
        assert await engine.container_list(labels={"corral.supervisor": corral_name}) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_corral_run_rejects_a_bad_config_naming_the_field(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('name = "x"\n[[workers]]\nagent = "shell"\nmemory = "lots"\n')
    out = subprocess.run(CORRAL + ["run", "--config", str(cfg), "--state-dir", str(tmp_path / "state")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert "$.workers[0].memory" in out.stderr


@pytest.mark.chaos
async def test_chaos_keeps_every_task_exactly_once(engine, corral_name):
    with trio.fail_after(120):
        report = await run_chaos(name=corral_name, workers=3, duration_s=8, kill_interval_s=0.7, seed=7)
    assert sum(report.actions.values()) >= 4
    assert report.tasks_submitted > 20
    assert report.ok, msgspec.json.encode(report).decode()


async def test_build_and_images_commands(engine):
    def corral(*args):
        return subprocess.run(CORRAL + ["--log-level", "ERROR", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
    out = await trio.to_thread.run_sync(lambda: corral("build", "--agent", "codex", "--cap", "git", "--stub"))
    assert out.returncode == 0, out.stderr
    tag = out.stdout.split()[0]
    assert tag.startswith("corral/worker-codex:")
    again = await trio.to_thread.run_sync(lambda: corral("build", "--agent", "codex", "--cap", "git", "--stub"))
    assert again.stdout.split()[0] == tag and "(reused)" in again.stdout
    dry = await trio.to_thread.run_sync(lambda: corral("build", "--agent", "claude", "--stub", "--dry-run"))
    assert "ENTRYPOINT" in dry.stdout and "ln -sf /opt/corral/stub_agent.py /usr/local/bin/claude" in dry.stdout
    bad = await trio.to_thread.run_sync(lambda: corral("build", "--agent", "codex", "--cap", "kubectl"))
    assert bad.returncode == 2 and "known capabilities" in bad.stderr
    listing = await trio.to_thread.run_sync(lambda: corral("images"))
    line = next(l for l in listing.stdout.splitlines() if l.startswith(tag))
    assert " codex " in line and " git " in line and " yes " in line


async def test_images_prune_removes_only_unused_corral_images(engine, corral_name):
    """Scoped to this test's own images: built on a base image of its own (a LABEL on top of
    corral/worker-base), so the prune cannot touch images other tests or users rely on."""
    from actors.builder import build_context
    from runtime import SupervisorConfig, WorkerSpec, open_supervisor

    def corral(*args):
        return subprocess.run(CORRAL + ["--log-level", "ERROR", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
    base = f"{corral_name}/base:latest"
    with trio.fail_after(240):
        await engine.image_build(build_context(
            f"FROM corral/worker-base:latest\nLABEL corral.test={corral_name}\n", {}), tag=base, labels={})
        try:
            built = await trio.to_thread.run_sync(lambda: corral("build", "--agent", "shell", "--base", base))
            unused = built.stdout.split()[0]
            async with open_supervisor(SupervisorConfig(name=corral_name, base_image=base), engine=engine) as sup:
                w = await sup.spawn(WorkerSpec(agent="factory", stub_agent=True))
                in_use = (await w.info()).image_tag
                out = await trio.to_thread.run_sync(lambda: corral("images", "prune", "--base", base))
                assert out.returncode == 0, out.stderr
                assert out.stdout.splitlines() == [f"removed {unused}", "1 image(s) removed, 1 kept"]
                assert (await engine.image_inspect(in_use)).id
            out = await trio.to_thread.run_sync(lambda: corral("images", "prune", "--base", base))
            assert out.stdout.splitlines() == [f"removed {in_use}", "1 image(s) removed, 0 kept"]
        finally:
            with trio.CancelScope(shield=True):
                await engine.image_remove(base, force=True)


async def test_the_demo_runs_and_cleans_up(engine):
    out = await trio.to_thread.run_sync(lambda: subprocess.run(
        CORRAL + ["--log-level", "ERROR", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=300))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "cause=killed" in out.stdout and "WorkerStartupError" in out.stdout
    assert "12 results, 12 ok" in out.stdout
    assert "containers left with label corral.supervisor=demo: 0" in out.stdout


# -- static configuration errors, client-side errors and escalations, as the operator sees them ----
def _no_traceback(out) -> str:
    err = out.stderr.decode(errors="replace") if isinstance(out.stderr, bytes) else out.stderr
    assert "Traceback" not in err, err
    return err


async def _corral(*args, timeout: float = 60):
    with trio.fail_after(timeout):
        return await trio.run_process([*CORRAL, *args], cwd=ROOT, check=False,
                                      capture_stdout=True, capture_stderr=True)


async def test_corral_run_finds_static_config_errors_before_starting_anything(engine, corral_name, tmp_path):
    cfg = tmp_path / "corral.toml"
    cfg.write_text(f'''
name = "{corral_name}"
[[workers]]
id = "solo"
agent = "gpt"
[[workers]]
id = "shells-1"
agent = "shell"
[[workers]]
id = "solo"
agent = "shell"
[[pools]]
name = "shells"
replicas = 1
[pools.worker]
agent = "shell"
capabilities = ["kubectl"]
''')
    out = await _corral("run", "--config", str(cfg), "--socket", str(tmp_path / "ctl.sock"),
                        "--state-dir", str(tmp_path / "state"), timeout=30)
    err = _no_traceback(out)
    assert out.returncode == 2, err
    assert err.startswith("corral: error: invalid config (4 problems)")
    for needle in ("`$.workers[0].agent`: unknown agent 'gpt'", "`$.workers[2].id`: duplicate worker id 'solo'",
                   "'shells-1' is the id of a member of pool 'shells'",
                   "`$.pools[0].worker.capabilities`: unknown capability 'kubectl'"):
        assert needle in err, err
    assert not os.path.exists(tmp_path / "ctl.sock")
    assert await engine.container_list(labels={"corral.supervisor": corral_name}) == []


async def test_client_errors_are_messages_not_tracebacks(tmp_path):
    from runtime import PoolSpec, SupervisorConfig, open_supervisor
    from runtime.apps.httpapi import serve_api
    from runtime.testing import FakeEngine

    sock = str(tmp_path / "ctl.sock")
    mute = str(tmp_path / "mute.sock")

    async def answer_nothing(task_status=trio.TASK_STATUS_IGNORED):
        """A `corral run` that dies mid-request: reads the request, closes without an answer."""
        s = trio.socket.socket(trio.socket.AF_UNIX)
        await s.bind(mute)
        s.listen(16)
        listener = trio.SocketListener(s)
        task_status.started()
        async with listener:
            while True:
                conn = await listener.accept()
                async with conn:
                    await conn.receive_some()

    with trio.fail_after(60):
        async with FakeEngine() as fake, \
                open_supervisor(SupervisorConfig(name="t", pools=[PoolSpec(name="p")]), engine=fake) as sup:
            async with trio.open_nursery() as n:
                api_ = await n.start(serve_api, sup, sock)
                await n.start(answer_nothing)
                out = await _corral("task", "--pool", "p", "--socket", sock, b"caf\xe9 \xff")
                assert out.returncode == 2 and _no_traceback(out).startswith(
                    "corral: error: the prompt argument is not valid UTF-8 text (byte 0xe9 at position 3)")
                out = await _corral("stop", "--socket", sock, b"w-\xff")
                assert out.returncode == 2 and "worker_id argument is not valid UTF-8" in _no_traceback(out)
                out = await _corral("task", "--pool", "p", "--socket", sock, "--timeout", "-1", "hi")
                assert out.returncode == 2 and "$.timeout_s" in _no_traceback(out)
                out = await _corral("task", "--pool", "p", "--socket", sock, "hi")
                assert (out.returncode, out.stdout) == (0, b"stub-shell: hi\n"), out
                out = await _corral("ps", "--socket", mute)
                assert out.returncode == 2 and f"`corral run` at {mute} closed the connection before " \
                    "answering (it stopped or crashed)" in _no_traceback(out)
                api_.stop()
                n.cancel_scope.cancel()
    missing = str(tmp_path / "no-such-dir" / "ctl.sock")
    out = await _corral("ps", "--socket", missing)
    assert out.returncode == 2 and f"cannot reach `corral run` at {missing}" in _no_traceback(out)


async def test_corral_run_with_a_socket_in_a_missing_directory_says_so(engine, corral_name, tmp_path):
    cfg = tmp_path / "corral.toml"
    cfg.write_text(f'name = "{corral_name}"\n[[workers]]\nid = "solo"\nagent = "shell"\n')
    missing = tmp_path / "no-such-dir" / "ctl.sock"
    out = await _corral("run", "--config", str(cfg), "--socket", str(missing),
                        "--state-dir", str(tmp_path / "state"), timeout=60)
    err = _no_traceback(out)
    assert out.returncode == 2, err
    assert f"cannot create the control socket {missing}: directory {missing.parent} does not exist" in err
    assert await engine.container_list(labels={"corral.supervisor": corral_name}) == []


async def test_an_escalation_exits_3_printing_why_and_the_deaths(engine, corral_name, tmp_path):
    cfg = tmp_path / "corral.toml"
    cfg.write_text(f'name = "{corral_name}"\nmax_restarts = 0\n[[workers]]\nid = "victim"\nagent = "shell"\n')
    sock = str(tmp_path / "ctl.sock")
    with trio.fail_after(120):
        proc = await trio.lowlevel.open_process(CORRAL + ["run", "--config", str(cfg), "--socket", sock,
                                                          "--state-dir", str(tmp_path / "state")],
                                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            while True:     # wait for the worker to be READY
                if os.path.exists(sock):
                    snap = await snapshot(sock)
                    if [c["info"]["state"] for c in snap["children"]] == ["ready"]:
                        break
                await trio.sleep(0.2)
            cid = snap["children"][0]["info"]["container_id"]
            await engine.container_kill(cid, "SIGKILL")
            err = b""
            async for chunk in proc.stderr:
                err += chunk
            assert await proc.wait() == 3, err.decode()[-3000:]
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    text = err.decode()
    assert "Traceback" not in text
    assert f"corral: supervisor {corral_name} escalated (intensity): 1 restarts within 60.0 s " \
        "exceed max_restarts=0" in text
    assert re.search(rf"^  worker victim generation 1: killed, exit code 137: .+ \(container {cid[:12]}\)$",
                     text, re.M), text
