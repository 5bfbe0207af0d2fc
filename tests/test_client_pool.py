"""`SharedStore`'s connection pool: threads that come and go reuse connections."""

from __future__ import annotations

import threading

import psutil
import pytest

import shmstore
from shmstore import Checkpoint, StoreUnavailable


def test_short_lived_threads_reuse_one_connection() -> None:
    with shmstore.serve(export=False) as server, server.connect(timeout=10) as store:
        store.save(Checkpoint(execution_id="warm"))
        threads_before = psutil.Process(server.pid).num_threads()
        for i in range(50):
            t = threading.Thread(target=store.save, args=(Checkpoint(execution_id=f"t{i}"),))
            t.start()
            t.join()
        assert len(store._conns) == 1
        assert psutil.Process(server.pid).num_threads() == threads_before
        assert len(store.executions()) == 51


def test_concurrent_calls_get_their_own_connections_then_share_them() -> None:
    with shmstore.serve(export=False) as server, server.connect(timeout=10) as store:
        barrier = threading.Barrier(7)  # six waiters and this thread
        errors: list[BaseException] = []

        def waiter() -> None:
            try:
                barrier.wait(10)
                store.wait("gate", timeout=10)  # six calls in the server at once
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=waiter) for _ in range(6)]
        for t in threads:
            t.start()
        barrier.wait(10)
        helper = server.connect(timeout=10)
        assert _wait_for(lambda: helper.stats().ops["wait"] >= 6)
        helper.save(Checkpoint(execution_id="gate"))
        helper.close()
        for t in threads:
            t.join(10)
        assert not errors
        assert len(store._conns) == 6 and len(store._idle) == 6
        for i in range(20):  # sequential calls now reuse those six
            store.save(Checkpoint(execution_id=f"after{i}"))
        assert len(store._conns) == 6


def test_a_closed_store_refuses_calls_and_keeps_no_connection() -> None:
    with shmstore.serve(export=False) as server:
        store = server.connect(timeout=10)
        store.save(Checkpoint(execution_id="x"))
        store.close()
        assert store._conns == set() and store._idle == []
        with pytest.raises(StoreUnavailable, match="closed"):
            store.latest("x")


@pytest.mark.timeout(60)
def test_a_call_whose_store_is_closed_under_it_says_the_store_was_closed() -> None:
    with shmstore.serve(export=False) as server, server.connect(timeout=10) as helper:
        store = server.connect(timeout=10)
        waits = helper.stats().ops["wait"]
        errors: list[BaseException] = []

        def waiter() -> None:
            try:
                store.wait("gate", timeout=20)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=waiter)
        thread.start()
        assert _wait_for(lambda: helper.stats().ops["wait"] > waits)  # in the server now
        store.close()  # closes the waiting call's connection under it
        helper.save(Checkpoint(execution_id="gate"))  # its answer comes: nowhere to go
        thread.join(30)
        assert not thread.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], StoreUnavailable), errors
        assert "closed while its 'wait' call ran" in str(errors[0])  # not "lost the server"


def _wait_for(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    from .helpers import wait_until

    return wait_until(predicate, timeout)
