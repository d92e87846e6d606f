"""The real worker-wrapper process (wrapper.py's threads and timers around the core) under its
supervisor's lease: ``hello`` replays what was not acknowledged, and an orphaned wrapper ends its
task and exits while its stdin is still open."""

from runtime.protocol import Ready, TaskDone, TaskOutput, TaskStarted

from .test_wrapper_process import Wrapper, pid_alive, wrapper_factory  # noqa: F401 (a fixture)


def frames_until(w: Wrapper, cls, timeout: float = 20) -> list:
    out = []
    while not isinstance(out[-1] if out else None, cls):
        out.append(w.frames.get(timeout=timeout))
    return out


def test_hello_replays_the_unacknowledged_frames_of_the_real_process(wrapper_factory):
    w = wrapper_factory("shell")
    first = w.run("t1", "echo one")
    frames_until(w, TaskDone)
    w.send({"kind": "lease", "ack": first.seq})
    w.run("t2", "echo two")
    frames_until(w, TaskDone)
    w.send({"kind": "hello", "worker_id": "w-test"})
    ready = w.frames.get(timeout=20)
    assert isinstance(ready, Ready) and (ready.resumed, ready.running, ready.replay) == (True, None, ["t2"])
    replayed = frames_until(w, TaskDone)
    assert [type(f) for f in replayed] == [TaskStarted, TaskOutput, TaskDone]
    assert [f.seq for f in replayed] == [first.seq + 1, first.seq + 2, first.seq + 3]
    assert replayed[-1].output == "two\n"
    assert w.close() == 0


def test_an_orphaned_process_cancels_its_task_and_exits_with_stdin_open(wrapper_factory):
    w = wrapper_factory("shell", env={"CORRAL_ORPHAN_TIMEOUT_S": "1"})
    w.send({"kind": "run_task", "task_id": "t1", "prompt": "echo $$ > agent.pid; exec sleep 60"})
    assert isinstance(frames_until(w, TaskStarted)[-1], TaskStarted)
    assert w.proc.wait(timeout=20) == 0           # nobody closed its stdin
    done = w.wait_done("t1")
    assert (done.status, done.error) == ("cancelled", "cancelled")
    stderr = bytes(w.stderr).decode()
    assert "orphaned: no supervisor for 1 s: cancelling task t1, then exiting" in stderr
    assert not pid_alive(int((w.workspace / "agent.pid").read_text()))
