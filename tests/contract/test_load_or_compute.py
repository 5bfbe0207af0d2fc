"""The "compute once" contract: ``load_or_compute`` on every backend (fixture ``store``).

Callers compete as threads on a `MemoryStore` and as spawned processes on a
`SharedStore`; each call of a computation appends a line to a file, so "exactly once"
is counted, not assumed.  A lease held by nobody alive is made with the table op itself
(``claim`` with an owner that never renews), which is what a dead process leaves behind.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import shmstore
from shmstore import (
    BaseStore,
    Checkpoint,
    ConfigError,
    EncodeError,
    SharedStore,
    StoreTimeout,
)
from tests.helpers import SPAWN, reaped, run_all, wait_until

GHOST = "ghost:1:1"  # an owner that claims and then never renews: a dead process


@pytest.fixture
def ghost(store: BaseStore) -> Iterator[Callable[..., str]]:
    """Take a lease as a dead process would leave it; released after the test.

    The shared backend's server outlives a test: a lease left there would stall the next.
    """
    taken: list[tuple[str, str, str]] = []

    def claim(execution: str = "run", node: str = "n", lease: float = 30.0) -> str:
        kind, token = store._backend.claim(execution, node, GHOST, lease, 0.0)
        assert kind == "granted"
        taken.append((execution, node, token))
        return str(token)

    yield claim
    for execution, node, token in taken:
        store._backend.release(execution, node, token)


def cp(execution: str = "run", node: str = "n", state: object = None) -> Checkpoint:
    return Checkpoint(execution_id=execution, node_name=node, state=state)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def ops(store: BaseStore) -> dict[str, int]:
    return store.stats().ops


def _compete(store: BaseStore, counter: str, results: str, hold_s: float) -> None:
    """One caller: compute (counted, slowly) or wait; record what it got."""
    me = f"{os.getpid()}-{threading.get_ident()}"

    def compute() -> dict[str, Any]:
        with open(counter, "a") as fh:
            fh.write(me + "\n")
        time.sleep(hold_s)
        return {"by": me, "rows": list(range(5))}

    got = store.load_or_compute("shared-run", "expensive", compute, timeout=60)
    with open(results, "a") as fh:
        fh.write(json.dumps([got.id, got.version, got.state]) + "\n")


def run_callers(store: BaseStore, n: int, tmp_path: Path, hold_s: float) -> list[list[Any]]:
    """Run ``n`` competing callers: spawned processes for a shared store, else threads."""
    counter, results = str(tmp_path / "computed"), str(tmp_path / "results")
    args = (counter, results, hold_s)
    if isinstance(store, SharedStore):
        assert run_all(_compete, [(store, *args) for _ in range(n)], timeout=60) == [0] * n
    else:
        threads = [threading.Thread(target=_compete, args=(store, *args)) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
    return [json.loads(line) for line in lines(tmp_path / "results")]


# -- computing once ----------------------------------------------------------------------


def test_computes_saves_as_the_nodes_latest_and_then_only_loads(store: BaseStore) -> None:
    calls: list[int] = []

    def compute() -> dict[str, int]:
        calls.append(1)
        return {"answer": 42}

    first = store.load_or_compute("run", "stage", compute)
    again = store.load_or_compute("run", "stage", compute)
    assert calls == [1]
    assert (first.execution_id, first.node_name, first.version, first.state) == (
        "run", "stage", 1, {"answer": 42})
    assert again == first
    assert store.latest("run") == first
    assert store.stats().checkpoints == 1


def test_an_existing_checkpoint_of_the_node_is_loaded_the_latest_one(store: BaseStore) -> None:
    store.save(cp("run", "stage", "old"))
    newer = store.save(cp("run", "stage", "new"))
    store.save(cp("run", "other", "not this node"))

    got = store.load_or_compute("run", "stage", lambda: pytest.fail("must not compute"))
    assert got == newer
    computed = store.load_or_compute("run", "fresh", lambda: "made")
    assert (computed.state, computed.version) == ("made", 4)
    assert store.load_or_compute("run2", "stage", lambda: "other run").state == "other run"


def test_the_result_is_a_snapshot(store: BaseStore) -> None:
    made: list[Any] = []

    def compute() -> list[Any]:
        made.append([1, (2, 3)])
        return made[0]

    got = store.load_or_compute("run", "n", compute)
    made[0].append("changed later")
    assert got.state == [1, (2, 3)] and got.state is not made[0]
    assert store.load_or_compute("run", "n", compute).state == [1, (2, 3)]


def test_concurrent_callers_compute_once_and_all_get_the_same_checkpoint(
    store: BaseStore, tmp_path: Path,
) -> None:
    results = run_callers(store, 4, tmp_path, hold_s=0.5)
    computed_by = lines(tmp_path / "computed")
    assert len(computed_by) == 1
    assert len(results) == 4
    assert {json.dumps(r) for r in results} == {json.dumps(results[0])}
    cid, version, state = results[0]
    assert version == 1 and state == {"by": computed_by[0], "rows": [0, 1, 2, 3, 4]}
    assert store.latest("shared-run").id == cid  # type: ignore[union-attr]


# -- waiting, leases, hand-over ------------------------------------------------------------


def test_a_waiter_sleeps_in_the_store_until_a_dead_owners_lease_expires(
    store: BaseStore, ghost: Callable[..., str],
) -> None:
    ghost(lease=0.5)
    claims_before = ops(store)["claim"]
    started = time.monotonic()
    got = store.load_or_compute("run", "n", lambda: "took over", timeout=10)
    waited = time.monotonic() - started
    assert got.state == "took over"
    assert 0.4 <= waited < 5.0
    # One claim call: it slept on the server until the lease expired, then took it.
    assert ops(store)["claim"] - claims_before == 1


def test_long_waits_are_sliced_into_short_server_waits(
    store: BaseStore, ghost: Callable[..., str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store, "wait_slice", 0.1)
    ghost(lease=0.45)
    claims_before = ops(store)["claim"]
    assert store.load_or_compute("run", "n", lambda: "late").state == "late"
    assert ops(store)["claim"] - claims_before >= 4


def test_a_checkpoint_saved_meanwhile_wakes_the_waiter(
    store: BaseStore, ghost: Callable[..., str],
) -> None:
    ghost()
    saver = threading.Timer(0.3, lambda: store.save(cp("run", "n", "saved by hand")))
    saver.start()
    started = time.monotonic()
    got = store.load_or_compute("run", "n", lambda: pytest.fail("must not compute"), timeout=10)
    saver.join(10)  # its answer may come after the waiter's: the store must outlive it
    assert got.state == "saved by hand"
    assert time.monotonic() - started < 5.0  # woken, not left to the 30 s lease


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt()])
def test_a_failing_computation_raises_there_and_a_waiter_takes_over(
    store: BaseStore, error: BaseException,
) -> None:
    started, fail = threading.Event(), threading.Event()
    outcome: list[Any] = []

    def failing() -> None:
        started.set()
        assert fail.wait(10)
        raise error

    def owner() -> None:
        try:
            store.load_or_compute("run", "n", failing, lease=30)
        except BaseException as exc:  # KeyboardInterrupt included: it is the point
            outcome.append(exc)

    first = threading.Thread(target=owner)
    first.start()
    assert started.wait(10)
    claims = ops(store)["claim"]
    waiter_got: list[Checkpoint] = []
    waiter = threading.Thread(
        target=lambda: waiter_got.append(store.load_or_compute("run", "n", lambda: "second",
                                                               timeout=20)))
    waiter.start()
    assert wait_until(lambda: ops(store)["claim"] > claims, 10)
    time.sleep(0.2)
    assert waiter.is_alive() and not waiter_got  # really waiting for the owner
    handed_over = time.monotonic()
    fail.set()
    first.join(10)
    waiter.join(10)
    assert outcome == [error]
    assert [c.state for c in waiter_got] == ["second"]
    assert time.monotonic() - handed_over < 5.0  # released at once, not after the 30 s lease


def test_an_unencodable_result_raises_encode_error_and_releases_the_lease(
    store: BaseStore,
) -> None:
    with pytest.raises(EncodeError):
        store.load_or_compute("run", "n", lambda: {"bad": object()}, lease=30)
    assert store.stats().checkpoints == 0
    # No lease left behind: timeout=0 does not wait, and nobody holds the node.
    assert store.load_or_compute("run", "n", lambda: "ok", timeout=0).state == "ok"


def test_a_long_computation_keeps_its_lease_by_renewing_it(store: BaseStore) -> None:
    calls: list[str] = []

    def slow() -> str:
        calls.append("slow")
        time.sleep(1.0)  # more than three leases
        return "slow result"

    owner = threading.Thread(target=lambda: store.load_or_compute("run", "n", slow, lease=0.3))
    owner.start()
    assert wait_until(lambda: bool(calls), 10)
    got = store.load_or_compute("run", "n", lambda: calls.append("stolen") or "stolen",
                                lease=0.3, timeout=10)
    owner.join(10)
    assert calls == ["slow"]
    assert got.state == "slow result"
    assert ops(store)["renew"] >= 2


def test_timeout_raises_store_timeout_naming_who_computes(
    store: BaseStore, ghost: Callable[..., str],
) -> None:
    ghost()
    started = time.monotonic()
    with pytest.raises(StoreTimeout) as info:
        store.load_or_compute("run", "n", lambda: "never", timeout=0.3)
    assert 0.25 <= time.monotonic() - started < 5.0
    assert info.value.timeout == 0.3 and GHOST in str(info.value)
    with pytest.raises(StoreTimeout):
        store.load_or_compute("run", "n", lambda: "never", timeout=0)


def test_a_call_from_inside_its_own_computation_is_refused(store: BaseStore) -> None:
    def recursive() -> object:
        return store.load_or_compute("run", "n", lambda: "inner", timeout=5)

    started = time.monotonic()
    with pytest.raises(ConfigError, match="inside its own compute"):
        store.load_or_compute("run", "n", recursive)
    assert time.monotonic() - started < 2.0
    assert store.load_or_compute("run", "n", lambda: "fine", timeout=0).state == "fine"


def test_bad_arguments_raise_config_error_before_anything_is_sent(store: BaseStore) -> None:
    before = ops(store)
    bad: list[dict[str, Any]] = [
        {"execution_id": ""},
        {"execution_id": 3},
        {"node_name": None},
        {"compute": "not callable"},
        {"timeout": -1},
        {"lease": 0},
        {"lease": float("inf")},
        {"lease": True},
    ]
    for override in bad:
        kwargs: dict[str, Any] = {"execution_id": "run", "node_name": "n",
                                  "compute": lambda: 1, **override}
        with pytest.raises(ConfigError):
            store.load_or_compute(kwargs.pop("execution_id"), kwargs.pop("node_name"),
                                  kwargs.pop("compute"), **kwargs)
    after = ops(store)
    assert {op: after[op] - before[op] for op in ("claim", "complete")} == {"claim": 0,
                                                                            "complete": 0}


# -- the table ops under it -----------------------------------------------------------------


def test_claim_renew_release_and_complete_keep_one_result_per_node(store: BaseStore) -> None:
    kind, stale = store._backend.claim("run", "n", "a:1:1", 0.2, 0.0)
    assert kind == "granted"
    assert list(store._backend.claim("run", "n", "b:2:2", 30.0, 0.0)) == ["busy", "a:1:1"]
    assert list(store._backend.claim("run", "n", "a:1:1", 30.0, 0.0)) == ["held", "a:1:1"]
    time.sleep(0.3)  # a's lease expires: b takes the node over
    kind, fresh = store._backend.claim("run", "n", "b:2:2", 30.0, 0.0)
    assert kind == "granted" and fresh != stale
    assert store._backend.renew("run", "n", stale, 30.0) is False
    assert store._backend.renew("run", "n", fresh, 30.0) is True
    # a completes late, but first: its record is the node's one and only.
    record = store._record(cp("run", "n", "from a"))
    kind, version = store._backend.complete(record, stale)
    assert (kind, version) == ("saved", 1)
    record_b = store._record(cp("run", "n", "from b"))
    kind, existing = store._backend.complete(record_b, fresh)
    assert kind == "done" and existing.id == record.id
    assert [c.state for c in store.list("run")] == ["from a"]
    assert store._backend.release("run", "n", fresh) is False  # complete released it


def _die_while_computing(store: SharedStore, counter: str) -> None:
    def compute() -> None:
        with open(counter, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        os._exit(3)  # a crash: no release, no exception handler runs

    store.load_or_compute("shared-run", "expensive", compute, lease=0.5)


def test_a_dead_computing_process_is_replaced_after_its_lease(
    shared_server: shmstore.StoreServer, tmp_path: Path,
) -> None:
    store = shared_server.connect(timeout=10.0)
    store.clear("shared-run")
    counter = tmp_path / "computed"
    dying = SPAWN.Process(target=_die_while_computing, args=(store, str(counter)))
    with reaped(dying, timeout=30):
        assert wait_until(lambda: bool(lines(counter)), 30)
        dying.join(10)
    assert dying.exitcode == 3
    started = time.monotonic()
    got = store.load_or_compute("shared-run", "expensive", lambda: "survivor", timeout=10)
    assert got.state == "survivor"
    assert time.monotonic() - started < 5.0
    assert len(lines(counter)) == 1
    store.clear("shared-run")
    store.close()


def test_a_server_side_wait_longer_than_the_call_timeout_is_not_a_timeout(
    shared_server: shmstore.StoreServer,
) -> None:
    store = shared_server.connect(timeout=0.5)  # a claim may block longer than any call
    store.clear("short-calls")
    kind, token = store._backend.claim("short-calls", "n", GHOST, 1.5, 0.0)
    assert kind == "granted"
    try:
        got = store.load_or_compute("short-calls", "n", lambda: "after the lease", timeout=10)
        assert got.state == "after the lease"
    finally:
        store._backend.release("short-calls", "n", token)
        store.clear("short-calls")
        store.close()
