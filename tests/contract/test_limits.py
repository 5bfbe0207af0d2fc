"""Limits on every backend (fixture ``limited_store``): refuse or evict on purpose, lose nothing.

"The store is unchanged" is checked on the raw records the backend holds (ids, versions,
timestamps, metadata and state bytes), not on decoded copies: byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import shmstore
from shmstore import (
    BaseStore,
    Checkpoint,
    ConfigError,
    DecodeError,
    EncodeError,
    Limits,
    MsgpackCodec,
    StoreFull,
)

LimitedStore = Callable[..., BaseStore]


def cp(execution: str = "run", state: object = "x", **kw: Any) -> Checkpoint:
    return Checkpoint(execution_id=execution, node_name="n", state=state, **kw)


def sized(nbytes: int) -> bytes:
    """A state whose encoding is exactly ``nbytes`` long (bin 16 header: 3 bytes)."""
    assert 256 <= nbytes - 3 < 65536
    return b"\0" * (nbytes - 3)


def snapshot(store: BaseStore) -> tuple[Any, ...]:
    """Every raw record, plus the figures: what "byte for byte unchanged" compares."""
    records = {ex: [tuple(r) for r in store._backend.list(ex, None, None, False)]
               for ex in store.executions()}
    stats = store.stats()
    return records, stats.checkpoints, stats.executions, stats.payload_bytes


def ids(store: BaseStore) -> set[str]:
    return {c.id for ex in store.executions() for c in store.list(ex)}


# -- reject ---------------------------------------------------------------------------------


def test_max_checkpoints_rejects_and_leaves_the_store_byte_for_byte(
    limited_store: LimitedStore,
) -> None:
    store = limited_store(max_checkpoints=3)
    store.save_many([cp("a", 1), cp("b", 2), cp("a", 3)])
    before = snapshot(store)
    with pytest.raises(StoreFull, match="max_checkpoints=3") as info:
        store.save(cp("a", 4))
    err = info.value
    assert (err.limit, err.maximum, err.current, err.requested) == ("max_checkpoints", 3, 3, 1)
    assert "on_full='evict'" in str(err)  # it says what to do
    assert snapshot(store) == before
    # No version was used up by the refused save.
    store.delete(store.list("b")[0].id)
    assert store.save(cp("a", 5)).version == 3
    stats = store.stats()
    assert (stats.rejections, stats.evictions) == (1, 0)
    assert stats.limits["max_checkpoints"] == 3


def test_max_bytes_rejects_with_the_figures(limited_store: LimitedStore) -> None:
    store = limited_store(max_bytes=1000)
    store.save(cp(state=sized(600)))
    before = snapshot(store)
    with pytest.raises(StoreFull) as info:
        store.save(cp(state=sized(500)))
    assert (info.value.limit, info.value.maximum) == ("max_bytes", 1000)
    assert (info.value.current, info.value.requested) == (600, 500)
    assert snapshot(store) == before
    store.save(cp(state=sized(400)))  # exactly at the limit is allowed
    assert store.stats().payload_bytes == 1000


def test_replacing_an_id_counts_what_it_frees(limited_store: LimitedStore) -> None:
    store = limited_store(max_checkpoints=2, max_bytes=1000)
    first = store.save(cp(state=sized(500)))
    store.save(cp(state=sized(500)))
    replaced = store.save(cp(state=sized(500), id=first.id))  # same count, same bytes
    assert replaced.version == 3
    assert store.stats().checkpoints == 2


def test_save_many_that_does_not_fit_is_refused_whole(limited_store: LimitedStore) -> None:
    store = limited_store(max_checkpoints=4)
    store.save(cp("a"))
    before = snapshot(store)
    with pytest.raises(StoreFull):
        store.save_many([cp("b"), cp("b"), cp("c"), cp("c")])
    assert snapshot(store) == before
    assert len(store.save_many([cp("b"), cp("b"), cp("c")])) == 3


def test_max_rss_refuses_saves_but_reads_go_on(limited_store: LimitedStore) -> None:
    store = limited_store(max_rss=1)  # any process is above one byte
    with pytest.raises(StoreFull) as info:
        store.save(cp())
    assert info.value.limit == "max_rss" and info.value.current > 1
    assert store.executions() == [] and store.latest("run") is None
    assert store.stats().rejections == 1


# -- evict ----------------------------------------------------------------------------------


def test_evict_drops_the_oldest_store_wide_in_save_order(limited_store: LimitedStore) -> None:
    store = limited_store(max_checkpoints=3, on_full="evict")
    a1, b1, a2 = store.save_many([cp("a", 1), cp("b", 1), cp("a", 2)])
    c1 = store.save(cp("c", 1))
    assert ids(store) == {b1.id, a2.id, c1.id}  # a1 went first
    store.save(cp(state=9, id=b1.id, execution="b"))  # re-saving b1 makes it the newest
    c2 = store.save(cp("c", 2))
    assert ids(store) == {b1.id, c1.id, c2.id}  # a2 was now the oldest
    assert [c.version for c in store.list("c")] == [1, 2]
    stats = store.stats()
    assert (stats.evictions, stats.rejections, stats.checkpoints) == (2, 0, 3)
    assert a1.id not in ids(store)


def test_evict_by_bytes_drops_as_many_as_needed(limited_store: LimitedStore) -> None:
    store = limited_store(max_bytes=2000, on_full="evict")
    small = store.save_many([cp("s", sized(400)) for _ in range(5)])  # 2000 bytes
    big = store.save(cp("big", sized(1100)))
    left = ids(store)
    assert big.id in left
    assert left - {big.id} == {c.id for c in small[3:]}  # the three oldest went
    assert store.stats().payload_bytes == 1100 + 800
    assert store.stats().evictions == 3


def test_evict_never_drops_the_batch_being_saved(limited_store: LimitedStore) -> None:
    store = limited_store(max_checkpoints=3, on_full="evict")
    store.save_many([cp("old"), cp("old")])
    batch = store.save_many([cp("new", i) for i in range(3)])
    assert ids(store) == {c.id for c in batch}
    assert store.executions() == ["new"]


def test_a_save_that_can_never_fit_is_refused_in_evict_mode_too(
    limited_store: LimitedStore,
) -> None:
    store = limited_store(max_checkpoints=2, max_bytes=1000, on_full="evict")
    store.save(cp())
    before = snapshot(store)
    with pytest.raises(StoreFull, match="can never fit") as info:
        store.save_many([cp("x"), cp("x"), cp("x")])
    assert info.value.limit == "max_checkpoints"
    with pytest.raises(StoreFull, match="can never fit"):
        store.save(cp(state=sized(1001)))
    assert snapshot(store) == before
    assert store.stats().evictions == 0


# -- retention ------------------------------------------------------------------------------


def test_retention_keeps_exactly_the_newest_n(limited_store: LimitedStore) -> None:
    store = limited_store(max_per_execution=3)
    saved = [store.save(cp("a", i)) for i in range(5)]
    other = store.save(cp("b", "kept"))
    assert [c.version for c in store.list("a")] == [3, 4, 5]
    assert [c.state for c in store.list("a")] == [2, 3, 4]
    assert store.latest("a").id == saved[-1].id  # type: ignore[union-attr]
    assert [c.id for c in store.list("b")] == [other.id]
    batch = store.save_many([cp("a", i) for i in range(10, 15)])
    assert [c.id for c in store.list("a")] == [c.id for c in batch[-3:]]
    stats = store.stats()
    assert (stats.pruned, stats.checkpoints, stats.evictions) == (7, 4, 0)


def test_retention_makes_room_before_a_store_wide_limit_counts(
    limited_store: LimitedStore,
) -> None:
    store = limited_store(max_per_execution=2, max_checkpoints=4)
    store.save_many([cp("a"), cp("a"), cp("b"), cp("b")])  # full
    store.save(cp("a", "newest"))  # replaces a's oldest: still 4
    assert store.stats().checkpoints == 4
    with pytest.raises(StoreFull):
        store.save(cp("c"))


def test_retention_with_expected_version(limited_store: LimitedStore) -> None:
    store = limited_store(max_per_execution=1)
    store.save(cp(state=1), expected_version=0)
    assert store.save(cp(state=2), expected_version=1).version == 2
    assert [c.state for c in store.list("run")] == [2]


# -- one checkpoint's size ------------------------------------------------------------------


def test_max_checkpoint_bytes_is_refused_before_sending(limited_store: LimitedStore) -> None:
    store = limited_store(max_checkpoint_bytes=1000)
    store.save(cp(state=sized(900)))
    sent = store.stats().ops
    with pytest.raises(StoreFull, match="nothing was sent") as info:
        store.save(cp(state=sized(1001)))
    # State plus metadata as encoded: the empty metadata map is one byte.
    assert (info.value.limit, info.value.maximum, info.value.current) == (
        "max_checkpoint_bytes", 1000, 1002)
    with pytest.raises(StoreFull):
        store.save_many([cp(), cp(state=sized(2000))])
    with pytest.raises(StoreFull):  # metadata counts too
        store.save(cp(state=sized(900), metadata={"note": "y" * 200}))
    ops = store.stats().ops
    assert (ops["save"], ops["save_many"]) == (sent["save"], sent["save_many"])
    assert store.stats().checkpoints == 1


def test_the_default_limits_one_checkpoint_to_64_mib(limited_store: LimitedStore) -> None:
    store = limited_store()
    assert store.limits() == Limits()
    assert store.limits().max_checkpoint_bytes == 64 * 1024 * 1024
    assert store.stats().limits["on_full"] == "reject"


def test_load_or_compute_refuses_an_oversize_result_and_hands_over(
    limited_store: LimitedStore,
) -> None:
    store = limited_store(max_checkpoint_bytes=500)
    with pytest.raises(StoreFull):
        store.load_or_compute("run", "big", lambda: sized(600), timeout=5)
    done = store.load_or_compute("run", "big", lambda: "small", timeout=5)
    assert done.state == "small"


# -- stats ----------------------------------------------------------------------------------


def test_stats_list_the_largest_executions(limited_store: LimitedStore) -> None:
    store = limited_store()
    store.save_many([cp("small", sized(300)), cp("big", sized(2000)), cp("big", sized(2000)),
                     cp("mid", sized(1000))])
    stats = store.stats()
    assert [tuple(row) for row in stats.largest_executions] == [
        ("big", 2, 4000), ("mid", 1, 1000), ("small", 1, 300)]
    assert stats.server_peak_rss >= stats.server_rss > 0
    text = str(stats)
    assert "largest executions: big" in text and "rejections 0" in text
    assert stats.to_dict()["largest_executions"][0][0] == "big"


# -- the Limits value -----------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    {"max_bytes": -1}, {"max_checkpoints": 0}, {"max_per_execution": True},
    {"max_checkpoint_bytes": 1.5}, {"max_rss": "1G"}, {"on_full": "drop"},
])
def test_bad_limits_are_a_config_error(fields: dict[str, Any]) -> None:
    name = next(iter(fields))
    with pytest.raises(ConfigError, match=f"Limits.{name}"):
        Limits(**fields)


def test_limits_round_trip_through_a_dict() -> None:
    limits = Limits(max_bytes=10, max_per_execution=2, on_full="evict")
    assert Limits.from_dict(limits.to_dict()) == limits
    assert Limits.coerce(None) == Limits()
    with pytest.raises(ConfigError, match="unknown limit"):
        Limits.from_dict({"max_byte": 1})
    with pytest.raises(ConfigError):
        Limits.coerce(42)  # type: ignore[arg-type]


# -- states of any size the limits allow ----------------------------------------------------

MiB = 2**20


def big_state(nbytes: int) -> bytes:
    """A state of ``nbytes`` that is not all one byte (so a truncation would show)."""
    return bytes(range(256)) * (nbytes // 256)


def another_client(store: BaseStore) -> BaseStore:
    """A second client of the same store with the default codec and no limits of its own."""
    if isinstance(store, shmstore.SharedStore):
        return shmstore.connect(store.url, authkey=store._authkey, timeout=30.0)
    if isinstance(store, shmstore.RedisStore):
        assert store.url is not None
        return shmstore.RedisStore(store.url, prefix=store.prefix, timeout=30.0)
    store.codec = MsgpackCodec()  # in-process there is no other client: drop the codec's bound
    return store


@pytest.mark.timeout(300)
def test_a_state_over_the_default_limit_is_store_full_before_sending(
    limited_store: LimitedStore,
) -> None:
    store = limited_store()
    sent = store.stats().ops
    size = 64 * MiB + 1024
    with pytest.raises(StoreFull, match=r"max_checkpoint_bytes=67108864.*nothing was sent") \
            as info:
        store.save(cp(state=big_state(size)))
    assert (info.value.limit, info.value.maximum) == ("max_checkpoint_bytes", 64 * MiB)
    assert info.value.current > 64 * MiB
    ops = store.stats().ops
    assert (ops["save"], ops["save_many"]) == (sent["save"], sent["save_many"])
    assert store.stats().checkpoints == 0


@pytest.mark.timeout(300)
def test_a_raised_limit_stores_a_100_mib_state_on_every_backend(
    limited_store: LimitedStore,
) -> None:
    store = limited_store(max_checkpoint_bytes=256 * MiB)
    state = big_state(96 * MiB)
    saved = store.save(cp(state=state, metadata={"kind": "big"}))
    assert store.load(saved.id).state == state
    assert store.stats().payload_bytes > 96 * MiB
    store.clear("run")


@pytest.mark.timeout(300)
def test_a_default_client_reads_a_record_stored_under_a_raised_limit(
    limited_store: LimitedStore,
) -> None:
    writer = limited_store(max_checkpoint_bytes=256 * MiB)
    # The writer's codec allows as much as the store, so that before the fix too the save
    # succeeded and only the default clients' reads failed.
    writer.codec = MsgpackCodec(max_bytes=256 * MiB)
    state = big_state(90 * MiB)
    writer.save(cp(state="small"))
    big = writer.save(cp(state=state))
    reader = another_client(writer)
    try:
        assert reader.codec.max_bytes == 64 * MiB  # the default codec: it raised no limit
        assert [c.version for c in reader.list("run")] == [1, 2]
        latest = reader.latest("run")
        assert latest is not None and latest.id == big.id and latest.state == state
        del latest
        assert reader.load(big.id).state == state
        if isinstance(writer, shmstore.RedisStore):
            # Redis limits belong to the data set: a store made with lower ones rewrites
            # them, and the record saved under the higher one must still be readable.
            assert writer.url is not None
            with shmstore.RedisStore(writer.url, prefix=writer.prefix, limits=Limits(),
                                     timeout=30.0) as lowered:
                assert lowered.limits().max_checkpoint_bytes == 64 * MiB
                assert [len(c.state) for c in lowered.list("run")] == [5, len(state)]
    finally:
        if reader is not writer:
            reader.close()
    writer.clear("run")


@pytest.mark.timeout(300)
def test_no_checkpoint_limit_means_none_in_the_client(limited_store: LimitedStore) -> None:
    store = limited_store(max_checkpoint_bytes=None)
    assert store.limits().max_checkpoint_bytes is None
    state = big_state(65 * MiB)  # just over the codec's standalone 64 MiB
    saved = store.save(cp(state=state))
    assert store.load(saved.id).state == state
    store.clear("run")


def test_an_explicit_codec_bound_is_stricter_than_the_store(limited_store: LimitedStore) -> None:
    store = limited_store(max_checkpoint_bytes=10_000)
    store.codec = MsgpackCodec(max_bytes=1000)  # this client keeps its own bound
    sent = store.stats().ops["save"]
    with pytest.raises(EncodeError, match=r"over the codec's limit of 1000 bytes"):
        store.save(cp(state=sized(2000)))
    assert store.stats().ops["save"] == sent
    store.codec = MsgpackCodec()
    big = store.save(cp(state=sized(2000)))
    store.codec = MsgpackCodec(max_bytes=1000)
    with pytest.raises(DecodeError, match=r"over the codec's limit of 1000 bytes"):
        store.load(big.id)
    store.codec = MsgpackCodec(max_bytes=100_000)  # a looser codec never raises the store's
    with pytest.raises(StoreFull, match="max_checkpoint_bytes=10000"):
        store.save(cp(state=sized(20_000)))


@pytest.mark.timeout(300)
# Only Redis limits change while clients run (they belong to the data set).
@pytest.mark.parametrize("limited_store", ["redis"], indirect=True)
def test_a_client_follows_a_limit_another_client_raised(limited_store: LimitedStore) -> None:
    store = limited_store()
    assert isinstance(store, shmstore.RedisStore)
    store.save(cp(state="small"))  # it has asked the store its limits: 64 MiB
    assert store.url is not None
    shmstore.RedisStore(store.url, prefix=store.prefix,
                        limits=Limits(max_checkpoint_bytes=256 * MiB)).close()
    state = big_state(70 * MiB)
    saved = store.save(cp(state=state))
    assert store.load(saved.id).state == state
    store.clear("run")
