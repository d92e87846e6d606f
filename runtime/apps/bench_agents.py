"""`corral bench` scenarios of the real agents (issue 11), measured side by side in one run:

  agent-image   a real agent's image cold (empty package cache, no image: npm fetch, agent image,
                worker image) vs warm (nothing changed: no fetch, no build), and a second worker
                image of the same agent (shares the agent layer); image sizes
  agent-spawn   a real-agent worker (claude) to READY vs a stub-agent worker to READY
  gateway       a streamed model response through corral (curl in the container -> the wrapper's
                endpoint -> frames over the attached stdio -> the supervisor's gateway -> the
                model API) vs the same API called directly from the host: time to first byte
                and total, as ratios

The model API here is a tiny streaming HTTP server of its own on the host's 127.0.0.1 (no test
dependency): ``/v1/messages`` answers a stream of Anthropic-style events, in chunks, when asked
by the benchmark's client, and holds the agent's own request open (so its task keeps running
while the benchmark's requests cross the gateway).

Hooked into runtime/apps/bench.py by ``run_agent_scenarios(bench, sup, engine, want)``; also runs
alone: ``python -m runtime.apps.bench_agents [--quick] [--only NAME]``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

AGENT_SCENARIOS = ("agent-image", "agent-spawn", "gateway")

SIZES = {True: {"image_agents": ("factory",), "spawn": 3, "requests": 20, "events": 100},
         False: {"image_agents": ("factory", "claude", "codex"), "spawn": 10, "requests": 100,
                 "events": 100}}
"""per --quick (True) or full (False)"""

BENCH_HEADER = "x-corral-bench"


# --- a tiny streaming model API ------------------------------------------------------------------

class StreamingAPI:
    """HTTP/1.1 on 127.0.0.1: POST /v1/messages with header ``x-corral-bench: GAP_MS`` answers
    ``events`` SSE events as chunks, GAP_MS apart (a message_start first, usage included); any
    other model request is held open after its first event (the agent waits: its task keeps
    running)."""

    def __init__(self, events: int) -> None:
        self.events = events
        self.url = ""
        self.on_held = lambda: None

    def _body(self) -> list[bytes]:
        start = {"type": "message_start", "message": {"id": "msg_b", "type": "message",
                 "role": "assistant", "model": "bench", "content": [], "stop_reason": None,
                 "usage": {"input_tokens": 11, "output_tokens": 1}}}
        out = [f"event: message_start\ndata: {json.dumps(start)}\n\n".encode()]
        delta = {"type": "content_block_delta", "index": 0,
                 "delta": {"type": "text_delta", "text": "x" * 64}}
        out += [f"event: content_block_delta\ndata: {json.dumps(delta)}\n\n".encode()] * (
            self.events - 2)
        out.append(b'event: message_stop\ndata: {"type": "message_stop"}\n\n')
        return out

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            head, _, rest = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in lines[1:])}
            need = int(headers.get("content-length", "0"))
            while len(rest) < need:
                data = await stream.receive_some(65536)
                if not data:
                    return
                rest += data
            method, path = lines[0].split(" ")[:2]
            if method == "HEAD" or not path.startswith("/v1/messages"):
                await stream.send_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n"
                                      b"connection: close\r\n\r\n")
                return
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                  b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n"
                                  b"connection: close\r\n\r\n")
            body = self._body()
            if BENCH_HEADER not in headers:
                await stream.send_all(b"%x\r\n%s\r\n" % (len(body[0]), body[0]))
                self.on_held()
                await trio.sleep_forever()
            gap_s = float(headers[BENCH_HEADER] or 0) / 1000
            for i, event in enumerate(body):
                if gap_s and i:
                    await trio.sleep(gap_s)
                await stream.send_all(b"%x\r\n%s\r\n" % (len(event), event))
            await stream.send_all(b"0\r\n\r\n")


class ServedAPI:
    """A StreamingAPI in a process of its own (so the supervisor's work does not delay its
    events): ``url``; ``held`` is set once it holds a request open (the agent's)."""

    def __init__(self, proc: trio.Process, url: str) -> None:
        self.proc = proc
        self.url = url
        self.held = trio.Event()


async def open_streaming_api(nursery: trio.Nursery, events: int) -> ServedAPI:
    import subprocess
    import sys
    proc = await nursery.start(partial(
        trio.run_process, [sys.executable, "-m", "runtime.apps.bench_agents", "--serve",
                           str(events)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        check=False))
    lines = _lines(proc.stdout)
    url = await lines.__anext__()
    api = ServedAPI(proc, url)

    async def watch() -> None:
        async for line in lines:
            if line == "held":
                api.held.set()
    nursery.start_soon(watch)
    return api


async def _lines(stream):
    buf = b""
    while True:
        data = await stream.receive_some(4096)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode().strip()


def _serve(events: int) -> None:
    """The --serve mode: print the URL, then ``held`` for each request held open."""
    import sys

    async def run() -> None:
        api = StreamingAPI(events)
        api.on_held = lambda: print("held", flush=True)
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, api.handle, 0,
                                                    host="127.0.0.1"))
            print(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}", flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)     # until the parent goes away
            nursery.cancel_scope.cancel()
    trio.run(run)


# --- helpers ---------------------------------------------------------------------------------

def summary(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    k = (len(v) - 1) * 0.95
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return {"median": statistics.median(v), "p95": v[lo] + (v[hi] - v[lo]) * (k - lo),
            "n": len(v)}


def curl_loop(url: str, n: int, gap_ms: float = 0) -> str:
    """A shell loop of ``n`` streamed requests (events ``gap_ms`` apart); prints ``status ttfb
    total`` for each."""
    body = json.dumps({"model": "bench", "max_tokens": 64, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]})
    return (f"for i in $(seq {n}); do curl -s -o /dev/null -w '%{{http_code}} "
            f"%{{time_starttransfer}} %{{time_total}}\\n' -H '{BENCH_HEADER}: {gap_ms:g}' "
            f"-H 'content-type: application/json' "
            f"-H 'anthropic-version: 2023-06-01' --data '{body}' {url}/v1/messages; done")


def parse_timings(text: str) -> tuple[list[float], list[float]]:
    """(ttfb, total) of each 200 response; anything else is an error of the benchmark."""
    ttfb, total = [], []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        if parts[0] != "200":
            raise RuntimeError(f"a benchmark request was answered {parts[0]}: {text[-500:]}")
        ttfb.append(float(parts[1]))
        total.append(float(parts[2]))
    return ttfb, total


# --- scenarios -------------------------------------------------------------------------------------

async def agent_image(bench, engine, quick: bool) -> None:
    """Cold (empty package cache, images absent) vs warm (no change: no build), per agent."""
    from actors.builder import (ImageBuilder, build_context, agent_image_inputs, agent_image_tag, image_inputs,
                                open_image_builder)
    from runtime.agentpkgs import ensure_agent_files
    from runtime.errors import CorralError

    from .baseimage import BASE_REF
    from .bench import Bench  # noqa: F401  (the reporter's type)

    tag = f"corral/bench-base:{bench.name}"
    base_ctx = build_context(f"FROM {BASE_REF}\nLABEL corral.bench={bench.name}\n", {})
    await engine.image_build(base_ctx, tag=tag, labels={"corral.bench": bench.name})
    cache = Path(tempfile.mkdtemp(prefix="corral-bench-cache-"))
    workers: list[str] = []
    agents: list[str] = []
    try:
        base_size = (await engine.image_inspect(tag)).size
        for agent in SIZES[quick]["image_agents"]:
            t0 = time.perf_counter()
            try:
                files = await ensure_agent_files(agent, cache_dir=cache)
            except CorralError as exc:
                bench.report(f"agent-image-{agent}", skipped=str(exc).splitlines()[0],
                         target="skipped", met=True)
                continue
            fetch_s = time.perf_counter() - t0
            async with open_image_builder(engine, base_image=tag,
                                          agent_cache_dir=cache) as b:
                t1 = time.perf_counter()
                img = await b.image_for(agent, [], stub_agent=False)
                build_s = time.perf_counter() - t1
                t2 = time.perf_counter()
                second = await b.image_for(agent, ["git", "workspace-tools"], stub_agent=False)
                second_s = time.perf_counter() - t2
                stats = b.statistics()
            workers += [img.tag, second.tag]
            base_id = (await engine.image_inspect(tag)).id
            agent_tag = agent_image_tag(agent_image_inputs(image_inputs(
                agent=agent, capabilities=[], stub_agent=False, base_image_id=base_id)))[0]
            agents.append(agent_tag)
            # warm: a new builder (as a new process would be) finds it: no fetch, no build
            warm = []
            for _ in range(5):
                b2 = ImageBuilder(engine, base_image=tag, agent_cache_dir=cache)
                t3 = time.perf_counter()
                again = await b2.image_for(agent, [], stub_agent=False)
                warm.append(time.perf_counter() - t3)
                assert not again.built and b2.stats.builds == 0 and b2.stats.agent_builds == 0
            worker_size = (await engine.image_inspect(img.tag)).size
            agent_size = (await engine.image_inspect(agent_tag)).size
            cold = fetch_s + build_s
            w = summary(warm)
            bench.report(f"agent-image-{agent}", package=files.package.spec,
                         cold_fetch_s=fetch_s, cold_build_s=build_s, cold_total_s=cold,
                         warm_no_change_s=w, ratio_warm_over_cold=w["median"] / cold,
                         second_worker_image_same_agent_s=second_s,
                         agent_images_built=stats.agent_builds,
                         base_mb=base_size / 1e6, agent_layer_mb=(agent_size - base_size) / 1e6,
                         worker_image_mb=worker_size / 1e6,
                         worker_layers_kb=(worker_size - agent_size) / 1e3,
                         target="warm: no build, < 0.1 s; a second worker image of the agent "
                                "reuses its agent image",
                         met=w["median"] < 0.1 and stats.agent_builds == 1)
    finally:
        with trio.CancelScope(shield=True):
            for ref in [*workers, *agents, tag]:     # children before their parents
                try:
                    await engine.image_remove(ref, force=True)
                except CorralError:
                    pass
            shutil.rmtree(cache, ignore_errors=True)


async def agent_spawn(bench, sup, engine, quick: bool) -> None:
    """Spawn to READY: a real claude worker (gateway on) vs a stub claude worker."""
    from runtime.errors import CorralError
    from runtime.specs import WorkerSpec
    n = SIZES[quick]["spawn"]
    real_spec = WorkerSpec(agent="claude", upstream="http://127.0.0.1:9",
                           secrets={"ANTHROPIC_API_KEY": "bench-not-a-key"})
    stub_spec = WorkerSpec(agent="claude", stub_agent=True)
    try:
        for s in (real_spec, stub_spec):      # images built (or found) before timing
            await (await sup.spawn(s)).stop()
    except CorralError as exc:
        bench.report("agent-spawn", skipped=str(exc).splitlines()[0],
                         target="skipped", met=True)
        return
    real, stub = [], []
    for i in range(n):
        for spec, out in ((real_spec, real), (stub_spec, stub))[::1 if i % 2 == 0 else -1]:
            t0 = time.perf_counter()
            w = await sup.spawn(spec)
            out.append(time.perf_counter() - t0)
            await w.stop()
    r, s = summary(real), summary(stub)
    bench.report("agent-spawn", workers=n, real_claude_to_ready_s=r, stub_claude_to_ready_s=s,
                 ratio_real_over_stub=r["median"] / s["median"],
                 target="real agent READY within 2x a stub's", met=r["median"] <= 2 * s["median"])


async def gateway(bench, sup, engine, quick: bool) -> None:
    """A streamed response through corral vs the same API from the host directly."""
    from runtime.errors import CorralError
    from runtime.specs import Task, WorkerSpec
    n, events = SIZES[quick]["requests"], SIZES[quick]["events"]
    async with trio.open_nursery() as nursery:
        api = await open_streaming_api(nursery, events)
        try:
            w = await sup.spawn(WorkerSpec(agent="claude", upstream=api.url,
                                           secrets={"ANTHROPIC_API_KEY": "bench-not-a-key"}))
        except CorralError as exc:
            bench.report("gateway", skipped=str(exc).splitlines()[0],
                         target="skipped", met=True)
            nursery.cancel_scope.cancel()
            return
        cid = (await w.info()).container_id
        # the agent's own request is held open: its task runs while we measure
        nursery.start_soon(partial(w.run, Task(prompt="wait", timeout_s=600)))
        with trio.fail_after(60):
            await api.held.wait()
        script = curl_loop("http://127.0.0.1:8787", 3)          # warm-up
        await engine.container_exec(cid, ["sh", "-c", script])
        await trio.run_process(["sh", "-c", curl_loop(api.url, 3)], capture_stdout=True)
        results = {}
        for label, gap_ms in (("burst", 0), ("paced", 2)):
            corral_ttfb, corral_total, direct_ttfb, direct_total = [], [], [], []
            for rnd in range(4):                 # alternate who goes first
                for who in (("corral", "direct") if rnd % 2 == 0 else ("direct", "corral")):
                    if who == "corral":
                        code, out = await engine.container_exec(cid, [
                            "sh", "-c", curl_loop("http://127.0.0.1:8787", n // 4, gap_ms)])
                        t, tot = parse_timings(out)
                        corral_ttfb += t
                        corral_total += tot
                    else:
                        p = await trio.run_process(
                            ["sh", "-c", curl_loop(api.url, n // 4, gap_ms)], capture_stdout=True)
                        t, tot = parse_timings(p.stdout.decode())
                        direct_ttfb += t
                        direct_total += tot
            results[label] = (gap_ms, *(summary(x) for x in (corral_ttfb, corral_total,
                                                             direct_ttfb, direct_total)))
        nursery.cancel_scope.cancel()
    await w.stop()
    for label, (gap_ms, ct, cto, dt, dto) in results.items():
        bench.report(f"gateway-{label}", requests=cto["n"], events_per_response=events,
                     event_gap_ms=gap_ms,
                     bytes_per_response=sum(len(b) for b in StreamingAPI(events)._body()),
                     corral_ttfb_s=ct, direct_ttfb_s=dt,
                     ratio_ttfb_corral_over_direct=ct["median"] / dt["median"],
                     corral_total_s=cto, direct_total_s=dto,
                     ratio_total_corral_over_direct=cto["median"] / dto["median"],
                     added_ms_ttfb=(ct["median"] - dt["median"]) * 1000,
                     added_ms_total=(cto["median"] - dto["median"]) * 1000,
                     target="reported (no target): the added time is corral's stdio hop",
                     met=cto["n"] == dto["n"] == n)


async def run_agent_scenarios(bench, sup, engine, want) -> None:
    """The hook for runtime/apps/bench.py's Bench.run (inside its supervisor block)."""
    from .bench import QUICK
    quick = bench.sizes is QUICK
    if "agent-image" in want:
        await agent_image(bench, engine, quick)
    if "agent-spawn" in want:
        await agent_spawn(bench, sup, engine, quick)
    if "gateway" in want:
        await gateway(bench, sup, engine, quick)


def main(argv: list[str] | None = None) -> int:
    """Run the agent scenarios alone (with bench.py's reporter)."""
    import argparse
    import sys
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        _serve(int(argv[1]))
        return 0
    from ..logging import configure_logging
    from .bench import FULL, QUICK, Bench
    p = argparse.ArgumentParser(prog="python -m runtime.apps.bench_agents")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", action="append", choices=AGENT_SCENARIOS)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--engine")
    args = p.parse_args(argv)
    configure_logging(os.environ.get("CORRAL_LOG_LEVEL", "ERROR"))
    bench = Bench(QUICK if args.quick else FULL, args.engine)
    want = set(args.only or AGENT_SCENARIOS)

    async def run() -> dict[str, Any]:
        from ..api import open_supervisor
        from ..engines import open_engine
        from ..specs import SupervisorConfig
        async with open_engine(args.engine) as engine:
            try:
                async with open_supervisor(SupervisorConfig(name=bench.name), engine=engine) as sup:
                    await run_agent_scenarios(bench, sup, engine, want)
            finally:
                with trio.CancelScope(shield=True):
                    await bench.cleanup(engine)
        return bench.results

    results = trio.run(run)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"quick": args.quick, "cores": os.cpu_count(), "results": results}, f,
                      indent=2, default=str)
    missed = [k for k, v in results.items() if isinstance(v, dict) and v.get("met") is False]
    print("\nsummary: " + ("all targets met" if not missed else f"missed: {', '.join(missed)}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
