"""The Watcher on every engine: when its events stream drops, it resubscribes from the last event
it saw, and what happened in between reaches the containers' watches, once."""

from contextlib import asynccontextmanager

import trio

from actors.watcher import Watcher
from runtime.engines import ContainerEvent, Engine

from .conftest import flavour
from .helpers import DEADLINE, worker_spec


class _Dropped:
    def __init__(self, receive: trio.MemoryReceiveChannel[ContainerEvent]) -> None:
        self.receive = receive
        self.ended: str | None = None


class DroppingEngine:
    """An engine whose events streams the test can cut (the subscription to the real engine is
    closed), and whose new subscriptions it can hold back; every other call goes through."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._cut = trio.Event()
        self._open = trio.Event()
        self._open.set()
        self.subscribed = trio.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def drop(self) -> None:
        """End the current streams, and hold new subscriptions until `let_in()`."""
        self._open = trio.Event()
        self._cut.set()
        self._cut = trio.Event()
        self.subscribed = trio.Event()

    def let_in(self) -> None:
        self._open.set()

    @asynccontextmanager
    async def events(self, **kwargs):
        await self._open.wait()
        cut = self._cut
        async with self._engine.events(**kwargs) as inner:
            send, recv = trio.open_memory_channel[ContainerEvent](1024)
            outer = _Dropped(recv)

            async def pump(task_status=trio.TASK_STATUS_IGNORED) -> None:
                async with send:
                    with trio.CancelScope() as scope:
                        task_status.started(scope)
                        async for ev in inner.receive:
                            await send.send(ev)
                    outer.ended = "dropped by the test" if scope.cancel_called else inner.ended

            async with trio.open_nursery() as nursery:
                scope = await nursery.start(pump)
                nursery.start_soon(self._cut_when, cut, scope)
                self.subscribed.set()
                try:
                    yield outer
                finally:
                    nursery.cancel_scope.cancel()

    @staticmethod
    async def _cut_when(cut: trio.Event, scope: trio.CancelScope) -> None:
        await cut.wait()
        scope.cancel()


async def test_the_watcher_resubscribes_and_replays_what_it_missed(engine, sup_name, image):
    dropping = DroppingEngine(engine)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            watcher = await nursery.start(Watcher(dropping, supervisor=sup_name).run)
            assert watcher.alive and watcher.subscriptions == 1
            cids = {}
            for wid in "ab":
                cids[wid] = await engine.container_create(worker_spec(image, sup_name, wid))
            wa, wb = watcher.watch(cids["a"]), watcher.watch(cids["b"])
            for w in (wa, wb):
                changed = w.changed
                await engine.container_start(w.container_id)
                await changed.wait()                   # its start event came through

            await engine.container_kill(cids["a"])
            await wa.died.wait()                       # seen live

            changed = wb.changed
            dropping.drop()                            # the stream ends; no new one yet
            await changed.wait()                       # (the watcher tells every watch)
            assert not watcher.alive
            await engine.container_stop(cids["b"], grace_s=5)
            assert (wb.kills, wb.exit_code, wb.stopped) == ([], None, False)

            dropping.let_in()
            await watcher.wait_alive()
            # replayed: kill, die, then stop. Podman tells no kill for a stop, and its stop event
            # only when the stop call wins a race with the container's cleanup
            podman = flavour(engine) == "podman"
            while not ((podman or wb.stopped) and wb.died.is_set()):
                await wb.changed.wait()
            if podman:
                with trio.move_on_after(0.5):
                    while not wb.stopped:
                        await wb.changed.wait()
            nursery.cancel_scope.cancel()
    assert watcher.subscriptions == 2
    assert (wa.kills, wa.exit_code, wa.stopped) == (["9"], 137, False)
    assert (wb.kills, wb.exit_code) == ([] if podman else ["15"], 143)
    assert wb.stopped or podman
    assert not wa.restarted and not wb.restarted
    # every event once, though the replay starts a little before the last one seen (a's death):
    # started a, b; killed, died a; killed, died, stopped b (Podman: died, stopped if told)
    assert watcher.events_seen == (5 + wb.stopped if podman else 7)


async def test_a_watcher_that_saw_no_event_yet_replays_from_its_first_subscription(engine, sup_name, image):
    """A watcher whose stream drops before it saw any event (a supervisor that just adopted a
    running container, then the engine restarted) still replays what happened meanwhile: from
    the time of its first subscription."""
    dropping = DroppingEngine(engine)
    with trio.fail_after(DEADLINE):
        cid = await engine.container_create(worker_spec(image, sup_name, "a"))
        await engine.container_start(cid)              # before the watcher: not its to see
        async with trio.open_nursery() as nursery:
            watcher = await nursery.start(Watcher(dropping, supervisor=sup_name).run)
            w = watcher.watch(cid)
            changed = w.changed
            dropping.drop()
            await changed.wait()
            assert not watcher.alive and watcher.events_seen == 0
            await engine.container_kill(cid)
            dropping.let_in()
            await watcher.wait_alive()
            with trio.move_on_after(10):
                while not w.died.is_set():
                    await w.changed.wait()
            nursery.cancel_scope.cancel()
    assert watcher.subscriptions == 2
    assert (w.kills, w.exit_code, w.died.is_set()) == (["9"], 137, True)
