"""Fuzzing the HTTP API: whatever a client sends, each request gets one clear answer (JSON, an
error with a stable code, never an internal error) and the supervision tree is untouched (same
workers, same generations, no deaths, running)."""

import json
import random
from urllib.parse import quote

import httpx
import msgspec
import trio
import trio.testing
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from runtime import PoolSpec, SupervisorConfig, WorkerSpec, open_supervisor
from runtime.apps.httpapi import CorralAPI
from runtime.testing import FakeEngine

CFG = SupervisorConfig(name="t", workers=[WorkerSpec(id="solo")], pools=[PoolSpec(name="p", replicas=2)])
IDS = {"solo", "p-1", "p-2"}
SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
           | st.text(max_size=20) | st.sampled_from(["", "solo", "p", "p-1", "a\x00b", "\ud800", "hi"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
task_bodies = st.fixed_dictionaries(
    {}, optional={
        "worker_id": st.sampled_from(sorted(IDS) + ["nobody", ""]) | json_values,
        "pool": st.sampled_from(["p", "nope", "P"]) | json_values,
        "prompt": scalars | json_values,
        "args": st.lists(scalars, max_size=3) | json_values,
        "timeout_s": scalars,
        "max_attempts": st.integers(-10, 200) | scalars,
        "max_output_bytes": st.integers(-10, 10**7) | scalars,
        "task_id": scalars,
        "wait": st.just(True) | scalars,
        "bogus": json_values,
    })
spawn_bodies = json_values | st.fixed_dictionaries({}, optional={
    "agent": scalars, "id": scalars, "memory": scalars, "capabilities": json_values,
    "env": json_values, "restart": json_values})
ids = (st.sampled_from(sorted(IDS) + ["nobody", "NOPE!", "..", "%2e%2e", "a%20b", "p"])
       | st.text(max_size=10).map(lambda t: quote(t.encode("utf-8", "surrogatepass"), safe="")))
paths = st.one_of(
    st.builds(lambda b: ("POST", "/v1/tasks", b), task_bodies),
    st.builds(lambda b: ("POST", "/v1/workers", b), spawn_bodies),
    st.builds(lambda i, b: ("POST", f"/v1/pools/{i}/scale", b), ids, json_values),
    st.builds(lambda m, i, a: (m, f"/v1/workers/{i}/{a}", None),
              st.sampled_from(["GET", "POST", "PUT", "DELETE"]), ids,
              st.sampled_from(["restart", "stop", "logs", "dance", ""])),
    st.builds(lambda m, i: (m, f"/v1/tasks/{i}", None), st.sampled_from(["GET", "DELETE", "PATCH"]), ids),
    st.builds(lambda p: ("GET", p, None), st.text(max_size=20).map(lambda t: "/" + quote(t.encode("utf-8", "surrogatepass")))),
)


def dumps(value, ascii_only: bool) -> bytes:
    """JSON as other clients write it: NaN, lone surrogates (escaped, or as invalid UTF-8)."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


bodies = (st.binary(max_size=300)
          | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))
          | st.builds(dumps, json_values, st.booleans()))
requests = (st.builds(lambda r, ascii_only: (r[0], r[1], dumps(r[2], ascii_only) if r[2] is not None else b""),
                      paths, st.booleans())
            | st.builds(lambda m, p, b: (m, p, b), st.sampled_from(["POST"]),
                        st.sampled_from(["/v1/tasks", "/v1/workers", "/v1/pools/p/scale"]), bodies))


def changes_the_tree(req) -> bool:
    """A valid request that is meant to change the tree (or to kill a worker): not fuzz."""
    method, path, body = req
    if method == "POST" and path.startswith("/v1/workers/") and path.rsplit("/", 1)[-1] in ("restart", "stop"):
        return path.split("/")[3] in IDS
    if path.startswith("/v1/pools/"):
        return True
    try:
        value = json.loads(body) if body else {}
    except (ValueError, RecursionError):
        return False
    if method == "POST" and path == "/v1/workers":
        try:
            msgspec.convert(value or {}, WorkerSpec)
        except (msgspec.ValidationError, ValueError, TypeError):
            return False
        return True
    if path == "/v1/tasks" and isinstance(value, dict):
        prompt = value.get("prompt")
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


def check_answer(req, r: httpx.Response) -> None:
    assert r.status_code < 500, (req, r.status_code, r.text)
    if r.headers.get("content-type", "").startswith("application/json"):
        answer = r.json()
        if r.status_code >= 400:
            assert set(answer) == {"code", "message"}, (req, answer)
            assert answer["code"] and answer["message"].strip(), (req, answer)
            assert answer["code"] != "internal_error", (req, answer)


async def _fuzz(batch) -> None:
    async with FakeEngine() as engine:
        async with open_supervisor(CFG, engine=engine, rng=random.Random(1)) as sup:
            await sup.wait_configured()
            before = tree(msgspec.to_builtins(await sup.snapshot()))
            assert before[0] == "running"
            creates = engine.stats["creates"]
            api = CorralAPI(sup)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api.app),
                                         base_url="http://corral") as c:
                for method, path, body in batch:
                    with trio.fail_after(600):
                        check_answer((method, path, body), await c.request(method, path, content=body))
            api.close()
            assert tree(msgspec.to_builtins(await sup.snapshot())) == before
            assert engine.stats["creates"] == creates and engine.stats["kills"] == 0


@SETTINGS
@given(batch=st.lists(requests, min_size=1, max_size=10))
def test_any_request_gets_a_clear_answer_and_leaves_the_tree_alone(batch):
    assume(not any(changes_the_tree(r) for r in batch))
    trio.run(_fuzz, batch, clock=trio.testing.MockClock(autojump_threshold=0))
