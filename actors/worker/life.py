"""One container's life: its spec, create (recovering a stale name), attach, start, the race of
READY against exit and the startup deadline, a graceful or forced end, removal, and the facts of
how it ended, classified by ``classify`` (pure) into a DeathCertificate."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import msgspec
import structlog
import trio

from runtime.engines import Attachment, ContainerSpec, ContainerSummary, TmpfsMount
from runtime.errors import (
    ConfigError,
    ContainerNotFound,
    CorralError,
    EngineError,
    EngineUnavailable,
    ImageNotFound,
    NameConflict,
    ProtocolError,
    RemovalInProgress,
)
from runtime.protocol import Shutdown, TaskDone, decode_wrapper_frame
from runtime.records import DeathCertificate

from ..watcher import ENGINE_CHECK_S, SETTLE_S
from .classify import ExitFacts, classify, signal_name

log = structlog.get_logger("corral.worker")

LOG_TAIL = 4096
FOUND_LOG_BYTES = 4 << 20
"""how much of the log of a container found dead is searched for task results"""
MAX_DEATHS = 10
EX_CONFIG = 78
GATEWAY_PORT = 8787
"""the wrapper's model-gateway endpoint: http://127.0.0.1:8787 inside the container"""
OUTBOX = 64
"""frames queued for the wrapper's stdin (backpressure beyond that)"""


class EngineGone(Exception):
    """The engine went away during a container's start and did not come back within
    engine_outage_s (args[0]: the error that cut the start off)."""


class StartLost(Exception):
    """A container's start was cut off by the engine going away, and the engine refused to
    start it again once back: it never ran, and is replaced (no death)."""


def container_name(supervisor: str, worker_id: str, generation: int) -> str:
    return f"corral-{supervisor}-{worker_id}-{generation}"


@dataclass(frozen=True, slots=True)
class GatewaySetup:
    """What one container's gateway needs, resolved on the host (never sent to the container
    but ``api``)."""
    upstream: str
    rule: object
    """runtime.gateway.AuthRule"""
    secrets: dict
    api: str
    """the wire API the upstream speaks for this credential: ``anthropic`` or ``openai``"""

    def __repr__(self) -> str:          # never show the secrets
        return f"GatewaySetup(upstream={self.upstream!r}, api={self.api!r})"


def gateway_setup(spec) -> GatewaySetup:
    """The upstream and credential of a real agent's worker; ConfigError when the credential is
    missing (or its environment variable unset)."""
    from runtime.gateway import auth_rule, default_upstream
    secrets = spec.resolve_secrets()
    rule = auth_rule(spec.agent, secrets)
    upstream = spec.upstream or default_upstream(spec.agent, secrets)
    api = "anthropic" if rule.secret.startswith("ANTHROPIC_") else "openai"
    return GatewaySetup(upstream=upstream, rule=rule, secrets=secrets, api=api)


@dataclass(slots=True)
class _Life:
    """One container of this worker, from create to removal."""
    container_id: str
    name: str
    generation: int
    created_at: float
    ready_at: float | None = None
    ready: bool = False
    settled: trio.Event = field(default_factory=trio.Event)   # ready, or ended before it
    ended: trio.Event = field(default_factory=trio.Event)
    end_kind: str | None = None        # died | hung | protocol | restart | stop | startup_timeout | replace
    end_reason: str = ""
    fatal_reason: str | None = None
    tail: bytearray = field(default_factory=bytearray)
    last_frame: float = 0.0
    att: Attachment | None = None
    outbox: trio.MemorySendChannel | None = None
    """whole frames for the container's stdin, written in order by one writer task"""
    gateway: object | None = None
    """the model gateway of this container (runtime.gateway.Gateway), for a real agent"""
    started: bool = False
    kill_sent: bool = False
    shutdown_sent: bool = False
    nursery: trio.Nursery | None = None
    """runs the tasks that live as long as this container (the reader, task deadlines)"""
    adopted: bool = False
    """a container of an earlier corral process (or of this one before the engine went away),
    attached to while it runs: ``hello`` instead of create and start"""
    seq: int = 0
    """the highest kept-frame sequence number processed (what the next lease acknowledges)"""
    reattaches: int = 0
    startup: trio.CancelScope | None = None
    """the startup deadline's scope (create to READY): an engine outage meanwhile extends it"""
    hello_at: float | None = None
    """when the last ``hello`` still unanswered was sent"""
    hellos: int = 0
    """``hello`` frames sent so far (numbered 1, 2, ...)"""
    first_unanswered: int | None = None
    """the number of the oldest ``hello`` not answered yet"""
    outage: bool = False
    """it ended while the engine was away (not the worker's doing)"""

    def end(self, kind: str, reason: str = "") -> None:
        if self.end_kind is None:
            self.end_kind, self.end_reason = kind, reason
        self.settled.set()
        self.ended.set()

    def add_tail(self, data: bytes) -> None:
        self.tail += data
        if len(self.tail) > LOG_TAIL:
            del self.tail[:-LOG_TAIL]


class ContainerLife:
    """The Worker's container concern."""

    def container_spec(self, image_id: str, generation: int) -> ContainerSpec:
        """The container of this worker's ``generation``; the engine adds the fixed hardening
        (no network, no capabilities, no-new-privileges, an init)."""
        spec = self.spec
        env = {**spec.env, "CORRAL_WORKER_ID": self.id, "CORRAL_AGENT": spec.agent,
               "CORRAL_HEARTBEAT_S": str(spec.heartbeat_s), "CORRAL_WORKSPACE": "/workspace"}
        if spec.required_env:
            env["CORRAL_REQUIRED_ENV"] = ",".join(spec.required_env)
        if spec.uses_gateway:
            # where the agent's model API is (the wrapper's endpoint) and what it may do; never
            # a credential: the wrapper gives the agent a placeholder, the gateway the real one
            env.update(CORRAL_GATEWAY="1", CORRAL_GATEWAY_PORT=str(GATEWAY_PORT),
                       CORRAL_PERMISSIONS=spec.permissions)
            if spec.model:
                env["CORRAL_MODEL"] = spec.model
            if spec.agent == "factory" and self._gateway_setup is not None:
                # droid's BYOK provider follows from the credential: Anthropic Messages with an
                # Anthropic key, OpenAI-style chat completions otherwise
                env["CORRAL_DROID_PROVIDER"] = ("anthropic" if self._gateway_setup.api == "anthropic"
                                                else "generic-chat-completion-api")
        labels = {"corral.supervisor": self.supervisor, "corral.worker": self.id,
                  "corral.generation": str(generation), "corral.spec": self._spec_hash,
                  "corral.agent": spec.agent}
        if self.pool:
            labels["corral.pool"] = self.pool
        # what a later corral process that adopts this container must know of the worker's past
        # (a container's labels are fixed for its life, and so are these: they change only
        # when a new container is made)
        labels["corral.restarts"] = str(self.restarts)
        if self.deaths:
            labels["corral.last_death"] = msgspec.json.encode(self.deaths[-1]).decode()[:8000]
        if spec.orphan_timeout_s:
            env["CORRAL_ORPHAN_TIMEOUT_S"] = repr(spec.orphan_timeout_s)
            env["CORRAL_ORPHAN_POLICY"] = spec.orphan_policy
        tmpfs: list[TmpfsMount] = []
        if spec.read_only_rootfs or spec.disk:
            tmpfs += [TmpfsMount(path="/workspace", size=spec.disk, mode=0o755, uid=1000, gid=1000),
                      TmpfsMount(path="/tmp", size=spec.disk, mode=0o1777)]
        if spec.read_only_rootfs:
            tmpfs.append(TmpfsMount(path="/home/worker", size=spec.disk, mode=0o700, uid=1000, gid=1000))
        return ContainerSpec(
            image=image_id, name=container_name(self.supervisor, self.id, generation), env=env,
            labels=labels, user="worker", working_dir="/workspace", memory=spec.memory,
            cpus=spec.cpus, pids_limit=spec.pids_limit, read_only_rootfs=spec.read_only_rootfs,
            tmpfs=tuple(tmpfs), stdin_once=False, placement=tuple(spec.placement))

    async def _create(self, cspec: ContainerSpec) -> str:
        try:
            return await self.engine.container_create(cspec)
        except NameConflict:
            # A leftover of ours (same supervisor, worker and generation: a crashed earlier run).
            # Remove it only if it carries our labels; never touch anyone else's container.
            existing = await self.engine.container_list(labels={"corral.supervisor": self.supervisor,
                                                                "corral.worker": self.id})
            for c in existing:
                if c.name == cspec.name:
                    log.warning("stale_container_removed", name=c.name, container_id=c.id[:12])
                    await self.engine.container_remove(c.id, force=True)
                    return await self.engine.container_create(cspec)
            raise

    async def _one_life(self, task_status, handle, first: bool,
                        adopt: ContainerSummary | None = None) -> tuple[str, DeathCertificate | None]:
        """One container, from create (or adoption: ``adopt``, a running container of this
        worker left by an earlier corral process) to removal. Returns ("died", certificate), or
        ("restart" | "stop", None) when it ended on request, ("replace", None) when it never
        ran and is replaced (StartLost)."""
        gen = self.generation
        name = adopt.name if adopt is not None else container_name(self.supervisor, self.id, gen)
        t_create = trio.current_time()
        if self.spec.uses_gateway:
            # the credential is checked before anything is built or created: a worker that
            # could only fail every task does not start (config_error, not retried)
            try:
                self._gateway_setup = gateway_setup(self.spec)
            except ConfigError as exc:
                log.error("worker_config_error", reason=str(exc))
                return "died", DeathCertificate(
                    worker_id=self.id, container_id=None, generation=gen, cause="config_error",
                    reason=str(exc), at=time.time())
        if self.spec.placement and not getattr(self.engine, "places", False):
            reason = (f"placement {self.spec.placement} needs a Docker Swarm engine "
                      f"(swarm+unix://...): {getattr(self.engine, 'url', 'this engine')} runs every "
                      f"container on its own host")
            log.error("worker_config_error", reason=reason)
            return "died", DeathCertificate(
                worker_id=self.id, container_id=None, generation=gen, cause="config_error",
                reason=reason, at=time.time())
        await self._remove_leftovers()
        if adopt is not None:
            if self.image_id is None:
                self.image_id = adopt.image_id
        elif self.image_id is None:
            try:
                await self._build_image()
            except CorralError as exc:
                if first:
                    raise          # spawn() reports ConfigError / ImageBuildError as they are
                return "died", self._engine_cert(None, gen, exc, t_create)
        self._set_state("creating" if adopt is None else "starting")
        await self.start_limiter.acquire()
        holding_slot = True
        try:
            # the startup deadline counts from here (waiting for a start slot is corral's own
            # throttle) and covers create, attach, start and the wait for READY
            deadline = trio.current_time() + self.spec.startup_timeout_s
            if adopt is not None:
                cid = adopt.id
            else:
                while True:
                    try:
                        with trio.fail_after(self.spec.startup_timeout_s):
                            try:
                                cid = await self._create(self.container_spec(self.image_id, gen))
                            except ImageNotFound:
                                # the image went away (pruned, engine reset): rebuild it once, no death
                                log.warning("image_missing_rebuilding", image=self.image_tag)
                                self.builder.invalidate(self.image_tag)
                                await self._build_image()
                                self._set_state("creating")
                                cid = await self._create(self.container_spec(self.image_id, gen))
                    except EngineUnavailable as exc:
                        # the engine is away: not this worker's death; wait for it (up to
                        # engine_outage_s), then create the container
                        if await self._wait_for_engine():
                            self._set_state("creating")
                            deadline = trio.current_time() + self.spec.startup_timeout_s
                            continue
                        if self._stop_event.is_set():
                            return "stop", None
                        return "died", self._outage_cert(None, gen, exc, t_create)
                    except (CorralError, trio.TooSlowError) as exc:
                        if isinstance(exc, ImageNotFound):
                            self.image_id = None
                        if isinstance(exc, trio.TooSlowError):
                            exc = EngineError(f"creating {name} took over {self.spec.startup_timeout_s} s")
                            await self._remove_container(name)   # in case the engine made it after all
                        return "died", self._engine_cert(None, gen, exc, t_create)
                    break
            life = self._life = _Life(container_id=cid, name=name, generation=gen, created_at=t_create,
                                      last_frame=t_create, adopted=adopt is not None)
            structlog.contextvars.bind_contextvars(container_id=cid[:12])
            watch = self.watcher.watch(cid) if self.watcher is not None else None
            try:
                async with trio.open_nursery() as nursery:
                    life.nursery = nursery
                    try:
                        with trio.move_on_at(deadline) as life.startup:
                            try:
                                await nursery.start(self._attached, life)
                                if adopt is None:
                                    self._set_state("starting")
                                    await self._start(life)
                                else:
                                    await self._hello(life)
                            except EngineGone as gone:
                                # away for engine_outage_s (or a stop was asked for meanwhile)
                                if self._stop_event.is_set():
                                    life.end("stop", "stop requested while the engine was away")
                                    return "stop", None
                                life.end("engine_unavailable", str(gone.args[0]))
                                return "died", self._outage_cert(cid, gen, gone.args[0], t_create)
                            except StartLost as exc:
                                log.warning("start_lost_replacing", error=str(exc))
                                life.end("replace", str(exc))
                                return "replace", None
                            except EngineError as exc:
                                life.end("died", str(exc))
                                return "died", await self._certify(life, watch, exc)
                            life.started = True
                            log.debug("container_started" if adopt is None else "container_adopting",
                                      name=name)
                            await life.settled.wait()
                        if not life.settled.is_set():
                            life.end("startup_timeout", f"not READY within {self.spec.startup_timeout_s} s")
                            await self._kill(cid)
                        self.start_limiter.release()
                        holding_slot = False
                        if life.ready and not life.ended.is_set():
                            self._set_state("busy" if self._current is not None else "ready")
                            if adopt is not None:
                                log.info("worker_adopted", name=name, container_id=cid[:12],
                                         running=self._current.task.task_id if self._current else None,
                                         adopt_s=round(trio.current_time() - t_create, 3))
                            else:
                                log.info("worker_ready", name=name,
                                         startup_s=round(trio.current_time() - t_create, 3))
                            if task_status is not None:
                                task_status.started(handle)
                            if adopt is not None and adopt.labels.get("corral.spec") != self._spec_hash:
                                # adopted, but its spec changed since: drained (its task finishes
                                # within stop_grace_s or is cancelled), then replaced
                                log.info("adopted_spec_changed", name=name)
                                self.image_id = None
                                life.end("restart", "its spec changed: drained and replaced")
                            await self._dispatch()
                            await life.ended.wait()
                        return await self._end_of_life(life, watch)
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                if self.watcher is not None:
                    self.watcher.forget(cid)
                if not self._abandoned():
                    await self._remove_container(cid)
        finally:
            if holding_slot:
                self.start_limiter.release()

    async def _start(self, life: _Life) -> None:
        """Start the container. A start cut off by the engine going away (a dockerd restarting
        closes its connections) is not the container's death: once the engine is back, the
        container runs (it started after all: the attach loop says ``hello`` and its READY
        comes as the answer) or is still only created (it is started again)."""
        cid = life.container_id
        cut = False
        while True:
            try:
                await self.engine.container_start(cid)
                return
            except EngineUnavailable as exc:
                if not await self._wait_for_engine():
                    raise EngineGone(exc) from None
                cut = True
            except EngineError as exc:
                if cut:
                    # started again after the outage, and refused: dockerd can come back with
                    # the half-made start of a container it still calls "created" ("task ...
                    # already exists"). It never ran: replaced by a new one, no death.
                    raise StartLost(str(exc)) from None
                raise
            try:
                st = await self.engine.container_inspect(cid)
            except EngineUnavailable:
                continue               # away again
            if st.status != "created":
                log.info("start_cut_off_by_the_engine", status=st.status)
                return                 # it started (running, or ended already: certified)

    def _abandoned(self) -> bool:
        """The supervisor was abandoned (a simulated crash of the corral process): containers
        are left running, as a killed process leaves them, for the next one to adopt."""
        return self.abandon is not None and self.abandon.is_set()

    async def _wait_for_engine(self, *, restore: bool = True) -> bool:
        """The engine does not answer: wait (state ``engine_down``) until it does again, for at
        most ``engine_outage_s``. False if it never came back in time, or the worker is asked to
        stop meanwhile. ``restore``: once it is back, the state goes back to what it was (else
        the caller does that when it has checked what it must)."""
        # (the attach loop and a start cut off may both wait: the state to go back to is the
        # one from before the outage)
        prev = self._before_outage = self.state if self.state != "engine_down" else self._before_outage
        self._set_state("engine_down")
        log.warning("engine_down", outage_limit_s=self.engine_outage_s)
        life = self._life
        startup = life.startup if life is not None and not life.settled.is_set() else None
        if startup is not None:
            startup.deadline = math.inf        # the startup deadline does not count the outage
        t0 = trio.current_time()
        deadline = t0 + self.engine_outage_s
        delay = 0.05
        try:
            while trio.current_time() < deadline and not self._stop_event.is_set():
                with trio.move_on_after(min(ENGINE_CHECK_S, max(deadline - trio.current_time(), 0.01))):
                    try:
                        await self.engine.ping()
                        back = True
                    except EngineUnavailable:
                        back = False
                    except EngineError:
                        back = True               # it answered, with an error
                    if back:
                        log.info("engine_back", down_s=round(trio.current_time() - t0, 3))
                        if restore:
                            self._set_state(prev)
                        return True
                with trio.move_on_after(min(delay, max(deadline - trio.current_time(), 0))):
                    await self._stop_event.wait()
                delay = min(delay * 2, 1.0)
        finally:
            if startup is not None:
                startup.deadline = trio.current_time() + self.spec.startup_timeout_s
        if self._stop_event.is_set():
            return False
        log.error("engine_unavailable", down_s=round(trio.current_time() - t0, 3))
        return False

    async def _engine_answers(self) -> bool:
        """The engine answers a ping within ENGINE_CHECK_S (with an error, even)."""
        with trio.move_on_after(ENGINE_CHECK_S):
            try:
                await self.engine.ping()
                return True
            except EngineUnavailable:
                return False
            except EngineError:
                return True
        return False

    def _outage_cert(self, cid: str | None, gen: int, exc: BaseException | None,
                     t0: float) -> DeathCertificate:
        return DeathCertificate(
            worker_id=self.id, container_id=cid, generation=gen, cause="engine_unavailable",
            reason=f"the engine was unreachable for over {self.engine_outage_s:g} s "
                   f"(engine_outage_s)" + (f": {exc}" if exc is not None else ""),
            at=time.time(), uptime_s=trio.current_time() - t0)

    async def _after_eof(self, life: _Life, watch) -> bool:
        """The container's attach stream ended. True: attach again (the engine went away or the
        stream broke, and the container still runs: it keeps its generation and task); False:
        the container's life is over (``life`` was ended)."""
        if life.ended.is_set():
            return False
        if watch is not None and watch.died.is_set():
            life.end("died", "output closed")
            return False
        cid = life.container_id
        outage = False
        errors = 0
        t_first = trio.current_time()
        while True:
            try:
                with trio.fail_after(ENGINE_CHECK_S):
                    st = await self.engine.container_inspect(cid)
                break
            except ContainerNotFound:
                life.end("died", "output closed")
                return False
            except (EngineError, trio.TooSlowError) as exc:
                # unreachable, too slow, or an error from an engine shutting down (a dockerd
                # that stops answers some calls with errors before it closes its socket): wait
                # until it answers again
                if not isinstance(exc, (EngineUnavailable, trio.TooSlowError)) \
                        and await self._engine_answers():
                    errors += 1                # an error of its own: asked again (3 times)
                    if errors >= 3:
                        life.end("died", f"output closed; the engine kept failing: {exc}")
                        return False
                    await trio.sleep(0.1)
                    continue
                outage = True
                if trio.current_time() - t_first > self.engine_outage_s \
                        or not await self._wait_for_engine(restore=False):
                    if self._stop_event.is_set():
                        life.end("stop", "stop requested while the engine was away")
                        return False
                    life.end("engine_unavailable",
                             f"the engine was unreachable for over {self.engine_outage_s:g} s "
                             f"(engine_outage_s)")
                    return False
        if outage:
            if not st.running and not (st.status == "created" and not life.started):
                life.end("died", "the container did not survive the engine's outage")
                life.outage = True
                return False
            # serving again only now that its container is known to have survived (a kill
            # before this point is no kill of a serving worker: it is the outage's)
            self._set_state(self._before_outage)
        if not st.running and not (st.status == "created" and not life.started):
            life.end("died", "output closed")
            return False
        # still running (or not started yet: its start was cut off, and is retried): the stream
        # broke, or the process is ending and the engine has not noticed yet (its die event
        # then comes at once)
        if watch is not None and self.watcher is not None and self.watcher.alive:
            with trio.move_on_after(0.2):
                await watch.died.wait()
            if watch.died.is_set():
                life.end("died", "output closed")
                return False
        life.reattaches += 1
        if life.reattaches > 10:
            life.end("died", "its output kept closing while the engine said it runs")
            return False
        log.warning("reattaching", reattaches=life.reattaches)
        return True

    async def _build_image(self) -> None:
        self._set_state("building")
        img = await self.builder.image_for(self.spec.agent, self.spec.capabilities, self.spec.stub_agent)
        self.image_id, self.image_tag = img.image_id, img.tag

    async def _end_of_life(self, life: _Life, watch) -> tuple[str, DeathCertificate | None]:
        kind = life.end_kind
        if kind in ("restart", "stop"):
            self._set_state("stopping")
            await self._graceful_end(life)
            if self._current is not None and kind == "restart":
                cert = await self._certify(life, watch, None)
                self._on_death(msgspec.structs.replace(cert, restart_in_s=0.0))
            return kind, None
        if kind == "hung":
            await self._kill(life.container_id)
        cert = await self._certify(life, watch, None)
        if await self._remove_container(life.container_id) == "gone" \
                and cert.cause in ("killed", "crashed", "exited"):
            # `docker rm -f` kills, then removes: the kill is what we saw first
            cert = msgspec.structs.replace(cert, cause="removed",
                                           reason="the container was removed out of band")
        return "died", cert

    async def _graceful_end(self, life: _Life) -> None:
        grace = self._stop.grace_s if (self._stop and self._stop.grace_s is not None) else self.spec.stop_grace_s
        if life.att is not None and life.end_kind != "died":
            life.shutdown_sent = True
            with trio.move_on_after(1.0):
                await self._send(life, Shutdown(grace_s=grace))
        with trio.move_on_after(grace + 1.0) as cs:
            try:
                await self.engine.container_wait(life.container_id)
            except EngineError:
                pass
        if cs.cancelled_caught:
            await self._kill(life.container_id)

    async def _kill(self, cid: str) -> None:
        if self._life is not None:
            self._life.kill_sent = True
        with trio.move_on_after(10):
            try:
                await self.engine.container_kill(cid, "SIGKILL")
            except EngineError:
                pass

    async def _remove_container(self, cid: str) -> str:
        """Remove our container (once). Returns "removed", "gone" (someone else removed it
        first) or "failed"."""
        if cid in self._removed:
            return self._removed[cid]
        result = "failed"
        with trio.CancelScope(shield=True):
            with trio.move_on_after(15):
                try:
                    await self.engine.container_remove(cid, force=True)
                    log.debug("container_removed", container_id=cid[:12])
                    result = "removed"
                except (ContainerNotFound, RemovalInProgress):
                    result = "gone"
                except EngineError as exc:
                    log.warning("container_remove_failed", container_id=cid[:12], error=str(exc))
        self._removed = {cid: result}
        if result == "failed":
            self._unremoved.add(cid)   # tried again before the next container, and at the end
        return result

    async def _remove_leftovers(self) -> None:
        """Containers of this worker that could not be removed (the engine was away)."""
        for cid in list(self._unremoved):
            with trio.CancelScope(shield=True), trio.move_on_after(15):
                try:
                    await self.engine.container_remove(cid, force=True)
                    self._unremoved.discard(cid)
                    log.info("leftover_container_removed", container_id=cid[:12])
                except (ContainerNotFound, RemovalInProgress):
                    self._unremoved.discard(cid)
                except EngineError as exc:
                    log.warning("container_remove_failed", container_id=cid[:12], error=str(exc))

    async def _certify_found(self, c: ContainerSummary) -> tuple[DeathCertificate, list[TaskDone]]:
        """A container of this worker that ended while no corral process was attached (found
        when corral started): its death certified from what the engine kept (exit code, OOM,
        its log), with the task results it wrote meanwhile (its log's task_done frames: a
        task that ended before the container did still has its answer); then it is removed."""
        exit_code: int | None = None
        oom = removed = False
        problem: str | None = None
        tail, frames, at, uptime = "", "", time.time(), 0.0
        try:
            st = await self.engine.container_inspect(c.id)
            exit_code, oom = st.exit_code, st.oom_killed
            if st.finished_at:
                at = st.finished_at
                uptime = max(st.finished_at - (st.started_at or st.finished_at), 0.0)
            tail = await self.engine.container_logs(c.id, tail_bytes=LOG_TAIL)
            frames = await self.engine.container_logs(c.id, tail_bytes=FOUND_LOG_BYTES,
                                                      stdout_only=True)
        except ContainerNotFound:
            removed = True
        except EngineError as exc:
            problem = str(exc)
        results: list[TaskDone] = []
        for line in frames.encode(errors="replace").split(b"\n"):   # stdout: the wrapper's own
            if b'"kind":"task_done"' in line:
                try:
                    frame = decode_wrapper_frame(line)
                except ProtocolError:
                    continue                 # cut off by the log's tail
                if isinstance(frame, TaskDone):
                    results.append(frame)
        cause, reason = classify(ExitFacts(
            end="died", ready=True, exit_code=exit_code, oom=oom, removed=removed,
            engine_problem=problem, watched=False, unattended=True,
            orphaned=any(line.startswith("[wrapper] orphaned:") for line in tail.split("\n"))))
        await self._remove_container(c.id)
        log.info("found_dead", container_id=c.id[:12], cause=cause, results=len(results))
        return DeathCertificate(worker_id=self.id, container_id=c.id, generation=self.generation,
                                cause=cause, reason=reason, exit_code=exit_code,
                                oom_killed=oom or cause == "oom_killed", ready=True,
                                uptime_s=round(uptime, 6), logs_tail=tail,
                                at=at), results

    def _engine_cert(self, cid: str | None, gen: int, exc: BaseException, t0: float) -> DeathCertificate:
        return DeathCertificate(worker_id=self.id, container_id=cid, generation=gen,
                                cause="engine_error", reason=str(exc), at=time.time(),
                                uptime_s=trio.current_time() - t0)

    async def _certify(self, life: _Life, watch, exc: BaseException | None) -> DeathCertificate:
        """Gather the facts of how this container ended (the I/O), then classify them
        (actors.classify: pure)."""
        cid = life.container_id
        kind = life.end_kind or "died"
        exit_code: int | None = None
        oom = removed = restarted = False
        lost: str | None = None
        problem = str(exc) if exc is not None else None
        unreachable = isinstance(exc, EngineUnavailable)
        if life.outage:
            problem, unreachable = "the engine went away and the container did not survive it", True
        answered = True
        watched_live = False      # its events were followed live as it ended (else a new
                                  # subscription of the watcher replays them)
        why = "the engine went away as the container ended"
        went_away = gave_up = False     # the engine went away as it ended, and came back / did not
        for again in (True, False) if exc is None and kind != "protocol" and life.started else ():
            try:
                with trio.fail_after(10):
                    exit_code = await self.engine.container_wait(cid)
                if watch is not None and self.watcher.alive:
                    watched_live = True
                    with trio.move_on_after(0.5):     # the die event comes after any kill event
                        await watch.died.wait()
                state = await self.engine.container_inspect(cid)
                if state.lost:
                    lost, exit_code = state.lost, None      # a cluster engine lost its node
                elif state.running:
                    restarted = True                  # up again since it died: a docker restart
                else:
                    oom = state.oom_killed
                    if state.exit_code is not None:
                        exit_code = state.exit_code
            except ContainerNotFound:
                removed = True
            except EngineError as e:
                problem, unreachable = str(e), isinstance(e, EngineUnavailable)
                if again and (unreachable or not await self._engine_answers()):
                    # the engine went away as it ended (a dockerd restarting cuts every call
                    # short): once it is back, it says how the container ended
                    if await self._wait_for_engine():
                        why, problem, unreachable, went_away = str(e), None, False, True
                        continue
                    gave_up = True
            except trio.TooSlowError:
                problem = "the container's exit was not reported within 10 s"
            break
        if watch is not None:
            oom = oom or watch.oom
            removed = removed or watch.destroyed.is_set()
            if exit_code is None:
                exit_code = watch.exit_code
        if kind == "died" and not removed and not unreachable and not went_away and not gave_up:
            if watch is not None and not life.kill_sent \
                    and any(signal_name(s) != "SIGKILL" for s in watch.kills):
                # a stop signal from outside: `docker stop`, `docker restart` (the engine starts
                # the container again) or the engine shutting down (its events stream ends)
                with trio.move_on_after(SETTLE_S):
                    await self.watcher.wait_settled(watch)
            # does the engine still answer? If not, it is what went away, not the worker
            answered, why = False, f"no answer to a ping within {ENGINE_CHECK_S} s"
            ping_failed = True
            with trio.move_on_after(ENGINE_CHECK_S):
                try:
                    await self.engine.ping()
                    ping_failed = False
                    why = f"its events stream ended and no new one was taken within {ENGINE_CHECK_S} s"
                    if self.watcher is not None:
                        await self.watcher.wait_alive()
                    answered = True
                    if watch is not None and not watched_live and not watch.died.is_set():
                        # subscribed again since the death: the new stream replays the events
                        # of this container (a kill comes before its die event)
                        with trio.move_on_after(0.5):
                            await watch.died.wait()
                except EngineUnavailable as e:
                    why = str(e)
                except EngineError:
                    ping_failed, answered = False, True     # it answered, with an error
            if ping_failed:
                if await self._wait_for_engine():
                    went_away = True
                else:
                    gave_up = True
        if gave_up and kind == "died" and not self._stop_event.is_set():
            kind = "engine_unavailable"
            life.end_reason = (f"the engine was unreachable for over {self.engine_outage_s:g} s "
                               f"(engine_outage_s)")
        if went_away and kind == "died" and not removed:
            # it went away as the container ended, and is back (a dockerd restarting): the
            # events its new stream replays tell a kill from outside (`docker kill`) apart;
            # any other end is the outage's doing, restarted without counting
            if self.watcher is not None:
                with trio.move_on_after(ENGINE_CHECK_S):
                    await self.watcher.wait_alive()
            if watch is not None and not watch.died.is_set():
                with trio.move_on_after(0.5):
                    await watch.died.wait()
            answered = bool(watch is not None and watch.kills and not watch.stopped
                            and not life.kill_sent)
            if not answered:
                life.outage = True
        if not answered:
            problem = why
        facts = ExitFacts(
            end=kind, detail=life.end_reason, ready=life.ready, exit_code=exit_code, oom=oom,
            oom_event=bool(watch and watch.oom), removed=removed, engine_problem=problem,
            engine_unreachable=unreachable, fatal=life.fatal_reason, watched=watch is not None,
            kill_signals=tuple(watch.kills) if watch is not None else (),
            corral_killed=life.kill_sent, stopped=bool(watch and watch.stopped),
            restarted=restarted or bool(watch and watch.restarted), engine_answered=answered,
            node_lost=lost)
        cause, reason = classify(facts)
        uptime = trio.current_time() - (life.ready_at or life.created_at)
        return DeathCertificate(worker_id=self.id, container_id=cid, generation=life.generation,
                                cause=cause, reason=reason, exit_code=exit_code,
                                oom_killed=oom or cause == "oom_killed", ready=life.ready,
                                uptime_s=round(uptime, 6),
                                logs_tail=life.tail.decode(errors="replace"), at=time.time())
