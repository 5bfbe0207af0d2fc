"""`BaseStore.list_records` / `save_records` on every backend: records as stored, moved
byte for byte, through the same checks as `save` (fixtures ``store``, ``limited_store``)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

import pytest

import shmstore
from shmstore import BaseStore, Checkpoint, ConfigError, StoreFull
from shmstore.core.record import Record
from shmstore.core.store import check_record


def _raw(records: list[Record]) -> list[tuple[object, ...]]:
    return [(*r[:7], bytes(r.state)) for r in records]


def test_records_move_between_stores_byte_for_byte(store: BaseStore) -> None:
    when = datetime(2023, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
    first = store.save(Checkpoint(execution_id="run", node_name="a", state={"k": [1, 2]},
                                  metadata={"m": 1}, timestamp=when))
    store.save(Checkpoint(execution_id="run", node_name="b", state=b"\x07" * 5000,
                          parent_id=first.id))
    records = store.list_records("run")
    assert [r.version for r in records] == [1, 2]
    assert records[0].timestamp_us == int(when.timestamp()) * 10**6 + 678901
    assert bytes(records[0].state) == store.codec.encode({"k": [1, 2]})
    assert store.list_records("run", newest_first=True, limit=1)[0].id == records[1].id
    with shmstore.MemoryStore() as other:
        assert other.save_records(records) == [1, 2]
        assert _raw(other.list_records("run")) == _raw(records)
        assert other.load(first.id) == first  # ids, parents, metadata, timestamp, state
        store.clear("run")
        assert store.save_records(other.list_records("run")) == [1, 2]
    assert _raw(store.list_records("run")) == _raw(records)
    assert store.save_records([]) == []


def test_save_records_checks_every_record_before_sending_any(store: BaseStore) -> None:
    good = ["id-1", "run", "n", 1, 0, None, b"\x80", b"\xc0"]
    bad_fields = {
        "a short array": [1, 2],
        "an empty id": ["", *good[1:]],
        "a node that is not a str": [*good[:2], 7, *good[3:]],
        "a negative version": [*good[:3], -1, *good[4:]],
        "a timestamp past year 9999": [*good[:4], 10**20, *good[5:]],
        "a str state": [*good[:7], "text"],
    }
    for case, bad in bad_fields.items():
        with pytest.raises(ConfigError):
            store.save_records([check_record(good), bad])
        assert store.executions() == [], case
    assert check_record(good) == Record(*good)  # type: ignore[arg-type]


def test_save_records_keeps_the_stores_limits(
    limited_store: Callable[..., BaseStore],
) -> None:
    store = limited_store(max_checkpoint_bytes=1000, max_checkpoints=2)
    small = ["id-1", "run", "n", 1, 0, None, b"\x80", b"\xc0"]
    with pytest.raises(StoreFull, match="max_checkpoint_bytes"):
        store.save_records([small, ["id-2", "run", "n", 2, 0, None, b"\x80", b"\0" * 1000]])
    with pytest.raises(StoreFull, match="max_checkpoints"):
        store.save_records([[f"id-{i}", "run", "n", i, 0, None, b"\x80", b"\xc0"]
                            for i in (1, 2, 3)])
    assert store.executions() == []
