import random
from contextlib import asynccontextmanager

from runtime import SupervisorConfig, open_supervisor
from runtime.testing import FakeEngine


@asynccontextmanager
async def fake_supervisor(config: SupervisorConfig | None = None, **engine_kwargs):
    """A supervisor on a FakeEngine, with a seeded rng: deterministic under autojump_clock."""
    async with FakeEngine(**engine_kwargs) as engine:
        async with open_supervisor(config or SupervisorConfig(name="t"), engine=engine,
                                   rng=random.Random(1)) as sup:
            yield sup, engine
