"""MemoryMonitor: psutil sampling of this process and of registered client processes."""

from __future__ import annotations

import os
import sys
import time

import pytest

from shmstore import ConfigError
from shmstore.core import segment
from shmstore.monitor.sampler import TRIM_STEP, MemoryMonitor

from .helpers import SPAWN, reaped, wait_until


def _hog(ready, go, done) -> None:  # type: ignore[no-untyped-def]
    ready.set()
    go.wait(30)
    blob = bytearray(80 * 1024 * 1024)  # touched pages: RSS really grows
    for i in range(0, len(blob), 4096):
        blob[i] = 1
    done.set()
    time.sleep(30)


def test_a_sample_has_the_process_and_the_store_figures() -> None:
    mon = MemoryMonitor(lambda: (3, 300))
    sample = mon.sample()
    assert sample["server_rss"] > 1_000_000
    assert (sample["checkpoints"], sample["payload_bytes"]) == (3, 300)
    assert mon.peak_rss == sample["server_rss"]
    assert mon.history() == [sample]


def test_history_is_bounded_and_filtered_by_time() -> None:
    mon = MemoryMonitor(lambda: (0, 0), history_size=5)
    for _ in range(12):
        mon.sample()
    history = mon.history()
    assert len(history) == 5
    assert [s["t"] for s in history] == sorted(s["t"] for s in history)
    assert mon.history(since=history[2]["t"]) == history[3:]


def test_the_sampling_thread_samples_every_interval() -> None:
    mon = MemoryMonitor(lambda: (0, 0), interval=0.05)
    mon.start()
    try:
        assert wait_until(lambda: len(mon.history()) >= 4, 5.0)
    finally:
        mon.stop()
    count = len(mon.history())
    time.sleep(0.2)
    assert len(mon.history()) == count  # stopped means stopped


def test_a_client_that_allocates_shows_growing_rss_then_is_marked_dead() -> None:
    ready, go, done = SPAWN.Event(), SPAWN.Event(), SPAWN.Event()
    proc = SPAWN.Process(target=_hog, args=(ready, go, done))
    mon = MemoryMonitor(lambda: (0, 0), client_ttl=60)
    with reaped(proc, timeout=0):
        assert ready.wait(30)
        assert proc.pid is not None
        mon.register(proc.pid, "hog")
        mon.sample()
        before = {c["name"]: c for c in mon.clients()}["hog"]
        go.set()
        assert done.wait(30)
        mon.sample()
        after = {c["name"]: c for c in mon.clients()}["hog"]
        assert after["rss"] - before["rss"] > 60 * 1024 * 1024
        assert after["alive"] and after["pid"] == proc.pid
        proc.kill()
        proc.join(10)
    mon.sample()
    dead = {c["name"]: c for c in mon.clients()}["hog"]
    assert dead["alive"] is False
    assert dead["peak_rss"] >= after["rss"]
    assert mon.history()[-1]["clients"][str(proc.pid)][2] is False


def test_dead_clients_age_out_after_their_ttl() -> None:
    mon = MemoryMonitor(lambda: (0, 0), client_ttl=0.0)
    mon.register(2**22 + 12345, "ghost")  # no such process
    mon.sample()
    assert mon.clients() == []
    mon.register(os.getpid(), "me")
    mon.sample()
    assert [c["name"] for c in mon.clients()] == ["me"]


@pytest.mark.parametrize("kwargs", [{"interval": 0}, {"interval": -1}, {"interval": "x"},
                                    {"history_size": 0}, {"history_size": 1.5}])
def test_bad_options_are_config_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        MemoryMonitor(lambda: (0, 0), **kwargs)  # type: ignore[arg-type]


def test_the_table_gives_back_its_index_after_a_clear() -> None:
    import sys

    from shmstore.backends.table import CheckpointTable
    from shmstore.core.record import Record

    table = CheckpointTable()
    for i in range(20_000):
        table.save(Record(f"id-{i}", "run", "node", 0, 0, None, b"\x80", b"x" * 10))
    full = sys.getsizeof(table._records)
    assert table.clear("run") == 20_000
    assert sys.getsizeof(table._records) < full // 10
    table.save(Record("again", "run", "node", 0, 0, None, b"\x80", b"x"))
    assert table.load("again")[3] == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_a_big_drop_in_payload_trims_the_heap_once() -> None:
    payload = [100 * 2**20]
    mon = MemoryMonitor(lambda: (1, payload[0]), trim=True)
    mon.sample()
    payload[0] -= TRIM_STEP // 2
    mon.sample()
    assert mon.trims == 0  # not worth it yet
    payload[0] -= TRIM_STEP // 2
    mon.sample()
    assert mon.trims == 1
    mon.sample()
    assert mon.trims == 1  # nothing more was freed
    assert MemoryMonitor(lambda: (0, 0)).trims == 0


@pytest.mark.skipif(not segment.available(), reason="memory segments need memfd (Linux)")
def test_payload_freed_from_memory_segments_does_not_trim_the_heap() -> None:
    # A segment's pages go back when its descriptor closes; a trim would find nothing
    # and stall every allocating thread while it holds the allocator's locks.
    held = [segment.write(b"x" * (TRIM_STEP + 4096)) for _ in range(2)]
    base = 2**20  # payload on the heap
    mon = MemoryMonitor(lambda: (2, base + sum(len(s) for s in held)), trim=True)
    mon.sample()
    held.pop().close()
    mon.sample()
    assert mon.trims == 0
    held.pop().close()
    mon.sample()
    assert mon.trims == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="USS is read from smaps")
def test_uss_is_read_within_its_cpu_budget() -> None:
    mon = MemoryMonitor(lambda: (0, 0))
    first, second = mon.sample(), mon.sample()
    assert first["server_uss"] is not None and first["server_uss"] > 0
    assert second["server_uss"] is None  # the next reading waits 200x the last one's cost
    assert second["server_rss"] > 0  # RSS is in every sample
    mon._next_uss = 0.0
    assert mon.sample()["server_uss"] is not None


def test_a_client_has_its_rss_from_the_moment_it_registers() -> None:
    mon = MemoryMonitor(lambda: (0, 0))
    mon.register(os.getpid(), "me")
    (me,) = mon.clients()  # no sample taken yet
    assert me["rss"] > 0 and me["alive"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/statm")
def test_a_clients_rss_is_read_from_statm_as_psutil_reads_it() -> None:
    import psutil

    from shmstore.monitor.sampler import _statm_rss

    mine = psutil.Process().memory_info().rss
    assert abs(_statm_rss(os.getpid()) - mine) < 4 * 2**20
    with pytest.raises(OSError):
        _statm_rss(2**22 + 12345)  # above pid_max: no such process


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="zombies read from /proc")
def test_a_zombie_client_is_not_alive_when_asked() -> None:
    import subprocess

    import psutil

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        assert wait_until(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE,
                          30)
        mon = MemoryMonitor(lambda: (0, 0))
        mon.register(child.pid, "zombie")
        assert [c["state"] for c in mon.clients()] == ["gone"]
    finally:
        child.wait(10)


def test_client_pss_is_read_round_robin_a_slice_per_sample(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import shmstore.monitor.sampler as sampler

    monkeypatch.setattr(sampler, "PSS_BUDGET", 0.0)  # one client per sample, no more
    mon = MemoryMonitor(lambda: (0, 0))
    pids = [os.getpid(), os.getppid()]
    for pid in pids:
        mon.register(pid, f"p{pid}")
    read = []
    monkeypatch.setattr(sampler._Client, "refresh_pss",
                        lambda self: read.append(self.pid))
    for _ in range(4):
        mon.sample()
    assert read == pids * 2  # each in turn, none twice in a row, no burst


def test_a_history_answer_is_bounded_and_pages_from_since(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import shmstore.monitor.sampler as sampler

    monkeypatch.setattr(sampler, "HISTORY_ENTRIES", 10)
    mon = MemoryMonitor(lambda: (0, 0), history_size=50)
    mon.register(os.getpid(), "me")  # each sample: 1 + 1 client = 2 entries
    taken = [mon.sample()["t"] for _ in range(12)]
    newest = mon.history()
    assert [s["t"] for s in newest] == taken[-5:]  # the newest that fit
    pages, since = [], taken[0] - 1
    while page := mon.history(since=since):
        assert len(page) <= 5
        pages.extend(s["t"] for s in page)
        since = page[-1]["t"]
    assert pages == taken  # oldest first, nothing lost, nothing twice


def test_the_recorder_reads_every_page_of_a_bounded_history() -> None:
    from shmstore.monitor.recorder import MemoryRecorder

    class Paged:
        def __init__(self) -> None:
            self.samples = [{"t": float(t), "server_rss": 1, "server_uss": None,
                             "checkpoints": 0, "payload_bytes": 0, "clients": {}}
                            for t in range(1, 26)]

        def memory_history(self, since: float | None = None) -> list[dict[str, object]]:
            after = [s for s in self.samples if since is None or s["t"] > since]
            return after[:4]  # a server's bounded answer: the oldest that fit

    recorder = MemoryRecorder(Paged(), keep=True, backlog=True)
    assert [s.t for s in recorder.poll()] == [float(t) for t in range(1, 26)]
    assert recorder.poll() == []
