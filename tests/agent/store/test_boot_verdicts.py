"""The update journal's verdicts and the version a start-up serves when the pointer is lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.models.probation import (
    MAX_VERDICTS,
    UpdateJournal,
    UpdateRecord,
    boot_version,
    rejected_versions,
)

INSTALLED = ["1.0.0", "2.0.0", "3.0.0"]


def _record(phase: str, old: str | None, new: str | None, **kw: object) -> UpdateRecord:
    return UpdateRecord.model_validate(
        {"model": "m", "phase": phase, "from_version": old, "to_version": new, **kw}
    )


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (None, "3.0.0"),  # no journal: the newest
        (_record("rolled_back", "1.0.0", "3.0.0"), "1.0.0"),  # the case
        (_record("failed", "2.0.0", "3.0.0"), "2.0.0"),
        (_record("committed", "1.0.0", "2.0.0", rejected=("3.0.0",)), "2.0.0"),
        (_record("probation", "1.0.0", "3.0.0"), "1.0.0"),  # not proven yet
        (_record("swapping", "2.0.0", "3.0.0"), "2.0.0"),
        # the version it went back to is gone: the newest never rejected
        (_record("rolled_back", "0.9.0", "3.0.0"), "2.0.0"),
        (_record("committed", "1.0.0", "1.0.0", rejected=("2.0.0", "3.0.0")), "1.0.0"),
    ],
)
def test_boot_version_never_picks_a_rejected_version_while_a_good_one_is_installed(
    record: UpdateRecord | None, expected: str
) -> None:
    chosen = boot_version(record, INSTALLED)
    assert chosen == expected
    assert chosen not in rejected_versions(record)


def test_everything_rejected_serves_the_newest_and_nothing_installed_serves_nothing() -> None:
    record = _record("rolled_back", None, "2.0.0", rejected=("1.0.0",))
    assert boot_version(record, ["1.0.0", "2.0.0"]) == "2.0.0"
    assert boot_version(record, []) is None


def test_journal_writes_carry_the_verdicts_of_earlier_updates(tmp_path: Path) -> None:
    journal = UpdateJournal(tmp_path)
    journal.save(_record("swapping", "1.0.0", "3.0.0"))
    journal.save(_record("rolled_back", "1.0.0", "3.0.0"))
    journal.save(_record("swapping", "1.0.0", "2.0.0"))  # a later update
    journal.save(_record("committed", "1.0.0", "2.0.0"))
    record = journal.load("m")
    assert record is not None
    assert record.rejected == ("3.0.0",)
    assert boot_version(record, INSTALLED) == "2.0.0"
    # offered again on purpose and swapped in: no longer rejected
    journal.save(_record("swapping", "2.0.0", "3.0.0"))
    again = journal.load("m")
    assert again is not None
    assert again.rejected == ()


def test_verdicts_are_bounded(tmp_path: Path) -> None:
    journal = UpdateJournal(tmp_path)
    for n in range(MAX_VERDICTS + 5):
        journal.save(_record("failed", "1.0.0", f"2.0.{n}"))
    record = journal.load("m")
    assert record is not None
    assert len(record.rejected) == MAX_VERDICTS
    assert record.rejected[-1] == f"2.0.{MAX_VERDICTS + 4}"
