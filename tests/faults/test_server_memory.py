"""The server's memory edges: what an idle connection keeps, refused batches, peak RSS."""

from __future__ import annotations

import errno
import logging
import multiprocessing.connection
from typing import Any

import psutil
import pytest

import shmstore
from shmstore import Checkpoint, Limits, StoreFull
from shmstore.monitor.sampler import MemoryMonitor

from ..helpers import SPAWN, reaped, wait_until

MiB = 2**20
STATE_BYTES = 40 * MiB


def _state(size: int = STATE_BYTES) -> bytes:
    """A state of ``size`` bytes, cheap to make (RSS counts every byte all the same)."""
    return bytes(range(256)) * (size // 256)


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


# The server's RSS growth over the payload it took: on the socket, the payload itself
# (once: no second copy kept by an idle connection); through the data plane, nothing but
# bookkeeping (the states are sealed segments it never maps; the target is 1%).
GROWTH = {False: 1.1, True: 0.01}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("data_plane", [False, True], ids=["socket", "plane"])
def test_an_idle_connection_does_not_keep_its_last_request(data_plane: bool) -> None:
    """After 10 x 40 MiB saves on one connection, the server holds ~ the payload, once
    (on the socket), or none of it (through the data plane)."""
    state = _state()
    limits = Limits(max_checkpoint_bytes=64 * MiB)
    with shmstore.serve(export=False, limits=limits) as srv, \
            srv.connect(data_plane=data_plane) as store, \
            srv.connect() as observer:  # its calls must not be what frees the saver's
        store.save(Checkpoint(execution_id="warm-up", state=b"x"))
        start = observer.stats().payload_bytes
        before = _rss(srv.pid)
        for i in range(10):
            store.save(Checkpoint(execution_id=f"big-{i}", state=state))
        # The saving connection is idle now, waiting for a request that does not come.
        growth = _rss(srv.pid) - before
        stats = observer.stats()
        payload = stats.payload_bytes - start
        assert payload >= 10 * STATE_BYTES
        assert stats.segment_bytes == (payload if data_plane else 0)
        bound = GROWTH[data_plane]
        assert growth <= bound * payload, f"server grew {growth / payload:.3f}x the payload"
        # A 40 MiB answer must not stay packed in the connection's buffer either.
        cp = store.latest("big-3")
        assert cp is not None and cp.state == state
        growth = _rss(srv.pid) - before
        assert growth <= bound * payload, f"after a load: {growth / payload:.3f}x the payload"


@pytest.mark.timeout(120)
def test_a_batch_refused_by_a_limit_is_dropped_at_once() -> None:
    """A refused `save_many` leaves nothing behind while its connection stays idle."""
    state = _state()
    limits = Limits(max_checkpoint_bytes=64 * MiB, max_bytes=64 * MiB)
    # On the socket: a refused batch through the plane is four descriptors, dropped too
    # (tests/test_data_plane.py), but never in the server's heap.
    with shmstore.serve(export=False, limits=limits) as srv, \
            srv.connect(data_plane=False) as store, \
            srv.connect() as observer:  # its calls must not be what frees the saver's
        store.save(Checkpoint(execution_id="warm-up", state=b"x"))
        start = observer.stats().payload_bytes
        before = _rss(srv.pid)
        batch = [Checkpoint(execution_id=f"refused-{i}", state=state) for i in range(4)]
        with pytest.raises(StoreFull):
            store.save_many(batch)
        assert observer.stats().payload_bytes == start  # nothing of the batch was written
        # No further call on this connection: the server must let go of the 160 MiB
        # batch (and its decoded copy) by itself.  Generous slack: RSS is not exact.
        slack = 16 * MiB
        assert wait_until(lambda: _rss(srv.pid) - before <= slack, timeout=30), (
            f"the server still holds {(_rss(srv.pid) - before) / MiB:.0f} MiB "
            "after refusing the batch"
        )


def _serve_after_allocating(size: int, out: multiprocessing.connection.Connection) -> None:
    """Touch ``size`` bytes, then start a server and report its peak RSS (spawn child)."""
    ballast = bytearray(size)
    for i in range(0, size, 4096):  # touch every page: they count in this process's RSS
        ballast[i] = 1
    try:
        with shmstore.serve(export=False) as srv, srv.connect() as store:
            out.send({"peak": store.stats().server_peak_rss, "ballast": len(ballast)})
    except BaseException as exc:
        out.send({"error": repr(exc)})
        raise


@pytest.mark.timeout(120)
def test_server_peak_rss_is_the_servers_own() -> None:
    """A server started by a 300 MiB process does not report that process's peak."""
    ballast = 300 * MiB
    reader, writer = SPAWN.Pipe(duplex=False)
    child = SPAWN.Process(target=_serve_after_allocating, args=(ballast, writer))
    with reaped(child):
        writer.close()
        assert reader.poll(90), "the child did not report"
        report: dict[str, Any] = reader.recv()
    reader.close()
    assert "error" not in report, report["error"] if "error" in report else ""
    assert child.exitcode == 0
    assert report["ballast"] == ballast
    assert report["peak"] < 100 * MiB, f"peak {report['peak'] / MiB:.0f} MiB"


@pytest.mark.timeout(60)
def test_the_sampler_logs_a_failing_read_once_and_resumes(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of descriptors (EMFILE), the sampler warns once, not every sample, and recovers."""
    mon = MemoryMonitor(lambda: (0, 0), interval=0.005)
    real = mon._process.memory_info
    state = {"failing": False, "calls": 0}

    def memory_info() -> Any:
        state["calls"] += 1
        if state["failing"]:
            raise OSError(errno.EMFILE, "Too many open files")
        return real()

    monkeypatch.setattr(mon._process, "memory_info", memory_info)
    caplog.set_level(logging.DEBUG, logger="shmstore")
    mon.start()
    try:
        state["failing"] = True
        calls = state["calls"]
        assert wait_until(lambda: state["calls"] >= calls + 30, timeout=30)
        records = [r for r in caplog.records if r.name == "shmstore"]
        assert len(records) == 1, [r.getMessage() for r in records]
        assert records[0].levelno == logging.WARNING
        assert not records[0].exc_info  # one line, not a traceback per sample
        assert "Too many open files" in records[0].getMessage()
        kept = len(mon.history())
        state["failing"] = False
        assert wait_until(lambda: len(mon.history()) >= kept + 3, timeout=30)
        assert mon.history()[-1]["server_rss"] > 0
        # Recovered: a new run of failures is worth one warning again, and one only.
        state["failing"] = True
        calls = state["calls"]
        assert wait_until(lambda: state["calls"] >= calls + 30, timeout=30)
        records = [r for r in caplog.records if r.name == "shmstore"]
        assert [r.levelno for r in records] == [logging.WARNING, logging.WARNING]
    finally:
        mon.stop()
