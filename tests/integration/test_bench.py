"""`corral bench --quick` keeps working (its numbers are not asserted: no timed tests)."""

import json
import subprocess
import sys
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[2]


async def test_bench_quick_runs_every_scenario(tmp_path, engine):
    out_file = tmp_path / "bench.json"
    proc = await trio.to_thread.run_sync(lambda: subprocess.run(
        [sys.executable, "-m", "runtime.apps.cli", "--log-level", "ERROR", "bench", "--quick",
         "--json", str(out_file)], cwd=ROOT, capture_output=True, text=True, timeout=600))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out_file.read_text())
    results = data["results"]
    assert data["quick"] is True
    adopts = getattr(engine, "flavour", "docker") == "docker"     # (crash safety needs Docker)
    for key in ("restart", "spawn", "task", "scale", "idle", "mailbox", "journal", "journal_real") \
            + (("adopt",) if adopts else ()):
        assert key in results, key
        assert "met" in results[key] and "target" in results[key]
    assert results["restart"]["corral_s"]["n"] == 3 and results["restart"]["corral_s"]["median"] > 0
    assert results["task"]["docker_exec_s"]["median"] > 0
    assert results["scale"]["workers"] == 1000
    assert results["journal_real"]["tasks"] == 200 and results["journal_real"]["tasks_per_s_with_journal"] > 0
    assert "summary:" in proc.stdout
    # the benchmark cleans up after itself
    assert await engine.container_list(labels={"corral.bench": "1"}) == []
