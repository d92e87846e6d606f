"""Every adapter implements the whole port, with the port's parameters (names, kinds, defaults)
and the same async-ness: a caller typed against `Engine` works on each of them."""

import inspect

import pytest

from runtime.engines import Engine
from runtime.engines.docker import DockerEngine
from runtime.engines.fake import FakeEngine
from runtime.engines.swarm import SwarmEngine

PORT = sorted(name for name, value in vars(Engine).items()
              if not name.startswith("_") and callable(value))


def test_the_port_is_what_the_actors_use():
    assert {"container_create", "container_start", "container_inspect", "container_wait",
            "container_kill", "container_remove", "container_list", "attach", "events",
            "ping", "image_inspect", "image_build"} <= set(PORT)


@pytest.mark.parametrize("adapter", [DockerEngine, FakeEngine, SwarmEngine])
def test_every_adapter_has_the_port_s_methods_with_its_parameters(adapter):
    for name in PORT:
        want, have = getattr(Engine, name), getattr(adapter, name)
        shape = lambda fn: [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]
        assert shape(have) == shape(want), name
        assert inspect.iscoroutinefunction(have) == inspect.iscoroutinefunction(want), name
