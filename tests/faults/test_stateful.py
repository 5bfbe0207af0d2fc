"""A hypothesis state machine drives a shared store and a plain model side by side.

Every step runs in this process or in a second (spawned) process, chosen at random, on
one server: save (with and without ``expected_version``), save_many, load, list (limit,
before_version, newest_first), latest, delete, clear and executions.  After every step
the whole store must equal the model.  The model is a few dicts, written from the
contract: versions are the execution's high-water mark + 1; re-saving an id replaces
its record with a new version (also the only one: that is no emptying); an execution
left empty is forgotten (its versions start again at 1).
"""

from __future__ import annotations

import multiprocessing.connection
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

import shmstore
from shmstore import Checkpoint, CheckpointNotFound, SharedStore, VersionConflict

from ..helpers import SPAWN, reaped

IDS = ["a", "b", "c", "d", "e", "f"]
EXECUTIONS = ["x", "y", "z"]
states = st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=8),
                   st.lists(st.integers(0, 9), max_size=3), st.binary(max_size=8))


def _remote(store: SharedStore, conn: multiprocessing.connection.Connection) -> None:
    """Run store calls sent by the test until it sends None."""
    while True:
        request = conn.recv()
        if request is None:
            break
        op, args, kwargs = request
        try:
            conn.send(("ok", getattr(store, op)(*args, **kwargs)))
        except Exception as exc:
            conn.send(("err", exc))
    store.close()


def _view(cp: Checkpoint | None) -> tuple[Any, ...] | None:
    if cp is None:
        return None
    return (cp.id, cp.execution_id, cp.node_name, cp.version, cp.state, cp.metadata)


class Model:
    """What the contract says the store holds."""

    def __init__(self) -> None:
        self.high: dict[str, int] = {}
        self.records: dict[str, dict[int, tuple[Any, ...]]] = {}  # execution -> version -> view
        self.where: dict[str, tuple[str, int]] = {}  # id -> (execution, version)

    def latest_version(self, execution: str) -> int:
        versions = self.records.get(execution)
        return max(versions) if versions else 0

    def _remove(self, cid: str, resave_in: str | None = None) -> None:
        execution, version = self.where.pop(cid)
        del self.records[execution][version]
        if not self.records[execution] and execution != resave_in:
            del self.records[execution]
            del self.high[execution]

    def save(self, cp: Checkpoint) -> int:
        if cp.id in self.where:
            self._remove(cp.id, resave_in=cp.execution_id)
        version = self.high.get(cp.execution_id, 0) + 1
        self.high[cp.execution_id] = version
        self.records.setdefault(cp.execution_id, {})[version] = (
            cp.id, cp.execution_id, cp.node_name, version, cp.state, cp.metadata)
        self.where[cp.id] = (cp.execution_id, version)
        return version

    def load(self, cid: str) -> tuple[Any, ...] | None:
        if cid not in self.where:
            return None
        execution, version = self.where[cid]
        return self.records[execution][version]

    def list(self, execution: str, limit: int | None, before: int | None,
             newest_first: bool) -> list[tuple[Any, ...]]:
        versions = sorted(self.records.get(execution, {}), reverse=newest_first)
        if before is not None:
            versions = [v for v in versions if v < before]
        if limit is not None:
            versions = versions[:limit]
        return [self.records[execution][v] for v in versions]

    def delete(self, cid: str) -> bool:
        if cid not in self.where:
            return False
        self._remove(cid)
        return True

    def clear(self, execution: str) -> int:
        ids = [view[0] for view in self.records.get(execution, {}).values()]
        for cid in ids:
            self._remove(cid)
        return len(ids)


class StoreMachine(RuleBasedStateMachine):
    local: SharedStore
    remote: multiprocessing.connection.Connection

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()

    def call(self, where: str, op: str, *args: Any, **kwargs: Any) -> Any:
        if where == "local":
            return getattr(self.local, op)(*args, **kwargs)
        self.remote.send((op, args, kwargs))
        kind, value = self.remote.recv()
        if kind == "err":
            raise value
        return value

    @rule(where=st.sampled_from(["local", "remote"]), cid=st.sampled_from(IDS),
          execution=st.sampled_from(EXECUTIONS), node=st.sampled_from(["", "n1", "n2"]),
          state=states, tagged=st.booleans())
    def save(self, where: str, cid: str, execution: str, node: str, state: Any,
             tagged: bool) -> None:
        cp = Checkpoint(id=cid, execution_id=execution, node_name=node, state=state,
                        metadata={"tag": cid} if tagged else {})
        saved = self.call(where, "save", cp)
        assert saved.version == self.model.save(cp)

    @rule(where=st.sampled_from(["local", "remote"]), cid=st.sampled_from(IDS),
          execution=st.sampled_from(EXECUTIONS), state=states, off_by=st.integers(-2, 2))
    def save_expecting(self, where: str, cid: str, execution: str, state: Any,
                       off_by: int) -> None:
        expected = max(0, self.model.latest_version(execution) + off_by)
        cp = Checkpoint(id=cid, execution_id=execution, state=state)
        if expected != self.model.latest_version(execution):
            with pytest.raises(VersionConflict) as info:
                self.call(where, "save", cp, expected_version=expected)
            assert (info.value.expected, info.value.actual) == (
                expected, self.model.latest_version(execution))
            return
        saved = self.call(where, "save", cp, expected_version=expected)
        assert saved.version == self.model.save(cp)

    @rule(where=st.sampled_from(["local", "remote"]),
          items=st.lists(st.tuples(st.sampled_from(IDS), st.sampled_from(EXECUTIONS), states),
                         max_size=4))
    def save_many(self, where: str, items: list[tuple[str, str, Any]]) -> None:
        cps = [Checkpoint(id=cid, execution_id=ex, state=state) for cid, ex, state in items]
        saved = self.call(where, "save_many", cps)
        assert [cp.version for cp in saved] == [self.model.save(cp) for cp in cps]

    @rule(where=st.sampled_from(["local", "remote"]), cid=st.sampled_from(IDS))
    def load(self, where: str, cid: str) -> None:
        expected = self.model.load(cid)
        if expected is None:
            with pytest.raises(CheckpointNotFound):
                self.call(where, "load", cid)
        else:
            assert _view(self.call(where, "load", cid)) == expected

    @rule(where=st.sampled_from(["local", "remote"]), execution=st.sampled_from(EXECUTIONS),
          limit=st.none() | st.integers(0, 3), before=st.none() | st.integers(0, 6),
          newest_first=st.booleans())
    def list(self, where: str, execution: str, limit: int | None, before: int | None,
             newest_first: bool) -> None:
        got = self.call(where, "list", execution, limit=limit, before_version=before,
                        newest_first=newest_first)
        assert [_view(cp) for cp in got] == self.model.list(execution, limit, before,
                                                            newest_first)

    @rule(where=st.sampled_from(["local", "remote"]), execution=st.sampled_from(EXECUTIONS))
    def latest(self, where: str, execution: str) -> None:
        expected = self.model.list(execution, 1, None, True)
        assert _view(self.call(where, "latest", execution)) == (
            expected[0] if expected else None)

    @rule(where=st.sampled_from(["local", "remote"]), cid=st.sampled_from(IDS))
    def delete(self, where: str, cid: str) -> None:
        assert self.call(where, "delete", cid) is self.model.delete(cid)

    @rule(where=st.sampled_from(["local", "remote"]), execution=st.sampled_from(EXECUTIONS))
    def clear(self, where: str, execution: str) -> None:
        assert self.call(where, "clear", execution) == self.model.clear(execution)

    @invariant()
    def store_equals_model(self) -> None:
        assert self.local.executions() == sorted(self.model.records)
        for execution in EXECUTIONS:
            assert [_view(cp) for cp in self.local.list(execution)] == \
                self.model.list(execution, None, None, False)

    def teardown(self) -> None:
        for execution in self.local.executions():
            self.local.clear(execution)


@pytest.fixture
def machine(server: shmstore.StoreServer) -> Iterator[type[StoreMachine]]:
    parent, child = SPAWN.Pipe()
    store = server.connect(timeout=10)
    proc = SPAWN.Process(target=_remote, args=(store, child))
    with reaped(proc, timeout=30):
        StoreMachine.local = store
        StoreMachine.remote = parent
        try:
            yield StoreMachine
        finally:
            parent.send(None)
    store.close()
    assert proc.exitcode == 0


def test_shared_store_matches_the_model_from_two_processes(
    machine: type[StoreMachine],
) -> None:
    run_state_machine_as_test(machine, settings=settings(
        max_examples=100, stateful_step_count=50, deadline=None))
