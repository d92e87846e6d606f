"""Fuzzing the control socket: whatever a client sends, each request line gets one clear answer
and the supervision tree is untouched (same workers, same generations, no deaths, running)."""

import json
import random

import msgspec
import trio
import trio.testing
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from runtime import PoolSpec, SupervisorConfig, WorkerSpec, open_supervisor
from runtime.apps.control import handle
from runtime.testing import FakeEngine

CFG = SupervisorConfig(name="t", workers=[WorkerSpec(id="solo")], pools=[PoolSpec(name="p", replicas=2)])
IDS = {"solo", "p-1", "p-2"}
SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
           | st.text(max_size=20) | st.sampled_from(["", "solo", "p", "p-1", "a\x00b", "\ud800", "hi"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
requests = st.fixed_dictionaries(
    {"op": st.sampled_from(["snapshot", "spawn", "stop", "restart", "task", "dance", "", "TASK"])
     | json_values},
    optional={
        "worker_id": st.sampled_from(sorted(IDS) + ["nobody", ""]) | json_values,
        "pool": st.sampled_from(["p", "nope", "P"]) | json_values,
        "prompt": scalars | json_values,
        "args": st.lists(scalars, max_size=3) | json_values,
        "timeout_s": scalars,
        "max_attempts": st.integers(-10, 200) | scalars,
        "max_output_bytes": st.integers(-10, 10**7) | scalars,
        "task_id": scalars,
        "spec": json_values | st.fixed_dictionaries({}, optional={
            "agent": scalars, "id": scalars, "memory": scalars, "capabilities": json_values,
            "env": json_values, "restart": json_values}),
        "bogus": json_values,
    })


def dumps(value, ascii_only: bool) -> bytes:
    """JSON as other clients write it: NaN, lone surrogates (escaped, or as invalid UTF-8)."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


lines = (st.binary(max_size=300)
         | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))
         | st.builds(dumps, json_values, st.booleans())
         | st.builds(dumps, requests, st.booleans()))


def changes_the_tree(line: bytes) -> bool:
    """A valid request that is meant to change the tree (or to kill a worker): not fuzz."""
    try:
        req = json.loads(line)
    except (ValueError, RecursionError):
        return False
    if not isinstance(req, dict):
        return False
    op = req.get("op")
    if op == "spawn":
        try:
            msgspec.convert(req.get("spec") or {}, WorkerSpec)
        except (msgspec.ValidationError, ValueError, TypeError):
            return False
        return True
    if op in ("stop", "restart"):
        return isinstance(req.get("worker_id"), str) and req["worker_id"] in IDS
    if op == "task":
        prompt = req.get("prompt")
        return isinstance(prompt, str) and prompt.lstrip().startswith("!")   # stub directives
    return False


def tree(snap) -> tuple:
    workers = []

    def walk(node):
        for c in node.get("children", []) + node.get("workers", []):
            if c["type"] == "worker":
                i = c["info"]
                workers.append((i["id"], i["generation"], i["restarts"], i["last_death"],
                                c.get("deaths_by_cause")))
            walk(c)
    walk(snap)
    return snap["state"], sorted(workers, key=str)


def check_answer(line: bytes, answer) -> None:
    assert isinstance(answer, dict) and isinstance(answer.get("ok"), bool), (line, answer)
    msgspec.json.encode(answer)                      # it can be sent
    if answer["ok"]:
        assert set(answer) == {"ok", "result"}, (line, answer)
    else:
        assert set(answer) == {"ok", "error"}, (line, answer)
        error = answer["error"]
        assert isinstance(error, str) and error.strip(), (line, answer)
        assert not error.startswith("internal error"), (line, answer)


async def _fuzz_handler(batch: list[bytes]) -> None:
    async with FakeEngine() as engine:
        async with open_supervisor(CFG, engine=engine, rng=random.Random(1)) as sup:
            await sup.wait_configured()
            before = tree(msgspec.to_builtins(await sup.snapshot()))
            assert before[0] == "running"
            creates = engine.stats["creates"]
            for line in batch:
                with trio.fail_after(600):
                    check_answer(line, await handle(sup, line))
            assert tree(msgspec.to_builtins(await sup.snapshot())) == before
            assert engine.stats["creates"] == creates and engine.stats["kills"] == 0


@SETTINGS
@given(batch=st.lists(lines, min_size=1, max_size=10))
def test_any_request_gets_a_clear_answer_and_leaves_the_tree_alone(batch):
    assume(not any(changes_the_tree(line) for line in batch))
    trio.run(_fuzz_handler, batch, clock=trio.testing.MockClock(autojump_threshold=0))


async def _fuzz_connection(chunks: list[bytes]) -> None:
    from runtime.apps.control import serve_connection

    data = b"".join(chunks)
    expected = sum(1 for line in data.split(b"\n")[:-1] if line.strip())
    async with FakeEngine() as engine:
        async with open_supervisor(CFG, engine=engine, rng=random.Random(1)) as sup:
            await sup.wait_configured()
            before = tree(msgspec.to_builtins(await sup.snapshot()))
            client, server = trio.testing.memory_stream_pair()
            async with trio.open_nursery() as n:
                n.start_soon(serve_connection, sup, server)
                for chunk in chunks:
                    await client.send_all(chunk)
                got = b""
                with trio.fail_after(600):
                    while got.count(b"\n") < expected:
                        got += await client.receive_some()
                await client.aclose()
            answers = got.split(b"\n")[:-1]
            assert len(answers) == expected
            for a in answers:
                check_answer(data, json.loads(a))
            assert tree(msgspec.to_builtins(await sup.snapshot())) == before


@SETTINGS
@given(chunks=st.lists(st.binary(max_size=80) | lines.map(lambda b: b + b"\n"), min_size=1, max_size=8))
def test_any_byte_stream_gets_one_answer_per_request_line(chunks):
    assume(not any(changes_the_tree(line) for line in b"".join(chunks).split(b"\n")))
    trio.run(_fuzz_connection, chunks, clock=trio.testing.MockClock(autojump_threshold=0))
