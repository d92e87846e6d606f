"""Wire protocol: whatever a wrapper writes, the actor gets a typed frame or a ProtocolError."""

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.errors import ProtocolError
from runtime.protocol import (MAX_LINE, LineSplitter, Ready, RunTask, TaskDone, decode_actor_frame,
                              decode_wrapper_frame, encode_frame)


def test_known_frames_round_trip():
    assert decode_wrapper_frame(b'{"kind":"ready","worker_id":"w-1","agent":"claude","pid":7}') == \
        Ready(worker_id="w-1", agent="claude", pid=7)
    done = decode_wrapper_frame(b'{"kind":"task_done","task_id":"t","status":"ok","exit_code":0}')
    assert isinstance(done, TaskDone) and done.exit_code == 0
    assert decode_actor_frame(encode_frame(RunTask(task_id="t", prompt="p")).strip()) == \
        RunTask(task_id="t", prompt="p")


@pytest.mark.parametrize("line", [b"not json", b'{"kind":"launch_missiles"}', b'{"kind":"ready"}',
                                  b'{"kind":"heartbeat","seq":"x"}', b"[]", b'{"kind": 3}'])
def test_bad_frames_are_protocol_errors(line):
    with pytest.raises(ProtocolError):
        decode_wrapper_frame(line)


def test_oversized_lines_are_protocol_errors():
    with pytest.raises(ProtocolError):
        LineSplitter().feed(b"x" * (MAX_LINE + 1))
    with pytest.raises(ProtocolError):
        decode_wrapper_frame(b'{"kind":"task_output","task_id":"t","data":"' + b"x" * MAX_LINE + b'"}')


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_give_a_frame_or_a_protocol_error(data):
    try:
        frame = decode_wrapper_frame(data)
    except ProtocolError:
        return
    assert msgspec.json.decode(encode_frame(frame)) is not None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=40), max_size=20))
def test_line_splitter_loses_nothing_whatever_the_chunking(chunks):
    data = b"".join(chunks)
    splitter = LineSplitter()
    lines = [line for c in chunks for line in splitter.feed(c)]
    complete = data.rsplit(b"\n", 1)[0] if b"\n" in data else b""   # what a newline has ended
    expected = [line for line in complete.split(b"\n") if line.strip()] if complete else []
    assert lines == expected
