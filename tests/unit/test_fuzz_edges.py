"""Fuzzing the edges: whatever arrives at Task / WorkerSpec construction or from a wrapper, it
ends in a clear error for that one request (or that one worker) and the tree is untouched.

(Control-socket requests are fuzzed in test_control_fuzz.py, agent output through the real
wrapper in test_wrapper_process.py.)"""

import msgspec
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime import ConfigError, Task, WorkerSpec
from runtime.testing import wait_for_generation

from .helpers import fake_supervisor

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
task_fields = st.sampled_from(["prompt", "args", "timeout_s", "max_attempts", "max_output_bytes",
                               "task_id", "bogus"])
spec_fields = st.sampled_from(["agent", "capabilities", "stub_agent", "id", "env", "required_env",
                               "memory", "cpus", "pids_limit", "disk", "startup_timeout_s",
                               "heartbeat_s", "restart", "task_grace_s", "bogus"])


def _build(cls, kwargs):
    """Building either gives a valid value (it encodes, and decodes back equal) or ConfigError."""
    try:
        value = cls(**kwargs)
    except ConfigError as exc:
        assert str(exc)
        return None
    except TypeError as exc:          # an unknown keyword: Python's own, clear error
        assert "keyword argument" in str(exc).lower() or "missing" in str(exc)
        return None
    assert msgspec.json.decode(msgspec.json.encode(value), type=cls) == value
    return value


@FUZZ
@given(st.dictionaries(task_fields, json_values | st.text(), max_size=5), st.text())
def test_task_construction_is_valid_or_a_config_error(kwargs, prompt):
    kwargs.setdefault("prompt", prompt)
    _build(Task, kwargs)
    try:
        msgspec.convert(kwargs, Task)           # the decoding path: same answer, as ValidationError
    except msgspec.ValidationError as exc:
        assert "$" in str(exc) or "Object contains unknown field" in str(exc) or str(exc)


@FUZZ
@given(st.dictionaries(spec_fields, json_values, max_size=5))
def test_worker_spec_construction_is_valid_or_a_config_error(kwargs):
    _build(WorkerSpec, kwargs)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.binary(max_size=2048),
                 st.lists(st.binary(max_size=64), max_size=20).map(lambda xs: b"\n".join(xs)),
                 json_values.map(lambda v: msgspec.json.encode(v) + b"\n"),
                 st.sampled_from([b'{"kind":"ready","worker_id":"someone-else","agent":"x"}\n',
                                  b'{"kind":"task_done","task_id":"nope","status":"ok"}\n',
                                  b'{"kind":"heartbeat","seq":"x"}\n', b"\xff\xfe\n", b"{" * 5000 + b"\n"])))
async def test_arbitrary_wrapper_output_hits_only_that_worker(data):
    with trio.fail_after(30):
        async with fake_supervisor() as (sup, engine):
            victim = await sup.spawn(WorkerSpec(id="victim"))
            bystander = await sup.spawn(WorkerSpec(id="bystander"))
            engine.container_of("victim").out_send.send_nowait((1, data + b"\n"))
            # (the garbage may kill the victim while "after" is already in flight: one retry)
            r = await victim.run(Task(prompt="after", max_attempts=2))
            assert (r.status, r.output) == ("ok", "stub-shell: after")
            causes = {d.cause for d in (await sup.snapshot()).children[0].deaths}
            assert causes <= {"protocol_error"}
            assert (await bystander.info()).generation == 1
            assert (await sup.snapshot()).state == "running"


@pytest.mark.parametrize("data", [b"x" * (2 << 20), b"y" * ((1 << 20) + 1) + b"\n"])
async def test_an_oversized_line_is_a_protocol_error_of_that_worker(autojump_clock, data):
    async with fake_supervisor() as (sup, engine):
        victim = await sup.spawn(WorkerSpec(id="victim"))
        bystander = await sup.spawn(WorkerSpec(id="bystander"))
        engine.container_of("victim").out_send.send_nowait((1, data))
        await wait_for_generation(victim, 2)
        assert (await victim.info()).last_death.cause == "protocol_error"
        assert (await bystander.info()).generation == 1 and (await sup.snapshot()).state == "running"
