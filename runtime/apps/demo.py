"""`corral demo`: the main job, end to end on the real engine, narrated."""

from __future__ import annotations

import sys
import time

import trio

from ..api import open_supervisor
from ..errors import WorkerStartupError
from ..specs import Backoff, PoolSpec, RestartPolicy, SupervisorConfig, Task, WorkerSpec


def say(msg: str = "") -> None:
    print(msg, flush=True)


def cert_line(c) -> str:
    return (f"cause={c.cause} exit_code={c.exit_code} generation={c.generation} ready={c.ready} "
            f"uptime={c.uptime_s:.2f}s restart_in={c.restart_in_s if c.restart_in_s is None else round(c.restart_in_s, 3)}"
            + (f"\n      reason: {c.reason}" if c.reason else ""))


async def demo(engine_url: str | None = None, name: str = "demo") -> int:
    t_start = time.monotonic()
    config = SupervisorConfig(name=name, engine_url=engine_url)
    async with open_supervisor(config) as sup:
        engine = sup.engine
        say(f"== corral demo: supervisor '{name}' on {engine.url}")

        say("\n1. Spawning one worker per agent (stub agents that speak the real output formats)")
        workers = {}
        for agent, caps in [("claude", ["git"]), ("factory", ["curl"]), ("codex", []), ("shell", [])]:
            t0 = time.monotonic()
            w = await sup.spawn(WorkerSpec(agent=agent, capabilities=caps, stub_agent=True,
                                           restart=RestartPolicy(backoff=Backoff(stable_s=1.0))))
            info = await w.info()
            workers[agent] = w
            say(f"   {agent:8} worker {w.id}  READY in {time.monotonic() - t0:.2f}s  "
                f"container {info.container_name} ({info.container_id[:12]})  image {info.image_tag}")

        say("\n2. Running tasks")
        for agent, w in workers.items():
            prompt = "echo hello from $(whoami) in $(pwd)" if agent == "shell" else "hello"
            r = await w.run(Task(prompt=prompt))
            say(f"   {agent:8} {r.status:5} {r.output.strip()!r}  ({r.duration_s * 1000:.0f} ms in the container)")
        r = await workers["claude"].run(Task(prompt="!exit 3"))
        say(f"   claude   '!exit 3' -> status={r.status} exit_code={r.exit_code}")

        say("\n3. `docker kill` of the claude worker's container")
        w = workers["claude"]
        old = await w.info()
        t0 = time.monotonic()
        await engine.container_kill(old.container_id)
        info = await w.wait_until(lambda i: i.generation == old.generation + 1 and i.state == "ready")
        say(f"   back READY in {time.monotonic() - t0:.2f}s as generation {info.generation} "
            f"({info.container_name}); the old container is gone")
        say(f"   death certificate: {cert_line(info.last_death)}")
        r = await w.run(Task(prompt="still here?"))
        say(f"   answers again: {r.output!r}")

        say("\n4. The wrapper crashes in the middle of a task ('!crash-wrapper')")
        r = await w.run(Task(prompt="!crash-wrapper"))
        say(f"   task status={r.status} (at-most-once by default); certificate: {cert_line(r.death)}")
        tail = [l for l in r.death.logs_tail.splitlines() if not l.startswith("{")][-2:]
        say("   log tail: " + " | ".join(tail))

        say("\n5. A worker whose agent CLI cannot start (CORRAL_STUB_FAIL_PROBE=1)")
        t0 = time.monotonic()
        try:
            await sup.spawn(WorkerSpec(agent="codex", stub_agent=True, env={"CORRAL_STUB_FAIL_PROBE": "1"}))
        except WorkerStartupError as exc:
            say(f"   WorkerStartupError after {time.monotonic() - t0:.2f}s (no restart loop): {exc}")

        say("\n6. A pool of 3 claude workers runs 12 tasks while one container is killed mid-run")
        pool = await sup.start_pool(PoolSpec(name="claude", replicas=3,
                                             worker=WorkerSpec(agent="claude", stub_agent=True)))
        results = []

        async def one(i: int) -> None:
            results.append(await pool.run(Task(prompt=f"!sleep 0.4 task {i}", max_attempts=3)))

        t0 = time.monotonic()
        async with trio.open_nursery() as n:
            for i in range(12):
                n.start_soon(one, i)
            await trio.sleep(0.6)
            victim = pool.workers[0]
            await engine.container_kill((await victim.info()).container_id)
        ok = sum(r.status == "ok" for r in results)
        redelivered = sum(r.attempts > 1 for r in results)
        say(f"   {len(results)} results, {ok} ok, {redelivered} redelivered after the kill, "
            f"in {time.monotonic() - t0:.2f}s; {victim.id} is now generation {(await victim.info()).generation}")

        say("\n7. Snapshot of the tree")
        snap = await sup.snapshot()
        for child in snap.children:
            if hasattr(child, "info"):
                i = child.info
                say(f"   worker {i.id:12} {i.agent:8} {i.state:7} gen={i.generation} restarts={i.restarts} "
                    f"last_death={i.last_death.cause if i.last_death else '-'}")
            elif hasattr(child, "workers"):
                say(f"   pool   {child.name:12} replicas={child.replicas} queued={child.queued}")
                for ws in child.workers:
                    i = ws.info
                    say(f"     worker {i.id:10} {i.state:7} gen={i.generation} restarts={i.restarts}")
        say("\n8. Leaving the supervisor block: every worker stops, every container is removed")
    from ..engines import open_engine
    async with open_engine(engine_url) as engine:
        left = await engine.container_list(labels={"corral.supervisor": name})
    say(f"   containers left with label corral.supervisor={name}: {len(left)}")
    say(f"\n== demo done in {time.monotonic() - t_start:.1f}s")
    return 0 if not left else 1


def main(engine_url: str | None = None) -> int:
    return trio.run(demo, engine_url)


if __name__ == "__main__":
    sys.exit(main())
