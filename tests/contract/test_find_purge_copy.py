"""Queries over several executions (`find`, `save_new`, `purge`, `copy`) on every backend.

They serve the LangGraph saver (one round trip per LangGraph call) but are generic: a
scope of execution ids or id prefixes, metadata filters, and "children" (records of a
node whose parent_id names a record).
"""

from __future__ import annotations

import pytest

from shmstore import BaseStore, Checkpoint, ConfigError, EncodeError, StoreFull
from shmstore.backends.table import CheckpointTable
from shmstore.core.record import Record
from shmstore.core.store import OneOf


def cp(execution: str, cid: str, node: str = "step", parent: str | None = None,
       state: object = None, **metadata: object) -> Checkpoint:
    return Checkpoint(execution_id=execution, node_name=node, id=cid, parent_id=parent,
                      state=state, metadata=dict(metadata))


def fill(store: BaseStore) -> None:
    """run/a: s1 <- s2 <- s3, logs under s1 and s3; run/b: s1; other: x."""
    store.save(cp("run/a", "a1", run="r1", source="input", state=1))
    store.save(cp("run/a", "a1-log1", node="log", parent="a1", state="l1"))
    store.save(cp("run/a", "a2", parent="a1", run="r2", source="loop", state=2))
    store.save(cp("run/a", "a1-log2", node="log", parent="a1", state="l2"))
    store.save(cp("run/a", "a3", parent="a2", run="r2", source="loop", state=3))
    store.save(cp("run/a", "a3-log", node="log", parent="a3", state="l3"))
    store.save(cp("run/b", "b1", run="r1", source="input", state=4))
    store.save(cp("other", "x1", run="r1", state=5))


def ids(found: list[tuple[Checkpoint, list[Checkpoint]]]) -> list[str]:
    return [c.id for c, _ in found]


# -- find ----------------------------------------------------------------------------------


def test_find_lists_one_execution_newest_first_with_filters(store: BaseStore) -> None:
    fill(store)
    assert ids(store.find("run/a", node_name="step")) == ["a3", "a2", "a1"]
    assert ids(store.find("run/a")) == ["a3-log", "a3", "a1-log2", "a2", "a1-log1", "a1"]
    assert ids(store.find("run/a", node_name="step", limit=2)) == ["a3", "a2"]
    assert ids(store.find("run/a", node_name="step", before_id="a3")) == ["a2", "a1"]
    assert ids(store.find("run/a", node_name="step", before_id="a3", limit=1)) == ["a2"]
    assert store.find("run/a", limit=0) == []
    assert store.find("nothing-here") == []


def test_find_returns_whole_checkpoints_with_their_children_oldest_first(
        store: BaseStore) -> None:
    fill(store)
    found = store.find("run/a", node_name="step", children="log")
    by_id = {c.id: [k.id for k in kids] for c, kids in found}
    assert by_id == {"a3": ["a3-log"], "a2": [], "a1": ["a1-log1", "a1-log2"]}
    first = found[-1][0]
    assert (first.state, first.metadata, first.version) == (1, {"run": "r1", "source": "input"},
                                                            1)
    assert [k.state for k in found[-1][1]] == ["l1", "l2"]
    assert all(kids == [] for _, kids in store.find("run/a", node_name="step"))


def test_find_one_checkpoint_by_id_only_in_scope(store: BaseStore) -> None:
    fill(store)
    [(found, kids)] = store.find("run/a", checkpoint_id="a1", children="log")
    assert found.id == "a1" and [k.id for k in kids] == ["a1-log1", "a1-log2"]
    assert store.find("run/b", checkpoint_id="a1") == []
    assert store.find("run/a", checkpoint_id="a1", node_name="log") == []
    assert store.find("run/a", checkpoint_id="missing") == []
    assert ids(store.find("run/", prefix=True, checkpoint_id="b1")) == ["b1"]


def test_find_filters_metadata_in_the_store(store: BaseStore) -> None:
    fill(store)
    assert ids(store.find("run/a", where={"run": "r2"})) == ["a3", "a2"]
    assert ids(store.find("run/a", where={"run": "r2", "source": "input"})) == []
    assert ids(store.find("run/a", where={"run": OneOf("r1", "r9")})) == ["a1"]
    # A missing key counts as None, as in LangGraph's in-memory saver.
    assert ids(store.find("run/a", node_name="log", where={"run": None})) == [
        "a3-log", "a1-log2", "a1-log1"]
    assert store.find("run/a", where={"run": "nobody"}) == []


def test_find_filters_on_rich_metadata_values(store: BaseStore) -> None:
    store.save(cp("rich", "r1", tags=("a", 1), n=1))
    store.save(cp("rich", "r2", tags=["a", 1], n=1.0))
    assert ids(store.find("rich", where={"tags": ("a", 1)})) == ["r1"]
    assert ids(store.find("rich", where={"tags": ["a", 1]})) == ["r2"]
    assert ids(store.find("rich", where={"n": 1})) == ["r2", "r1"]  # 1 == 1.0, as in Python


def test_find_over_prefixes_takes_executions_in_id_order(store: BaseStore) -> None:
    fill(store)
    assert ids(store.find("run/", prefix=True, node_name="step")) == ["a3", "a2", "a1", "b1"]
    assert ids(store.find("run/", prefix=True, where={"run": "r1"})) == ["a1", "b1"]
    assert ids(store.find(["run/b", "oth"], prefix=True)) == ["x1", "b1"]
    assert ids(store.find("run/", prefix=True, node_name="step", limit=3)) == ["a3", "a2", "a1"]
    assert ids(store.find(["run/b", "other", "run/b"])) == ["x1", "b1"]
    assert store.find("run/", node_name="step") == []  # not a prefix: no such execution
    assert store.find([]) == []


def test_find_rejects_bad_arguments_before_sending(store: BaseStore) -> None:
    with pytest.raises(ConfigError):
        store.find("")
    with pytest.raises(ConfigError):
        store.find("run", limit=-1)
    with pytest.raises(ConfigError):
        store.find("run", where=["run"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        store.find("run", where={1: "x"})  # type: ignore[dict-item]
    with pytest.raises(ConfigError):
        store.find("run", node_name=3)  # type: ignore[arg-type]
    with pytest.raises(EncodeError):
        store.find("run", where={"x": object()})


# -- save_new ------------------------------------------------------------------------------


def test_save_new_keeps_what_is_stored_and_the_first_of_a_batch(store: BaseStore) -> None:
    store.save(cp("run", "w1", state="first"))
    saved = store.save_new([cp("run", "w1", state="second"), cp("run", "w2", state="a"),
                            cp("run", "w2", state="b"), cp("run", "w3", state="c")])
    assert [None if s is None else (s.id, s.version) for s in saved] == [
        None, ("w2", 2), None, ("w3", 3)]
    assert [store.load(i).state for i in ("w1", "w2", "w3")] == ["first", "a", "c"]
    assert store.save_new([]) == []
    assert store.save_new([cp("run", "w1")]) == [None]
    assert store.stats().checkpoints == 3


def test_save_new_writes_nothing_if_one_cannot_be_encoded(store: BaseStore) -> None:
    with pytest.raises(EncodeError):
        store.save_new([cp("run", "ok"), cp("run", "bad", state=object())])
    assert store.executions() == []


# -- purge ---------------------------------------------------------------------------------


def test_purge_drops_matches_with_their_children_and_frees_their_bytes(
        store: BaseStore) -> None:
    fill(store)
    before = store.stats().payload_bytes
    dropped = store.purge("run/", prefix=True, node_name="step", where={"run": "r1"},
                          children="log")
    assert dropped == 4  # a1 with its two logs, b1
    assert ids(store.find("run/", prefix=True)) == ["a3-log", "a3", "a2"]
    assert store.executions() == ["other", "run/a"]
    after = store.stats()
    assert after.checkpoints == 4
    assert after.payload_bytes == sum(
        len(store.codec.encode(c.state)) for c, _ in store.find(["run/a", "other"]))
    assert after.payload_bytes < before


def test_purge_keeps_the_newest_per_execution(store: BaseStore) -> None:
    fill(store)
    assert store.purge("run/", prefix=True, node_name="step", keep=1, children="log") == 4
    assert ids(store.find("run/a")) == ["a3-log", "a3"]
    assert ids(store.find("run/b")) == ["b1"]
    assert ids(store.find("other")) == ["x1"]


def test_purge_without_filters_clears_every_execution_in_scope(store: BaseStore) -> None:
    fill(store)
    assert store.purge(["run/a", "run/b"]) == 7
    assert store.executions() == ["other"]
    assert store.stats().checkpoints == 1
    assert store.purge("run/", prefix=True) == 0
    assert store.purge([]) == 0


def test_purge_any_of_several_values(store: BaseStore) -> None:
    fill(store)
    assert store.purge("run/a", where={"run": OneOf("r1", "r2")}, children="log") == 6
    assert store.executions() == ["other", "run/b"]


def test_purge_rejects_bad_arguments(store: BaseStore) -> None:
    fill(store)
    with pytest.raises(ConfigError):
        store.purge("run/a", keep=-1)
    with pytest.raises(ConfigError):
        store.purge("")
    assert store.stats().checkpoints == 8


# -- copy ----------------------------------------------------------------------------------


def test_copy_under_a_new_prefix_keeps_order_links_and_leaves_the_source(
        store: BaseStore) -> None:
    store.save(cp("t1/", "t1/#1", state=1, k="v"))
    store.save(cp("t1/", "t1/#1#w", node="log", parent="t1/#1", state="w"))
    store.save(cp("t1/", "t1/#2", parent="t1/#1", state=2))
    store.save(cp("t1/sub", "t1/sub#1", state=3))
    store.save(cp("t10/", "t10/#1", state=4))  # shares "t1" but not "t1/"
    assert store.copy("t1/", "t2/", prefix=True) == 4
    assert store.executions() == ["t1/", "t1/sub", "t10/", "t2/", "t2/sub"]
    copied = store.find("t2/", node_name="step", children="log")
    assert [(c.id, c.parent_id, c.version, c.state, [k.id for k in kids])
            for c, kids in copied] == [
        ("t2/#2", "t2/#1", 3, 2, []), ("t2/#1", None, 1, 1, ["t2/#1#w"])]
    assert copied[-1][0].metadata == {"k": "v"}
    assert ids(store.find("t1/")) == ["t1/#2", "t1/#1#w", "t1/#1"]
    assert store.stats().checkpoints == 9


def test_copy_gives_new_ids_to_ids_outside_the_prefix_and_relinks_them(
        store: BaseStore) -> None:
    first = store.save(Checkpoint(execution_id="run", state=1))
    store.save(Checkpoint(execution_id="run", state=2, parent_id=first.id))
    assert store.copy("run", "run-copy") == 2
    a, b = (c for c, _ in store.find("run-copy"))
    assert {a.id, b.id}.isdisjoint({c.id for c, _ in store.find("run")})
    assert (a.state, a.parent_id, b.state, b.parent_id) == (2, b.id, 1, None)
    assert store.copy("missing", "elsewhere") == 0
    assert store.executions() == ["run", "run-copy"]


def test_copy_onto_itself_is_refused(store: BaseStore) -> None:
    store.save(cp("run", "r1"))
    with pytest.raises(ConfigError):
        store.copy("run", "run")
    with pytest.raises(ConfigError):
        store.copy("", "x", prefix=True)
    assert store.stats().checkpoints == 1


# -- the table's invariants under limits ---------------------------------------------------


def record(execution: str, cid: str, size: int) -> Record:
    return Record(cid, execution, "step", 0, 0, None, b"\x80", b"x" * size)


def test_copy_and_save_new_respect_the_limits_and_write_nothing_when_refused() -> None:
    table = CheckpointTable({"max_checkpoints": 3})
    table.save(record("a", "a1", 10))
    table.save(record("a", "a2", 10))
    with pytest.raises(StoreFull):
        table.copy("a", "b")
    with pytest.raises(StoreFull):
        table.save_new([record("c", "c1", 1), record("c", "c2", 1)])
    assert table.executions() == ["a"]
    assert table.figures() == (2, 20)


def test_purge_and_copy_keep_the_byte_accounting_exact() -> None:
    table = CheckpointTable()
    for i in range(5):
        table.save(record("run/x", f"x{i}", 10 + i))
    table.copy("run/", "copy/", prefix=True)
    assert table.figures() == (10, 2 * sum(range(10, 15)))
    assert table.purge(["run/x"], False, None, None, 2) == 3
    assert table.figures() == (7, 13 + 14 + sum(range(10, 15)))
    stats = table.stats()
    assert stats["ops"]["copy"] == 1 and stats["ops"]["purge"] == 1
    assert table.purge(["copy/"], True) == 5
    assert table.figures() == (2, 27)
