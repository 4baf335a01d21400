"""The runner's cached snapshot (``SnapshotCache``) against a fresh ``build_snapshot`` of the same
rows, on SQLite and PostgreSQL: a partial read sees every stamped change (a link row the
ingester rewrote, a device's report, an enrollment, a removal, a label edit through the API);
an unstamped edit (by hand in the database) waits for the next full read."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import delete, update
from sqlalchemy.orm import Session, sessionmaker

from control_plane.db.engine import make_engine, make_sessionmaker, upgrade_database
from control_plane.db.models import Device
from control_plane.ingest.tables import DeviceLink
from control_plane.rollouts.controller import RolloutSpec
from control_plane.rollouts.snapshot import SnapshotCache, build_snapshot

SPEC = RolloutSpec.model_validate(
    {
        "id": "r",
        "model": "digits",
        "version": "2.0.0",
        "selector": {"site": "a"},
        "waves": [{"percent": 50}, {"percent": 100}],
        "rules": {},
    }
)


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    upgrade_database(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


def _now(offset_s: float = 0.0) -> datetime:
    return datetime.now(timezone.utc) + timedelta(seconds=offset_s)


def _device(device_id: str, site: str = "a", *, enrolled_s_ago: float = 0.0) -> Device:
    return Device(
        id=device_id,
        name=device_id,
        token_hash=uuid.uuid4().hex * 2,
        labels={"site": site},
        profile=None,
        reported=None,
        enrolled_at=_now(-enrolled_s_ago),
    )


def _link(device_id: str, version: str, step: str, *, at: datetime | None = None) -> DeviceLink:
    at = at or _now()
    return DeviceLink(
        device_id=device_id,
        status="online",
        slots=[],
        models={"digits": {"health": {"version": version, "p99_ms": 4.0, "inferences": 30}}},
        updates={"digits": {"step": step, "version": version, "received_at": at.isoformat()}},
        updated_at=at,
    )


def _same(cache: SnapshotCache, s: Session, assigned: dict[str, float]) -> dict[str, Any]:
    cached, _ = cache.build(s, assigned)
    fresh, _ = build_snapshot(s, SPEC, assigned)
    assert cached == fresh
    return {d.device_id: d for d in cached.devices}


def test_a_partial_read_sees_every_stamped_change(sessions: sessionmaker[Session]) -> None:
    with sessions() as s, s.begin():
        for i in range(6):
            s.add(_device(f"d{i}", site="a" if i < 5 else "b"))
            s.add(_link(f"d{i}", "1.0.0", "committed"))
    assigned = {"d0": time.time() - 1, "d1": time.time() - 1}
    cache = SnapshotCache(SPEC)
    with sessions() as s:
        seen = _same(cache, s, assigned)
    assert cache.full_reads == 1
    assert sorted(seen) == ["d0", "d1", "d2", "d3", "d4"]  # d5 is not selected
    assert seen["d0"].update == "pending"

    with sessions() as s, s.begin():  # the ingester rewrites d0's row: committed on 2.0.0
        s.merge(_link("d0", "2.0.0", "committed"))
        s.add(_device("d6"))  # enrolled
        s.execute(delete(DeviceLink).where(DeviceLink.device_id == "d4"))
        s.execute(delete(Device).where(Device.id == "d4"))  # removed from the registry
        s.execute(  # d1 reports over HTTP
            update(Device)
            .where(Device.id == "d1")
            .values(
                reported={"models": [{"name": "digits", "phase": "failed"}]},
                reported_at=_now(),
            )
        )
    with sessions() as s:
        seen = _same(cache, s, assigned)
    assert (cache.full_reads, cache.partial_reads) == (1, 1)
    assert seen["d0"].update == "committed"
    assert seen["d0"].version == "2.0.0"
    assert "d6" in seen
    assert "d4" not in seen
    assert seen["d1"].update == "pending"  # its link's event for 1.0.0 came before

    assigned["d2"] = time.time()  # a new wave: the entry follows the assignment
    with sessions() as s:
        seen = _same(cache, s, assigned)
    assert seen["d2"].update == "pending"


def test_a_stamped_label_edit_is_read_at_once_an_unstamped_one_at_the_full_read(
    sessions: sessionmaker[Session],
) -> None:
    with sessions() as s, s.begin():
        # enrolled well before the latest stamp: a partial read does not read them again
        for i, ago in enumerate((60.0, 60.0, 120.0, 120.0)):
            s.add(_device(f"d{i}", enrolled_s_ago=ago))
    now = [0.0]
    cache = SnapshotCache(SPEC, full_read_s=30.0, clock=lambda: now[0])
    with sessions() as s:
        assert len(cache.build(s, {})[0].devices) == 4
    with sessions() as s, s.begin():  # the API's edit: labels and changed_at together
        s.execute(
            update(Device).where(Device.id == "d3").values(labels={"site": "b"}, changed_at=_now())
        )
    now[0] = 1.0
    with sessions() as s:
        assert sorted(d.device_id for d in cache.build(s, {})[0].devices) == ["d0", "d1", "d2"]
    assert cache.last_read_full is False
    with sessions() as s, s.begin():  # edited in the database by hand: no stamp moves
        s.execute(update(Device).where(Device.id == "d2").values(labels={"site": "b"}))
    now[0] = 29.0
    with sessions() as s:
        assert len(cache.build(s, {})[0].devices) == 3
    assert cache.last_read_full is False
    now[0] = 30.0
    with sessions() as s:
        assert sorted(d.device_id for d in cache.build(s, {})[0].devices) == ["d0", "d1"]
    assert cache.last_read_full is True


def test_a_row_stamped_by_a_slower_clock_is_read_within_the_margin(
    sessions: sessionmaker[Session],
) -> None:
    with sessions() as s, s.begin():
        for i in range(2):
            s.add(_device(f"d{i}"))
            s.add(_link(f"d{i}", "1.0.0", "committed"))
    assigned = {"d0": time.time() - 60, "d1": time.time() - 60}
    cache = SnapshotCache(SPEC, margin_s=5.0)
    with sessions() as s:
        _same(cache, s, assigned)
    # another replica, its clock 3 s behind, writes d1's row after this one wrote d0's
    with sessions() as s, s.begin():
        s.merge(_link("d0", "2.0.0", "committed", at=_now(1.0)))
    with sessions() as s:
        _same(cache, s, assigned)
    with sessions() as s, s.begin():
        s.merge(_link("d1", "2.0.0", "committed", at=_now(-2.0)))
    with sessions() as s:
        seen = _same(cache, s, assigned)
    assert seen["d1"].update == "committed"
