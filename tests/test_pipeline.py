"""`Pipeline` and `CheckpointConfig`: checkpoints, resume, retention, time travel, processes.

Steps record every invocation in a file named by the state (``state["log"]``), one line
``<execution> <step> <pid>``, so that tests can count which steps ran, and where, even
in worker processes that were killed.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import psutil
import pytest

import shmstore
from shmstore import (
    Checkpoint,
    CheckpointConfig,
    CheckpointNotFound,
    ConfigError,
    EncodeError,
    MemoryStore,
    Pipeline,
    SharedStore,
    ShmstoreError,
    StoreTimeout,
    StoreUnavailable,
    VersionConflict,
)
from shmstore.integrations import pipeline as pipeline_module

from .helpers import SPAWN, children, reap, reaped, wait_until

CRASH_EXIT = 17


# -- steps (top level: spawned workers import them by name) --------------------------------

def _record(state: dict[str, Any], step: str) -> None:
    with open(state["log"], "a") as fh:
        fh.write(f"{state['id']} {step} {os.getpid()}\n")


def add_one(state: dict[str, Any]) -> dict[str, Any]:
    _record(state, "add_one")
    return {**state, "n": state["n"] + 1}


def double(state: dict[str, Any]) -> dict[str, Any]:
    _record(state, "double")
    marker = state.get("crash")
    if marker and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(CRASH_EXIT)  # the worker dies in the middle of this step, once
    if state.get("fail"):
        raise ValueError(f"double refuses {state['id']}")
    return {**state, "n": state["n"] * 2}


def square(state: dict[str, Any]) -> dict[str, Any]:
    _record(state, "square")
    time.sleep(state.get("sleep", 0))
    if state.get("until"):  # a handshake: hold this step until the test says go
        assert wait_until(lambda: os.path.exists(state["until"]), 60)
    return {**state, "n": state["n"] ** 2}


def die(state: dict[str, Any]) -> dict[str, Any]:
    os._exit(CRASH_EXIT)


STEPS = [add_one, double, square]
NAMES = ["add_one", "double", "square"]


def expected(n: int) -> int:
    return ((n + 1) * 2) ** 2


def calls(log: Path) -> collections.Counter[tuple[str, str]]:
    """How often each (execution, step) ran."""
    if not log.exists():
        return collections.Counter()
    return collections.Counter(tuple(line.split()[:2]) for line in log.read_text().splitlines())


def pids(log: Path, execution_id: str, step: str) -> list[int]:
    return [int(p) for e, s, p in (line.split() for line in log.read_text().splitlines())
            if e == execution_id and s == step]


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "calls.log"


def start(log: Path, execution_id: str, n: int = 1, **extra: Any) -> dict[str, Any]:
    return {"id": execution_id, "log": str(log), "n": n, **extra}


# -- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    {"auto_save": 1},
    {"auto_save": False, "save_interval": 0},
    {"auto_save": False, "save_interval": -1.0},
    {"auto_save": False, "save_interval": float("nan")},
    {"auto_save": False, "save_interval": "5"},
    {"save_interval": 5.0},  # with auto_save=True it could never apply: say so
    {"max_checkpoints": 0},
    {"max_checkpoints": 2.0},
    {"store": {}},
])
def test_bad_checkpoint_config_is_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        CheckpointConfig(**options)


def test_checkpoint_config_defaults_and_interval_as_float() -> None:
    config = CheckpointConfig()
    assert (config.store, config.auto_save, config.save_interval, config.max_checkpoints) == (
        None, True, None, None)
    assert CheckpointConfig(auto_save=False, save_interval=2).save_interval == 2.0


@pytest.mark.parametrize("steps", [
    [], [add_one, add_one], [("a", add_one), ("a", double)], [("a",)], [("", add_one)],
    [("a", 3)], "add_one", {"a": add_one},
])
def test_bad_steps_are_refused(steps: Any) -> None:
    with pytest.raises(ConfigError):
        Pipeline(steps)


def test_steps_are_functions_or_named_pairs() -> None:
    pipe = Pipeline([add_one, ("twice", double)])
    assert [name for name, _ in pipe.steps] == ["add_one", "twice"]
    assert isinstance(pipe.store, MemoryStore)
    assert Pipeline([add_one]).store is not pipe.store  # each pipeline its own by default


# -- run, history, resume ---------------------------------------------------------------------

def test_run_checkpoints_every_step_in_order(log: Path) -> None:
    pipe = Pipeline(STEPS, name="math")
    assert pipe.run(start(log, "r"), execution_id="r")["n"] == expected(1)
    history = pipe.history("r")
    assert [cp.node_name for cp in history] == NAMES
    assert [cp.version for cp in history] == [1, 2, 3]
    assert [cp.state["n"] for cp in history] == [2, 4, 16]
    assert [cp.parent_id for cp in history] == [None, history[0].id, history[1].id]
    assert [cp.metadata["step"] for cp in history] == [0, 1, 2]
    assert [cp.metadata["done"] for cp in history] == [False, False, True]
    assert {cp.metadata["pipeline"] for cp in history} == {"math"}
    assert {cp.metadata["pid"] for cp in history} == {os.getpid()}
    assert [cp.node_name for cp in pipe.history("r", newest_first=True)] == NAMES[::-1]


def test_a_finished_execution_is_not_run_again(log: Path) -> None:
    pipe = Pipeline(STEPS)
    first = pipe.run(start(log, "f"), execution_id="f")
    assert pipe.run(start(log, "f", n=100), execution_id="f") == first
    assert calls(log) == {("f", name): 1 for name in NAMES}
    assert len(pipe.history("f")) == 3


def test_run_without_an_id_makes_a_new_execution(log: Path) -> None:
    pipe = Pipeline(STEPS)
    pipe.run(start(log, "?"))
    pipe.run(start(log, "?"))
    assert len(pipe.store.executions()) == 2


def _run_in_child(pipeline: Pipeline, execution_id: str, state: Any) -> None:
    pipeline.run(state, execution_id=execution_id)


def test_resume_after_the_process_died_mid_step(server: shmstore.StoreServer, log: Path,
                                                tmp_path: Path) -> None:
    store = server.connect()
    pipe = Pipeline(STEPS, config=CheckpointConfig(store=store))
    state = start(log, "c", crash=str(tmp_path / "crashed"))
    child = SPAWN.Process(target=_run_in_child, args=(pipe, "c", state))
    with reaped(child):
        pass
    assert child.exitcode == CRASH_EXIT
    assert [cp.node_name for cp in pipe.history("c")] == ["add_one"]
    assert pipe.get_state("c").next == "double"

    assert pipe.run(execution_id="c")["n"] == expected(1)
    assert calls(log) == {("c", "add_one"): 1, ("c", "double"): 2, ("c", "square"): 1}
    history = pipe.history("c")
    assert [cp.node_name for cp in history] == NAMES
    assert history[1].parent_id == history[0].id
    assert history[0].metadata["pid"] == child.pid != history[1].metadata["pid"]
    store.close()


def test_an_error_from_a_step_propagates_and_the_run_resumes_after_the_fix(
    log: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    pipe = Pipeline(STEPS)
    with pytest.raises(ValueError, match="double refuses e"):
        pipe.run(start(log, "e", fail=True), execution_id="e")
    assert [cp.node_name for cp in pipe.history("e")] == ["add_one"]
    pipe.update_state("e", {"fail": False}, as_node="add_one")
    with caplog.at_level(logging.INFO, logger="shmstore"):
        assert pipe.run(execution_id="e")["n"] == expected(1)
    assert "resumes after step 'add_one'" in caplog.text
    assert calls(log)[("e", "add_one")] == 1
    assert calls(log)[("e", "double")] == 2


def test_errors_from_the_store_propagate(log: Path, server: shmstore.StoreServer) -> None:
    pipe = Pipeline([add_one, ("opaque", lambda state: object())])
    with pytest.raises(EncodeError):
        pipe.run(start(log, "x"), execution_id="x")
    assert [cp.node_name for cp in pipe.history("x")] == ["add_one"]

    closed = MemoryStore()
    closed.close()
    with pytest.raises(StoreUnavailable):
        Pipeline(STEPS, config=CheckpointConfig(store=closed)).run(start(log, "y"))

    store = server.connect(timeout=5.0)
    gone = Pipeline(STEPS, config=CheckpointConfig(store=store))
    server.shutdown()
    with pytest.raises(StoreUnavailable):
        gone.run(start(log, "z"), execution_id="z")
    store.close()


def test_another_writer_in_the_same_execution_is_a_version_conflict(log: Path) -> None:
    store = MemoryStore()

    def meddle(state: dict[str, Any]) -> dict[str, Any]:
        store.save(Checkpoint(execution_id="v", node_name="add_one", state=state,
                              metadata={"pipeline": "pipeline"}))
        return state

    pipe = Pipeline([add_one, meddle, double], config=CheckpointConfig(store=store))
    with pytest.raises(VersionConflict) as err:
        pipe.run(start(log, "v"), execution_id="v")
    assert (err.value.expected, err.value.actual) == (1, 2)
    assert [cp.node_name for cp in store.list("v")] == ["add_one", "add_one"]


def test_an_execution_of_another_pipeline_is_refused(log: Path) -> None:
    store = MemoryStore()
    Pipeline(STEPS, name="one", config=CheckpointConfig(store=store)).run(
        start(log, "o"), execution_id="o")
    other = Pipeline(STEPS, name="two", config=CheckpointConfig(store=store))
    with pytest.raises(ConfigError, match="pipeline 'one'"):
        other.run(execution_id="o")
    renamed = Pipeline([("a", add_one)], name="one", config=CheckpointConfig(store=store))
    with pytest.raises(ConfigError, match="does not have"):
        renamed.get_state("o")


# -- configuration honoured ------------------------------------------------------------------

def test_max_checkpoints_keeps_the_newest(log: Path) -> None:
    steps = [(f"s{i}", add_one) for i in range(5)]
    pipe = Pipeline(steps, config=CheckpointConfig(max_checkpoints=2))
    assert pipe.run(start(log, "k", n=0), execution_id="k")["n"] == 5
    history = pipe.history("k")
    assert [(cp.node_name, cp.version, cp.state["n"]) for cp in history] == [
        ("s3", 4, 4), ("s4", 5, 5)]
    pipe.update_state("k", {"n": 0}, as_node="s2")
    assert [cp.version for cp in pipe.history("k")] == [5, 6]
    assert pipe.run(execution_id="k")["n"] == 2  # s3, s4 again after the update
    assert [cp.node_name for cp in pipe.history("k")] == ["s3", "s4"]


def test_retention_is_one_function_over_the_store() -> None:
    store = MemoryStore()
    for i in range(4):
        store.save(Checkpoint(execution_id="r", state=i))
    assert pipeline_module._enforce_max_checkpoints(store, "r", None) == 0
    assert pipeline_module._enforce_max_checkpoints(store, "r", 3) == 1
    assert [cp.state for cp in store.list("r")] == [1, 2, 3]


def test_retention_is_the_stores_purge_one_request_per_save(
        log: Path, server: shmstore.StoreServer) -> None:
    """Retention is the store's rule run on the backend (purge with keep), one request
    per save, never a list and a delete per checkpoint from the pipeline."""
    store = server.connect()
    try:
        steps = [(f"s{i}", add_one) for i in range(4)]
        pipe = Pipeline(steps, config=CheckpointConfig(store=store, max_checkpoints=2))
        before = store.stats().ops
        assert pipe.run(start(log, "p", n=0), execution_id="p")["n"] == 4
        ops = store.stats().ops
        spent = {op: ops[op] - before.get(op, 0) for op in ("save", "purge", "delete")}
        assert spent == {"save": 4, "purge": 4, "delete": 0}
        assert [cp.node_name for cp in store.list("p")] == ["s2", "s3"]
    finally:
        store.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_save_interval_saves_at_most_once_per_interval_plus_the_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(pipeline_module, "_now", clock)

    def tick(state: int) -> int:
        clock.now += 1.0  # every step takes one second
        return state + 1

    steps = [(f"s{i}", tick) for i in range(7)]
    pipe = Pipeline(steps, config=CheckpointConfig(auto_save=False, save_interval=2.5))
    assert pipe.run(0, execution_id="i") == 7
    # 3 s after the start, 3 s after that, and the final one.
    assert [(cp.node_name, cp.state) for cp in pipe.history("i")] == [
        ("s2", 3), ("s5", 6), ("s6", 7)]


def test_without_auto_save_or_interval_only_the_final_checkpoint_is_saved(log: Path) -> None:
    pipe = Pipeline(STEPS, config=CheckpointConfig(auto_save=False))
    pipe.run(start(log, "n"), execution_id="n")
    assert [(cp.node_name, cp.metadata["done"]) for cp in pipe.history("n")] == [
        ("square", True)]


def test_with_an_interval_a_resume_redoes_only_the_steps_since_the_last_save(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(pipeline_module, "_now", clock)
    ran: list[str] = []
    broken = [True]

    def step(name: str) -> Any:
        def run(state: int) -> int:
            ran.append(name)
            clock.now += 1.0
            if name == "s4" and broken[0]:
                raise RuntimeError("s4 failed")
            return state + 1
        return (name, run)

    pipe = Pipeline([step(f"s{i}") for i in range(6)],
                    config=CheckpointConfig(auto_save=False, save_interval=2.5))
    with pytest.raises(RuntimeError):
        pipe.run(0, execution_id="j")
    assert [cp.node_name for cp in pipe.history("j")] == ["s2"]  # s3 was not due yet
    broken[0] = False
    ran.clear()
    assert pipe.run(execution_id="j") == 6
    assert ran == ["s3", "s4", "s5"]


# -- state inspection and time travel --------------------------------------------------------

def test_get_state_names_the_next_step() -> None:
    pipe = Pipeline([("a", add_one), ("b", double)])
    empty = pipe.get_state("nothing")
    assert (empty.values, empty.next, empty.checkpoint, empty.done) == (None, "a", None, False)
    pipe.update_state("s", {"n": 3}, as_node="a")
    snap = pipe.get_state("s")
    assert (snap.values, snap.next, snap.done) == ({"n": 3}, "b", False)
    assert snap.checkpoint is not None and snap.checkpoint.metadata["source"] == "update"


def test_time_travel_forks_from_a_chosen_checkpoint(log: Path) -> None:
    pipe = Pipeline(STEPS)
    pipe.run(start(log, "t"), execution_id="t")
    first, second, _ = pipe.history("t")
    assert pipe.get_state("t").done
    past = pipe.get_state("t", checkpoint_id=second.id)
    assert (past.values["n"], past.next) == (4, "square")

    forked = pipe.update_state("t", {"n": 10}, as_node="add_one", checkpoint_id=first.id)
    assert (forked.version, forked.parent_id, forked.state["n"]) == (4, first.id, 10)
    assert forked.state["log"] == str(log)  # merged into the old state, not replacing it
    assert pipe.get_state("t").next == "double"
    assert pipe.run(execution_id="t")["n"] == 400

    replay = pipe.run(execution_id="t", checkpoint_id=second.id)
    assert replay["n"] == 16
    history = pipe.history("t")
    assert [cp.node_name for cp in history] == NAMES + NAMES + ["square"]
    assert [cp.version for cp in history] == list(range(1, 8))
    assert history[4].parent_id == forked.id
    assert history[6].parent_id == second.id
    assert calls(log) == {("t", "add_one"): 1, ("t", "double"): 2, ("t", "square"): 3}


def test_time_travel_checks_what_it_is_given(log: Path) -> None:
    pipe = Pipeline(STEPS)
    pipe.run(start(log, "a"), execution_id="a")
    pipe.run(start(log, "b"), execution_id="b")
    other = pipe.history("b")[0].id
    with pytest.raises(ConfigError, match="belongs to execution 'b'"):
        pipe.run(execution_id="a", checkpoint_id=other)
    with pytest.raises(CheckpointNotFound):
        pipe.get_state("a", checkpoint_id="no-such-checkpoint")
    with pytest.raises(ConfigError, match="not a step"):
        pipe.update_state("a", {}, as_node="nope")


def test_update_state_replaces_what_is_not_a_dict() -> None:
    pipe = Pipeline([("a", add_one), ("b", double)])
    pipe.update_state("u", [1, 2], as_node="a")
    assert pipe.update_state("u", [3], as_node="a").state == [3]
    assert pipe.update_state("u", {"k": 1}, as_node="b").metadata["done"] is True
    assert pipe.run(execution_id="u") == {"k": 1}  # done: nothing runs


# -- processes ---------------------------------------------------------------------------------

def test_a_pipeline_over_a_memory_store_cannot_cross_processes(
    server: shmstore.StoreServer,
) -> None:
    with pytest.raises(ConfigError, match="MemoryStore"):
        pickle.dumps(Pipeline(STEPS))
    store = server.connect()
    copy = pickle.loads(pickle.dumps(Pipeline(STEPS, name="p",
                                              config=CheckpointConfig(store=store))))
    assert isinstance(copy.store, SharedStore) and copy.store.url == server.url
    assert (copy.name, copy.steps) == ("p", Pipeline(STEPS).steps)
    store.close()


def test_run_many_refuses_steps_that_workers_cannot_import(log: Path) -> None:
    def local(state: Any) -> Any:
        return state

    for steps in ([("anon", lambda s: s)], [add_one, local]):
        with pytest.raises(ConfigError, match="top level of a module"):
            Pipeline(steps).run_many({"a": 1})
    with pytest.raises(ConfigError):
        Pipeline(STEPS).run_many({"a": 1}, processes=0)
    assert Pipeline(STEPS).run_many({}) == {}


def test_run_many_survives_a_worker_killed_mid_step(
    log: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    ids = [f"e{i:02d}" for i in range(12)]
    crash = str(tmp_path / "crashed")
    states = {eid: start(log, eid, n=i, **({"crash": crash} if eid == "e05" else {}))
              for i, eid in enumerate(ids)}
    pipe = Pipeline(STEPS)  # a MemoryStore: run_many serves it for the call
    with caplog.at_level(logging.WARNING, logger="shmstore"):
        results = pipe.run_many(states, processes=4)

    assert os.path.exists(crash)
    assert list(results) == ids
    assert {eid: s["n"] for eid, s in results.items()} == {
        eid: expected(i) for i, eid in enumerate(ids)}
    counted = calls(log)
    for eid in ids:
        # Checkpointed steps never ran twice; only the step that was cut short did.
        assert counted[(eid, "add_one")] == 1
        assert counted[(eid, "double")] == (2 if eid == "e05" else 1)
        assert counted[(eid, "square")] == 1
        # Completed exactly once: one checkpoint per step, one of them final.
        history = pipe.history(eid)  # copied back from the call's server
        assert [cp.node_name for cp in history] == NAMES
        assert sum(cp.metadata["done"] for cp in history) == 1
    first, second = pids(log, "e05", "double")
    assert first != second
    assert pids(log, "e05", "add_one") == [first]
    assert f"worker {first} died (exit code {CRASH_EXIT}) running execution e05" in caplog.text
    assert len({p for eid in ids for p in pids(log, eid, "add_one")}) >= 2


def test_run_many_on_a_shared_store_resumes_and_skips_finished_executions(
    server: shmstore.StoreServer, log: Path,
) -> None:
    store = server.connect()
    pipe = Pipeline(STEPS, config=CheckpointConfig(store=store))
    pipe.update_state("half", start(log, "half", n=5), as_node="add_one")
    states = {eid: start(log, eid, n=1) for eid in ("a", "b", "half")}
    first = pipe.run_many(states, processes=2)
    assert {eid: s["n"] for eid, s in first.items()} == {"a": 16, "b": 16, "half": 100}
    assert calls(log)[("half", "add_one")] == 0
    before = calls(log)
    assert pipe.run_many(states, processes=2) == first
    assert calls(log) == before  # nothing ran again
    assert pipe.history("a")[0].metadata["pid"] != os.getpid()
    store.close()


def test_run_many_without_ids_names_the_executions(log: Path) -> None:
    pipe = Pipeline(STEPS)
    results = pipe.run_many([start(log, "x", n=1), start(log, "x", n=2)], processes=2)
    assert [s["n"] for s in results.values()] == [16, 36]
    assert sorted(pipe.store.executions()) == sorted(results)


def test_run_many_raises_a_step_error_with_the_worker_traceback(log: Path) -> None:
    states = {eid: start(log, eid, fail=eid == "bad") for eid in ("ok1", "bad", "ok2")}
    pipe = Pipeline(STEPS)
    with pytest.raises(ValueError, match="double refuses bad") as err:
        pipe.run_many(states, processes=2)
    assert 'in double' in str(err.value.__cause__)
    assert [cp.node_name for cp in pipe.history("bad")] == ["add_one"]


def test_run_many_gives_up_on_an_execution_that_keeps_killing_workers(log: Path) -> None:
    pipe = Pipeline([add_one, die])
    with pytest.raises(ShmstoreError, match="took down 2 workers") as err:
        pipe.run_many({"doomed": start(log, "doomed")}, processes=1, max_attempts=2)
    assert err.value.execution_id == "doomed"  # type: ignore[attr-defined]
    assert calls(log)[("doomed", "add_one")] == 1


def test_run_many_explains_a_worker_that_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    # Picklable here, but the module exists in this process only: the worker cannot import it.
    ghost_module = types.ModuleType("shmstore_test_ghost")

    def ghost(state: Any) -> Any:
        return state

    ghost.__module__, ghost.__qualname__ = ghost_module.__name__, "ghost"
    ghost_module.ghost = ghost  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, ghost_module.__name__, ghost_module)
    with pytest.raises(ShmstoreError, match="died before it started"):
        Pipeline([ghost]).run_many({"a": 1}, processes=1)


def _downstream(pipeline: Pipeline, execution_id: str, out: Any, seen: str) -> None:
    cp = pipeline.wait(execution_id, step="double", timeout=60)
    out.put((cp.node_name, cp.state["n"], os.getpid()))
    Path(seen).touch()  # lets the upstream's next step finish
    pipeline.store.close()


def test_a_stage_in_another_process_waits_for_an_upstream_checkpoint(
    server: shmstore.StoreServer, log: Path,
) -> None:
    store = server.connect()
    pipe = Pipeline(STEPS, config=CheckpointConfig(store=store))
    out = SPAWN.Queue()
    seen = str(log.parent / "downstream-has-seen-double")
    child = SPAWN.Process(target=_downstream, args=(pipe, "w", out, seen))
    waits_before = store.stats().ops.get("wait", 0)
    with reaped(child):
        # The handshake: the server has counted the child's wait, so it is blocked in it.
        assert wait_until(lambda: store.stats().ops.get("wait", 0) > waits_before, 60)
        assert child.is_alive() and out.empty()  # blocked: nothing checkpointed yet
        # square waits for the child to have read double's checkpoint: no race on which
        # checkpoint is the latest when it wakes.
        assert pipe.run(start(log, "w", until=seen), execution_id="w")["n"] == 16
        node, n, pid = out.get(timeout=60)
    out.close()
    out.join_thread()
    assert (node, n) == ("double", 4)  # woken by double's checkpoint, before square's
    assert pid == child.pid != os.getpid()
    store.close()


def test_wait_times_out_and_checks_its_arguments() -> None:
    pipe = Pipeline([("a", add_one), ("b", double)])
    started = time.monotonic()
    with pytest.raises(StoreTimeout, match="did not finish"):
        pipe.wait("never", timeout=0.2)
    assert 0.15 < time.monotonic() - started < 5
    pipe.update_state("half", {}, as_node="a")
    assert pipe.wait("half", step="a", timeout=0).node_name == "a"
    with pytest.raises(StoreTimeout, match="checkpoint step 'b'"):
        pipe.wait("half", step="b", timeout=0)
    with pytest.raises(ConfigError):
        pipe.wait("half", step="zzz")
    with pytest.raises(ConfigError):
        pipe.wait("half", timeout=-1)


# -- output -------------------------------------------------------------------------------------

def test_the_library_prints_nothing(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Pipeline(STEPS).run(start(log, "quiet"))
    assert capsys.readouterr() == ("", "")


def test_progress_bar_with_rich_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("rich")
    with pipeline_module._progress_bar(3, enabled=True, description="work") as advance:
        for _ in range(3):
            advance()
    out, err = capsys.readouterr()
    assert out == ""
    assert "work" in err and "3/3" in err


def test_progress_bar_degrades_to_nothing_without_rich(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("rich", "rich.progress", "rich.console"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    with pipeline_module._progress_bar(2, enabled=True, description="work") as advance:
        advance()
        advance()
    assert capsys.readouterr() == ("", "")


# -- worker lifetime ------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    """This environment, with this checkout first on the path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def _python(*args: str, **popen: Any) -> subprocess.Popen[str]:
    """Start ``python *args`` in the repository, this checkout first on the path."""
    popen.setdefault("env", _env())
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


RUN_MANY_SLOWLY = """
import sys
from shmstore import Pipeline
from tests.test_pipeline import STEPS, start
from pathlib import Path
log = Path(sys.argv[1])
Pipeline(STEPS).run_many({f"s{i}": start(log, f"s{i}", sleep=60) for i in range(3)},
                         processes=3)
"""


@pytest.mark.timeout(120)
def test_run_many_workers_exit_when_their_parent_is_killed(log: Path, tmp_path: Path) -> None:
    # The killed parent cannot remove its server's private directory: keep it in tmp_path.
    parent = _python("-c", RUN_MANY_SLOWLY.replace("sys.argv[1]", repr(str(log))),
                     env={**_env(), "TMPDIR": str(tmp_path)})
    try:
        # Each worker records its pid as it enters the slow step: then all three are busy.
        assert wait_until(lambda: calls(log).get(("s0", "square"), 0)
                          + calls(log).get(("s1", "square"), 0)
                          + calls(log).get(("s2", "square"), 0) == 3, 60), parent.stderr
        workers = {p for eid in ("s0", "s1", "s2") for p in pids(log, eid, "square")}
        assert len(workers) == 3 and parent.pid not in workers
        parent.kill()
        parent.wait(10)
        assert wait_until(lambda: all(_gone(p) for p in workers), 10), \
            f"orphaned workers still run: {[p for p in workers if not _gone(p)]}"
        # The workers share the parent's stderr: end of file once the last one is gone.
        _, err = parent.communicate(timeout=30)
    finally:
        reap(parent)
        for pid in workers if "workers" in locals() else ():
            if not _gone(pid):  # only when the test failed: do not leave orphans running
                psutil.Process(pid).kill()
    assert err == ""


def test_run_many_and_the_demo_return_after_every_process_they_started(log: Path) -> None:
    pipe = Pipeline(STEPS)
    for round_ in range(3):
        states = {f"r{round_}-{i}": start(log, f"r{round_}-{i}", n=i) for i in range(4)}
        assert len(pipe.run_many(states, processes=3)) == 4
        assert children() == [], f"round {round_}: run_many returned before its children ended"


INTERACTIVE_RUN_MANY = """
from shmstore import ConfigError, Pipeline
def step(state):
    return state + 1
try:
    Pipeline([step]).run_many({"a": 1}, processes=1)
except ConfigError as exc:
    print("ConfigError:", exc)
"""


@pytest.mark.parametrize("how", ["-c", "stdin"])
def test_run_many_refuses_steps_from_an_interactive_main(how: str) -> None:
    if how == "-c":
        proc, stdin = _python("-c", INTERACTIVE_RUN_MANY), None
    else:
        proc, stdin = _python("-", stdin=subprocess.PIPE), INTERACTIVE_RUN_MANY
    try:
        out, err = proc.communicate(stdin, timeout=60)
    finally:
        reap(proc)
    assert proc.returncode == 0, err
    assert "ConfigError: step 'step' cannot run in a worker process" in out, out + err
    assert "interactive __main__" in out and "into a .py module" in out
    assert "died before it started" not in out + err  # refused up front: no worker started
