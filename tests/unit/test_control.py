"""The control protocol of `corral run`, on FakeEngine."""

import msgspec

from runtime import PoolSpec, SupervisorConfig, WorkerSpec
from runtime.control import handle

from .helpers import fake_supervisor


async def ask(sup, **req):
    return await handle(sup, msgspec.json.encode(req))


async def test_control_ops(autojump_clock):
    cfg = SupervisorConfig(name="t", workers=[WorkerSpec(id="solo")], pools=[PoolSpec(name="p", replicas=2)])
    async with fake_supervisor(cfg) as (sup, engine):
        await sup.wait_configured()
        res = await ask(sup, op="spawn", spec={"id": "extra", "agent": "claude", "stub_agent": True})
        assert res["ok"] and res["result"]["id"] == "extra" and res["result"]["state"] == "ready"
        res = await ask(sup, op="task", pool="p", prompt="hi")
        assert res["ok"] and res["result"]["output"] == "stub-shell: hi"
        assert sup.worker("p-1").id == "p-1"          # pool workers are found by id too
        res = await ask(sup, op="task", worker_id="extra", prompt="yo")
        assert res["result"]["output"] == "stub-claude: yo"
        snap = await ask(sup, op="snapshot")
        kinds = sorted(c["type"] for c in snap["result"]["children"])
        assert kinds == ["pool", "worker", "worker"]
        assert (await ask(sup, op="stop", worker_id="extra"))["ok"]
        res = await ask(sup, op="stop", worker_id="nobody")
        assert not res["ok"] and "no worker 'nobody'" in res["error"]
        res = await ask(sup, op="spawn", spec={"agent": "shell", "bogus": 1})
        assert not res["ok"] and "bogus" in res["error"]
        res = await ask(sup, op="dance")
        assert not res["ok"] and "unknown op" in res["error"]
        res = await handle(sup, b"{not json")
        assert not res["ok"] and res["error"].startswith("bad request")
