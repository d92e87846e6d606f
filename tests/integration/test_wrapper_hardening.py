"""One bad task, request or output can only ever fail itself: the worker-wrapper in a real
container (through corral's public API), where the /proc sweep covers the whole pid namespace."""

import trio

from runtime import SupervisorConfig, Task, WorkerSpec, open_supervisor

CAP = 256 * 1024       # Task.max_output_bytes default
SETSID_BOMB = ("echo 'setsid sh /tmp/b.sh & setsid sh /tmp/b.sh & wait' > /tmp/b.sh; "
               "setsid sh /tmp/b.sh & sleep 30")
LIST_PROCESSES = 'for p in /proc/[0-9]*; do read -r c < "$p/comm" && echo "$c"; done'


async def processes(w) -> list[str]:
    """The command names of every process in the worker's container, seen by a task (sh)."""
    r = await w.run(Task(prompt=LIST_PROCESSES))
    assert r.status == "ok", r
    return sorted(r.output.split())


async def assert_first_container(w) -> None:
    info = await w.info()
    assert (info.generation, info.restarts, info.last_death) == (1, 0, None), info


async def test_2mb_of_output_is_its_tail_not_a_dead_worker(engine, corral_name):
    with trio.fail_after(120):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            w = await sup.spawn(WorkerSpec(agent="shell"))
            r = await w.run(Task(prompt="yes 0123456789abcdef | head -c 2097152"))
            full = (b"0123456789abcdef\n" * (2097152 // 17 + 1))[:2097152].decode()
            assert (r.status, r.exit_code) == ("ok", 0), r.error
            assert len(r.output) == CAP and r.output == full[-CAP:]
            assert r.truncated is True
            r = await w.run(Task(prompt="head -c 3000000 /dev/urandom; echo; printf '\\001%.0s' $(seq 300000)",
                                 max_output_bytes=512 * 1024))
            assert r.status == "ok" and r.truncated and r.output.endswith("\x01" * 1000)
            r = await w.run(Task(prompt="echo small"))
            assert (r.status, r.output, r.truncated) == ("ok", "small\n", False)
            await assert_first_container(w)


async def test_300_kib_prompts_on_shell_and_claude(engine, corral_name):
    with trio.fail_after(180):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            s = await sup.spawn(WorkerSpec(agent="shell"))
            script = "# " + "x" * (300 * 1024) + "\nprintf '%s|' \"$0\" \"$@\"; echo; ls /tmp | wc -l"
            r = await s.run(Task(prompt=script, args=["zero", "one", "two words"]))
            assert (r.status, r.output) == ("ok", "zero|one|two words|\n1\n"), r.error   # its own file
            r = await s.run(Task(prompt="ls -A /tmp | wc -l"))
            assert r.output == "0\n"                                  # and it is gone
            c = await sup.spawn(WorkerSpec(agent="claude", stub_agent=True))
            prompt = "p" * (300 * 1024)
            r = await c.run(Task(prompt=prompt))
            assert r.status == "ok", r.error
            assert r.output == f"stub-claude: {prompt}"[-CAP:] and r.truncated
            r = await c.run(Task(prompt=prompt, max_output_bytes=512 * 1024))
            assert (r.output, r.truncated) == (f"stub-claude: {prompt}", False)
            r = await c.run(Task(prompt="!exit 4 " + " " * (100 * 1024)))
            assert (r.status, r.exit_code) == ("error", 4)
            await assert_first_container(s)
            await assert_first_container(c)


async def test_fork_bomb_under_a_pids_limit_fails_alone(engine, corral_name):
    with trio.fail_after(120):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            w = await sup.spawn(WorkerSpec(agent="shell", pids_limit=64))
            r = await w.run(Task(prompt="f(){ f & f & wait; }; f; sleep 30", timeout_s=3))
            assert r.status in ("timeout", "error"), r
            assert r.duration_s < 3 + 2 + 2, r          # its timeout, then the sweep (<= 2 s)
            r = await w.run(Task(prompt="echo alive"))
            assert (r.status, r.output) == ("ok", "alive\n")
            # only pid 1 (init), the wrapper and the shell that lists them
            assert await processes(w) == ["docker-init", "python3", "sh"]
            # one whose every process leaves the agent's process group and session
            r = await w.run(Task(prompt=SETSID_BOMB, timeout_s=3))
            assert r.status in ("timeout", "error"), r
            assert r.duration_s < 3 + 2 + 2, r
            assert await processes(w) == ["docker-init", "python3", "sh"]
            # and the bare kind, whose first shell returns at once: its children die with it
            r = await w.run(Task(prompt="f(){ f & f & }; f", timeout_s=3))
            assert r.status in ("ok", "timeout", "error"), r
            assert await processes(w) == ["docker-init", "python3", "sh"]
            await assert_first_container(w)


async def test_the_sweep_covers_the_whole_container(engine, corral_name):
    with trio.fail_after(120):
        async with open_supervisor(SupervisorConfig(name=corral_name), engine=engine) as sup:
            w = await sup.spawn(WorkerSpec(agent="shell"))
            cid = (await w.info()).container_id
            # children that escape the task's process group and session, and one that is not the
            # wrapper's descendant at all (docker exec)
            r = await w.run(Task(prompt="setsid sh -c 'sleep 1000 & sleep 1000' >/dev/null 2>&1 & "
                                        "(setsid sleep 1000 >/dev/null 2>&1 &); echo started"))
            assert (r.status, r.output) == ("ok", "started\n")
            assert await processes(w) == ["docker-init", "python3", "sh"]
            code, out = await engine.container_exec(cid, ["sh", "-c", "setsid sleep 1000 >/dev/null 2>&1 &"])
            assert code == 0, out
            # a root process (docker exec -u root) is nothing a task can make: it is left alone
            code, out = await engine.container_exec(
                cid, ["sh", "-c", "setsid sleep 999 >/dev/null 2>&1 &"], user="root")
            assert code == 0, out
            # seen while the listing task runs; swept when it ends (but the root one)
            assert await processes(w) == ["docker-init", "python3", "sh", "sleep", "sleep"]
            assert await processes(w) == ["docker-init", "python3", "sh", "sleep"]
            r = await w.run(Task(prompt="echo next"))
            assert (r.status, r.output) == ("ok", "next\n")
            await assert_first_container(w)
