"""A minimal W3C WebDriver client (httpx over 127.0.0.1) for Debian's chromium + chromedriver:
enough to open a page, wait in the page for a condition (a MutationObserver, not a poll) and
take a screenshot. No browser download: `scripts/setup` installs both from Debian."""

from __future__ import annotations

import base64
import contextlib
import shutil
import socket
import subprocess
import time
from typing import Any, Iterator

import httpx

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def available() -> bool:
    return bool(shutil.which("chromium") and shutil.which("chromedriver"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    def __init__(self, url: str, session: str) -> None:
        self._http = httpx.Client(base_url=f"{url}/session/{session}", timeout=60)

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        r = self._http.request(method, path, json=body)
        value = r.json().get("value")
        if r.status_code >= 400:
            raise RuntimeError(f"webdriver {path}: {value}")
        return value

    def get(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def run(self, script: str, *args: Any) -> Any:
        return self._call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, condition_js: str, *args: Any, timeout_s: float) -> float:
        """Wait in the page until ``condition_js`` (a function body over ``args``, returning
        truthy) holds: checked at each DOM change. Returns the seconds it took; raises
        TimeoutError past ``timeout_s``."""
        self._call("POST", "/timeouts", {"script": int(timeout_s * 1000) + 1000})
        script = """
            const done = arguments[arguments.length - 1];
            const args = Array.prototype.slice.call(arguments, 0, -1);
            const check = new Function(...args.map((_, i) => "a" + i), %s);
            const t0 = performance.now();
            const test = () => { try { return check(...args); } catch (e) { return false; } };
            if (test()) { done(0); return; }
            const obs = new MutationObserver(() => {
                if (test()) { obs.disconnect(); clearTimeout(timer); done((performance.now() - t0) / 1000); }
            });
            obs.observe(document, {subtree: true, childList: true, attributes: true, characterData: true});
            const timer = setTimeout(() => { obs.disconnect(); done(-1); }, %d);
        """ % (repr_js(condition_js), int(timeout_s * 1000))
        took = self._call("POST", "/execute/async", {"script": script, "args": list(args)})
        if took < 0:
            raise TimeoutError(f"not within {timeout_s} s: {condition_js}")
        return took

    def screenshot(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(base64.b64decode(self._call("GET", "/screenshot")))


def repr_js(text: str) -> str:
    import json
    return json.dumps(text)


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 900) -> Iterator[Browser]:
    """A headless chromium session; the driver and the browser end with the block."""
    port = _free_port()
    driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}", "--allowed-ips=127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:           # the driver answers /status once it listens
            try:
                if httpx.get(f"{url}/status", timeout=2).json()["value"]["ready"]:
                    break
            except (httpx.TransportError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline or driver.poll() is not None:
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.1)
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", "--no-first-run",
                     "--disable-extensions", "--disable-background-networking"]}}}}
        r = httpx.post(f"{url}/session", json=caps, timeout=60)
        session = r.json()["value"].get("sessionId")
        if not session:
            raise RuntimeError(f"chromedriver: no session: {r.text[:500]}")
        browser = Browser(url, session)
        try:
            yield browser
        finally:
            with contextlib.suppress(httpx.HTTPError):
                httpx.delete(f"{url}/session/{session}", timeout=30)
    finally:
        driver.terminate()
        try:
            driver.wait(10)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait()
