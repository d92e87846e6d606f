"""Embedded through `open_supervisor`, corral writes nothing to stdout or stderr unless the
application configured logging; then its events go through the standard `logging` module."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

APP = """
import trio
from runtime import open_supervisor, SupervisorConfig, WorkerSpec, PoolSpec, Task
from runtime.testing import FakeEngine

async def main():
    async with FakeEngine() as engine:
        cfg = SupervisorConfig(name="quiet", pools=[PoolSpec(name="p", replicas=2)])
        async with open_supervisor(cfg, engine=engine) as sup:
            await sup.wait_configured()
            w = await sup.spawn(WorkerSpec(id="a"))
            await w.run(Task(prompt="hi"))
            await w.restart()
            info = await w.wait_until(lambda i: i.generation == 2 and i.state == "ready")
            engine.kill(info.container_id)                              # a death: a warning
            await w.wait_until(lambda i: i.generation == 3 and i.state == "ready")
            r = await sup.pool("p").run(Task(prompt="!exit 3"))         # a failed task
            assert r.status == "error"
trio.run(main)
"""


def run_app(prelude: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", prelude + APP], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_an_embedding_application_sees_nothing_it_did_not_ask_for():
    out = run_app()
    assert out.returncode == 0, out.stderr
    assert (out.stdout, out.stderr) == ("", "")


def test_with_logging_configured_the_events_go_through_the_logging_module():
    out = run_app("import logging; logging.basicConfig(level='INFO', format='%(name)s %(message)s')\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert any(line.startswith("corral.worker event='worker_died'") and "cause='killed'" in line
               for line in lines), out.stderr[-2000:]
    assert any(line.startswith("corral.worker event='worker_state'") for line in lines)


def test_warnings_only_when_the_application_says_so():
    out = run_app("import logging; logging.basicConfig(level='WARNING', format='%(name)s %(message)s')\n")
    assert out.returncode == 0, out.stderr
    assert "worker_died" in out.stderr and "worker_state" not in out.stderr
