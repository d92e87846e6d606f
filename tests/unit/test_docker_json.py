"""The Docker adapter's translation, both ways, on Docker's own JSON (no engine needed): what the
rest of corral sees are the port's typed values only."""

import pytest

from runtime.engines import ContainerEvent, ContainerSpec, ContainerState, TmpfsMount
from runtime.engines.docker import (
    container_event,
    container_state,
    container_summary,
    create_body,
    image_summary,
)

CID = "f" * 64
LABELS = {"corral.supervisor": "s", "corral.worker": "w-1", "corral.generation": "3"}


def test_a_spec_becomes_a_hardened_create_body():
    spec = ContainerSpec(image="img", name="n", env={"A": "1", "B": "x=y"}, labels={"k": "v"},
                         user="worker", working_dir="/workspace", memory=64 << 20, cpus=0.25,
                         pids_limit=100, read_only_rootfs=True,
                         tmpfs=(TmpfsMount(path="/workspace", size=1024, mode=0o755, uid=1000, gid=1000),
                                TmpfsMount(path="/tmp")))
    body = create_body(spec)
    assert body["HostConfig"] == {
        "NetworkMode": "none", "CapDrop": ["ALL"], "SecurityOpt": ["no-new-privileges"], "Init": True,
        "AutoRemove": False, "RestartPolicy": {"Name": "no"}, "PidsLimit": 100,
        "Memory": 64 << 20, "MemorySwap": 64 << 20, "NanoCpus": 250_000_000, "ReadonlyRootfs": True,
        "Tmpfs": {"/workspace": "uid=1000,gid=1000,mode=0755,size=1024", "/tmp": "mode=1777"}}
    assert body["Env"] == ["A=1", "B=x=y"] and body["Labels"] == {"k": "v"}
    assert (body["Image"], body["User"], body["WorkingDir"]) == ("img", "worker", "/workspace")
    assert (body["OpenStdin"], body["StdinOnce"], body["Tty"]) == (True, True, False)
    assert "Cmd" not in body and "Entrypoint" not in body          # the image's own
    minimal = create_body(ContainerSpec(image="img", command=["sh", "-c", "true"], stdin_once=False))
    assert minimal["Cmd"] == ["sh", "-c", "true"] and minimal["StdinOnce"] is False
    assert set(minimal["HostConfig"]) == {"NetworkMode", "CapDrop", "SecurityOpt", "Init",
                                          "AutoRemove", "RestartPolicy"}


def inspect_json(**state):
    return {"Id": CID, "Name": "/corral-s-w-1-3", "Image": "sha256:abc",
            "Config": {"Labels": LABELS},
            "State": {"Status": "exited", "Running": False, "OOMKilled": False, "Pid": 0,
                      "ExitCode": 0, "StartedAt": "0001-01-01T00:00:00Z",
                      "FinishedAt": "0001-01-01T00:00:00Z", **state}}


def test_inspect_becomes_a_container_state():
    created = container_state(inspect_json(Status="created"))
    assert created == ContainerState(id=CID, name="corral-s-w-1-3", image="sha256:abc", labels=LABELS,
                                     status="created", running=False)
    running = container_state(inspect_json(Status="running", Running=True, Pid=4242, ExitCode=0,
                                           StartedAt="2024-05-01T12:00:00.123456789Z"))
    assert (running.running, running.pid, running.exit_code) == (True, 4242, None)
    assert running.started_at == pytest.approx(1714564800.123456)
    oom = container_state(inspect_json(OOMKilled=True, ExitCode=137,
                                       StartedAt="2024-05-01T12:00:00Z",
                                       FinishedAt="2024-05-01T12:00:01.5Z"))
    assert (oom.status, oom.exit_code, oom.oom_killed, oom.pid) == ("exited", 137, True, None)
    assert oom.finished_at - oom.started_at == pytest.approx(1.5)


def test_a_listing_entry_becomes_a_summary():
    s = container_summary({"Id": CID, "Names": ["/corral-s-w-1-3"], "Labels": LABELS,
                           "State": "running", "ImageID": "sha256:abc", "Status": "Up 2 seconds"})
    assert (s.id, s.name, s.labels, s.status, s.image_id) == (CID, "corral-s-w-1-3", LABELS, "running",
                                                             "sha256:abc")


def event(action, **attrs):
    return {"Type": "container", "Action": action, "status": action, "id": CID, "from": "img",
            "Actor": {"ID": CID, "Attributes": {**LABELS, "image": "img", "name": "n", **attrs}},
            "scope": "local", "time": 1714564800, "timeNano": 1714564800123456789}


@pytest.mark.parametrize("raw, kind, fields", [
    (event("start"), "started", {}),
    (event("die", exitCode="137"), "died", {"exit_code": 137}),
    (event("kill", signal="15"), "killed", {"signal": 15}),
    (event("kill", signal="SIGHUP"), "killed", {"signal": 1}),
    (event("oom"), "oom", {}),
    (event("stop"), "stopped", {}),
    (event("restart"), "restarted", {}),
    (event("destroy"), "removed", {}),
])
def test_event_lines_become_typed_events(raw, kind, fields):
    assert container_event(raw) == ContainerEvent(
        kind=kind, container_id=CID, time_ns=1714564800123456789, supervisor="s", worker_id="w-1",
        generation=3, **fields)


@pytest.mark.parametrize("raw", [event("create"), event("attach"), event("exec_start: sh"),
                                 {**event("start"), "Type": "network"}])
def test_events_corral_does_not_follow_are_dropped(raw):
    assert container_event(raw) is None


def test_an_event_without_corral_labels_or_nanoseconds():
    raw = {"Type": "container", "Action": "die", "Actor": {"ID": CID, "Attributes": {"exitCode": "x"}},
           "time": 1714564800}
    assert container_event(raw) == ContainerEvent(kind="died", container_id=CID,
                                                  time_ns=1714564800 * 10**9)


def test_images_from_a_listing_and_from_inspect_agree():
    listed = image_summary({"Id": "sha256:abc", "RepoTags": ["corral/worker-claude:0123"],
                            "Labels": {"corral.image": "1"}, "Created": 1714564800, "Size": 5})
    inspected = image_summary({"Id": "sha256:abc", "RepoTags": ["corral/worker-claude:0123"],
                               "Config": {"Labels": {"corral.image": "1"}},
                               "Created": "2024-05-01T12:00:00.987654321Z", "Size": 5})
    assert listed == inspected
    untagged = image_summary({"Id": "sha256:def", "RepoTags": ["<none>:<none>"], "Labels": None,
                              "Created": 1, "Size": 0})
    assert (untagged.tags, untagged.labels) == ([], {})
