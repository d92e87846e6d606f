"""What the Docker adapter makes of Podman's answers, on Podman's own JSON and texts (no engine
needed): the same typed values as from Docker."""

import pytest

from runtime.engines import ContainerEvent, ContainerSpec, TmpfsMount
from runtime.engines.docker import (
    BuildOutput,
    PodmanEngine,
    container_event,
    container_state,
    create_body,
    image_summary,
)
from runtime.engines.podman import KillSignals
from runtime.errors import (ContainerNotFound, ContainerNotRunning, EngineError, ImageNotFound,
                           NameConflict)

CID = "c" * 64


def ev(kind, cid=CID, t=1, **kw):
    return ContainerEvent(kind=kind, container_id=cid, time_ns=t, **kw)


def test_a_kill_without_a_signal_takes_it_from_the_death_that_follows():
    fill = KillSignals(hold_s=1.0)
    assert fill.feed(ev("started", t=1), now=0.0) == [ev("started", t=1)]
    assert fill.feed(ev("killed", t=2), now=0.0) == []                  # held
    assert fill.deadline == 1.0
    assert fill.feed(ev("started", cid="o", t=3), now=0.1) == []        # held behind it: order kept
    assert fill.feed(ev("died", t=4, exit_code=143), now=0.2) == [
        ev("killed", t=2, signal=15), ev("started", cid="o", t=3), ev("died", t=4, exit_code=143)]
    assert fill.deadline is None


def test_a_kill_that_does_not_end_the_container_keeps_no_signal():
    fill = KillSignals(hold_s=1.0)
    assert fill.feed(ev("killed", t=1), now=0.0) == []
    assert fill.expire(now=0.5) == []
    assert fill.expire(now=1.0) == [ev("killed", t=1)]                 # no guess
    fill.feed(ev("killed", t=2), now=2.0)
    assert fill.feed(ev("died", t=3, exit_code=0), now=2.1) == [ev("killed", t=2), ev("died", t=3, exit_code=0)]
    # two kills, one death by SIGKILL: the last kill is what ended it
    fill.feed(ev("killed", t=4), now=3.0)
    fill.feed(ev("killed", t=5), now=3.1)
    assert fill.feed(ev("died", t=6, exit_code=137), now=3.2) == [
        ev("killed", t=4), ev("killed", t=5, signal=9), ev("died", t=6, exit_code=137)]
    fill.feed(ev("killed", t=7), now=4.0)
    assert fill.flush() == [ev("killed", t=7)]


def test_a_kill_with_its_signal_passes_at_once():
    fill = KillSignals()
    assert fill.feed(ev("killed", t=1, signal=9), now=0.0) == [ev("killed", t=1, signal=9)]


def test_podman_s_event_names():
    def raw(action, **attrs):
        return {"Type": "container", "Action": action, "status": action, "timeNano": 5,
                "Actor": {"ID": CID, "Attributes": {"corral.supervisor": "s", **attrs}}}
    assert container_event(raw("remove")).kind == "removed"
    assert container_event(raw("die", exitCode="137")).exit_code == 137
    assert container_event(raw("kill")).signal is None
    assert container_event(raw("cleanup")) is None and container_event(raw("init")) is None


def test_podman_s_tags_read_as_given_and_its_states_as_docker_s():
    raw = {"Id": "sha256:1", "RepoTags": ["docker.io/corral/worker-claude:abc",
                                          "localhost/corral/worker-base:latest",
                                          "docker.io/library/debian:12", "quay.io/x/y:1"],
           "Labels": {}, "Created": 5, "Size": 1}
    assert image_summary(raw, podman=True).tags == ["corral/worker-claude:abc", "corral/worker-base:latest",
                                                    "debian:12", "quay.io/x/y:1"]
    assert image_summary(raw).tags == raw["RepoTags"]            # Docker's are what they are
    assert image_summary({**raw, "RepoTags": None}, podman=True).tags == []
    for podman_status, status in [("stopped", "exited"), ("configured", "created"),
                                  ("initialized", "created"), ("stopping", "running")]:
        state = container_state({"Id": CID, "Name": "n", "Image": "i", "Config": {},
                                 "State": {"Status": podman_status}})
        assert state.status == status


def test_a_tmpfs_for_the_container_s_user_is_U_on_podman():
    spec = ContainerSpec(image="i", tmpfs=(TmpfsMount(path="/w", size=1024, mode=0o755, uid=1000, gid=1000),
                                           TmpfsMount(path="/tmp")))
    assert create_body(spec, podman=True)["HostConfig"]["Tmpfs"] == {"/w": "U,mode=0755,size=1024",
                                                                     "/tmp": "mode=1777"}
    assert create_body(spec)["HostConfig"]["Tmpfs"]["/w"] == "uid=1000,gid=1000,mode=0755,size=1024"


@pytest.mark.parametrize("lines", [
    ["Step 1/4 : FROM base", " ---> 1111111111aa", "Step 2/4 : RUN echo hi", " ---> Running in 99",
     "hi", " ---> 2222222222bb", "Step 3/4 : RUN exit 3", " ---> Running in 98", "boom"],
    ["STEP 1/4: FROM base", "STEP 2/4: RUN echo hi", "hi", "--> 2222222222b", "STEP 3/4: RUN exit 3",
     "boom"],
], ids=["docker", "podman"])
def test_build_output_of_both_engines(lines):
    out = BuildOutput()
    for line in lines:
        out.feed({"stream": line + "\n"})
    out.feed({"error": "exit status 3\n", "errorDetail": {"message": "exit status 3"}})
    assert out.step == "RUN exit 3" and out.output[-1] == "boom" and out.error == "exit status 3"
    assert [layer[:10] for layer in out.layers] == ["2222222222"]      # not the FROM image


def test_podman_s_error_texts_are_corral_s_typed_errors():
    e = PodmanEngine(None, None, "unix:///p.sock")
    assert isinstance(e._map_status(500, "can only kill running containers. c is in state exited: "
                                    "container state improper", what="kill c"), ContainerNotRunning)
    assert isinstance(e._map_status(500, "can only create exec sessions on running containers: "
                                    "container state improper", what="exec in c"), ContainerNotRunning)
    running = e._map_status(500, "cannot remove container c as it is running - running or paused "
                            "containers cannot be removed without force: container state improper")
    assert type(running) is EngineError and running.status == 409
    assert isinstance(e._map_status(404, "no such image: docker.io/library/x:1: image not known"),
                      ImageNotFound)
    assert isinstance(e._map_status(500, "the container name \"n\" is already in use by c"), NameConflict)
    # a container in the middle of its removal (someone else's): gone, as a 404 would say
    for text in ("container c does not exist in database: no such container",
                 "container has already been removed"):
        gone = e._map_status(500, text, what="container c", kind="container")
        assert isinstance(gone, ContainerNotFound) and gone.status == 404, (text, gone)
