"""Versions mean one thing on every backend: re-saves, clears, and waiters across a clear.

Runs on every backend through the ``store`` fixture.  Waiters signal that they are blocked
through the store's own op counter (``stats().ops["wait"]``), never by sleeping.
"""

from __future__ import annotations

import threading

import pytest

from shmstore import BaseStore, Checkpoint, StoreTimeout, VersionConflict
from tests.helpers import wait_until


def cp(execution: str = "run", node: str = "n", state: object = None, **kw: object) -> Checkpoint:
    return Checkpoint(execution_id=execution, node_name=node, state=state, **kw)  # type: ignore[arg-type]


class Waiter(threading.Thread):
    """``store.wait(...)`` in a thread; ``got`` is its checkpoint or its exception."""

    def __init__(self, store: BaseStore, execution: str, after: int, timeout: float) -> None:
        super().__init__(daemon=True)
        self.store, self.execution, self.after, self.timeout = store, execution, after, timeout
        self.got: Checkpoint | BaseException | None = None

    def run(self) -> None:
        try:
            self.got = self.store.wait(self.execution, after_version=self.after,
                                       timeout=self.timeout)
        except BaseException as exc:  # reported by the test
            self.got = exc


def start_waiter(store: BaseStore, execution: str, after: int, timeout: float = 30.0) -> Waiter:
    """Start a waiter and return once the store has counted its wait (it is blocked)."""
    before = store.stats().ops.get("wait", 0)
    waiter = Waiter(store, execution, after, timeout)
    waiter.start()
    assert wait_until(lambda: store.stats().ops.get("wait", 0) > before, 20)
    return waiter


# -- 1. a re-save gets a version above every version its execution has had -------------


@pytest.mark.timeout(60)
def test_re_saving_the_only_checkpoint_gets_a_new_version(store: BaseStore) -> None:
    first = store.save(cp(state="old"))
    again = store.save(cp(state="new", id=first.id))
    assert (first.version, again.version) == (1, 2)
    assert store.latest("run").state == "new"  # type: ignore[union-attr]
    assert store.wait("run", after_version=1, timeout=5).state == "new"


@pytest.mark.timeout(60)
def test_re_saving_the_latest_gets_a_new_version_on_every_write_path(store: BaseStore) -> None:
    a = store.save(cp(state="a"))
    b = store.save(cp(state="b"))
    assert store.save(cp(state="b2", id=b.id)).version == 3
    [again] = store.save_many([cp(state="b3", id=b.id)])
    assert again.version == 4
    # The only checkpoint left, re-saved in a batch and alone.
    store.delete(a.id)
    [alone] = store.save_many([cp(state="b4", id=b.id)])
    assert alone.version == 5
    assert [(c.version, c.state) for c in store.list("run")] == [(5, "b4")]


@pytest.mark.timeout(60)
def test_a_waiter_sees_the_re_save_of_the_latest(store: BaseStore) -> None:
    first = store.save(cp(state="old"))
    waiter = start_waiter(store, "run", after=1)
    store.save(cp(state="new", id=first.id))
    waiter.join(30)
    assert isinstance(waiter.got, Checkpoint), waiter.got
    assert (waiter.got.version, waiter.got.state) == (2, "new")


@pytest.mark.timeout(60)
def test_expected_version_of_a_re_save_compares_with_the_latest(store: BaseStore) -> None:
    first = store.save(cp(state="old"))
    with pytest.raises(VersionConflict) as info:
        store.save(cp(state="new", id=first.id), expected_version=0)
    assert info.value.actual == 1
    assert store.save(cp(state="new", id=first.id), expected_version=1).version == 2
    assert store.latest("run").version == 2  # type: ignore[union-attr]


# -- 2. clear restarts at 1; a waiter blocked across a clear wakes at the next save -----


@pytest.mark.timeout(60)
def test_clear_restarts_at_version_1_while_someone_waits(store: BaseStore) -> None:
    for i in range(5):
        store.save(cp(state=i))
    waiter = start_waiter(store, "run", after=5)
    assert store.clear("run") == 5
    saved = store.save(cp(state="after clear"))
    assert saved.version == 1
    waiter.join(30)
    assert isinstance(waiter.got, Checkpoint), waiter.got
    assert (waiter.got.id, waiter.got.version, waiter.got.state) == (saved.id, 1, "after clear")


@pytest.mark.timeout(60)
def test_a_waiter_from_before_a_clear_wakes_across_wait_slices(
    store: BaseStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store, "wait_slice", 0.2)
    for i in range(3):
        store.save(cp(state=i))
    waiter = start_waiter(store, "run", after=3)
    store.clear("run")
    # Let the wait run through further slices while the execution is empty.
    calls = store.stats().ops.get("wait", 0)
    assert wait_until(lambda: store.stats().ops.get("wait", 0) >= calls + 2, 20)
    assert waiter.is_alive()
    saved = store.save(cp(state="fresh"))
    waiter.join(30)
    assert isinstance(waiter.got, Checkpoint), waiter.got
    assert (waiter.got.id, waiter.got.version) == (saved.id, 1)


@pytest.mark.timeout(60)
def test_deleting_the_last_checkpoint_restarts_and_wakes_an_earlier_waiter(
    store: BaseStore,
) -> None:
    only = store.save(cp(state="only"))
    store.save(cp(state="x", id=only.id))  # version 2
    waiter = start_waiter(store, "run", after=2)
    assert store.delete(only.id)
    saved = store.save(cp(state="restarted"))
    assert saved.version == 1
    waiter.join(30)
    assert isinstance(waiter.got, Checkpoint), waiter.got
    assert waiter.got.id == saved.id


@pytest.mark.timeout(60)
def test_a_waiter_that_starts_after_the_clear_waits_for_its_version(store: BaseStore) -> None:
    for i in range(3):
        store.save(cp(state=i))
    store.clear("run")
    store.save(cp(state="v1"))
    with pytest.raises(StoreTimeout):
        store.wait("run", after_version=3, timeout=0.3)
    assert store.wait("run", after_version=0, timeout=5).version == 1


# -- find(by_id=True): id order, not save order (LangGraph's savers order so) --------------


@pytest.mark.timeout(60)
def test_find_by_id_orders_greatest_id_first_with_limit_and_before(store: BaseStore) -> None:
    for cid in ["run#b", "run#d", "run#a", "run#c"]:
        store.save(cp(id=cid, state=cid))

    def ids(**kw: object) -> list[str]:
        return [c.id for c, _ in store.find("run", **kw)]  # type: ignore[arg-type]

    assert ids() == ["run#c", "run#a", "run#d", "run#b"]  # by version
    assert ids(by_id=True) == ["run#d", "run#c", "run#b", "run#a"]
    assert ids(by_id=True, limit=1) == ["run#d"]
    assert ids(by_id=True, before_id="run#d", limit=2) == ["run#c", "run#b"]
