"""`FollowCursor` on its own: the answers no store gives on demand (a clear between a
``list`` and its probe, an execution emptied under a page), fed by hand.

The cursor is pure, so these tests are its whole spec for races; the contract tests
(tests/contract/test_streams.py) run it on every backend.
"""

from __future__ import annotations

import pytest

from shmstore import Cleared, ConfigError
from shmstore.core.record import Record
from shmstore.core.stream import FollowCursor, ListAbove, WaitFor


def rec(version: int, cid: str | None = None) -> Record:
    return Record(cid or f"id{version}", "run", "n", version, 0, None, b"\x80", b"\xc0")


def names(items: list[Record | Cleared]) -> list[object]:
    return [i if isinstance(i, Cleared) else i.version for i in items]


def test_the_first_request_is_a_probe_that_learns_the_generation() -> None:
    cursor = FollowCursor("run", after_version=3)
    assert cursor.request() == WaitFor(0, 0, block=False)
    assert cursor.on_wait(rec(3), 7) == []             # nothing above 3
    assert cursor.request() == WaitFor(3, 7, block=True)
    assert names(cursor.on_wait(rec(4), 7)) == [4]     # the next one: no list
    assert cursor.version == 4


def test_a_gap_is_listed_then_placed_by_a_probe() -> None:
    cursor = FollowCursor("run")
    assert cursor.on_wait(rec(5), 1) == []
    assert cursor.request() == ListAbove(0, 256)
    assert cursor.on_list([rec(1), rec(2), rec(4)]) == []  # held back
    assert cursor.request() == WaitFor(0, 1, block=False)
    assert names(cursor.on_wait(rec(5), 1)) == [1, 2, 4, 5]
    assert cursor.version == 5 and cursor.request() == WaitFor(5, 1, block=True)


def test_a_page_is_dropped_when_its_probe_finds_another_generation() -> None:
    cursor = FollowCursor("run", after_version=2)
    cursor.on_wait(rec(6), 1)
    cursor.on_list([rec(3), rec(4)])    # maybe read in the new generation already
    items = cursor.on_wait(rec(2, "new2"), 9)
    assert items == [Cleared("run", 2)]  # the page is gone, the clear reported
    assert cursor.request() == ListAbove(0, 256)
    cursor.on_list([rec(1, "new1"), rec(2, "new2")])
    assert [r.id for r in cursor.on_wait(rec(2, "new2"), 9)] == ["new1", "new2"]  # type: ignore[union-attr]


def test_a_page_is_dropped_when_the_execution_is_empty_at_its_probe() -> None:
    cursor = FollowCursor("run")
    cursor.on_wait(rec(1), 1)
    cursor.on_wait(rec(3), 1)
    cursor.on_list([rec(2), rec(3)])
    assert cursor.on_wait(None, 1) == []  # emptied after the list: the page is dropped
    assert cursor.request() == WaitFor(1, 1, block=True)
    assert names(cursor.on_wait(rec(1, "fresh"), 4)) == [Cleared("run", 1), 1]


def test_a_later_generation_from_a_blocking_wait_is_a_clear() -> None:
    cursor = FollowCursor("run")
    cursor.on_wait(rec(1), 1)
    assert names(cursor.on_wait(rec(1, "again"), 2)) == [Cleared("run", 1), 1]
    assert names(cursor.on_wait(rec(2), 2)) == [2]


def test_slices_that_run_out_keep_the_generation_they_were_given() -> None:
    cursor = FollowCursor("run")
    assert cursor.on_wait(None, 0) == []   # empty, no generation yet
    assert cursor.request() == WaitFor(0, 0, block=True)
    assert cursor.on_wait(None, 5) == []
    assert cursor.request() == WaitFor(0, 5, block=True)
    assert names(cursor.on_wait(rec(1), 5)) == [1]


def test_a_resume_on_an_empty_execution_reports_the_clear_at_the_first_save() -> None:
    cursor = FollowCursor("run", after_version=4)
    assert cursor.on_wait(None, 0) == []
    assert cursor.version == 0
    assert names(cursor.on_wait(rec(1), 3)) == [Cleared("run", 4), 1]


def test_a_list_that_finds_nothing_above_goes_back_to_waiting() -> None:
    cursor = FollowCursor("run", after_version=1)
    cursor.on_wait(rec(3), 1)
    assert cursor.on_list([]) == []  # deleted meanwhile
    assert cursor.request() == WaitFor(1, 1, block=True)


@pytest.mark.parametrize("bad", [{"after_version": -1}, {"after_version": 1.0},
                                 {"batch": 0}, {"batch": True}])
def test_bad_arguments_are_config_errors(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        FollowCursor("run", **bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        FollowCursor("")
