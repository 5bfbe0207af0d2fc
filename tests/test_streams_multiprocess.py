"""``follow`` across real processes over a real server (spawn children).

A writer saves a first run of checkpoints, clears the execution once the follower has
seen them all, and saves a second run; the follower reads every one in order with the
clear reported between them, stops partway through the second run; a new process
resumes at the last version it saw and gets exactly the rest.  Children signal through
events and pipes, never sleeps; every child is reaped.
"""

from __future__ import annotations

from multiprocessing.connection import Connection
from typing import Any

import pytest

import shmstore
from shmstore import Checkpoint, Cleared, SharedStore

from .helpers import SPAWN, reaped

EXECUTION = "stream"
FIRST, SECOND, STOP_AFTER = 20, 30, 10
DEADLINE = 60.0  # bounds a hang only


def _writer(store: SharedStore, follower_started: Any, first_seen: Any) -> None:
    assert follower_started.wait(DEADLINE)
    for i in range(FIRST):
        store.save(Checkpoint(execution_id=EXECUTION, node_name="a", state=i))
    assert first_seen.wait(DEADLINE)
    store.clear(EXECUTION)
    for i in range(SECOND):
        store.save(Checkpoint(execution_id=EXECUTION, node_name="b", state=f"b{i}"))
    store.close()


def _item(item: Checkpoint | Cleared) -> tuple[Any, ...]:
    if isinstance(item, Cleared):
        return ("cleared", item.execution_id, item.last_version)
    return ("checkpoint", item.version, item.state)


def _follower(store: SharedStore, out: Connection, started: Any, first_seen: Any) -> None:
    """Follow until STOP_AFTER checkpoints of the second run have come; send each item."""
    started.set()
    seen = second = 0
    for item in store.follow(EXECUTION, timeout=DEADLINE):
        out.send(_item(item))
        if isinstance(item, Cleared):
            continue
        seen += 1
        if seen == FIRST:
            first_seen.set()
        if seen > FIRST:
            second += 1
            if second == STOP_AFTER:
                break
    out.send(("end",))
    out.close()
    store.close()


def _resumer(store: SharedStore, out: Connection, after: int) -> None:
    """Follow from ``after`` until the second run's last version has come."""
    for item in store.follow(EXECUTION, after_version=after, timeout=DEADLINE):
        out.send(_item(item))
        if isinstance(item, Checkpoint) and item.version == SECOND:
            break
    out.send(("end",))
    out.close()
    store.close()


def _receive(conn: Connection) -> list[tuple[Any, ...]]:
    items = []
    while True:
        assert conn.poll(DEADLINE), f"the child sent nothing for {DEADLINE} s; got {items}"
        item = conn.recv()
        if item == ("end",):
            return items
        items.append(item)


@pytest.mark.timeout(120)
def test_follow_across_processes_reports_a_clear_and_resumes_exactly(
    server: shmstore.StoreServer,
) -> None:
    store = server.connect()
    started, first_seen = SPAWN.Event(), SPAWN.Event()
    follower_end, follower_out = SPAWN.Pipe(duplex=False)
    writer = SPAWN.Process(target=_writer, args=(store, started, first_seen))
    follower = SPAWN.Process(target=_follower,
                             args=(store, follower_out, started, first_seen))
    with reaped(writer, follower, timeout=DEADLINE):
        follower_out.close()  # the child's end, ours closed: EOF if it dies
        got = _receive(follower_end)
        follower.join(DEADLINE)
        assert follower.exitcode == 0
        assert got == (
            [("checkpoint", v, v - 1) for v in range(1, FIRST + 1)]
            + [("cleared", EXECUTION, FIRST)]
            + [("checkpoint", v, f"b{v - 1}") for v in range(1, STOP_AFTER + 1)])
        last = got[-1][1]

        resume_end, resume_out = SPAWN.Pipe(duplex=False)
        resumer = SPAWN.Process(target=_resumer, args=(store, resume_out, last))
        with reaped(resumer, timeout=DEADLINE):
            resume_out.close()
            rest = _receive(resume_end)
        assert resumer.exitcode == 0
        assert rest == [("checkpoint", v, f"b{v - 1}") for v in range(last + 1, SECOND + 1)]
        writer.join(DEADLINE)
        assert writer.exitcode == 0
    store.close()
