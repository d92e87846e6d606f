"""Generated fault histories on every strategy: spawns, tasks, faults and time steps interleaved
by Hypothesis over FakeEngine, every invariant checked after every step; and a planted bug found
and shrunk to a handful of steps."""

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from actors.pool import Pool
from runtime import PoolSpec, SupervisorConfig, WorkerSpec
from runtime.chaoskit.stateful import DEFAULT_POLICY, CorralStateMachine, HistoryFailed

FAST = settings(max_examples=25, stateful_step_count=15, deadline=None, derandomize=True,
                database=None, suppress_health_check=[HealthCheck.too_slow])


class CorralTree(CorralStateMachine):
    """A pool of two, plus up to three workers spawned beside it (group strategies act on those)."""
    hypothesis_settings = FAST

    async def build(self, sup):
        await sup.start_pool(PoolSpec(name="p", replicas=2, worker=WorkerSpec(
            restart=DEFAULT_POLICY, heartbeat_s=4.0, heartbeat_timeout_s=10.0)))


class OneForOne(CorralTree):
    config = SupervisorConfig(name="sm", strategy="one_for_one", max_restarts=3, within_s=30)


class OneForAll(CorralTree):
    config = SupervisorConfig(name="sm", strategy="one_for_all", max_restarts=3, within_s=30)


class RestForOne(CorralTree):
    config = SupervisorConfig(name="sm", strategy="rest_for_one", max_restarts=3, within_s=30)


TestOneForOne = OneForOne.TestCase
TestOneForAll = OneForAll.TestCase
TestRestForOne = RestForOne.TestCase


def test_a_planted_redelivery_bug_is_found_and_shrunk_to_a_few_steps(monkeypatch, capsys):
    """Redelivery that ignores max_attempts (two tries too many): the generated histories find
    it, and Hypothesis shrinks the history to at most five steps, which it prints."""
    monkeypatch.setattr(Pool, "_should_redeliver", lambda self, job, res: res.status == "worker_died"
                        and job.attempts < job.task.max_attempts + 2)

    class Planted(OneForOne):
        hypothesis_settings = settings(FAST, max_examples=40)

    with pytest.raises(HistoryFailed):
        run_state_machine_as_test(Planted, settings=Planted.hypothesis_settings)
    shrunk = Planted.failures[-1]           # the last failure Hypothesis ran: the minimal one
    with capsys.disabled():
        print("\n" + str(shrunk).split("\ntimeline:")[0])
    assert len(shrunk.plan) <= 5
    assert any("[executions]" in v and "max_attempts" in v for v in shrunk.violations)
