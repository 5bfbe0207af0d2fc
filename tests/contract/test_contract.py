"""The store contract: every backend passes these tests unchanged (fixture ``store``)."""

from __future__ import annotations

import pickle
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from shmstore import (
    BaseStore,
    Checkpoint,
    CheckpointNotFound,
    ConfigError,
    EncodeError,
    StoreTimeout,
    StoreUnavailable,
    VersionConflict,
)
from shmstore.core.codec import DEFAULT_CODEC
from tests.helpers import wait_until


def cp(execution: str = "run", node: str = "n", state: object = None, **kw: object) -> Checkpoint:
    return Checkpoint(execution_id=execution, node_name=node, state=state, **kw)  # type: ignore[arg-type]


# -- save ----------------------------------------------------------------------------------


def test_save_assigns_increasing_versions_per_execution(store: BaseStore) -> None:
    versions = [store.save(cp("a", state=i)).version for i in range(5)]
    other = store.save(cp("b")).version
    assert versions == [1, 2, 3, 4, 5]
    assert other == 1


def test_save_returns_the_checkpoint_with_its_version_and_leaves_the_input_alone(
    store: BaseStore,
) -> None:
    original = cp(state={"x": 1}, metadata={"k": "v"}, parent_id="p-1")
    saved = store.save(original)
    assert original.version == 0
    assert saved.version == 1
    assert (saved.id, saved.execution_id, saved.node_name, saved.state, saved.metadata) == (
        original.id, original.execution_id, original.node_name, original.state,
        original.metadata,
    )


def test_every_field_round_trips(store: BaseStore) -> None:
    when = datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=timezone.utc)
    original = cp("exec-1", "node-a", {"rows": [1, (2, 3)], "b": b"\x00"},
                  metadata={"step": 3, "tags": ["x"]}, timestamp=when, parent_id="parent")
    saved = store.save(original)
    loaded = store.load(original.id)
    assert loaded == saved
    assert loaded.timestamp == when and loaded.timestamp.tzinfo is not None
    assert isinstance(loaded.state["rows"][1], tuple)


def test_stored_checkpoints_are_snapshots(store: BaseStore) -> None:
    state = {"items": [1, 2]}
    saved = store.save(cp(state=state))
    state["items"].append(3)  # the seed's store would now have changed history
    loaded = store.load(saved.id)
    assert loaded.state == {"items": [1, 2]}
    loaded.state["items"].append(99)
    assert store.load(saved.id).state == {"items": [1, 2]}


def test_saving_an_existing_id_replaces_it_with_a_new_version(store: BaseStore) -> None:
    first = store.save(cp(state="old"))
    store.save(cp(state="other"))
    again = store.save(cp(state="new", id=first.id))
    assert again.version == 3
    listed = store.list("run")
    assert [(c.version, c.state) for c in listed] == [(2, "other"), (3, "new")]
    assert store.stats().checkpoints == 2


def test_saving_an_existing_id_into_another_execution_moves_it(store: BaseStore) -> None:
    first = store.save(cp("a", state=1))
    moved = store.save(cp("b", state=2, id=first.id))
    assert moved.version == 1
    assert store.list("a") == []
    assert store.executions() == ["b"]
    assert store.load(first.id).execution_id == "b"


def test_expected_version_is_a_compare_and_set(store: BaseStore) -> None:
    assert store.save(cp(state=1), expected_version=0).version == 1
    assert store.save(cp(state=2), expected_version=1).version == 2
    with pytest.raises(VersionConflict) as info:
        store.save(cp(state=3), expected_version=1)
    assert (info.value.execution_id, info.value.expected, info.value.actual) == ("run", 1, 2)
    with pytest.raises(VersionConflict):
        store.save(cp("empty"), expected_version=3)
    assert [c.state for c in store.list("run")] == [1, 2]
    assert store.executions() == ["run"]


def test_versions_are_not_reused_after_deleting_the_latest(store: BaseStore) -> None:
    store.save(cp(state=1))
    second = store.save(cp(state=2))
    store.delete(second.id)
    assert store.latest("run").version == 1  # type: ignore[union-attr]
    assert store.save(cp(state=3)).version == 3


def test_a_cleared_execution_starts_again_at_version_1(store: BaseStore) -> None:
    store.save(cp())
    store.save(cp())
    store.clear("run")
    assert store.save(cp()).version == 1


def test_save_many_is_one_batch_in_order(store: BaseStore) -> None:
    saved = store.save_many([cp("a", state=i) for i in range(3)] + [cp("b", state="x")])
    assert [(c.execution_id, c.version) for c in saved] == [("a", 1), ("a", 2), ("a", 3),
                                                             ("b", 1)]
    assert [c.state for c in store.load_many([c.id for c in saved])] == [0, 1, 2, "x"]
    assert store.save_many([]) == []


def test_save_many_writes_nothing_if_one_state_cannot_be_encoded(store: BaseStore) -> None:
    with pytest.raises(EncodeError) as info:
        store.save_many([cp(state=1), cp(state={"bad": [object()]})])
    assert info.value.path == "state['bad'][0]"
    assert store.executions() == []
    assert store.stats().checkpoints == 0


def test_an_unencodable_state_is_refused_and_the_store_is_unchanged(store: BaseStore) -> None:
    store.save(cp(state=1))
    before = store.stats()
    with pytest.raises(EncodeError):
        store.save(cp(state={"when": [object()]}))
    with pytest.raises(EncodeError):
        store.save(cp(state=2**70))
    after = store.stats()
    assert (after.checkpoints, after.payload_bytes) == (before.checkpoints, before.payload_bytes)
    assert after.ops["save"] == before.ops["save"]  # nothing was sent


# -- load ----------------------------------------------------------------------------------


def test_load_of_a_missing_id_raises_checkpoint_not_found(store: BaseStore) -> None:
    with pytest.raises(CheckpointNotFound) as info:
        store.load("nope")
    assert isinstance(info.value, KeyError)
    assert info.value.checkpoint_id == "nope"
    assert "nope" in str(info.value)


def test_load_many_keeps_order_and_names_the_missing_id(store: BaseStore) -> None:
    a, b = store.save(cp(state="a")), store.save(cp(state="b"))
    assert [c.state for c in store.load_many([b.id, a.id, b.id])] == ["b", "a", "b"]
    assert store.load_many([]) == []
    with pytest.raises(CheckpointNotFound) as info:
        store.load_many([a.id, "missing", "also-missing"])
    assert info.value.checkpoint_id == "missing"


# -- list, latest, executions ----------------------------------------------------------------


def test_list_is_ordered_by_version_with_limit_before_and_newest_first(store: BaseStore) -> None:
    for i in range(1, 8):
        store.save(cp(state=i))
    store.save(cp("other"))

    def versions(**kw: object) -> list[int]:
        return [c.version for c in store.list("run", **kw)]  # type: ignore[arg-type]

    assert versions() == [1, 2, 3, 4, 5, 6, 7]
    assert versions(limit=3) == [1, 2, 3]
    assert versions(newest_first=True) == [7, 6, 5, 4, 3, 2, 1]
    assert versions(newest_first=True, limit=2) == [7, 6]
    assert versions(before_version=4) == [1, 2, 3]
    assert versions(before_version=4, newest_first=True, limit=2) == [3, 2]
    assert versions(before_version=1) == []
    assert versions(limit=0) == []
    assert store.list("nobody") == []


def test_list_order_follows_versions_after_a_replace(store: BaseStore) -> None:
    a = store.save(cp(state="a"))
    store.save(cp(state="b"))
    store.save(cp(state="a2", id=a.id))
    assert [c.state for c in store.list("run")] == ["b", "a2"]
    assert [c.state for c in store.list("run", newest_first=True)] == ["a2", "b"]


def test_latest_is_the_highest_version(store: BaseStore) -> None:
    assert store.latest("run") is None
    for i in range(3):
        store.save(cp(state=i))
    latest = store.latest("run")
    assert latest is not None and (latest.version, latest.state) == (3, 2)


def test_executions_are_sorted_and_forget_cleared_ones(store: BaseStore) -> None:
    for name in ["c", "a", "b"]:
        store.save(cp(name))
    assert store.executions() == ["a", "b", "c"]
    store.clear("b")
    assert store.executions() == ["a", "c"]


# -- delete, clear ---------------------------------------------------------------------------


def test_delete_reports_whether_there_was_something(store: BaseStore) -> None:
    saved = store.save(cp())
    assert store.delete(saved.id) is True
    assert store.delete(saved.id) is False
    with pytest.raises(CheckpointNotFound):
        store.load(saved.id)
    assert store.executions() == []


def test_clear_drops_one_execution_and_counts(store: BaseStore) -> None:
    for _ in range(3):
        store.save(cp("a"))
    kept = store.save(cp("b", state="kept"))
    assert store.clear("a") == 3
    assert store.clear("a") == 0
    assert store.list("a") == []
    assert store.load(kept.id).state == "kept"


# -- wait ------------------------------------------------------------------------------------


def test_wait_returns_at_once_when_the_version_is_there(store: BaseStore) -> None:
    store.save(cp(state=1))
    store.save(cp(state=2))
    assert store.wait("run").version == 2
    assert store.wait("run", after_version=1).state == 2


def test_wait_times_out_with_store_timeout(store: BaseStore) -> None:
    store.save(cp())
    started = time.monotonic()
    with pytest.raises(StoreTimeout) as info:
        store.wait("run", after_version=1, timeout=0.3)
    assert 0.25 <= time.monotonic() - started < 5
    assert info.value.timeout == 0.3
    with pytest.raises(StoreTimeout):
        store.wait("never", timeout=0)


def test_wait_is_woken_by_a_save_from_another_thread(store: BaseStore) -> None:
    store.save(cp(state="first"))
    got: list[Checkpoint] = []
    waiter = threading.Thread(target=lambda: got.append(store.wait("run", after_version=1,
                                                                   timeout=10)))
    waits = store.stats().ops.get("wait", 0)
    waiter.start()
    # The handshake: every backend counts a wait as it begins; then it is really waiting.
    assert wait_until(lambda: store.stats().ops.get("wait", 0) > waits, 30)
    assert waiter.is_alive()
    store.save(cp(state="second"))
    waiter.join(10)
    assert [(c.version, c.state) for c in got] == [(2, "second")]


def test_wait_slices_a_long_wait_into_short_server_waits(store: BaseStore,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "wait_slice", 0.1)
    with pytest.raises(StoreTimeout):
        store.wait("slow", timeout=0.35)
    assert store.stats().ops["wait"] >= 3
    saver = threading.Timer(0.3, lambda: store.save(cp("slow")))
    saver.start()
    assert store.wait("slow").version == 1  # no timeout: several slices, then woken
    saver.join(10)  # its answer may come after the waiter's: the store must outlive it


# -- stats, close ----------------------------------------------------------------------------


def test_stats_count_exactly(store: BaseStore) -> None:
    ops_before = store.stats().ops
    states = [{"n": i, "pad": "x" * i} for i in range(10)]
    for state in states:
        store.save(cp("a" if len(state["pad"]) % 2 else "b", state=state))
    store.load(store.latest("a").id)  # type: ignore[union-attr]
    stats = store.stats()
    assert stats.checkpoints == 10
    assert stats.executions == 2
    assert stats.payload_bytes == sum(len(DEFAULT_CODEC.encode(s)) for s in states)
    ops = {op: n - ops_before[op] for op, n in stats.ops.items()}
    assert (ops["save"], ops["load"], ops["latest"], ops["stats"]) == (10, 1, 1, 1)
    assert stats.server_pid > 0 and stats.server_rss > 1_000_000 and stats.uptime_s >= 0
    as_dict = stats.to_dict()
    assert as_dict["checkpoints"] == 10 and isinstance(as_dict["ops"], dict)
    assert "10 checkpoints in 2 executions" in str(stats)


def test_payload_bytes_follow_deletes_and_replacements(store: BaseStore) -> None:
    a = store.save(cp(state="x" * 100))
    store.save(cp(state="y" * 10, id=a.id))
    assert store.stats().payload_bytes == len(DEFAULT_CODEC.encode("y" * 10))
    store.delete(a.id)
    assert store.stats().payload_bytes == 0


def test_close_twice_is_fine_and_later_calls_fail_clearly(store: BaseStore) -> None:
    store.save(cp())
    store.close()
    store.close()
    with pytest.raises(StoreUnavailable):
        store.executions()


def test_context_manager_closes(store: BaseStore) -> None:
    with store as same:
        assert same is store
        same.save(cp())
    with pytest.raises(StoreUnavailable):
        store.latest("run")


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.load(""),
        lambda s: s.load(3),
        lambda s: s.load(None),
        lambda s: s.load_many(["ok", ""]),
        lambda s: s.delete(b"bytes-id"),
        lambda s: s.clear(""),
        lambda s: s.latest(7),
        lambda s: s.list(""),
        lambda s: s.list("run", limit=-1),
        lambda s: s.list("run", limit=1.5),
        lambda s: s.list("run", before_version=-2),
        lambda s: s.wait("run", timeout=-1),
        lambda s: s.wait("run", after_version=-1),
        lambda s: s.wait("run", timeout="soon"),
        lambda s: s.save({"execution_id": "run"}),
        lambda s: s.save(cp(), expected_version=-1),
        lambda s: s.save_many([cp(), "not a checkpoint"]),
    ],
)
def test_bad_arguments_raise_config_error_before_anything_is_sent(store: BaseStore,
                                                                  call: object) -> None:
    store.save(cp())
    ops_before = store.stats().ops
    with pytest.raises(ConfigError):
        call(store)  # type: ignore[operator]
    ops_after = store.stats().ops
    ops_after["stats"] -= 1
    assert ops_after == ops_before
    assert len(store.list("run")) == 1


def test_checkpoint_validates_its_fields() -> None:
    with pytest.raises(ConfigError):
        Checkpoint(execution_id="")
    with pytest.raises(ConfigError):
        Checkpoint(execution_id=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Checkpoint(execution_id="x", id="")
    with pytest.raises(ConfigError):
        Checkpoint(execution_id="x", metadata=[1])  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Checkpoint(execution_id="x", timestamp="yesterday")  # type: ignore[arg-type]
    naive = Checkpoint(execution_id="x", timestamp=datetime(2020, 1, 1))
    assert naive.timestamp.tzinfo is timezone.utc
    shifted = Checkpoint(execution_id="x", timestamp=datetime(2020, 1, 1, 2,
                                                               tzinfo=timezone(timedelta(hours=2))))
    assert shifted.timestamp == datetime(2020, 1, 1, tzinfo=timezone.utc)
    assert shifted.timestamp.tzinfo is timezone.utc


def test_checkpoint_ids_are_time_ordered_uuid7() -> None:
    ids = [Checkpoint(execution_id="x").id for _ in range(2000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(i[14] == "7" and i[19] in "89ab" for i in ids)


def test_checkpoints_pickle(store: BaseStore) -> None:
    saved = store.save(cp(state={"a": (1, 2)}))
    assert pickle.loads(pickle.dumps(saved)) == saved
