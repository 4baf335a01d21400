"""The on-disk spool: bound, drop order, restart, corruption, and a state-machine model."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import structlog
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent.errors import TelemetryError
from agent.telemetry.spool import Spool

TOPIC = "edgefleet/v1/d/telemetry"  # 24 bytes of every message's size


def test_order_and_restart(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=10_000) as spool:
        ids = [
            spool.enqueue("event" if i % 3 else "telemetry", TOPIC, b"%d" % i, qos=1)
            for i in range(9)
        ]
        assert spool.ack(ids[0])
        assert not spool.ack(ids[0])  # acking twice is harmless
    with Spool(tmp_path, max_bytes=10_000) as again:
        assert [m.payload for m in again.peek()] == [b"%d" % i for i in range(1, 9)]
        assert [m.id for m in again.peek(after_id=ids[4], limit=2)] == ids[5:7]
        assert len(again) == 8
        assert again.bytes == sum(m.size for m in again.peek())


def test_oldest_telemetry_dropped_first_events_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10 * (len(TOPIC) + 100))
    event = spool.enqueue("event", TOPIC, b"e" * 100, qos=1)
    tele = [spool.enqueue("telemetry", TOPIC, bytes([i]) * 100, qos=0) for i in range(15)]
    kept = spool.peek(limit=100)
    assert kept[0].id == event
    assert [m.id for m in kept[1:]] == tele[-9:]  # the 6 oldest telemetry went
    assert spool.counters().telemetry_dropped == 6
    assert spool.bytes <= spool.max_bytes
    spool.close()


def test_events_beyond_bound_are_kept_and_said_then_refused_at_hard_cap(tmp_path: Path) -> None:
    size = len(TOPIC) + 100
    spool = Spool(tmp_path, max_bytes=4 * size, hard_max_bytes=6 * size)
    spool.enqueue("telemetry", TOPIC, b"t" * 100, qos=0)
    with structlog.testing.capture_logs() as logs:
        for _ in range(6):
            spool.enqueue("event", TOPIC, b"e" * 100, qos=1)
    assert spool.counters().events_over_bound == 2
    assert any(e["event"] == "spool_events_over_bound" for e in logs)
    assert [m.kind for m in spool.peek()] == ["event"] * 6  # telemetry made room first
    # Telemetry cannot displace events: it is dropped on arrival.
    assert spool.enqueue("telemetry", TOPIC, b"t" * 100, qos=0) is None
    with pytest.raises(TelemetryError, match="spool full"):
        spool.enqueue("event", TOPIC, b"e" * 100, qos=1)
    assert len(spool) == 6  # the refused event left nothing behind
    assert spool.counters().events_refused == 1
    spool.close()


def test_corrupt_database_is_moved_aside_not_deleted(tmp_path: Path) -> None:
    (tmp_path / "spool.db").write_bytes(b"this is not sqlite" * 100)
    with structlog.testing.capture_logs() as logs, Spool(tmp_path, max_bytes=1000) as spool:
        assert len(spool) == 0
        assert spool.counters().corrupt_files_moved == 1
        spool.enqueue("event", TOPIC, b"x", qos=1)
    assert (tmp_path / "spool.db.corrupt-0").read_bytes() == b"this is not sqlite" * 100
    assert any(e["event"] == "spool_corrupt_moved_aside" for e in logs)


def test_bad_bounds_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TelemetryError, match="max_bytes must be positive"):
        Spool(tmp_path, max_bytes=0)
    with pytest.raises(TelemetryError, match="hard_max_bytes"):
        Spool(tmp_path, max_bytes=100, hard_max_bytes=50)


def test_unwritable_directory_is_a_telemetry_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TelemetryError, match="cannot create spool directory"):
        Spool(blocker / "spool", max_bytes=100)


class SpoolMachine(RuleBasedStateMachine):
    """The spool against a list model: events never lost, telemetry dropped oldest first,
    order kept, the bound held (events aside), everything the same after a restart."""

    MAX = 8 * (len(TOPIC) + 40)
    HARD = 16 * (len(TOPIC) + 40)

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="spool-sm-"))
        self.spool = Spool(self.dir, max_bytes=self.MAX, hard_max_bytes=self.HARD)
        self.model: list[tuple[int, str, bytes]] = []  # (id, kind, payload) in order
        self.events_refused = 0

    def teardown(self) -> None:
        self.spool.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _size(self, payload: bytes) -> int:
        return len(TOPIC) + len(payload)

    @rule(payload=st.binary(min_size=0, max_size=40))
    def enqueue_event(self, payload: bytes) -> None:
        events = sum(self._size(p) for _, k, p in self.model if k == "event")
        if events + self._size(payload) > self.HARD:
            with pytest.raises(TelemetryError):
                self.spool.enqueue("event", TOPIC, payload, qos=1)
            self.events_refused += 1
            return
        new_id = self.spool.enqueue("event", TOPIC, payload, qos=1)
        assert new_id is not None
        self.model.append((new_id, "event", payload))
        self._apply_bound()

    @rule(payload=st.binary(min_size=0, max_size=40))
    def enqueue_telemetry(self, payload: bytes) -> None:
        new_id = self.spool.enqueue("telemetry", TOPIC, payload, qos=0)
        if new_id is not None:
            self.model.append((new_id, "telemetry", payload))
        self._apply_bound()
        if new_id is None:  # only dropped when events leave no room for it
            events = sum(self._size(p) for _, k, p in self.model if k == "event")
            assert events + self._size(payload) > self.MAX

    def _apply_bound(self) -> None:
        while sum(self._size(p) for _, _, p in self.model) > self.MAX:
            oldest = next((m for m in self.model if m[1] == "telemetry"), None)
            if oldest is None:
                break
            self.model.remove(oldest)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        # Acks arrive for the head or out of order (QoS 0 written, QoS 1 PUBACK later).
        entry = data.draw(st.sampled_from(self.model[:5]))
        assert self.spool.ack(entry[0])
        self.model.remove(entry)

    @rule()
    def restart(self) -> None:
        self.spool.close()
        self.spool = Spool(self.dir, max_bytes=self.MAX, hard_max_bytes=self.HARD)

    @invariant()
    def matches_model(self) -> None:
        got = [(m.id, m.kind, m.payload) for m in self.spool.peek(limit=1000)]
        assert got == self.model
        assert self.spool.bytes == sum(self._size(p) for _, _, p in self.model)
        assert len(self.spool) == len(self.model)

    @invariant()
    def bound_held_unless_only_events(self) -> None:
        if self.spool.bytes > self.MAX:
            assert all(k == "event" for _, k, _ in self.model)
        assert self.spool.bytes <= self.HARD


TestSpoolMachine = SpoolMachine.TestCase
TestSpoolMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
