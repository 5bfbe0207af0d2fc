"""The server killed, frozen, or a call interrupted: every client gets a named error, and
nothing acknowledged is lost while the server lives.

A SIGKILLed server's memory is gone, so "nothing lost" is checked against what a reader
process saw: it snapshots every writer's execution continuously, and each save a writer
had acknowledged before a snapshot began must be in that snapshot, with the version the
writer was told and the bytes it sent (a save acknowledged before a request is sent must
be visible to it).  ``time.monotonic`` is CLOCK_MONOTONIC, one clock for every process
on Linux, so acknowledgement and snapshot times compare across processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import shmstore
from shmstore import Checkpoint, SharedStore, StoreTimeout, StoreUnavailable

from ..helpers import SPAWN, reaped, wait_until

WRITERS = 4

pytestmark = pytest.mark.skipif(sys.platform != "linux",
                                reason="one monotonic clock across processes: Linux")


def _digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _writer(store: SharedStore, index: int, log_path: str) -> None:
    """Save until the server is gone; log every acknowledged save, then how it ended."""
    rng = __import__("random").Random(index)
    execution = f"w{index}"
    with open(log_path, "w", buffering=1) as log:
        try:
            n = 0
            while True:
                blobs = [os.urandom(rng.randrange(1, 4096)) for _ in range(rng.choice((1, 3)))]
                cps = [Checkpoint(execution_id=execution, node_name=f"n{n + i}",
                                  state={"n": n + i, "blob": blob})
                       for i, blob in enumerate(blobs)]
                saved = [store.save(cps[0])] if len(cps) == 1 else store.save_many(cps)
                acked = time.monotonic()
                for cp, blob in zip(saved, blobs, strict=True):
                    log.write(json.dumps(["ack", acked, cp.id, cp.version, _digest(blob)]) + "\n")
                n += len(cps)
        except BaseException as exc:
            log.write(json.dumps(["end", type(exc).__name__, str(exc)]) + "\n")


def _reader(store: SharedStore, out_path: str) -> None:
    """Snapshot every writer's execution until the server is gone; keep the last of each."""
    last: dict[str, Any] = {}
    snapshots = 0
    problems: list[str] = []
    progress = out_path + ".rounds"
    try:
        while True:
            with open(progress + ".tmp", "w") as fh:
                fh.write(str(snapshots // WRITERS))
            os.replace(progress + ".tmp", progress)
            for index in range(WRITERS):
                execution = f"w{index}"
                began = time.monotonic()
                cps = store.list(execution)
                records = [[cp.id, cp.version, _digest(cp.state["blob"])] for cp in cps]
                if [r[1] for r in records] != list(range(1, len(records) + 1)):
                    problems.append(f"{execution}: versions {[r[1] for r in records]}")
                previous = last.get(execution)
                if previous is not None and records[:len(previous[1])] != previous[1]:
                    problems.append(f"{execution}: a later snapshot lost or changed records")
                last[execution] = [began, records]
                snapshots += 1
                if cps:  # load() what list() gave: the same record
                    again = store.load(cps[-1].id)
                    if (again.version, again.state) != (cps[-1].version, cps[-1].state):
                        problems.append(f"{execution}: load disagrees with list")
    except BaseException as exc:
        ended = [type(exc).__name__, str(exc)]
    with open(out_path, "w") as fh:
        json.dump({"last": last, "snapshots": snapshots, "problems": problems,
                   "end": ended}, fh)


def _acks(path: Path) -> tuple[list[list[Any]], list[Any]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines and lines[-1][0] == "end", f"{path.name} did not end cleanly"
    return [line[1:] for line in lines[:-1]], lines[-1][1:]


def test_server_sigkilled_under_four_writers_loses_nothing_acknowledged(
    tmp_path: Path,
) -> None:
    server = shmstore.serve(export=False)
    store = server.connect(timeout=10)
    logs = [tmp_path / f"w{i}.log" for i in range(WRITERS)]
    seen = tmp_path / "reader.json"
    procs = [SPAWN.Process(target=_writer, args=(store, i, str(logs[i])))
             for i in range(WRITERS)]
    procs.append(SPAWN.Process(target=_reader, args=(store, str(seen))))
    try:
        with reaped(*procs, timeout=60):
            # Let them work until every writer has a few hundred acknowledged saves
            # and the reader has snapshotted every execution several times.
            rounds = tmp_path / "reader.json.rounds"

            def busy() -> bool:
                return all(p.exists() and p.stat().st_size > 40_000 for p in logs) \
                    and rounds.exists() and int(rounds.read_text() or 0) >= 5

            assert wait_until(busy, 60, interval=0.1)
            os.kill(server.pid, signal.SIGKILL)
            with pytest.raises(StoreUnavailable):
                store.executions()
        assert [p.exitcode for p in procs] == [0] * (WRITERS + 1)
    finally:
        server.shutdown()
        store.close()
    reader = json.loads(seen.read_text())
    assert reader["problems"] == []
    assert reader["end"][0] == "StoreUnavailable", reader["end"]
    checked = 0
    for index, path in enumerate(logs):
        acks, end = _acks(path)
        assert end[0] == "StoreUnavailable", end  # every client: the named error
        began, records = reader["last"][f"w{index}"]
        snapshot = {cid: (version, digest) for cid, version, digest in records}
        before = [a for a in acks if a[0] < began]
        for _, cid, version, digest in before:
            assert snapshot.get(cid) == (version, digest), f"w{index}: lost {cid} v{version}"
        checked += len(before)
        # The snapshot holds nothing the writer did not send: at most the batch that was
        # in flight (stored, but its answer never arrived) is not in the log.
        logged = {a[1] for a in acks}
        assert len(set(snapshot) - logged) <= 3
    assert reader["snapshots"] >= 5 * WRITERS  # what busy() waited for
    assert checked > WRITERS * 100, checked
    print(f"checked {checked} acknowledged saves against {reader['snapshots']} snapshots")


def test_a_killed_server_is_store_unavailable_within_a_second(
    server: shmstore.StoreServer,
) -> None:
    store = server.connect(timeout=30)
    store.save(Checkpoint(execution_id="x"))
    os.kill(server.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        for _ in range(1000):
            store.save(Checkpoint(execution_id="x"))
    assert time.monotonic() - started < 1.0  # not the 30 s timeout: the socket says so
    assert info.value.address == server.url and isinstance(info.value, ConnectionError)
    store.close()


def test_a_sigstopped_server_times_out_every_caller_and_the_same_stores_recover(
    server: shmstore.StoreServer,
) -> None:
    stores = [server.connect(timeout=0.5) for _ in range(3)]
    for i, store in enumerate(stores):
        store.save(Checkpoint(execution_id=f"s{i}", state="before"))
    os.kill(server.pid, signal.SIGSTOP)
    try:
        # kill() only queues the signal; wait until the server has really stopped.
        assert wait_until(
            lambda: psutil.Process(server.pid).status() == psutil.STATUS_STOPPED, 5.0)
        errors: list[BaseException | None] = [None] * 4
        lost: list[Checkpoint] = []

        def call(i: int) -> None:
            try:
                if i == 3:  # a second thread of the first store: its own connection
                    stores[0].latest("s0")
                else:
                    cp = Checkpoint(execution_id=f"s{i}", state="during")
                    lost.append(cp)
                    stores[i].save(cp)
            except BaseException as exc:
                errors[i] = exc

        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert 0.4 <= time.monotonic() - started < 3.0
        assert all(isinstance(e, StoreTimeout) and e.timeout == 0.5 for e in errors), errors
        assert all(isinstance(e, TimeoutError) for e in errors)
    finally:
        os.kill(server.pid, signal.SIGCONT)
    # The same objects work again, and every answer belongs to its own question: a
    # connection whose answer never came was dropped, not reused out of step.
    for i, store in enumerate(stores):
        after = store.save(Checkpoint(execution_id=f"s{i}", state="after"))
        states = [c.state for c in store.list(f"s{i}")]
        # A timed-out save may still be applied when the server resumes, before or after
        # the new save (its dropped connection's request is still in the socket).
        assert states in (["before", "after"], ["before", "during", "after"],
                          ["before", "after", "during"]), states
        assert after.version == states.index("after") + 1
        assert store.load(after.id).state == "after"
    for store in stores:
        store.close()


def _interrupt_main_soon(delay: float) -> threading.Timer:
    # A real SIGINT, as Ctrl-C sends: it interrupts a blocking select() or read().
    main = threading.main_thread().ident
    assert main is not None
    timer = threading.Timer(delay, signal.pthread_kill, args=(main, signal.SIGINT))
    timer.start()
    return timer


@pytest.mark.parametrize("op", ["wait", "save_many", "load_many"])
def test_a_call_interrupted_by_keyboardinterrupt_leaves_the_store_usable(
    server: shmstore.StoreServer, op: str,
) -> None:
    store = server.connect(timeout=10)
    big = [Checkpoint(execution_id="big", state=os.urandom(256 * 1024)) for _ in range(64)]
    store.save_many(big)
    ids = [cp.id for cp in big] * 8
    timer = _interrupt_main_soon(0.05)
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in range(10_000):  # until the interrupt lands, mid-call or between
                if op == "wait":
                    store.wait("nothing", timeout=5)
                elif op == "save_many":
                    store.save_many([Checkpoint(execution_id="spam", state=os.urandom(65536))
                                     for _ in range(64)])
                else:
                    store.load_many(ids)
    finally:
        timer.join()
    # In step: each answer matches its question.
    cp = store.save(Checkpoint(execution_id="after", state="ok"))
    assert store.load(cp.id).state == "ok"
    assert [c.id for c in store.list("big")] == [c.id for c in big]
    assert store.latest("after").id == cp.id  # type: ignore[union-attr]
    spam = store.list("spam")
    assert len(spam) % 64 == 0  # a save_many is all or nothing, even when interrupted
    store.close()


def _interrupted_child(store: SharedStore, out: Any) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    results = []
    try:
        store.wait("never", timeout=30)
    except KeyboardInterrupt:
        results.append("interrupted")
    cp = store.save(Checkpoint(execution_id="child", state="after"))
    results.append(store.load(cp.id).state)
    out.put(results)


def test_sigint_in_a_child_mid_call_leaves_its_store_usable(
    server: shmstore.StoreServer,
) -> None:
    store = server.connect(timeout=10)
    out = SPAWN.Queue()
    proc = SPAWN.Process(target=_interrupted_child, args=(store, out))
    with reaped(proc, timeout=30):
        # Wait until the child is blocked in the server (its wait is registered).
        assert wait_until(lambda: store.stats().ops.get("wait", 0) >= 1, 20)
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGINT)
        assert out.get(timeout=20) == ["interrupted", "after"]
    assert proc.exitcode == 0
    store.close()
