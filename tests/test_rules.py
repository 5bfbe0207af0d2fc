"""shmstore/core/rules.py: the store's rules as pure functions, checked on plain inputs.

The backends' agreement with each other (Lua twins included) is in
tests/contract/test_rules_agree.py; here each rule is checked alone.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from shmstore import CheckpointNotFound, ConfigError, Limits, StoreFull, VersionConflict
from shmstore.core import rules


def rec(cid: str, execution: str = "x", size: int = 1, node: str = "n",
        parent: str | None = None, meta: dict[str, Any] | None = None) -> tuple[Any, ...]:
    return (cid, execution, node, 0, 7, parent, msgpack.packb(meta or {}), b"s" * size)


# -- messages ---------------------------------------------------------------------------------

def test_store_full_says_what_broke_and_what_to_do() -> None:
    error = rules.store_full("max_checkpoints", 3, 3, 1, value=4)
    assert isinstance(error, StoreFull)
    assert (error.limit, error.maximum, error.current, error.requested) == (
        "max_checkpoints", 3, 3, 1)
    assert str(error) == ("the store is full: max_checkpoints=3, it holds 3 checkpoints and "
                          "this save would make it 4; delete or clear executions, raise the "
                          "limit, or use on_full='evict'")
    alone = rules.store_full("max_bytes", 10, 0, 20, value=20, alone=True)
    assert str(alone) == ("20 bytes of payload in one save can never fit under max_bytes=10; "
                          "save less at once, or raise the limit")
    big = rules.store_full("max_checkpoint_bytes", 8, 9, 9, checkpoint_id="c")
    assert str(big).startswith("checkpoint 'c' is 9 bytes encoded, over max_checkpoint_bytes=8")
    assert str(rules.store_full("max_checkpoint_bytes", 8, 9, 9, checkpoint_id="c",
                                unsent=True)).endswith("(nothing was sent)")
    assert "max_rss=5" in str(rules.store_full("max_rss", 5, 6, 0))


def test_conflict_not_found_and_copy_refusals() -> None:
    conflict = rules.version_conflict("run", 2, 3)
    assert isinstance(conflict, VersionConflict)
    assert (conflict.execution_id, conflict.expected, conflict.actual) == ("run", 2, 3)
    assert "at version 3, not 2" in str(conflict)
    missing = rules.not_found("c")
    assert isinstance(missing, CheckpointNotFound) and missing.checkpoint_id == "c"
    assert isinstance(rules.copy_onto_itself("a"), ConfigError)


# -- limits -----------------------------------------------------------------------------------

def test_retention_excess() -> None:
    assert rules.retention_excess(5, None) == 0
    assert rules.retention_excess(5, 3) == 2
    assert rules.retention_excess(2, 3) == 0


def test_over_names_the_count_limit_first() -> None:
    limits = Limits(max_checkpoints=2, max_bytes=10)
    assert rules.over(limits, 2, 10) is None
    assert rules.over(limits, 3, 11) == ("max_checkpoints", 2, 3)
    assert rules.over(limits, 2, 11) == ("max_bytes", 10, 11)


def test_oversized_counts_state_and_metadata() -> None:
    limits = Limits(max_checkpoint_bytes=4)
    assert rules.oversized(limits, [rec("a", size=3)]) is None  # 3 + 1 (empty map)
    error = rules.oversized(limits, [rec("a", size=3), rec("b", size=4)])
    assert error is not None and (error.current, error.maximum) == (5, 4)
    assert "'b'" in str(error)
    assert rules.oversized(Limits(max_checkpoint_bytes=None), [rec("a", size=99)]) is None


def test_rss_refusal() -> None:
    assert rules.rss_refusal(Limits(), 10**12) is None
    assert rules.rss_refusal(Limits(max_rss=100), 100) is None
    error = rules.rss_refusal(Limits(max_rss=100), 101)
    assert error is not None and (error.limit, error.current, error.requested) == (
        "max_rss", 101, 0)


class Stored:
    """A store's contents as `rules.project` sees them."""

    def __init__(self, *records: tuple[Any, ...]) -> None:
        self.records = {r[0]: r for r in records}

    def stored(self, cid: str) -> tuple[str, int] | None:
        r = self.records.get(cid)
        return None if r is None else (r[1], len(r[7]))

    def members(self, execution: str) -> list[str]:
        return [cid for cid, r in self.records.items() if r[1] == execution]

    def project(self, batch: list[tuple[Any, ...]], keep: int | None) -> rules.Projection:
        nbytes = sum(len(r[7]) for r in self.records.values())
        return rules.project(batch, len(self.records), nbytes, self.stored, self.members, keep)


def test_project_counts_resaves_once() -> None:
    store = Stored(rec("a", size=5), rec("b", size=2))
    # a moves to y with a new size; c twice in the batch is one record
    got = store.project([rec("a", "y", size=1), rec("c", size=3), rec("c", size=4)], None)
    assert got == rules.Projection(3, 2 + 1 + 4, 2, 5)


def test_project_applies_retention_to_stored_and_batch_records() -> None:
    store = Stored(rec("a", size=5), rec("b", size=2))
    # keep 1: c drops a and b (x holds only c); d (in y) stays
    got = store.project([rec("c", size=3), rec("d", "y", size=1)], 1)
    assert got == rules.Projection(2, 4, 2, 4)
    # a batch record dropped by retention leaves the batch too
    got = Stored().project([rec("a", size=3), rec("b", size=1)], 1)
    assert got == rules.Projection(1, 1, 1, 1)


@pytest.mark.parametrize(("on_full", "expected"), [("reject", "refused"), ("evict", "evict")])
def test_store_wide_verdict(on_full: str, expected: str) -> None:
    limits = Limits(max_checkpoints=2, on_full=on_full)
    fits = rules.Projection(2, 9, 1, 3)
    assert rules.store_wide(limits, 1, 6, fits) == (False, None)
    evict, refusal = rules.store_wide(limits, 2, 6, rules.Projection(3, 9, 1, 3))
    assert ("evict" if evict else "refused") == expected
    assert (refusal is None) == evict
    if refusal is not None:
        assert (refusal.current, refusal.requested) == (2, 1)
    # a batch over the limit by itself is refused in both modes
    evict, refusal = rules.store_wide(limits, 0, 0, rules.Projection(3, 9, 3, 9))
    assert not evict and refusal is not None and "can never fit" in str(refusal)


def test_store_wide_figures_of_max_bytes_are_bytes() -> None:
    _, refusal = rules.store_wide(Limits(max_bytes=10), 4, 8, rules.Projection(5, 12, 1, 4))
    assert refusal is not None
    assert (refusal.limit, refusal.current, refusal.requested) == ("max_bytes", 8, 4)
    assert "it holds 8 bytes of payload and this save would make it 12" in str(refusal)


def test_evictions_drop_oldest_until_within_limits() -> None:
    limits = Limits(max_checkpoints=3, max_bytes=10)

    def victims(count: int, nbytes: int, sizes: list[int]) -> list[str]:
        oldest_first = [rec(f"r{i}", size=size) for i, size in enumerate(sizes)]
        return [r[0] for r in rules.evictions(limits, count, nbytes, oldest_first)]

    assert victims(3, 10, [4, 4, 2]) == []
    assert victims(5, 10, [1, 1, 1, 1, 6]) == ["r0", "r1"]
    assert victims(3, 14, [1, 1, 4, 8]) == ["r0", "r1", "r2"]  # bytes still over after two


# -- copy -------------------------------------------------------------------------------------

def test_copy_renames_prefixed_ids_and_follows_parent_links() -> None:
    plan = [(rec("run-1", "run"), "copy"), (rec("k1", "run", parent="run-1"), "copy"),
            (rec("k2", "run", parent="k1"), "copy"), (rec("k3", "run", parent="elsewhere"), "copy"),
            (rec("k4", "run", parent="run-9"), "copy")]
    copies = rules.copy_records(plan, "run", "copy")
    first, k1, k2, k3, k4 = copies
    assert first[0] == "copy-1" and first[1] == "copy" and first[3] == 0
    assert k1[0] not in {"k1", "copy"} and k1[5] == "copy-1"
    assert k2[5] == k1[0]  # a link between copies follows the new id
    assert k3[5] == "elsewhere"  # a link out of the copy stays
    assert k4[5] == "copy-9"  # a prefixed id outside the copy is renamed all the same
    assert [c[6:] for c in copies] == [r[6:] for r, _ in plan]
    assert rules.renamed("run/a", "run", "copy") == "copy/a"


# -- queries ----------------------------------------------------------------------------------

def where(**values: list[Any]) -> rules.Where | None:
    return rules.decode_where({k: [msgpack.packb(v) for v in vs] for k, vs in values.items()})


def test_decode_where() -> None:
    assert rules.decode_where(None) is None and rules.decode_where({}) is None
    assert where(run=["a", 1]) == [("run", ["a", 1])]
    with pytest.raises(ConfigError, match="msgpack-encoded"):
        rules.decode_where({"run": [b"\xc1"]})


def test_metadata_matches_with_python_equality() -> None:
    filters = where(n=[1], gone=[None])
    assert filters is not None
    assert rules.metadata_matches(msgpack.packb({"n": 1.0}), filters)  # 1 == 1.0
    assert not rules.metadata_matches(msgpack.packb({"n": 1, "gone": 0}), filters)
    assert not rules.metadata_matches(msgpack.packb([1]), filters)  # not a map
    assert not rules.metadata_matches(b"\xc1", filters)  # not msgpack


def test_matches_and_first_matches() -> None:
    records = [rec("c", node="a"), rec("b", node="b"), rec("a", node="a")]
    assert rules.matches(records[0], "a", None, "d")
    assert not rules.matches(records[0], "a", None, "c")  # before_id is strict
    assert rules.first_matches(records, "a", None, None, None) == [records[0], records[2]]
    assert rules.first_matches(records, None, None, None, 2) == records[:2]
    assert rules.first_matches(records, None, None, None, 0) == []


def test_with_children_pairs_kids_by_parent_id() -> None:
    parents = [rec("p2"), rec("p1")]
    kids = [rec("k1", parent="p1"), rec("k2", parent="p2"), rec("k3", parent="p1"),
            rec("k4", parent="nobody")]
    assert rules.with_children(parents, kids) == [(parents[0], [kids[1]]),
                                                  (parents[1], [kids[0], kids[2]])]


def test_purge_plan_keeps_the_newest_matches_and_drops_children() -> None:
    oldest_first = [rec("s1", node="step"), rec("l1", node="log", parent="s1"),
                    rec("s2", node="step"), rec("l2", node="log", parent="s2"),
                    rec("s3", node="step")]
    ids = [r[0] for r in rules.purge_plan(oldest_first, "step", None, 1, "log")]
    assert ids == ["s1", "l1", "s2", "l2"]
    assert [r[0] for r in rules.purge_plan(oldest_first, "step", None, 1, None)] == ["s1", "s2"]
    assert rules.purge_plan(oldest_first, None, None, 0, None) == oldest_first
    assert rules.purge_plan(oldest_first, "step", None, 3, "log") == []
