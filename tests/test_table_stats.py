"""The table's stats keep the largest executions and the execution count incrementally,
and agree with a full scan after any sequence of saves, deletes, clears and retention."""

from __future__ import annotations

import heapq

from hypothesis import given, settings
from hypothesis import strategies as st

from shmstore.backends.table import LARGEST, CheckpointTable
from shmstore.core.record import Record

NAMES = [f"e{i}" for i in range(12)]

ops = st.lists(st.one_of(
    st.tuples(st.just("save"), st.sampled_from(NAMES), st.integers(1, 5000)),
    st.tuples(st.just("save"), st.sampled_from(NAMES), st.integers(1, 5000)),
    st.tuples(st.just("resave"), st.sampled_from(NAMES), st.integers(1, 5000)),
    st.tuples(st.just("delete"), st.sampled_from(NAMES), st.just(0)),
    st.tuples(st.just("clear"), st.sampled_from(NAMES), st.just(0)),
    st.tuples(st.just("stats"), st.just(""), st.just(0)),
), max_size=120)


def _scan(table: CheckpointTable) -> tuple[int, list[int]]:
    """What a full scan gives: live executions, and the largest sizes."""
    sizes: dict[str, int] = {}
    for record in table._records.values():
        sizes[record.execution_id] = sizes.get(record.execution_id, 0) + len(record.state)
    return len(sizes), heapq.nlargest(LARGEST, sizes.values())


def _check(table: CheckpointTable) -> None:
    stats = table.stats()
    executions, largest = _scan(table)
    assert stats["executions"] == executions
    rows = stats["largest_executions"]
    assert [row[2] for row in rows] == largest  # sizes in order (names may tie)
    for name, count, nbytes in rows:  # each row is that execution's truth
        mine = [r for r in table._records.values() if r.execution_id == name]
        assert (count, nbytes) == (len(mine), sum(len(r.state) for r in mine))


@settings(max_examples=300, deadline=None)
@given(ops, st.sampled_from([None, 3]))
def test_largest_executions_agree_with_a_full_scan(script: list[tuple[str, str, int]],
                                                   keep: int | None) -> None:
    table = CheckpointTable({"max_per_execution": keep})
    ids: dict[str, list[str]] = {}
    n = 0
    for op, name, size in script:
        if op in ("save", "resave"):
            mine = ids.setdefault(name, [])
            cid = mine[-1] if op == "resave" and mine else f"c{n}"
            n += 1
            table.save(Record(cid, name, "node", 0, 0, None, b"\x80", b"x" * size))
            if cid not in mine:
                mine.append(cid)
        elif op == "delete" and ids.get(name):
            table.delete(ids[name].pop(0))
        elif op == "clear":
            table.clear(name)
            ids.pop(name, None)
        else:
            _check(table)
        # retention may have dropped some: keep only the ids still stored
        for key in list(ids):
            ids[key] = [cid for cid in ids[key] if cid in table._records]
    _check(table)


def _save(table: CheckpointTable, cid: str, name: str, size: int) -> None:
    table.save(Record(cid, name, "node", 0, 0, None, b"\x80", b"x" * size))


def test_an_execution_that_stayed_under_the_top_appears_once_the_top_is_cleared() -> None:
    table = CheckpointTable()
    for i in range(LARGEST + 1):
        _save(table, f"c{i}", f"e{i}", 1000 * (i + 1))
    _check(table)  # the floor is now the fifth largest
    _save(table, "late", "late", 10)  # under the floor: noted, never pushed
    for i in range(1, LARGEST + 1):
        table.clear(f"e{i}")
    assert [row[0] for row in table.stats()["largest_executions"]] == ["e0", "late"]


def test_a_top_execution_that_shrank_takes_its_place_by_its_size_now() -> None:
    table = CheckpointTable()
    for i in range(LARGEST + 2):
        _save(table, f"a{i}", f"e{i}", 1000 * (i + 1))
        _save(table, f"b{i}", f"e{i}", 1000 * (i + 1))
    _check(table)
    table.delete(f"a{LARGEST + 1}")  # the largest loses half: now second to e5
    _check(table)
    assert table.stats()["largest_executions"][0][0] == f"e{LARGEST}"


def test_many_executions_between_reads_are_not_kept_alive() -> None:
    table = CheckpointTable()
    for i in range(3 * 4096):
        table.save(Record(f"c{i}", f"e{i}", "n", 0, 0, None, b"\x80", b"x" * (i % 97 + 1)))
        table.clear(f"e{i - 1}") if i % 2 else None
    assert len(table._by_size.grown) <= 4096 + 1
    _check(table)
