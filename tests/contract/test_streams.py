"""Streams on every backend: ``list(after_version=)`` and ``follow()``.

Runs through the ``store`` fixture.  A follower in a thread signals that it is blocked
through the store's own op counter (``stats().ops["wait"]``), never by sleeping; most
tests need no thread at all, since ``follow`` is lazy: what is saved between two
``next()`` calls is what the next one finds.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import pytest

from shmstore import BaseStore, Checkpoint, Cleared, ConfigError
from shmstore.core.stream import FOLLOW_BATCH
from tests.helpers import wait_until


def cp(execution: str = "run", state: object = None, **kw: object) -> Checkpoint:
    return Checkpoint(execution_id=execution, node_name="n", state=state, **kw)  # type: ignore[arg-type]


def save(store: BaseStore, n: int, execution: str = "run") -> list[Checkpoint]:
    return store.save_many([cp(execution, state=i) for i in range(n)])


def versions(items: list[Checkpoint | Cleared]) -> list[int | str]:
    return [f"cleared@{i.last_version}" if isinstance(i, Cleared) else i.version
            for i in items]


def take(it: Iterator[Checkpoint | Cleared], n: int) -> list[Checkpoint | Cleared]:
    return [next(it) for _ in range(n)]


# -- list(after_version=) ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_list_after_version_alone_and_with_the_other_bounds(store: BaseStore) -> None:
    save(store, 8)

    def got(**kw: object) -> list[int]:
        return [c.version for c in store.list("run", **kw)]  # type: ignore[arg-type]

    assert got(after_version=5) == [6, 7, 8]
    assert got(after_version=0) == list(range(1, 9))
    assert got(after_version=8) == []
    assert got(after_version=100) == []
    # With limit, oldest first: the oldest `limit` above it (a reader's next page).
    assert got(after_version=2, limit=3) == [3, 4, 5]
    assert got(after_version=2, limit=3, newest_first=True) == [8, 7, 6]
    assert got(after_version=2, before_version=6) == [3, 4, 5]
    assert got(after_version=2, before_version=6, limit=2) == [3, 4]
    assert got(after_version=2, before_version=6, newest_first=True) == [5, 4, 3]
    assert got(after_version=2, before_version=6, newest_first=True, limit=2) == [5, 4]
    assert got(after_version=5, before_version=6) == []
    assert got(after_version=6, before_version=3) == []
    assert got(after_version=2, limit=0) == []
    assert store.list("nobody", after_version=3) == []


@pytest.mark.timeout(60)
def test_list_after_version_skips_deleted_and_re_saved_versions(store: BaseStore) -> None:
    cps = save(store, 6)
    store.delete(cps[3].id)                         # version 4 gone
    store.save(cp(state="again", id=cps[1].id))     # version 2 becomes 7
    store.delete(cps[0].id)                         # the oldest gone
    got = store.list("run", after_version=1)
    assert [(c.version, c.state) for c in got] == [(3, 2), (5, 4), (6, 5), (7, "again")]
    assert [c.version for c in store.list("run", after_version=3, limit=2)] == [5, 6]
    # Below the oldest stored version: from the oldest.
    assert [c.version for c in store.list("run", after_version=0, limit=2)] == [3, 5]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_a_bad_after_version_is_a_config_error(store: BaseStore, bad: object) -> None:
    with pytest.raises(ConfigError, match="after_version"):
        store.list("run", after_version=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="after_version"):
        store.follow("run", after_version=bad)  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_follow_checks_its_arguments_when_called(store: BaseStore) -> None:
    with pytest.raises(ConfigError):
        store.follow("")
    with pytest.raises(ConfigError, match="timeout"):
        store.follow("run", timeout=-1)
    with pytest.raises(ConfigError, match="timeout"):
        store.follow("run", timeout=float("nan"))


# -- follow ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_follow_yields_the_backlog_then_each_new_save_in_order(store: BaseStore) -> None:
    save(store, 3)
    it = store.follow("run", timeout=10)
    assert [(c.version, c.state) for c in take(it, 3)] == [(1, 0), (2, 1), (3, 2)]  # type: ignore[union-attr]
    store.save(cp(state="four"))
    four = next(it)
    assert isinstance(four, Checkpoint) and (four.version, four.state) == (4, "four")
    save(store, 2)
    assert versions(take(it, 2)) == [5, 6]


@pytest.mark.timeout(60)
def test_a_long_backlog_comes_in_pages(store: BaseStore) -> None:
    n = FOLLOW_BATCH * 2 + 10
    save(store, n)
    lists = store.stats().ops.get("list", 0)
    got = take(store.follow("run", timeout=10), n)
    assert versions(got) == list(range(1, n + 1))
    assert [c.state for c in got] == list(range(n))  # type: ignore[union-attr]
    assert store.stats().ops.get("list", 0) - lists == 3  # pages of FOLLOW_BATCH


@pytest.mark.timeout(60)
def test_follow_resumes_exactly_after_the_last_one_seen(store: BaseStore) -> None:
    save(store, 5)
    first = take(store.follow("run", timeout=10), 3)
    last = first[-1]
    assert isinstance(last, Checkpoint)
    save(store, 2)
    rest = list(store.follow("run", after_version=last.version, timeout=0))
    assert versions(rest) == [4, 5, 6, 7]


@pytest.mark.timeout(60)
def test_follow_ends_when_its_timeout_runs_out(store: BaseStore) -> None:
    assert list(store.follow("run", timeout=0)) == []
    assert list(store.follow("run", timeout=0.2)) == []
    save(store, 2)
    assert versions(list(store.follow("run", timeout=0))) == [1, 2]
    assert list(store.follow("run", after_version=2, timeout=0.2)) == []


@pytest.mark.timeout(60)
def test_a_clear_is_reported_then_the_new_generation_is_followed(store: BaseStore) -> None:
    save(store, 3)
    it = store.follow("run", timeout=10)
    assert versions(take(it, 3)) == [1, 2, 3]
    assert store.clear("run") == 3
    save(store, 2)
    items = take(it, 3)
    assert items[0] == Cleared("run", 3)
    assert [(c.version, c.state) for c in items[1:]] == [(1, 0), (2, 1)]  # type: ignore[union-attr]
    # And the follower goes on in the new generation.
    store.save(cp(state="three"))
    assert versions([next(it)]) == [3]


@pytest.mark.timeout(60)
def test_a_clear_with_one_save_after_it_is_reported(store: BaseStore) -> None:
    # The new generation's first checkpoint is the next version after 0: no list needed.
    save(store, 2)
    it = store.follow("run", timeout=10)
    take(it, 2)
    store.clear("run")
    saved = store.save(cp(state="fresh"))
    cleared, fresh = take(it, 2)
    assert cleared == Cleared("run", 2)
    assert isinstance(fresh, Checkpoint) and fresh.id == saved.id


@pytest.mark.timeout(60)
def test_emptying_by_delete_is_a_clear_too(store: BaseStore) -> None:
    [only] = save(store, 1)
    it = store.follow("run", timeout=10)
    take(it, 1)
    store.delete(only.id)
    save(store, 1)
    assert versions(take(it, 2)) == ["cleared@1", 1]


@pytest.mark.timeout(60)
def test_a_resumed_follow_starts_in_the_generation_it_finds(store: BaseStore) -> None:
    save(store, 4)
    it = store.follow("run", after_version=4, timeout=10)
    store.clear("run")   # before the first next(): the follower has not looked yet
    save(store, 5)
    # The execution is not empty when it starts: a version says no generation, so it
    # goes on above 4 in the one it finds (the documented limit of a resume).
    assert versions(take(it, 1)) == [5]


@pytest.mark.timeout(60)
def test_a_resumed_follow_on_an_emptied_execution_reports_the_clear(store: BaseStore) -> None:
    save(store, 5)
    store.clear("run")
    assert list(store.follow("run", after_version=5, timeout=0)) == []
    # Empty when it starts: whatever comes is a new run, reported at its first save.
    items = _first_after_save(store, store.follow("run", after_version=5, timeout=10))
    assert versions(items) == ["cleared@5", 1]


def _first_after_save(store: BaseStore,
                      it: Iterator[Checkpoint | Cleared]) -> list[Checkpoint | Cleared]:
    """Start ``it`` in a thread (blocked once the store counts its wait), save one
    checkpoint, return the first two items."""
    got: queue.Queue[Checkpoint | Cleared | BaseException] = queue.Queue()

    def run() -> None:
        try:
            for item in it:
                got.put(item)
        except BaseException as exc:  # reported below
            got.put(exc)

    before = store.stats().ops.get("wait", 0)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert wait_until(lambda: store.stats().ops.get("wait", 0) >= before + 2, 20)
    store.save(cp(state="new"))
    items = [got.get(timeout=20), got.get(timeout=20)]
    assert not any(isinstance(i, BaseException) for i in items), items
    store.close()  # ends the follower
    thread.join(20)
    assert not thread.is_alive()
    return items  # type: ignore[return-value]


@pytest.mark.timeout(60)
def test_a_checkpoint_deleted_before_it_was_read_is_skipped(store: BaseStore) -> None:
    cps = save(store, 5)
    store.delete(cps[1].id)
    store.delete(cps[3].id)
    it = store.follow("run", timeout=10)
    assert versions(take(it, 3)) == [1, 3, 5]
    more = save(store, 3)  # 6, 7, 8
    store.delete(more[0].id)
    store.delete(more[2].id)   # the latest, too
    store.save(cp(state="nine"))
    assert versions(take(it, 2)) == [7, 9]


@pytest.mark.timeout(60)
def test_a_writer_thread_and_a_follower_see_every_checkpoint_in_order(store: BaseStore) -> None:
    n = 60
    writer_done = threading.Event()

    def write() -> None:
        try:
            for i in range(n):
                store.save(cp(state=i))
        finally:
            writer_done.set()

    got: list[Checkpoint | Cleared] = []
    writer = threading.Thread(target=write, daemon=True)
    it = store.follow("run", timeout=20)
    writer.start()
    for item in it:
        got.append(item)
        if len(got) == n:
            break
    writer.join(20)
    assert writer_done.is_set()
    assert versions(got) == list(range(1, n + 1))
    assert [c.state for c in got] == list(range(n))  # type: ignore[union-attr]


@pytest.mark.timeout(60)
def test_a_follower_blocked_across_a_clear_reports_it(store: BaseStore) -> None:
    save(store, 2)
    got: queue.Queue[Checkpoint | Cleared | BaseException] = queue.Queue()
    it = store.follow("run", timeout=20)

    def run() -> None:
        try:
            for item in it:
                got.put(item)
        except BaseException as exc:  # reported below
            got.put(exc)

    thread = threading.Thread(target=run, daemon=True)
    before = store.stats().ops.get("wait", 0)
    thread.start()
    assert versions([got.get(timeout=20), got.get(timeout=20)]) == [1, 2]  # type: ignore[list-item]
    # Blocked now: its probe and its first wait were counted.
    assert wait_until(lambda: store.stats().ops.get("wait", 0) >= before + 2, 20)
    store.clear("run")
    save(store, 3)
    items = [got.get(timeout=20) for _ in range(4)]
    assert versions(items) == ["cleared@2", 1, 2, 3]  # type: ignore[arg-type]
    store.close()
    thread.join(20)
    assert not thread.is_alive()


@pytest.mark.timeout(60)
def test_close_from_another_thread_ends_a_blocked_follow_at_once(
    store: BaseStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One slice far longer than the test: only a woken wait ends in time.
    monkeypatch.setattr(store, "wait_slice", 600.0)
    ended = threading.Event()
    got: list[object] = []

    def run() -> None:
        try:
            got.extend(store.follow("run"))
        except BaseException as exc:  # reported below
            got.append(exc)
        finally:
            ended.set()

    before = store.stats().ops.get("wait", 0)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert wait_until(lambda: store.stats().ops.get("wait", 0) >= before + 2, 20)
    store.close()
    assert ended.wait(30), "close() did not end the blocked follow"
    thread.join(5)
    assert got == []  # it simply ended: no exception, nothing yielded
    # A follow started on a closed store ends at once too.
    assert list(store.follow("run")) == []
