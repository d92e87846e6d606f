"""The dashboard in a real browser (Debian's chromium, driven over WebDriver): a worker's
container is killed, and the page shows the death and the new generation, live (no reload)."""

import os
import secrets
import time

import httpx
import pytest
import trio

from runtime import PoolSpec, SupervisorConfig, WorkerSpec, open_supervisor
from runtime.apps.httpapi import serve_api
from runtime.events import WorkerStateChanged

from tests import webdriver

pytestmark = pytest.mark.skipif(not webdriver.available(),
                                reason="needs chromium and chromedriver (scripts/setup installs them)")

ROW = 'return document.querySelector(`[data-worker="${a0}"][data-generation="${a1}"][data-state="ready"]`) !== null;'
DEATH_SHOWN = ('const r = document.querySelector(`[data-worker="${a0}"]`);'
               'return r !== null && r.textContent.includes("killed");')


async def test_the_dashboard_shows_a_kill_and_the_new_generation_live(engine, corral_name, tmp_path):
    token = secrets.token_hex(16)
    (tmp_path / "token").write_text(token + "\n")
    cfg = SupervisorConfig(name=corral_name, workers=[WorkerSpec(id="solo", agent="shell")],
                           pools=[PoolSpec(name="shells", replicas=2, worker=WorkerSpec(agent="shell"))])
    with trio.fail_after(240):
        async with open_supervisor(cfg, engine=engine) as sup, trio.open_nursery() as n:
            api = await n.start(lambda task_status: serve_api(
                sup, str(tmp_path / "api.sock"), tcp_port=0, token_file=str(tmp_path / "token"),
                task_status=task_status))
            await sup.wait_configured()
            page = f"http://127.0.0.1:{api.tcp_port}/"
            with webdriver.chromium() as browser:
                await trio.to_thread.run_sync(browser.get, page + f"?token={token}")
                await trio.to_thread.run_sync(lambda: browser.wait_for(ROW, "shells-1", 1, timeout_s=20))
                ready_at = {}

                def on(ev):
                    if isinstance(ev, WorkerStateChanged) and ev.worker_id == "shells-1" \
                            and ev.state == "ready" and ev.generation == 2:
                        ready_at["t"] = time.monotonic()
                sup.events.subscribe(on)
                info = await sup.worker("shells-1").info()
                killed_at = time.monotonic()
                await engine.container_kill(info.container_id, "SIGKILL")
                death_s = await trio.to_thread.run_sync(
                    lambda: browser.wait_for(DEATH_SHOWN, "shells-1", timeout_s=2))
                await trio.to_thread.run_sync(lambda: browser.wait_for(ROW, "shells-1", 2, timeout_s=30))
                shown_at = time.monotonic()
                assert "t" in ready_at
                # the page shows the death within 2 s of the kill, and the new generation within
                # 2 s of it being READY (docker's own restart time is not the page's)
                assert time.monotonic() - killed_at < 60
                assert death_s < 2.0, death_s
                assert shown_at - ready_at["t"] < 2.0, shown_at - ready_at["t"]
                # its certificate history, on a click
                await trio.to_thread.run_sync(browser.run, 'document.querySelector(\'[data-worker="shells-1"]\').click();')
                await trio.to_thread.run_sync(lambda: browser.wait_for(
                    'return document.querySelector(`[data-death="shells-1:1"]`) !== null;', timeout_s=5))
                text = await trio.to_thread.run_sync(browser.run, "return document.body.innerText;")
                assert "killed" in text and "gen 1" in text
                shot = os.environ.get("CORRAL_DASHBOARD_SCREENSHOT")
                if shot:
                    await trio.to_thread.run_sync(browser.screenshot, shot)
                # without the token: refused
                r = await trio.to_thread.run_sync(lambda: httpx.get(page, timeout=10))
                assert r.status_code == 401 and r.json()["code"] == "unauthorized"
            api.stop()
