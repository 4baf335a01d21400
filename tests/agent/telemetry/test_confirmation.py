"""End-to-end confirmation of events in the spool, the header contract, and event numbers that
outlive restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.contracts.events import MAX_STORED_LISTED, parse_stored
from agent.events import EventBus, EventSequence
from agent.telemetry.spool import Spool


def test_an_event_stays_after_puback_until_confirmed_and_goes_again_when_late(
    tmp_path: Path,
) -> None:
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        ids = [spool.enqueue("event", "t", b"e%d" % n, qos=1, seq=100 + n) for n in range(3)]
        assert all(i is not None for i in ids)
        for i in ids:
            assert i is not None
            spool.mark_sent(i, now=10.0)
        assert spool.peek() == []  # sent: not drained again
        assert spool.lowest_unconfirmed_seq() == 100
        assert spool.confirm([101, 999]) == 1  # an unknown number changes nothing
        assert len(spool) == 2
        assert spool.resend_unconfirmed(sent_before=5.0) == 0  # not late yet
        assert spool.resend_unconfirmed(sent_before=20.0) == 2
        assert [m.payload for m in spool.peek()] == [b"e0", b"e2"]
    with Spool(tmp_path, max_bytes=1 << 20) as spool:  # kept across a restart
        assert spool.lowest_unconfirmed_seq() == 100
        assert spool.confirm([100, 102]) == 2
        assert len(spool) == 0
        assert spool.bytes == 0
        assert spool.lowest_unconfirmed_seq() is None


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("1,2,3", (1, 2, 3)),
        (" 7 , 9", (7, 9)),
        ("", ()),
        (None, ()),
        ("1,x", ()),  # malformed: drop nothing
        ("-1", ()),
        (str(2**63), ()),
        (",".join(["1"] * (MAX_STORED_LISTED + 10)), (1,) * MAX_STORED_LISTED),
    ],
)
def test_stored_header_is_parsed_strictly(header: str | None, expected: tuple[int, ...]) -> None:
    assert parse_stored(header) == expected


def test_event_numbers_outlive_restarts_and_a_lost_file(tmp_path: Path) -> None:
    path = tmp_path / "events.seq"
    bus = EventBus("d", sequence=EventSequence(path, block=10, wall=lambda: 5.0))
    first = [bus.emit("committed", model="m").seq for _ in range(12)]
    assert first == list(range(5000, 5012))  # a new file starts at the clock in ms
    bus = EventBus("d", sequence=EventSequence(path, block=10, wall=lambda: 5.0))
    again = bus.emit("committed", model="m").seq
    assert again > first[-1]  # kill -9 at any point: never a number given before
    path.write_bytes(b"\xff garbage")
    later = EventSequence(path, block=10, wall=lambda: 9.0).take()
    assert later == 9000
