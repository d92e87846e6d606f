"""The wrapper core's crash-safe control plane (runtime/wrapper/core.py, wrapper version 5):
sequence numbers on the frames that carry a task's progress and result, the actor's ``lease``
acknowledging them, ``hello`` replaying what was not acknowledged, and the orphan timeout."""

import json

import pytest

from runtime.protocol import Ready, decode_wrapper_frame
from runtime.wrapper import core as c

from .test_wrapper_core import ENV, Clock, W, done_of, frames, kinds, of

LEASE = {"CORRAL_ORPHAN_TIMEOUT_S": "10"}


class L(W):
    """A core made ready with the lease's environment (the lease timer runs from Boot)."""

    def __init__(self, agent="shell", **env):
        self.clock = Clock()
        self.core = c.WrapperCore({**ENV, "CORRAL_AGENT": agent, **env}, clock=self.clock, pid=7)
        boot = self.core.handle(c.Boot())
        lease = float(env.get("CORRAL_ORPHAN_TIMEOUT_S") or 0)
        assert boot == ([c.StartTimer("lease", lease)] if lease else []) + [c.CheckWorkspace("/ws")]
        self.core.handle(c.WorkspaceChecked(None))
        self.ready = self.core.handle(c.ProbeDone(0, b"v1.2\n"))

    def lease(self, ack):
        return self.send({"kind": "lease", "ack": ack})

    def hello(self, worker_id="w-1"):
        return self.send({"kind": "hello", "worker_id": worker_id})


def seqs(actions):
    return [(f["kind"], f.get("task_id"), f.get("seq")) for f in frames(actions)]


def lines(actions):
    return [a.data for a in actions if isinstance(a, c.Send)]


def resumed(actions):
    """The ready that answers hello, decoded as the actor decodes it, and the frames after it."""
    sent = lines(actions)
    ready = decode_wrapper_frame(sent[0].rstrip(b"\n"))
    assert isinstance(ready, Ready) and ready.resumed and ready.wrapper_version == "6"
    return ready, sent[1:]


# --- sequence numbers ---------------------------------------------------------------------------

def test_progress_and_results_are_numbered_over_the_wrapper_s_life():
    w = L()
    acts = []
    w.start("a")
    acts += w(c.AgentOutput("a", "stdout", b"x" * (c.OUTPUT_CHUNK + 10)))
    acts += w(c.TimerFired("heartbeat"))
    acts += w.finish("a")
    acts += w.run("bad", 123)                         # a refused task's answer is a result too
    w.start("b")
    acts += w.finish("b", stdout=b"y")
    assert seqs(acts) == [("task_output", "a", 2), ("task_output", "a", 3), ("heartbeat", None, 1),
                          ("task_done", "a", 4), ("task_done", "bad", 5), ("task_output", "b", 7),
                          ("task_done", "b", 8)]
    assert frames(acts)[2] == {"kind": "heartbeat", "seq": 1, "sent": 3}   # heartbeats count on their
    #                                                                    own, and say what was sent


# --- hello and replay ---------------------------------------------------------------------------

def test_hello_answers_ready_resumed_then_replays_every_unacknowledged_frame_unchanged():
    w = L()
    sent = []
    w.start("a")
    sent += lines(w(c.AgentOutput("a", "stdout", b"out-a")))
    sent += lines(w.finish("a"))
    started_b = lines(w.run("b") + w(c.AgentStarted("b", 1)))
    sent += started_b + lines(w(c.AgentOutput("b", "stdout", b"out-b")))
    w.clock.t = 150.0
    ready, replayed = resumed(w.hello())
    assert (ready.worker_id, ready.running, ready.replay, ready.agent_version, ready.pid) == \
        ("w-1", "b", ["a"], "v1.2", 7)
    # task a's task_started was sent by W.start (not captured above): the replay starts with it
    assert [json.loads(x)["seq"] for x in replayed] == [1, 2, 3, 4, 5]
    assert replayed[1:] == sent                       # the very same lines, the same numbers
    # what the agent writes after the replay follows it, numbered on
    after = frames(w(c.AgentOutput("b", "stdout", b"more")))
    assert after == [{"kind": "task_output", "task_id": "b", "data": "more", "seq": 6}]
    assert done_of(w.finish("b"))["seq"] == 7


def test_a_lease_acknowledges_and_the_acknowledged_are_not_replayed():
    w = L()
    w.start("a")
    w.finish("a", stdout=b"1")                        # seq 1, 2, 3
    w.start("b")                                      # 4
    w(c.AgentOutput("b", "stdout", b"2"))             # 5
    assert w.lease(3) == []
    ready, replayed = resumed(w.hello())
    assert (ready.running, ready.replay) == ("b", [])
    assert [json.loads(x)["seq"] for x in replayed] == [4, 5]
    w.lease(5)
    ready, replayed = resumed(w.hello())
    assert replayed == []
    done = done_of(w.finish("b"))
    ready, replayed = resumed(w.hello())              # a result stays until it is acknowledged
    assert ready.replay == ["b"] and [json.loads(x) for x in replayed] == [done]
    assert ready.running is None


@pytest.mark.parametrize("ack", [-1, "3", True, 1.5, None])
def test_a_lease_with_a_bad_ack_forgets_nothing(ack):
    w = L()
    w.start("a")
    w.finish("a")
    acts = w.lease(ack)
    assert frames(acts) == [] and "not a sequence number" in acts[0].text
    assert resumed(w.hello())[0].replay == ["a"]


def test_an_ack_past_the_last_frame_forgets_everything_sent():
    w = L()
    w.start("a")
    w.finish("a")                                     # seq 1, 2
    acts = w.lease(99)
    assert acts == [c.Log("a lease acknowledges seq 99, but the last frame sent is 2")]
    assert resumed(w.hello())[1] == []
    w.start("b")
    assert done_of(w.finish("b"))["seq"] == 4         # numbering goes on from the wrapper's count


def test_a_hello_for_another_worker_is_logged_and_ignored():
    w = L()
    w.start("a")
    acts = w.hello("w-2")
    assert acts == [c.Log('ignoring hello for worker "w-2": this is worker w-1')]


def test_kept_output_is_capped_oldest_first_and_the_result_is_never_dropped():
    w = L()
    w.start("a", max_output_bytes=None)
    data = bytes(range(48, 48 + 64)) * (40 * 1024)     # 2.5 MiB of output, nothing acknowledged
    acts = []
    for i in range(0, len(data), 65536):
        acts += w(c.AgentOutput("a", "stdout", data[i:i + 65536]))
    outputs = [a for a in acts if isinstance(a, c.Send)]
    logs = [a.text for a in of(acts, c.Log)]
    assert len(logs) == 1 and logs[0].startswith(
        "unacknowledged task_output over 1048576 bytes: dropping the oldest (from seq 2 of task a on;")
    done = done_of(w.finish("a"))
    ready, replayed = resumed(w.hello())
    assert ready.replay == ["a"]
    kept = [json.loads(x) for x in replayed]
    assert kept[0]["kind"] == "task_started" and kept[-1] == done
    out = kept[1:-1]
    assert sum(len(x) for x in replayed[1:-1]) <= c.KEPT_OUTPUT_BYTES
    assert sum(len(x) for x in replayed[1:-1]) > c.KEPT_OUTPUT_BYTES - 2 * c.OUTPUT_CHUNK
    assert [f["seq"] for f in out] == list(range(done["seq"] - len(out), done["seq"]))  # the newest
    assert replayed[1:-1] == [a.data for a in outputs[-len(out):]]
    assert "".join(f["data"] for f in out) == data.decode()[-len("".join(f["data"] for f in out)):]
    assert "task_output frames were dropped over the cap" in of(w.hello(), c.Log)[0].text


# --- the lease ------------------------------------------------------------------------------------

def test_without_the_environment_there_is_no_lease():
    w = L()
    assert "lease" not in w.core.timers
    w.start("a")
    w.clock.t += 10_000
    assert w(c.TimerFired("lease")) == []             # no such timer: ignored
    assert w.core.busy and w.core.state == "serving"
    w = L(CORRAL_ORPHAN_TIMEOUT_S="0")
    assert "lease" not in w.core.timers


NOT_SECONDS = "CORRAL_ORPHAN_TIMEOUT_S must be a number of seconds (0: no lease), not "


@pytest.mark.parametrize("env,reason", [
    ({"CORRAL_ORPHAN_TIMEOUT_S": "soon"}, NOT_SECONDS + "'soon'"),
    ({"CORRAL_ORPHAN_TIMEOUT_S": "-1"}, NOT_SECONDS + "'-1'"),
    ({"CORRAL_ORPHAN_TIMEOUT_S": "inf"}, NOT_SECONDS + "'inf'"),
    ({"CORRAL_ORPHAN_POLICY": "linger"}, "CORRAL_ORPHAN_POLICY must be one of cancel, finish, not 'linger'"),
])
def test_a_bad_lease_environment_is_a_configuration_error(env, reason):
    core = c.WrapperCore({**ENV, **env}, clock=Clock())
    acts = core.handle(c.Boot())
    assert frames(acts) == [{"kind": "fatal", "reason": reason}] and acts[-1] == c.Exit(78)


def test_an_idle_orphan_exits_at_once():
    w = L(**LEASE)
    w.clock.t = 110.0
    assert w(c.TimerFired("lease")) == [c.Log("orphaned: no supervisor for 10 s: exiting"), c.Exit(0)]
    assert w.core.exit_code == c.EX_ORPHANED == 0


def test_an_orphan_during_startup_exits_too():
    core = c.WrapperCore({**ENV, **LEASE}, clock=Clock())
    core.handle(c.Boot())
    core.handle(c.WorkspaceChecked(None))             # the version probe never answers
    core.clock.t = 110.0
    assert core.handle(c.TimerFired("lease"))[-1] == c.Exit(0)


def test_an_orphan_cancels_its_task_answers_it_and_exits():
    w = L(**LEASE)
    w.start("a", "sleep 60")
    w.clock.t = 110.0
    acts = w(c.TimerFired("lease"))
    assert acts == [c.Log("orphaned: no supervisor for 10 s: cancelling task a, then exiting"),
                    c.KillAgent("a"), c.StartTimer("drain", c.CLEANUP_S), c.StartTimer("stop", c.STOP_S)]
    acts = w.finish("a", -9, stdout=b"so far")
    d = done_of(acts)
    assert (d["status"], d["output"], d["seq"]) == ("cancelled", "so far", 3)
    assert acts[-2:] == [c.Log("orphaned: task a ended, exiting"), c.Exit(0)]


def test_an_orphan_s_task_that_will_not_end_does_not_keep_it():
    w = L(**LEASE)
    w.start("a", "sleep 60")
    w.clock.t = 110.0
    w(c.TimerFired("lease"))
    w(c.TimerFired("drain"))                          # its cleanup never reports
    assert w(c.TimerFired("stop")) == [c.Log("orphaned: task a did not end in time, exiting"), c.Exit(0)]


def test_an_orphan_with_policy_finish_lets_the_task_end_then_exits():
    w = L(CORRAL_ORPHAN_POLICY="finish", **LEASE)
    w.start("a", "sleep 60")
    w.clock.t = 110.0
    assert w(c.TimerFired("lease")) == [
        c.Log("orphaned: no supervisor for 10 s: task a may finish, then the wrapper exits")]
    w.clock.t = 500.0
    assert w(c.TimerFired("heartbeat"))[-1] == c.StartTimer("heartbeat", 1.0)    # it runs on
    acts = w.finish("a", 0, stdout=b"done")
    assert done_of(acts)["status"] == "ok" and acts[-1] == c.Exit(0)


@pytest.mark.parametrize("frame", [
    {"kind": "lease", "ack": 0}, {"kind": "cancel_task", "task_id": "nope"},
    {"kind": "run_task", "task_id": "b", "prompt": "x"},     # (answered busy)
    {"kind": "http_end", "req_id": 1, "error": ""},
])
def test_any_frame_from_the_actor_renews_the_lease(frame):
    w = L(**LEASE)
    w.start("a", "sleep 60")
    w.clock.t = 106.0
    w.send(frame)
    w.clock.t = 110.0
    assert w(c.TimerFired("lease")) == [c.StartTimer("lease", 6.0)]     # what is left of it
    w.clock.t = 116.0
    acts = w(c.TimerFired("lease"))
    assert acts[0] == c.Log("orphaned: no supervisor for 10 s: cancelling task a, then exiting")


def test_frames_every_few_seconds_keep_a_wrapper_alive_for_ever():
    w = L(**LEASE)
    timer_at = 110.0
    for step in range(1, 200):
        w.clock.t = 100.0 + 3 * step
        w.lease(0)
        if w.clock.t >= timer_at:                     # the driver fires the timer when it is due
            (again,) = w(c.TimerFired("lease"))
            timer_at = w.clock.t + again.delay
    assert w.core.state == "serving" and w.core.exit_code is None


def test_garbage_on_stdin_does_not_renew_the_lease():
    w = L(**LEASE)
    w.clock.t = 106.0
    w.send(b"not json", {"kind": "launch"}, b"[1]", {"kind": "hello", "worker_id": "w-2"})
    w.clock.t = 110.0
    assert w(c.TimerFired("lease"))[-1] == c.Exit(0)


def test_a_hello_before_a_finishing_orphan_exits_keeps_the_wrapper():
    w = L(CORRAL_ORPHAN_POLICY="finish", **LEASE)
    w.start("a", "sleep 60")
    w.clock.t = 110.0
    w(c.TimerFired("lease"))
    w.clock.t = 130.0
    acts = w.hello()
    assert acts[0] == c.Log("lease renewed: a supervisor is back, the wrapper stays")
    assert c.StartTimer("lease", 10.0) in acts
    ready, replayed = resumed(acts)
    assert (ready.running, ready.replay, len(replayed)) == ("a", [], 1)   # its task_started
    acts = w.finish("a", 0)
    assert done_of(acts)["status"] == "ok" and not of(acts, c.Exit)
    assert kinds(w.run("b"))[-1] == "StartAgent"      # and it serves on
    w.clock.t = 140.0
    assert w(c.TimerFired("lease")) == [
        c.Log("orphaned: no supervisor for 10 s: task b may finish, then the wrapper exits")]


def test_a_hello_after_an_orphan_s_cancel_keeps_the_wrapper_and_the_cancelled_result():
    w = L(**LEASE)
    w.start("a", "sleep 60")
    w.clock.t = 110.0
    w(c.TimerFired("lease"))
    acts = w.hello()
    assert c.CancelTimer("stop") in acts and not of(acts, c.Exit)
    acts = w.finish("a", -9)
    assert done_of(acts)["status"] == "cancelled" and not of(acts, c.Exit)
    ready, replayed = resumed(w.hello())
    assert ready.replay == ["a"] and json.loads(replayed[-1])["status"] == "cancelled"


def test_a_hello_while_shutting_down_replays_but_does_not_stop_the_shutdown():
    w = L(**LEASE)
    w.start("a", "sleep 60")
    w.send({"kind": "shutdown", "grace_s": 5})
    ready, replayed = resumed(w.hello())
    assert ready.running == "a" and len(replayed) == 1
    acts = w.finish("a", 0)
    assert done_of(acts)["status"] == "ok" and acts[-1] == c.Exit(0)


def test_stdin_s_end_still_shuts_the_wrapper_down():
    w = L(**LEASE)
    w.start("a", "sleep 60")
    acts = w(c.StdinClosed())
    assert acts[0] == c.Log("stdin closed: shutting down") and c.CancelTimer("lease") in acts
    assert w.finish("a", -9)[-1] == c.Exit(0)
