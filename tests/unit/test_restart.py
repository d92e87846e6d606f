"""When next: the restart window and the backoff (pure; exact values)."""

import random

import pytest

from actors.restart import BackoffState, RestartWindow, backoff_cap, backoff_delay
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
