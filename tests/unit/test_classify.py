"""Which cause: the pure exit classifier, as a table (exit facts -> cause, reason)."""

import pytest

from actors.worker.classify import ExitFacts, classify, signal_name
from runtime.records import CAUSES

F = ExitFacts
SERVING = dict(ready=True)
ENGINE_DOWN = "cannot reach the Docker engine at unix:///var/run/docker.sock: Connection refused"

# (id, facts, cause, the exact reason, or None where any reason will do)
TABLE = [
    # corral's own account of the end comes first
    ("hung", F(end="hung", detail="no heartbeat for 5 s", ready=True, exit_code=137, corral_killed=True,
               kill_signals=("9",)), "hung", "no heartbeat for 5 s"),
    ("protocol_error", F(end="protocol", detail="unexpected frame Foo", ready=True, corral_killed=True,
                         kill_signals=("9",), exit_code=137), "protocol_error", "unexpected frame Foo"),
    ("startup_timeout", F(end="startup_timeout", detail="not READY within 3 s", corral_killed=True,
                          exit_code=137), "startup_timeout", "not READY within 3 s"),
    ("startup_timeout_even_if_engine_gone", F(end="startup_timeout", detail="not READY within 3 s",
                                              engine_answered=False), "startup_timeout", "not READY within 3 s"),
    # the wrapper said why
    ("config_error_fatal", F(exit_code=78, fatal="agent CLI version probe failed"), "config_error",
     "agent CLI version probe failed"),
    ("config_error_exit_78_alone", F(exit_code=78, **SERVING), "config_error", None),
    ("config_error_fatal_before_ready", F(exit_code=1, fatal="required environment variable(s) not set"),
     "config_error", "required environment variable(s) not set"),
    ("oom_from_inspect", F(exit_code=137, oom=True, **SERVING), "oom_killed", "killed by the kernel OOM killer"),
    ("oom_from_event", F(exit_code=137, oom_event=True, **SERVING), "oom_killed", None),
    ("oom_from_wrapper", F(exit_code=137, fatal="oom_killed: the agent was killed", **SERVING),
     "oom_killed", "oom_killed: the agent was killed"),
    # the engine's events
    ("removed", F(exit_code=137, removed=True, kill_signals=("9",), **SERVING), "removed",
     "the container was removed out of band"),
    ("docker_kill", F(exit_code=137, kill_signals=("9",), **SERVING), "killed", "killed outside corral with SIGKILL"),
    ("docker_kill_before_ready", F(exit_code=137, kill_signals=("9",)), "killed", "killed outside corral with SIGKILL"),
    ("docker_kill_s_term", F(exit_code=143, kill_signals=("15",), **SERVING), "killed",
     "killed outside corral with SIGTERM"),
    ("docker_kill_s_term_by_name", F(exit_code=143, kill_signals=("SIGTERM",), **SERVING), "killed",
     "killed outside corral with SIGTERM"),
    ("docker_stop", F(exit_code=143, kill_signals=("15",), stopped=True, **SERVING), "killed",
     "stopped outside corral (docker stop: SIGTERM)"),
    ("podman_stop_no_kill_event", F(exit_code=143, stopped=True, **SERVING), "killed",
     "stopped outside corral (docker stop: SIGTERM)"),
    ("a_stop_that_ended_it_with_0", F(exit_code=0, stopped=True, **SERVING), "killed",
     "stopped outside corral (docker stop: its stop signal)"),
    ("docker_stop_past_its_timeout", F(exit_code=137, kill_signals=("15", "9"), stopped=True, **SERVING),
     "killed", "stopped outside corral (docker stop: SIGTERM, then SIGKILL)"),
    ("docker_restart", F(exit_code=143, kill_signals=("15",), stopped=True, restarted=True, **SERVING),
     "killed", "restarted outside corral (docker restart)"),
    ("docker_restart_seen_running_again", F(exit_code=0, kill_signals=("15",), stopped=True,
                                            restarted=True, **SERVING),
     "killed", "restarted outside corral (docker restart)"),
    ("a_signal_it_survived_then_a_crash", F(exit_code=1, kill_signals=("28",), **SERVING), "crashed",
     "exited with 1 after READY"),
    ("corral_killed_it", F(exit_code=137, kill_signals=("9",), corral_killed=True, **SERVING), "crashed",
     "exited with 137 after READY (SIGKILL, from corral)"),
    # the engine went away
    ("engine_shutdown", F(exit_code=143, kill_signals=("15",), stopped=True, engine_answered=False,
                          engine_problem=ENGINE_DOWN, **SERVING),
     "engine_error", f"the engine went away (the container exited with 143): {ENGINE_DOWN}"),
    ("engine_unreachable_while_gathering", F(engine_problem=ENGINE_DOWN, engine_unreachable=True,
                                             engine_answered=False, **SERVING),
     "engine_error", f"the engine went away: {ENGINE_DOWN}"),
    ("engine_stayed_away", F(end="engine_unavailable", detail="the engine was unreachable for over 60 s",
                             engine_unreachable=True, engine_answered=False, **SERVING),
     "engine_unavailable", "the engine was unreachable for over 60 s"),
    # a cluster engine lost the container's node: whatever else went wrong on the way
    ("node_lost", F(node_lost="node n2 (abc) is down in the swarm", exit_code=143, kill_signals=("15",),
                    stopped=True, engine_problem=ENGINE_DOWN, engine_unreachable=True,
                    engine_answered=False, **SERVING),
     "node_lost", "its node was lost: node n2 (abc) is down in the swarm"),
    ("engine_error_exit_unknown", F(engine_problem="start abc: fake: start failed"), "engine_error",
     "start abc: fake: start failed"),
    ("engine_error_but_exit_known", F(engine_problem="inspect failed", exit_code=2, **SERVING), "crashed",
     "exited with 2 after READY"),
    # no kill through the engine
    ("early_exit", F(exit_code=3), "early_exit", "exited with 3 before READY"),
    ("early_exit_sigkill_not_through_engine", F(exit_code=137), "early_exit",
     "exited with 137 before READY (SIGKILL, not sent through the engine API: a kill on the host, "
     "or a process inside the container)"),
    ("exited", F(exit_code=0, **SERVING), "exited", "exited with 0 while serving"),
    ("crashed", F(exit_code=2, **SERVING), "crashed", "exited with 2 after READY"),
    ("crashed_with_fatal", F(exit_code=1, fatal="agent exploded", **SERVING), "crashed", "agent exploded"),
    ("host_kill_9_of_init", F(exit_code=137, **SERVING), "crashed",
     "exited with 137 after READY (SIGKILL, not sent through the engine API: a kill on the host, "
     "or a process inside the container)"),
    ("host_kill_term_of_init", F(exit_code=143, **SERVING), "crashed",
     "exited with 143 after READY (SIGTERM, not sent through the engine API: a kill on the host, "
     "or a process inside the container)"),
    ("no_watcher_137", F(exit_code=137, watched=False, **SERVING), "killed", "exited with 137 (SIGKILL)"),
    # corral ended it on request (a task was in flight)
    ("restart_requested", F(end="restart", detail="restart requested", exit_code=0, **SERVING), "exited",
     "restart requested: the wrapper shut down (exit 0)"),
    ("stop_past_grace", F(end="stop", detail="stop requested", exit_code=137, corral_killed=True,
                          kill_signals=("9",), **SERVING), "killed",
     "stop requested: killed by corral after its stop grace"),
]


@pytest.mark.parametrize("facts,cause,reason", [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_classify(facts, cause, reason):
    got_cause, got_reason = classify(facts)
    assert got_cause == cause
    if reason is not None:
        assert got_reason == reason
    assert got_reason


def test_the_table_covers_every_cause():
    assert {t[2] for t in TABLE} == set(CAUSES)


@pytest.mark.parametrize("sig,name", [("9", "SIGKILL"), ("15", "SIGTERM"), ("TERM", "SIGTERM"),
                                      ("SIGHUP", "SIGHUP"), ("nonsense", "nonsense")])
def test_signal_name(sig, name):
    assert signal_name(sig) == name
