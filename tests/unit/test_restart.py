"""When next: the restart window and the backoff (pure; exact values)."""

import random

import pytest

from actors.worker.restart import BackoffState, RestartWindow, backoff_cap, backoff_delay
from runtime import Backoff

B = Backoff(initial_s=0.5, factor=2.0, max_s=4.0, jitter="none", stable_s=10.0)


@pytest.mark.parametrize("times,admitted", [
    ([0, 1, 2], [True, True, True]),
    ([0, 1, 2, 3], [True, True, True, False]),            # the 4th within 60 s: refused
    ([0, 1, 2, 60], [True, True, True, True]),            # t=0 is exactly 60 s old: still counts...
    ([0, 1, 2, 60.5], [True, True, True, True]),          # ...and falls out after
    ([0, 1, 2, 3, 61.5], [True, True, True, False, True]),
])
def test_restart_window_allows_max_restarts_within_the_period(times, admitted):
    w = RestartWindow(3, 60.0)
    got = [w.admit(t) for t in times]
    if times == [0, 1, 2, 60]:
        assert got == [True, True, True, False]
    else:
        assert got == admitted


def test_restart_window_counts_what_is_inside():
    w = RestartWindow(10, 5.0)
    for t in (0, 1, 2):
        w.admit(t)
    assert (w.count(2), w.count(6), w.count(8)) == (3, 2, 0)


def test_zero_restarts_allowed_refuses_the_first():
    assert RestartWindow(0, 60).admit(0) is False


@pytest.mark.parametrize("n,cap", [(0, 0.0), (1, 0.0), (2, 0.5), (3, 1.0), (4, 2.0), (5, 4.0), (9, 4.0)])
def test_backoff_cap(n, cap):
    assert backoff_cap(B, n) == cap
    assert backoff_delay(B, n, random.Random(0)) == cap     # jitter "none": the cap itself


def test_full_jitter_stays_within_the_cap():
    full = Backoff(initial_s=0.5, factor=2.0, max_s=4.0, jitter="full")
    rng = random.Random(7)
    delays = [backoff_delay(full, 4, rng) for _ in range(200)]
    assert all(0 <= d <= 2.0 for d in delays) and len(set(delays)) > 100


def test_backoff_state_resets_after_a_stable_period():
    s = BackoffState(B)
    rng = random.Random(0)
    got = [s.next_delay(stable=False, rng=rng) for _ in range(4)]
    assert got == [0.0, 0.5, 1.0, 2.0] and s.next_cap == 4.0
    assert s.next_delay(stable=True, rng=rng) == 0.0 and s.consecutive == 1 and s.next_cap == 0.5


def _cert(cause="crashed", ready=True, uptime_s=1.0):
    from runtime import DeathCertificate
    return DeathCertificate(worker_id="w", container_id="c", generation=1, cause=cause, ready=ready,
                            uptime_s=uptime_s)


@pytest.mark.parametrize("restart,cause,stopping,charged,expected", [
    ("permanent", "crashed", False, False, ("restart", 0.0)),
    ("permanent", "crashed", True, False, ("done", 0.0)),         # stopping
    ("temporary", "crashed", False, False, ("done", 0.0)),
    ("transient", "exited", False, False, ("done", 0.0)),         # a clean exit of a transient one
    ("transient", "crashed", False, False, ("restart", 0.0)),
    ("permanent", "config_error", False, False, ("give_up", 0.0)),
    ("permanent", "crashed", False, True, ("restart", 0.0)),
])
def test_decide(restart, cause, stopping, charged, expected):
    from actors.worker.restart import decide
    from runtime import RestartPolicy
    policy = RestartPolicy(restart=restart, backoff=B)
    got = decide(policy, _cert(cause), charged=charged, stopping=stopping,
                 window=RestartWindow(5, 60), backoff=BackoffState(B), now=0.0, rng=random.Random(0))
    assert got == expected


def test_decide_budget_and_charged_deaths():
    """Past the budget: give up; deaths charged to a task never spend it, but back off."""
    from actors.worker.restart import decide
    from runtime import RestartPolicy
    policy = RestartPolicy(max_restarts=2, backoff=B)
    window, state = RestartWindow(2, 60), BackoffState(B)

    def d(charged, t):
        return decide(policy, _cert(), charged=charged, stopping=False, window=window,
                      backoff=state, now=t, rng=random.Random(0))
    assert [d(True, t) for t in (0, 1, 2)] == [("restart", 0.0), ("restart", 0.5), ("restart", 1.0)]
    assert [d(False, t) for t in (3, 4, 5)] == [("restart", 2.0), ("restart", 4.0), ("give_up", 0.0)]
