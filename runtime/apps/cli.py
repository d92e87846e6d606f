"""The `corral` command line.

  corral run --config corral.toml      long-running supervisor (SIGTERM/SIGINT: graceful stop;
                                       a second signal: stop at once, containers still removed)
  corral ps | task | restart | stop | scale | events | logs
                                       talk to a running `corral run` through its HTTP API
                                       (on its unix socket)
  corral task --detach ... ; corral result ID [--wait]
                                       durable tasks: their results outlive a restart of
                                       `corral run` (its task journal, under --state-dir)
  corral demo                          the end-to-end tour on the real engine
  corral chaos                         a pool under fire, invariants checked
  corral bench [--quick]               corral measured side by side with the alternatives
  corral build | images | images prune | base-image
"""

from __future__ import annotations

import argparse
import os
from functools import partial
import signal
import sys
import time

import msgspec
import trio

from ..engines import Engine, ImageSummary
from ..errors import ConfigError, CorralError, SupervisorEscalation
from ..logging import configure_logging, get_logger

log = get_logger("corral.cli")


def default_socket(name: str) -> str:
    base = "/run" if os.geteuid() == 0 else (os.environ.get("XDG_RUNTIME_DIR") or "/tmp")
    return os.path.join(base, f"corral-{name}.sock")


def default_state_dir(name: str) -> str:
    """Where `corral run` keeps its task journal unless told (--state-dir, config state_dir)."""
    if os.geteuid() == 0:
        return os.path.join("/var/lib/corral", name)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "corral", name)


def with_state_dir(config, state_dir: str | None, *, no_journal: bool = False):
    """`corral run`'s journal: --no-journal (none), else --state-dir, else the config's
    ``state_dir``, else `default_state_dir`."""
    if no_journal:
        return msgspec.structs.replace(config, state_dir=None)
    if state_dir:
        return msgspec.structs.replace(config, state_dir=state_dir)
    if config.state_dir is None:
        return msgspec.structs.replace(config, state_dir=default_state_dir(config.name))
    return config


EX_TEMPFAIL = 75
"""`corral result` without --wait: the task has not finished yet (sysexits: try again later)"""


def _out(text: str = "") -> None:
    print(text, flush=True)


def _age(created: float) -> str:
    s = max(0, time.time() - created)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{int(s // n)}{unit}"
    return f"{int(s)}s"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.1f}TB"


# -- commands ------------------------------------------------------------------------------------
def cmd_base_image(args) -> int:
    from .baseimage import BASE_REF, build_base_image
    from ..engines import open_engine

    from .progress import Progress

    async def main() -> None:
        async with open_engine(args.engine) as engine:
            if args.if_missing:
                print(f"[corral] ensuring {BASE_REF} exists", file=sys.stderr)
            with Progress() as progress:
                image_id = await build_base_image(
                    engine, mirror=args.mirror, if_missing=args.if_missing,
                    progress=lambda line: progress.update("base", f"building {BASE_REF}",
                                                          detail=line.strip()))
                progress.finish("base", f"{BASE_REF} ready")
            _out(f"{BASE_REF} {image_id}")
    trio.run(main)
    return 0


def cmd_build(args) -> int:
    from actors.builder import describe_dockerfile, open_image_builder
    from ..engines import open_engine
    from .progress import Progress

    async def main() -> None:
        async with open_engine(args.engine) as engine:
            if args.dry_run:
                base_id = (await engine.image_inspect(args.base)).id
                _out(describe_dockerfile(args.agent, args.cap, args.stub, base_id))
                return
            with Progress() as progress:
                progress.hook_logging()     # the builder's progress events become bars
                async with open_image_builder(engine, base_image=args.base,
                                              build_network=args.build_network) as b:
                    info = await b.image_for(args.agent, args.cap, args.stub)
                _out(f"{info.tag} {info.image_id} ({'built' if info.built else 'reused'})")
    trio.run(main)
    return 0


async def _corral_images(engine: Engine, base: str | None = None) -> tuple[list[ImageSummary], set[str]]:
    """corral-built images (those built on ``base`` only, if given) and the image ids in use."""
    labels = {"corral.image": "1"}
    if base:
        labels["corral.base"] = (await engine.image_inspect(base)).id
    images = await engine.image_list(labels=labels)
    used = {c.image_id for c in await engine.container_list(all=True)}
    return images, used


def cmd_images(args) -> int:
    from ..engines import open_engine

    async def main() -> int:
        async with open_engine(args.engine) as engine:
            images, used = await _corral_images(engine, args.base)
            if args.action == "prune":
                removed = 0
                for img in images:
                    if img.id in used:
                        continue
                    for ref in img.tags or [img.id]:
                        try:
                            await engine.image_remove(ref)
                        except CorralError as exc:
                            _out(f"kept {ref}: {exc}")
                            continue
                    removed += 1
                    _out(f"removed {', '.join(img.tags or [img.id[:19]])}")
                _out(f"{removed} image(s) removed, {len(images) - removed} kept")
                return 0
            _out(f"{'IMAGE':40} {'AGENT':8} {'CAPABILITIES':20} {'STUB':4} {'AGE':>5} {'SIZE':>7} IN USE")
            for img in sorted(images, key=lambda i: -i.created):
                lab = img.labels
                tag = (img.tags or ["<none>"])[0]
                _out(f"{tag:40} {lab.get('corral.agent', '?'):8} {lab.get('corral.capabilities', '') or '-':20} "
                     f"{'yes' if lab.get('corral.stub') == '1' else 'no':4} {_age(img.created):>5} "
                     f"{_size(img.size):>7} {'yes' if img.id in used else 'no'}")
            return 0
    return trio.run(main)


def cmd_run(args) -> int:
    from ..configcheck import check_config
    from .httpapi import check_socket_path
    from ..specs import load_config_file

    config = load_config_file(args.config)
    if args.name:
        config = msgspec.structs.replace(config, name=args.name)
    if args.engine:
        config = msgspec.structs.replace(config, engine_url=args.engine)
    config = with_state_dir(config, args.state_dir, no_journal=args.no_journal)
    sock = args.socket or config.control_socket or default_socket(config.name)
    check_config(config)            # static errors: exit 2 before anything starts
    check_socket_path(sock)
    if args.api_port is not None and not args.api_token_file:
        raise ConfigError("--api-port needs --api-token-file (the bearer token clients send)")
    if args.api_token_file:
        from .httpapi import read_token
        read_token(args.api_token_file)       # a missing or short token: exit 2 before starting
    return trio.run(_run_service, config, sock, args.api_port, args.api_token_file)


async def _run_service(config, sock: str, api_port: int | None = None,
                       token_file: str | None = None) -> int:
    """`corral run`: SIGTERM/SIGINT stop gracefully; a second one cuts the grace short (the
    containers are still removed). Signals are handled until the very end."""
    stopping, forced = trio.Event(), trio.Event()

    async def watch_signals(signals) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not stopping.is_set():
                log.info("shutting_down", signal=name)
                stopping.set()
            elif not forced.is_set():
                log.warning("forced_stop", signal=name,
                            hint="no grace period: containers are killed, then removed")
                forced.set()
            else:
                log.warning("already_stopping", signal=name)

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as n:
            n.start_soon(watch_signals, signals)
            try:
                return await _supervise(config, sock, stopping, forced, api_port, token_file)
            finally:
                n.cancel_scope.cancel()


async def _supervise(config, sock: str, stopping: trio.Event, forced: trio.Event,
                     api_port: int | None = None, token_file: str | None = None) -> int:
    from ..api import open_supervisor
    from .httpapi import serve_api
    from ..util import leaf_exceptions

    try:
        async with open_supervisor(config, force_stop=forced) as sup:
            async with trio.open_nursery() as n:
                api = await n.start(partial(serve_api, sup, sock, tcp_port=api_port,
                                            token_file=token_file))
                log.info("corral_running", supervisor=config.name, socket=sock,
                         api=f"http://127.0.0.1:{api.tcp_port}/" if api.tcp_port else None,
                         workers=len(config.workers), pools=len(config.pools),
                         journal=sup.tasks.journal.path if sup.tasks is not None else None)

                announcing = trio.CancelScope()

                async def announce() -> None:
                    with announcing:
                        await sup.wait_configured()
                        log.info("configured_children_started", supervisor=config.name)
                n.start_soon(announce)
                await stopping.wait()
                announcing.cancel()
                api.stop()          # what waits is answered "shutting down"; the server ends
                n.cancel_scope.deadline = trio.current_time() + 10
    except BaseExceptionGroup as group:
        leaves = [e for e in leaf_exceptions(group) if not isinstance(e, trio.Cancelled)]
        if len(leaves) != 1 or not isinstance(leaves[0], CorralError):
            raise
        return _report_error(config, leaves[0])
    except CorralError as exc:
        return _report_error(config, exc)
    log.info("stopped", supervisor=config.name, forced=forced.is_set())
    return 0


def _report_error(config, exc: CorralError) -> int:
    if not isinstance(exc, SupervisorEscalation):
        print(f"corral: error: {exc}", file=sys.stderr, flush=True)
        return 2
    log.error("escalated", error=str(exc), reason=exc.reason,
              certificates=[msgspec.to_builtins(c) for c in exc.certificates[-10:]])
    print(format_escalation(config.name, exc), file=sys.stderr, flush=True)
    return 3


def format_escalation(name: str, esc: SupervisorEscalation) -> str:
    """What an operator reads when the supervisor gives up: why, and each death (last 10)."""
    who = esc.supervisor or name
    why = str(esc).removeprefix(f"supervisor {who}: ")
    lines = [f"corral: supervisor {who} escalated ({esc.reason}): {why}"]
    certs = esc.certificates[-10:]
    if len(esc.certificates) > len(certs):
        lines.append(f"  ({len(esc.certificates) - len(certs)} earlier death(s) not shown)")
    for c in certs:
        code = f", exit code {c.exit_code}" if c.exit_code is not None else ""
        lines.append(f"  worker {c.worker_id} generation {c.generation}: {c.cause}{code}"
                     + (f": {c.reason}" if c.reason else "")
                     + (f" (container {c.container_id[:12]})" if c.container_id else ""))
        tail = [line for line in (c.logs_tail or "").splitlines() if line.strip()][-3:]
        lines.extend(f"    | {line}" for line in tail)
    return "\n".join(lines)


def _client(args):
    from .client import Client
    return Client(args.socket or default_socket(args.name))


def _utf8_arg(what: str, value: str) -> None:
    """An argument that was not UTF-8 reaches Python as lone surrogates: say so plainly."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raw = value[exc.start].encode("utf-8", "surrogateescape")
        raise ConfigError(f"the {what} argument is not valid UTF-8 text (byte 0x{raw.hex()} at "
                          f"position {exc.start})") from None


def cmd_ps(args) -> int:
    from ..records import PoolSnapshot, SupervisorSnapshot
    with _client(args) as c:
        snap = c.tree()
    if args.json:
        _out(msgspec.json.encode(snap).decode())
        return 0

    def show(node, indent=""):
        if isinstance(node, SupervisorSnapshot):
            _out(f"{indent}supervisor {node.name} ({node.strategy}, {node.state}, "
                 f"restarts in window: {node.restarts_in_window})")
            for c in node.children:
                show(c, indent + "  ")
        elif isinstance(node, PoolSnapshot):
            _out(f"{indent}pool {node.name} replicas={node.replicas} queued={node.queued}")
            for c in node.workers:
                show(c, indent + "  ")
        else:
            i = node.info
            d = i.last_death
            _out(f"{indent}worker {i.id:14} {i.agent:8} {i.state:8} gen={i.generation:<3} "
                 f"restarts={i.restarts:<3} {(i.container_name or '-'):40} "
                 f"last_death={(d.cause + ' ' + (d.reason or '')) if d else '-'}")
    show(snap)
    return 0


def cmd_task(args) -> int:
    from ..specs import Task
    from .apitypes import TaskSubmit
    _utf8_arg("prompt", args.prompt)
    Task(prompt=args.prompt, timeout_s=args.timeout,     # a bad prompt is ConfigError: exit 2
         max_attempts=args.max_attempts)
    req = TaskSubmit(prompt=args.prompt, timeout_s=args.timeout, max_attempts=args.max_attempts,
                     pool=args.pool or None, worker_id=None if args.pool else args.worker)
    with _client(args) as c:
        if args.detach:
            _out(c.submit(req).task_id)
            return 0
        return _show_result(args, c.run(req))


def _show_result(args, res) -> int:
    """A TaskResult as `corral task` prints it: the output (or --json); exit 0 if ok, else 1."""
    _out(msgspec.json.encode(res).decode() if args.json else (res.output or "").rstrip())
    return 0 if res.status == "ok" else 1


def cmd_result(args) -> int:
    _utf8_arg("task id", args.task_id)
    with _client(args) as c:
        rec = c.wait_task(args.task_id) if args.wait else c.task(args.task_id)
    if rec.result is not None:
        return _show_result(args, rec.result)
    if args.json:
        _out(msgspec.json.encode(rec).decode())
    where = ""
    if rec.dispatches:
        d = rec.dispatches[-1]
        where = f" (on worker {d.worker_id}, generation {d.generation})"
    print(f"corral: task {args.task_id} is {rec.state}{where}: not finished yet (--wait to "
          f"wait for it)", file=sys.stderr, flush=True)
    return EX_TEMPFAIL


def cmd_worker_op(args) -> int:
    _utf8_arg("worker_id", args.worker_id)
    with _client(args) as c:
        (c.restart if args.command == "restart" else c.stop)(args.worker_id)
    return 0


def cmd_scale(args) -> int:
    _utf8_arg("pool", args.pool)
    with _client(args) as c:
        pool = c.scale(args.pool, args.replicas)
    _out(f"pool {pool.name} replicas={pool.replicas} queued={pool.queued}")
    return 0


def format_event(ev) -> str:
    """One lifecycle event as `corral events` prints it (like `docker events`)."""
    from datetime import datetime, timezone
    from ..events import (GatewayExchange, ImageBuilt, SupervisorEscalated, TaskDone, TaskQueued,
                          TaskStarted, WorkerDied, WorkerRestarting, WorkerStateChanged)
    at = datetime.fromtimestamp(ev.at, timezone.utc).isoformat(timespec="milliseconds")
    kind = ev.__struct_config__.tag
    match ev:
        case WorkerStateChanged():
            what = f"{ev.worker_id} gen={ev.generation} {ev.previous} -> {ev.state}"
        case WorkerDied(certificate=c):
            code = f" exit={c.exit_code}" if c.exit_code is not None else ""
            what = (f"{ev.worker_id} gen={c.generation} cause={c.cause}{code} "
                    f"decision={ev.decision}" + (f": {c.reason}" if c.reason else ""))
        case WorkerRestarting():
            what = f"{ev.worker_id} after gen={ev.generation} cause={ev.cause} in {ev.delay_s:.2f}s"
        case SupervisorEscalated():
            what = f"{ev.supervisor} reason={ev.reason}: {ev.error}"
        case TaskQueued():
            what = f"{ev.task_id} {ev.target}"
        case TaskStarted():
            what = f"{ev.task_id} on {ev.worker_id} gen={ev.generation}"
        case TaskDone():
            what = f"{ev.task_id} {ev.target} {ev.status} {ev.duration_s:.3f}s"
        case GatewayExchange():
            what = f"{ev.worker_id} status={ev.status} tokens={ev.input_tokens}/{ev.output_tokens}"
        case ImageBuilt():
            what = f"{ev.tag} {ev.seconds:.1f}s"
        case _:
            what = ""
    return f"{at} {kind} {what}"


def cmd_events(args) -> int:
    kinds = args.kinds.split(",") if args.kinds else None
    with _client(args) as c:
        try:
            for ev in c.events(last_event_id=args.since, kinds=kinds, follow=args.follow):
                _out(msgspec.json.encode(ev).decode() if args.json else format_event(ev))
        except KeyboardInterrupt:
            return 130
    return 0


def cmd_logs(args) -> int:
    _utf8_arg("worker_id", args.worker_id)
    with _client(args) as c:
        if args.follow and not args.previous:
            try:
                for chunk in c.follow_logs(args.worker_id):
                    sys.stdout.write(chunk)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                return 130
            return 0
        text = c.logs(args.worker_id, previous=args.previous)
    sys.stdout.write(text if not text or text.endswith("\n") else text + "\n")
    sys.stdout.flush()
    return 0


def cmd_demo(args) -> int:
    from .demo import demo
    return trio.run(demo, args.engine)


def cmd_chaos(args) -> int:
    from ..chaoskit import ChaosError
    from .chaos import DEFAULT_EVERY_S, run_chaos
    every = args.every if args.every is not None else DEFAULT_EVERY_S
    if args.every is not None and not (args.kill_supervisor or args.restart_engine):
        print("corral chaos: --every goes with --kill-supervisor or --restart-engine", file=sys.stderr)
        return 2
    try:
        report = trio.run(lambda: run_chaos(
            engine_url=args.engine, name=args.name, workers=args.workers, duration_s=args.duration,
            kill_interval_s=args.kill_interval, seed=args.seed,
            kill_supervisor_every=every if args.kill_supervisor else None,
            restart_engine_every=every if args.restart_engine else None))
    except ChaosError as exc:
        print(f"corral chaos: {exc}", file=sys.stderr, flush=True)
        return 2
    if args.text:
        _out(report.text())                 # ends with the verdict line
    else:
        _out(msgspec.json.format(msgspec.json.encode(report), indent=2).decode())
        _out("chaos: invariants hold" if report.ok else "chaos: INVARIANT VIOLATED")
    return 0 if report.ok else 1


def cmd_bench(args) -> int:
    from .bench import main as bench_main
    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="corral", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default=None,
                   help="engine URL (default: $DOCKER_HOST, else unix:///var/run/docker.sock)")
    p.add_argument("--log-level", default=os.environ.get("CORRAL_LOG_LEVEL"),
                   help="log level (default INFO; `bench` and `chaos` log to a file unless given)")
    p.add_argument("--log-file", help="write log lines to this file instead of stderr")
    p.add_argument("--log-json", action="store_true", default=None, help="JSON logs even on a TTY")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("run", help="run a supervisor from a config file until SIGTERM/SIGINT "
                                   "(exit 0 stopped, 2 error before start, 3 escalated)")
    s.add_argument("--config", required=True, help="TOML (or .json) SupervisorConfig")
    s.add_argument("--name", help="override the supervisor name")
    s.add_argument("--socket", help="the HTTP API's unix socket (default: config control_socket "
                                    "or /run/corral-NAME.sock)")
    j = s.add_mutually_exclusive_group()
    j.add_argument("--state-dir", help="where the task journal lives (default: config state_dir, "
                                       "else /var/lib/corral/NAME as root, else "
                                       "$XDG_STATE_HOME/corral/NAME or ~/.local/state/corral/NAME)")
    j.add_argument("--no-journal", action="store_true",
                   help="keep no task journal: results live only as long as their request")
    s.add_argument("--api-port", type=int, default=None,
                   help="also serve the HTTP API and dashboard on 127.0.0.1:PORT (0: any free "
                        "port), for clients that send the bearer token of --api-token-file")
    s.add_argument("--api-token-file", help="file holding the bearer token (16+ characters)")
    s.set_defaults(fn=cmd_run)

    for cmd, helptext in (("ps", "show the supervision tree of a running `corral run`"),):
        s = sub.add_parser(cmd, help=helptext)
        s.add_argument("--name", default="corral")
        s.add_argument("--socket")
        s.add_argument("--json", action="store_true")
        s.set_defaults(fn=cmd_ps)
    s = sub.add_parser("task", help="run one task on a worker or pool of a running `corral run`")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--worker")
    g.add_argument("--pool")
    s.add_argument("prompt")
    s.add_argument("--timeout", type=float)
    s.add_argument("--max-attempts", type=int, default=1,
                   help="run it again after its container died under it (default 1: at most once)")
    s.add_argument("--detach", action="store_true",
                   help="print the task id and return at once (`corral result ID` later)")
    s.add_argument("--name", default="corral")
    s.add_argument("--socket")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_task)
    s = sub.add_parser("result", help="the result of a task of a running `corral run`, also after "
                                      "it restarted (exit 0 ok, 1 failed, 2 error, 75 not finished)")
    s.add_argument("task_id")
    s.add_argument("--wait", action="store_true", help="wait until the task has finished")
    s.add_argument("--name", default="corral")
    s.add_argument("--socket")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_result)
    for cmd in ("restart", "stop"):
        s = sub.add_parser(cmd, help=f"{cmd} a worker of a running `corral run`")
        s.add_argument("worker_id")
        s.add_argument("--name", default="corral")
        s.add_argument("--socket")
        s.set_defaults(fn=cmd_worker_op)
    s = sub.add_parser("scale", help="grow or shrink a pool of a running `corral run`")
    s.add_argument("pool")
    s.add_argument("replicas", type=int)
    s.add_argument("--name", default="corral")
    s.add_argument("--socket")
    s.set_defaults(fn=cmd_scale)
    s = sub.add_parser("events", help="lifecycle events of a running `corral run` (state changes, "
                                      "deaths, restarts, escalations, tasks), like docker events")
    s.add_argument("--follow", "-f", action="store_true", help="keep printing them as they come")
    s.add_argument("--since", type=int, default=0, metavar="ID",
                   help="only events after this id (default: every event kept)")
    s.add_argument("--kinds", help="comma-separated kinds, e.g. worker_died,worker_restarting")
    s.add_argument("--json", action="store_true")
    s.add_argument("--name", default="corral")
    s.add_argument("--socket")
    s.set_defaults(fn=cmd_events)
    s = sub.add_parser("logs", help="a worker's container output (like kubectl logs)")
    s.add_argument("worker_id")
    s.add_argument("--follow", "-f", action="store_true", help="then what it writes, as it writes it")
    s.add_argument("--previous", "-p", action="store_true",
                   help="the last dead generation's tail, from its death certificate")
    s.add_argument("--name", default="corral")
    s.add_argument("--socket")
    s.set_defaults(fn=cmd_logs)

    s = sub.add_parser("demo", help="the end-to-end tour on the real engine")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("chaos", help="kill workers under load; check every task has one result")
    s.add_argument("--name", default="chaos")
    s.add_argument("--workers", type=int, default=4)
    s.add_argument("--duration", type=float, default=20.0)
    s.add_argument("--kill-interval", type=float, default=1.0,
                   help="kill or remove a worker's container about this often (0: never)")
    s.add_argument("--kill-supervisor", action="store_true",
                   help="also kill the supervisor (a crash: its containers run on) and reopen it; tasks "
                        "go through its task journal, and it must adopt its containers")
    s.add_argument("--restart-engine", action="store_true",
                   help="also restart the engine (live-restore) under the pool: a private dockerd this "
                        "run starts itself (root; never the machine's engine); no worker may die of it")
    s.add_argument("--every", type=float, metavar="S",
                   help="how often --kill-supervisor / --restart-engine act (default 10 s)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--text", action="store_true", help="a text report instead of JSON")
    s.set_defaults(fn=cmd_chaos)

    s = sub.add_parser("bench", help="benchmarks, side by side with the alternatives")
    s.add_argument("--quick", action="store_true", help="small sizes: under 2 minutes")
    s.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    s.add_argument("--only", action="append", help="run only these scenarios (repeatable)")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("build", help="build (or reuse) the worker image for an agent + capabilities")
    s.add_argument("--agent", required=True)
    s.add_argument("--cap", action="append", default=[], help="capability (repeatable)")
    s.add_argument("--stub", action="store_true", help="install the stub agent CLI")
    s.add_argument("--base", default="corral/worker-base:latest")
    s.add_argument("--build-network", action="store_true", help="let the build use the host network")
    s.add_argument("--dry-run", action="store_true", help="print the Dockerfile instead")
    s.set_defaults(fn=cmd_build)

    s = sub.add_parser("images", help="list corral-built images; `images prune` removes unused ones")
    s.add_argument("action", nargs="?", choices=["list", "prune"], default="list")
    s.add_argument("--base", help="only images built on this base image")
    s.set_defaults(fn=cmd_images)

    s = sub.add_parser("base-image", help="build corral/worker-base offline from Debian packages")
    s.add_argument("--mirror", default=None,
                   help="Debian mirror (default: $CORRAL_DEBIAN_MIRROR, else the machine's apt sources)")
    s.add_argument("--if-missing", action="store_true", help="do nothing if the image exists")
    s.set_defaults(fn=cmd_base_image)
    return p


def _set_up_logging(args) -> None:
    """The CLI's log lines: to stderr (console on a TTY, JSON otherwise) at --log-level, or to
    --log-file. `corral bench` and `corral chaos` print reports: their per-worker events go to a
    file unless --log-level is given."""
    target = args.log_file
    if target is None and args.command in ("bench", "chaos") and args.log_level is None:
        import tempfile
        target = os.path.join(tempfile.gettempdir(), f"corral-{args.command}-{os.getpid()}.log")
        print(f"[corral] per-worker events are logged to {target} (--log-level LEVEL shows them "
              f"here)", file=sys.stderr, flush=True)
    out = open(target, "a", buffering=1) if target else None
    configure_logging(args.log_level or "INFO", json=True if out is not None else args.log_json,
                      file=out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _set_up_logging(args)
    try:
        return args.fn(args)
    except CorralError as exc:
        print(f"corral: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
