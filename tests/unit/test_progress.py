"""Progress where people wait: bars on a TTY, plain lines otherwise; the builder's progress
events become progress and leave the log."""

import io

import pytest
import structlog

from runtime.apps.progress import Progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def feed(p: Progress, **ev) -> None:
    with pytest.raises(structlog.DropEvent):
        p.processor(None, "info", ev)


def test_plain_lines_when_not_a_tty():
    out = io.StringIO()
    with Progress(out) as p:
        feed(p, event="agent_package", package="claude@2.0", phase="fetching", done_mb=5.0, total_mb=20.0)
        feed(p, event="image_build_started", tag="corral/worker-claude:abc")
        feed(p, event="image_build_progress", tag="corral/worker-claude:abc", line="Step 2/5 : RUN true")
        feed(p, event="image_built", tag="corral/worker-claude:abc", seconds=3.2)
        assert p.processor(None, "info", {"event": "worker_ready"}) == {"event": "worker_ready"}
    lines = out.getvalue().splitlines()
    assert lines == ["[corral] fetching claude@2.0 5/20: 5.0/20.0 MB",
                     "[corral] building corral/worker-claude:abc",
                     "[corral] building corral/worker-claude:abc 2/5: RUN true",
                     "[corral] built corral/worker-claude:abc in 3.2 s"]


def test_a_bar_on_a_tty():
    out = Tty()
    with Progress(out) as p:
        feed(p, event="image_build_progress", tag="img", line="Step 3/4 : COPY x")
        feed(p, event="image_built", tag="img", seconds=1.0)
    text = out.getvalue()
    assert "built img in 1.0 s" in text and "━" in text
