"""ImageBuilder against the real engine: content-addressed, shared builds, clear errors."""

import time
import uuid

import pytest
import trio

from actors.builder import (ImageBuilder, build_context, image_inputs, image_tag, network_steps,
                            open_image_builder, wrapper_sources)
from runtime.apps.baseimage import BASE_REF
from runtime.errors import ConfigError, ImageBuildError, ImageNotFound


def context(dockerfile: str) -> bytes:
    return build_context(dockerfile, {})


@pytest.fixture
async def scratch_images(engine):
    """Derived base images made by a test, and what was built on them, removed afterwards."""
    made: list[str] = []

    async def derive(extra: str = "") -> str:
        tag = f"corral/test-base:{uuid.uuid4().hex[:10]}"
        await engine.image_build(context(f"FROM {BASE_REF}\nLABEL corral.test=1\n{extra}\n"),
                                 tag=tag, labels={"corral.test": "1"})
        made.append(tag)
        return tag

    yield derive, made
    with trio.CancelScope(shield=True):
        for ref in reversed(made):
            try:
                await engine.image_remove(ref, force=True)
            except ImageNotFound:
                pass


async def test_different_agents_get_different_images(engine):
    with trio.fail_after(120):
        async with open_image_builder(engine) as b:
            claude = await b.image_for("claude", ["git"], stub_agent=True)
            factory = await b.image_for("factory", ["git"], stub_agent=True)
    assert claude.tag.startswith("corral/worker-claude:") and factory.tag.startswith("corral/worker-factory:")
    assert claude.image_id != factory.image_id
    labels = (await engine.image_inspect(claude.tag)).labels
    assert labels["corral.agent"] == "claude" and labels["corral.capabilities"] == "git"
    assert labels["corral.base"] == (await engine.image_inspect(BASE_REF)).id
    assert len(labels["corral.spec"]) == 64


async def test_same_inputs_reuse_the_image_fast_and_without_a_build(engine):
    with trio.fail_after(120):
        async with open_image_builder(engine) as b:
            first = await b.image_for("claude", ["git"], stub_agent=True)
            builds = b.statistics().builds
            t0 = time.monotonic()
            second = await b.image_for("claude", ["git"], stub_agent=True)
            elapsed = time.monotonic() - t0
        assert second.image_id == first.image_id and not second.built
        assert b.statistics().builds == builds
        assert elapsed < 0.1
    # a new builder (a new process, say) finds the image on the engine: still no build
    async with open_image_builder(engine) as b2:
        third = await b2.image_for("claude", ["git"], stub_agent=True)
        assert third.image_id == first.image_id and b2.statistics().builds == 0


async def test_ten_concurrent_requests_for_a_new_tag_run_one_build(engine, scratch_images):
    derive, made = scratch_images
    with trio.fail_after(180):
        base = await derive()
        async with open_image_builder(engine, base_image=base) as b:
            results = []

            async def ask():
                results.append(await b.image_for("codex", ["curl"], stub_agent=True))
            async with trio.open_nursery() as n:
                for _ in range(10):
                    n.start_soon(ask)
            made.append(results[0].tag)
        assert b.statistics().builds == 1
        assert sum(r.built for r in results) == 1
        assert len({r.image_id for r in results}) == 1


async def test_capability_order_and_duplicates_do_not_matter(engine):
    with trio.fail_after(120):
        async with open_image_builder(engine) as b:
            a = await b.image_for("claude", ["curl", "git"], stub_agent=True)
            c = await b.image_for("claude", ["git", "curl", "git"], stub_agent=True)
    assert a.tag == c.tag and a.image_id == c.image_id


async def test_changed_base_or_wrapper_gives_a_new_tag(engine, scratch_images):
    derive, made = scratch_images
    base_id = (await engine.image_inspect(BASE_REF)).id
    tag0, _ = image_tag(image_inputs(agent="shell", capabilities=[], stub_agent=False, base_image_id=base_id))
    other_base = (await engine.image_inspect(await derive())).id
    tag1, _ = image_tag(image_inputs(agent="shell", capabilities=[], stub_agent=False, base_image_id=other_base))
    sources = dict(wrapper_sources())
    sources["wrapper.py"] += b"\n# changed\n"
    tag2, _ = image_tag(image_inputs(agent="shell", capabilities=[], stub_agent=False, base_image_id=base_id,
                                     sources=sources))
    assert len({tag0, tag1, tag2}) == 3


async def test_unknown_capability_and_agent_are_config_errors(engine):
    async with open_image_builder(engine) as b:
        with pytest.raises(ConfigError) as ei:
            await b.image_for("claude", ["git", "kubectl"], stub_agent=True)
        assert "'kubectl'" in str(ei.value) and "known capabilities: curl, git" in str(ei.value)
        with pytest.raises(ConfigError) as ei:
            await b.image_for("gemini", [], stub_agent=True)
        assert "known agents: claude, codex, factory, shell" in str(ei.value)


async def test_step_needing_network_is_rejected_before_building(engine):
    async with open_image_builder(engine) as b:
        with pytest.raises(ImageBuildError) as ei:
            await b.image_for("claude", ["node"], stub_agent=True)
        msg = str(ei.value)
        assert "capability 'node'" in msg and "needs network at build time" in msg
        assert "Bake it into the base image" in msg and "build_network = true" in msg
        assert b.statistics().builds == 0
    # a real agent needs none: its package is fetched on the host and COPYed
    base_id = (await engine.image_inspect(BASE_REF)).id
    assert network_steps(image_inputs(agent="claude", capabilities=[], stub_agent=False,
                                      base_image_id=base_id)) == []


async def test_base_without_worker_user_is_rejected_at_build_time(engine, scratch_images):
    derive, made = scratch_images
    with trio.fail_after(180):
        base = await derive("RUN userdel -r worker")
        async with open_image_builder(engine, base_image=base) as b:
            with pytest.raises(ImageBuildError) as ei:
                await b.image_for("shell", [], stub_agent=False)
    msg = str(ei.value)
    assert "has no user 'worker'" in msg and "failing step" in msg and "id -u worker" in msg
