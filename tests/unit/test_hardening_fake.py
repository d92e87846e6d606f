"""Hardening: one bad task can only ever fail itself (FakeEngine, autojump clock, exact times)."""

import msgspec
import pytest
import trio

from runtime import (Backoff, ConfigError, PoolSnapshot, PoolSpec, RestartPolicy, SupervisorConfig, Task,
                     WorkerSpec)
from runtime.testing import wait_for_generation

from .helpers import fake_supervisor

NOJITTER = Backoff(initial_s=0.5, factor=2.0, max_s=4.0, jitter="none", stable_s=10.0)


def tree_view(snap):
    """What a bystander would notice: every worker's id, state, generation and deaths."""
    out = []
    for c in snap.children:
        workers = c.workers if isinstance(c, PoolSnapshot) else [c]
        out += [(w.info.id, w.info.state, w.info.generation, len(w.deaths)) for w in workers]
    return (snap.state, out)


@pytest.mark.parametrize("prompt", ["echo caf\udce9", "a\x00b"])
async def test_a_bad_prompt_fails_that_task_and_nothing_else(autojump_clock, prompt):
    async with fake_supervisor() as (sup, engine):
        bystander = await sup.spawn(WorkerSpec(id="bystander"))
        pool = await sup.start_pool(PoolSpec(name="p", replicas=2))
        before = tree_view(await sup.snapshot())
        with pytest.raises(ConfigError) as ei:
            await pool.run(Task(prompt=prompt))
        assert "prompt" in str(ei.value)
        with pytest.raises(ConfigError):
            await pool.run(prompt)                 # the str shorthand is checked the same way
        with pytest.raises(ConfigError):
            await bystander.run(Task(prompt="ok", args=[prompt]))
        assert tree_view(await sup.snapshot()) == before
        assert (await pool.run("fine")).status == "ok"
        assert (await bystander.run("fine")).status == "ok"


@pytest.mark.parametrize("kwargs,field", [
    (dict(prompt=123), "$.prompt"), (dict(prompt=["a"]), "$.prompt"),
    (dict(prompt="x", max_attempts=0), "$.max_attempts"), (dict(prompt="x", max_attempts=-5), "$.max_attempts"),
    (dict(prompt="x", timeout_s=-1), "$.timeout_s"), (dict(prompt="x", timeout_s="abc"), "$.timeout_s"),
    (dict(prompt="x", max_output_bytes=10), "$.max_output_bytes"), (dict(prompt="x", task_id=""), "$.task_id"),
    (dict(prompt="x" * (1 << 20 + 1)), "1 MiB"),
])
def test_tasks_are_validated_when_built(kwargs, field):
    with pytest.raises(ConfigError) as ei:
        Task(**kwargs)
    assert field in str(ei.value)


@pytest.mark.parametrize("kwargs,field", [
    (dict(startup_timeout_s=-5), "$.startup_timeout_s"), (dict(pids_limit="many"), "$.pids_limit"),
    (dict(env={"A": "x\x00"}), "NUL"), (dict(env={"BAD-NAME": "x"}), "$.env"),
    (dict(disk=10), "$.disk"), (dict(id="Has Spaces"), "$.id"),
])
def test_worker_specs_are_validated_when_built(kwargs, field):
    with pytest.raises(ConfigError) as ei:
        WorkerSpec(**kwargs)
    assert field in str(ei.value)
    with pytest.raises(ConfigError):             # replace() builds a new spec: checked too
        msgspec.structs.replace(WorkerSpec(), **kwargs)


async def test_spawn_with_an_invalid_spec_is_a_config_error_not_a_trio_error(autojump_clock):
    async with fake_supervisor() as (sup, engine):
        with pytest.raises(ConfigError):
            await sup.spawn(WorkerSpec(startup_timeout_s=-5))
        with pytest.raises(ConfigError):
            await sup.spawn(startup_timeout_s=-5)
        assert (await sup.snapshot()).state == "running"


async def test_a_poison_task_fails_alone_and_never_escalates(autojump_clock):
    """Four tasks that each kill their container, with max_attempts=3: twelve deaths. They fail
    alone, marked poison; neither the pool's workers nor the supervisor give up."""
    policy = RestartPolicy(max_restarts=2, within_s=60, backoff=NOJITTER)
    cfg = SupervisorConfig(name="t", max_restarts=2, within_s=60)
    async with fake_supervisor(cfg) as (sup, engine):
        pool = await sup.start_pool(PoolSpec(name="p", replicas=2, worker=WorkerSpec(restart=policy)))
        results = []

        async def poison(i):
            results.append(await pool.run(Task(prompt="!crash-wrapper", max_attempts=3, task_id=f"bad-{i}")))
        async with trio.open_nursery() as n:
            for i in range(4):
                n.start_soon(poison, i)
        assert sorted(r.task_id for r in results) == [f"bad-{i}" for i in range(4)]
        for r in results:
            assert (r.status, r.attempts, r.poison) == ("worker_died", 3, True)
            assert r.death.cause == "crashed" and "poison task" in r.error
        snap = await sup.snapshot()
        deaths = sum(w.deaths_by_cause.get("crashed", 0) for w in snap.children[0].workers)
        assert deaths == 12 and snap.state == "running" and snap.restarts_in_window == 0
        r = await pool.run(Task(prompt="after"))
        assert r.status == "ok" and not r.poison


async def test_a_task_killed_from_outside_is_not_poison(autojump_clock):
    async with fake_supervisor() as (sup, engine):
        w = await sup.spawn(WorkerSpec(restart=RestartPolicy(backoff=NOJITTER)))
        async with trio.open_nursery() as n:
            results = []

            async def go():
                results.append(await w.run(Task(prompt="!sleep 10")))
            n.start_soon(go)
            await trio.sleep(1)
            engine.kill(engine.container_of(w.id).id)
        assert (results[0].status, results[0].poison, results[0].death.cause) == ("worker_died", False, "killed")
        assert (await sup.snapshot()).restarts_in_window == 1     # outside kills do count


async def test_corral_enforces_a_task_deadline_when_the_wrapper_does_not(autojump_clock):
    """A wrapper that keeps heartbeating but never ends its task (an agent it cannot kill): at
    timeout_s + task_grace_s the task is "timeout"; one more grace later the container is
    replaced, its certificate naming the task. The next task runs on the new container."""
    spec = WorkerSpec(task_grace_s=2.0, restart=RestartPolicy(backoff=NOJITTER, max_restarts=1))
    async with fake_supervisor() as (sup, engine):
        w = await sup.spawn(spec)
        engine.wedge(engine.container_of(w.id).id)
        t0 = trio.current_time()
        r = await w.run(Task(prompt="anything", timeout_s=5, task_id="wedged"))
        assert trio.current_time() - t0 == 7.0
        assert r.status == "timeout" and "corral ended the task" in r.error
        assert (await w.info()).state == "busy"       # the wrapper still owes its task_done
        await wait_for_generation(w, 2)
        assert trio.current_time() - t0 == 9.0
        death = (await w.info()).last_death
        assert death.cause == "hung" and "task wedged did not end" in death.reason
        assert (await w.run("next")).status == "ok"
        assert (await sup.snapshot()).restarts_in_window == 0   # charged to the task


async def test_tasks_queue_behind_a_wedged_task_and_run_after_the_replacement(autojump_clock):
    async with fake_supervisor() as (sup, engine):
        w = await sup.spawn(WorkerSpec(task_grace_s=1.0))
        engine.wedge(engine.container_of(w.id).id)
        async with trio.open_nursery() as n:
            results = {}

            async def go(name, task):
                results[name] = await w.run(task)
            n.start_soon(go, "stuck", Task(prompt="x", timeout_s=3))
            await trio.sleep(0.1)
            n.start_soon(go, "queued", Task(prompt="later"))
        assert results["stuck"].status == "timeout"
        assert (results["queued"].status, results["queued"].output) == ("ok", "stub-shell: later")


async def test_disk_limit_mounts_sized_tmpfs(autojump_clock):
    async with fake_supervisor() as (sup, engine):
        w = await sup.spawn(WorkerSpec(disk=64 << 20))
        tmpfs = {m.path: m for m in engine.container_of(w.id).spec.tmpfs}
        assert tmpfs["/workspace"].size == tmpfs["/tmp"].size == 64 << 20
